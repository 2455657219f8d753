"""WikiText-2 (Merity et al. 2016), read from its token files and tokenised as PyTorch's
word_language_model example does. Never downloaded here: a missing file is a one-line error
naming it and where to get it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lbs_tune.errors import UserError
from lbs_tune.formats import TokenData, corrupt_file, describe

WIKITEXT2_FOLDER = "wikitext-2"
WIKITEXT2_FILES = {
    "train": "wiki.train.tokens",
    "valid": "wiki.valid.tokens",
    "test": "wiki.test.tokens",
}
WIKITEXT2_SOURCE = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip"
EOS, UNK = "<eos>", "<unk>"


def wikitext2_paths(root: Path) -> dict[str, Path]:
    """The three token files under `root`; UserError naming the missing ones and the source."""
    folder = root / WIKITEXT2_FOLDER
    paths = {split: folder / file for split, file in WIKITEXT2_FILES.items()}
    missing = [path.name for path in paths.values() if not path.is_file()]
    if missing:
        raise UserError(
            f"wikitext2: WikiText-2 files missing from {folder}: {', '.join(missing)}; unzip "
            f"{WIKITEXT2_SOURCE} (Merity et al. 2016) into {root}, or set data.dir or "
            f"LBS_DATA_DIR to the folder that holds {WIKITEXT2_FOLDER}"
        )
    return paths


def _wikitext2_corrupt(path: Path, why: str) -> UserError:
    return corrupt_file("wikitext2", path, why, f"unzip it again from {WIKITEXT2_SOURCE}")


def _read_lines(path: Path) -> list[list[str]]:
    """The words of each line of a token file, split on whitespace, as PyTorch's example does."""
    try:
        with path.open(encoding="utf8") as f:
            lines = [line.split() for line in f]
    except UnicodeDecodeError as exc:
        raise _wikitext2_corrupt(path, describe(exc)) from exc
    if not any(lines):
        raise _wikitext2_corrupt(path, "it holds no words")
    return lines


def tokenize(
    train: list[list[str]], others: Sequence[list[list[str]]]
) -> tuple[tuple[str, ...], np.ndarray, list[np.ndarray]]:
    """Token ids of lines of words, with `<eos>` after each line (PyTorch's word_language_model).

    The vocabulary is the training split's words in order of first appearance, so the ids are
    the example's; `<unk>` is appended if the training split lacks it. A word of `others` (valid,
    test) that is not in the vocabulary becomes `<unk>`. Returns the vocabulary, the training
    ids and the ids of each of `others`, int64.
    """
    index: dict[str, int] = {}
    for words in train:
        for word in (*words, EOS):
            index.setdefault(word, len(index))
    index.setdefault(UNK, len(index))
    unk = index[UNK]

    def ids(lines: list[list[str]]) -> np.ndarray:
        return np.fromiter(
            (index.get(word, unk) for words in lines for word in (*words, EOS)), dtype=np.int64
        )

    return tuple(index), ids(train), [ids(lines) for lines in others]


def read_wikitext2(root: Path) -> TokenData:
    """Read WikiText-2's `wikitext-2/wiki.{train,valid,test}.tokens` under the data folder `root`.

    Returns each split as int64 token ids with `<eos>` ending every line, over the training
    split's vocabulary (33,278 words for the real files; see `tokenize`). UserError on one line
    naming the file when one is missing, not UTF-8 or empty.
    """
    paths = wikitext2_paths(Path(root))
    lines = {split: _read_lines(path) for split, path in paths.items()}
    vocab, train, (valid, test) = tokenize(lines["train"], [lines["valid"], lines["test"]])
    return TokenData(train, valid, test, vocab)
