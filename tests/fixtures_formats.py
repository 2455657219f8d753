"""Write tiny datasets in their real on-disk formats, for tests that read them back.

Each `write_*` of torchvision's datasets takes the data folder (torchvision's `root`) and the
split sizes, writes the files where torchvision keeps them, and returns the `RawData` that
`read_torchvision` should give back. Pixels follow `pattern_images` and labels `pattern_labels`,
so tests can check exact values. `write_wikitext2` writes a tiny corpus in the style of the
WikiText-2 token files; `write_cityscapes` writes PNGs in torchvision's Cityscapes layout.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.io
from PIL import Image

from lbs_tune.formats import RawData


def pattern_images(start: int, n: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Return uint8 images (n, C, H, W) whose pixel [i, c, h, w] is a known function of its place.

    Image i is image number `start + i`; the value is (37 i + 101 c + 7 h + 3 w) mod 256, so any
    mix-up of images, channels, rows or columns changes it.
    """
    i, c, h, w = np.indices((n, *shape))
    return ((37 * (start + i) + 101 * c + 7 * h + 3 * w) % 256).astype(np.uint8)


def pattern_labels(start: int, n: int, num_classes: int) -> np.ndarray:
    """Return int64 labels 7 (start + i) mod num_classes, which cover every class given enough."""
    return (7 * (start + np.arange(n)) % num_classes).astype(np.int64)


def _expected(n_train: int, n_test: int, shape: tuple[int, int, int], classes: int) -> RawData:
    return RawData(
        train_x=pattern_images(0, n_train, shape),
        train_y=pattern_labels(0, n_train, classes),
        test_x=pattern_images(n_train, n_test, shape),
        test_y=pattern_labels(n_train, n_test, classes),
        num_classes=classes,
    )


