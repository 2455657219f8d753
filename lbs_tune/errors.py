"""The one exception type for user mistakes, and the did-you-mean of their messages."""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Iterable


class UserError(Exception):
    """A mistake in the user's input (a sweep file, a flag, a data folder, a checkpoint).

    The message is one line that names the file, the key and the fix. Bugs raise other types.
    """

    exit_code = 2


def did_you_mean(value: object, candidates: Iterable[str]) -> str:
    """ " (did you mean 'x'?)" for the closest candidate, else "; known: a, b, c".

    Among the close matches (difflib's, in order of similarity) the longest common prefix wins,
    so 'resnet21' suggests 'resnet20', not 'resnet32'.
    """
    value, candidates = str(value), [str(c) for c in candidates]
    close = difflib.get_close_matches(value, candidates, n=5, cutoff=0.6)
    if close:
        best = max(close, key=lambda c: _common_prefix(value, c))
        return f" (did you mean '{best}'?)"
    return f"; known: {cut(', '.join(sorted(candidates)), 80)}"


def _common_prefix(a: str, b: str) -> int:
    same = itertools.takewhile(lambda pair: pair[0] == pair[1], zip(a, b, strict=False))
    return sum(1 for _ in same)


# C0 and C1 control characters (ESC, BEL, CSI ...) except tab and newline: terminal escape
# sequences in a file name, a config value or an error file could set the title or clear it.
# And Unicode's bidirectional controls (marks, embeddings, overrides, isolates): they make a
# terminal show a line in another order than its characters ("Trojan Source", CVE-2021-42574).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_ESCAPE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|.)")


def printable(text: str) -> str:
    """`text` without terminal escape sequences, control characters (tabs and newlines stay) and
    bidirectional controls, for echoing what came from files or configs."""
    return _CONTROL.sub("", _ESCAPE.sub("", text))


def short(value: object, limit: int = 80) -> str:
    """repr(value), printable and cut to `limit` characters ('...' marks a cut), for values
    echoed in one-line error messages."""
    return cut(repr(value), limit)


def cut(text: str, limit: int = 80) -> str:
    """`text`, printable and cut to `limit` characters ('...' marks a cut)."""
    text = printable(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def out_of_memory(batch_size: int, micro_batch: int) -> str:
    """The message of a trial that ran out of GPU memory: the batch and the fix."""
    return (
        f"out of GPU memory at batch_size {batch_size} ({micro_batch} examples through the "
        "network at once); set max_device_batch: auto (the largest micro-batch that fits, "
        "with gradient accumulation) or a smaller divisor of batch_size, or use a smaller model"
    )