class _Python2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2 `str` (opcodes U and T), as the CIFAR files were written.

    Loading such a file needs torchvision's encoding="latin1": keys then come back as str and the
    array bytes as latin1 text that numpy turns back into bytes.
    """

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def _write_python2_pickle(path: Path, obj: Any) -> None:
    with path.open("wb") as f:
        _Python2Pickler(f, protocol=2).dump(obj)
    # The real files name numpy's module as it was called then; numpy 2 still loads that name.
    path.write_bytes(path.read_bytes().replace(b"cnumpy._core.", b"cnumpy.core."))


def _cifar_batch(x: np.ndarray, y: np.ndarray, label_key: bytes, batch: bytes) -> dict:
    """A CIFAR batch dict with Python 2 str keys; each row is the R, G then B plane."""
    return {
        b"batch_label": batch,
        label_key: [int(label) for label in y],
        b"data": x.reshape(len(x), -1),
        b"filenames": [b"img_%d.png" % i for i in range(len(x))],
    }


def write_cifar10(root: Path, n_train: int = 20, n_test: int = 10) -> RawData:
    """Write CIFAR-10 as root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}."""
    expected = _expected(n_train, n_test, (3, 32, 32), 10)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    parts = zip(
        np.array_split(expected.train_x, 5), np.array_split(expected.train_y, 5), strict=True
    )
    for i, (x, y) in enumerate(parts, start=1):
        batch = _cifar_batch(x, y, b"labels", b"training batch %d of 5" % i)
        _write_python2_pickle(folder / f"data_batch_{i}", batch)
    test = _cifar_batch(expected.test_x, expected.test_y, b"labels", b"testing batch 1 of 1")
    _write_python2_pickle(folder / "test_batch", test)
    meta = {
        b"label_names": [b"class_%d" % k for k in range(10)],
        b"num_cases_per_batch": 10000,
        b"num_vis": 3072,
    }
    _write_python2_pickle(folder / "batches.meta", meta)
    return expected


def write_cifar100(root: Path, n_train: int = 20, n_test: int = 10) -> RawData:
    """Write CIFAR-100 as root/cifar-100-python/{train,test,meta}, fine labels 0..99."""
    expected = _expected(n_train, n_test, (3, 32, 32), 100)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for file, x, y in (
        ("train", expected.train_x, expected.train_y),
        ("test", expected.test_x, expected.test_y),
    ):
        batch = _cifar_batch(x, y, b"fine_labels", file.encode())
        batch[b"coarse_labels"] = [int(label) // 5 for label in y]
        _write_python2_pickle(folder / file, batch)
    meta = {
        b"fine_label_names": [b"fine_%d" % k for k in range(100)],
        b"coarse_label_names": [b"coarse_%d" % k for k in range(20)],
    }
    _write_python2_pickle(folder / "meta", meta)
    return expected


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file: magic 0x0000_08_<ndim>, big-endian sizes, the bytes."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 20, n_test: int = 10, folder: str = "MNIST") -> RawData:
    """Write MNIST as root/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte."""
    expected = _expected(n_train, n_test, (1, 28, 28), 10)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, x, y in (
        ("train", expected.train_x, expected.train_y),
        ("t10k", expected.test_x, expected.test_y),
    ):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x[:, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y.astype(np.uint8))
    return expected


def write_fashion_mnist(root: Path, n_train: int = 20, n_test: int = 10) -> RawData:
    """Write Fashion-MNIST as root/FashionMNIST/raw/..., the same files as MNIST."""
    return write_mnist(root, n_train, n_test, folder="FashionMNIST")


def write_svhn(root: Path, n_train: int = 20, n_test: int = 10) -> RawData:
    """Write SVHN as root/{train,test}_32x32.mat: 'X' (32, 32, 3, N) uint8, 'y' (N, 1), 0 as 10."""
    expected = _expected(n_train, n_test, (3, 32, 32), 10)
    root.mkdir(parents=True, exist_ok=True)
    for split, x, y in (
        ("train", expected.train_x, expected.train_y),
        ("test", expected.test_x, expected.test_y),
    ):
        labels = np.where(y == 0, 10, y).astype(np.uint8)[:, None]
        mat = {"X": np.transpose(x, (2, 3, 1, 0)), "y": labels}
        scipy.io.savemat(root / f"{split}_32x32.mat", mat)
    return expected


WRITERS = {
    "cifar10": write_cifar10,
    "cifar100": write_cifar100,
    "mnist": write_mnist,
    "fashion_mnist": write_fashion_mnist,
    "svhn": write_svhn,
}


# Lines as the WikiText-2 token files have them: a space before each line, headings between
# "=", blank lines of one space, "@-@" for hyphens, and "<unk>" for rare words.
WIKITEXT2_TRAIN = (
    " ",
    " = Valkyria Chronicles = ",
    " ",
    " The game 's <unk> @-@ system is new . ",
    " The game is new . ",
)
WIKITEXT2_VALID = (" ", " = Chronicles = ", " The system is old . ")
WIKITEXT2_TEST = (" The <unk> game ",)


def write_wikitext2(
    root: Path,
    train: tuple[str, ...] = WIKITEXT2_TRAIN,
    valid: tuple[str, ...] = WIKITEXT2_VALID,
    test: tuple[str, ...] = WIKITEXT2_TEST,
) -> Path:
    """Write root/wikitext-2/wiki.{train,valid,test}.tokens, UTF-8, one line of `train` etc.
    per line, each ended by a newline as in the real files; returns the folder."""
    folder = root / "wikitext-2"
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", train), ("valid", valid), ("test", test)):
        text = "".join(f"{line}\n" for line in lines)
        (folder / f"wiki.{split}.tokens").write_text(text, encoding="utf8")
    return folder


CITYSCAPES_CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",)}


def save_png(path: Path, array: np.ndarray) -> None:
    """Write uint8 `array` as a PNG: (H, W) as one 8-bit channel (mode L), (C, H, W) as RGB."""
    pixels = array if array.ndim == 2 else array.transpose(1, 2, 0)
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, format="PNG")


def pattern_label_ids(start: int, shape: tuple[int, int]) -> np.ndarray:
    """uint8 Cityscapes label ids (H, W): every id 0..33 and 255, placed by image and pixel."""
    ids = np.array([*range(34), 255], dtype=np.uint8)
    h, w = np.indices(shape)
    return ids[(5 * start + 3 * h + w) % len(ids)]


def cityscapes_name(split: str, index: int) -> tuple[str, str]:
    """(city, file stem) of image `index` of `split`: cities in turn, as <city>_xxxxxx_yyyyyy."""
    cities = CITYSCAPES_CITIES[split]
    city = cities[index % len(cities)]
    return city, f"{city}_{index:06d}_000019"


def write_cityscapes(
    root: Path, n_train: int = 3, n_val: int = 2, shape: tuple[int, int] = (8, 12)
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Write root/cityscapes/leftImg8bit/{split}/<city>/<stem>_leftImg8bit.png (RGB) and
    gtFine/{split}/<city>/<stem>_gtFine_labelIds.png (one channel) for train and val.

    Image i of a split (numbered on from the train images for val) has pixels
    pattern_images(i) and label ids pattern_label_ids(i). Returns the images (N, 3, H, W) and
    the label ids (N, H, W) written per split, in the file-name order a reader sorts them in.
    """
    images, labels = {}, {}
    start = 0
    for split, n in (("train", n_train), ("val", n_val)):
        named = sorted((cityscapes_name(split, i), i) for i in range(n))
        x = pattern_images(start, n, (3, *shape))
        y = np.stack([pattern_label_ids(start + i, shape) for i in range(n)])
        for (city, stem), i in named:
            image_dir = root / "cityscapes" / "leftImg8bit" / split / city
            label_dir = root / "cityscapes" / "gtFine" / split / city
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            save_png(image_dir / f"{stem}_leftImg8bit.png", x[i])
            save_png(label_dir / f"{stem}_gtFine_labelIds.png", y[i])
        order = [i for _, i in named]
        images[split], labels[split] = x[order], y[order]
        start += n
    return images, labels
