"""Datasets' raw arrays and torchvision's image formats: what every reader returns (`RawData`,
`TokenData`), the one-line errors of a missing or damaged file, the .npz cache of arrays made
once (`cached_arrays`), and the readers of torchvision's image datasets (CIFAR-10/100, MNIST,
Fashion-MNIST, SVHN). WikiText-2 and Cityscapes have their own modules (`lbs_tune.wikitext`,
`lbs_tune.cityscapes`); which dataset reads which files is `lbs_tune.datasets`' registry.

The files are read exactly where and as torchvision keeps them under its `root`. MNIST-family IDX
files go through torchvision's own readers. CIFAR pickles and SVHN .mat files are read by small
readers that follow torchvision's code, because torchvision's CIFAR and SVHN classes
check the MD5 of the official files when constructed; those checks belong to the download step,
which is torchvision's own and runs only when files are missing.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from lbs_tune.errors import UserError

# IDX magic numbers of MNIST-family files: 0x08 (uint8) then the number of dimensions.
_IDX_IMAGES = 0x0803
_IDX_LABELS = 0x0801


@dataclass(frozen=True, eq=False)
class RawData:
    """A dataset as arrays: uint8 images (N, C, H, W) or float vectors, and int64 labels (N,),
    or for segmentation uint8 masks (N, H, W) of class ids with 255 for pixels to ignore.

    `test_x` and `test_y` are None for a dataset without a test split (synthetic).
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    num_classes: int


@dataclass(frozen=True, eq=False)
class TokenData:
    """A tokenised corpus: int64 token ids (T,) per split, and the words of the ids in order."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocab: tuple[str, ...]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def describe(exc: BaseException) -> str:
    """Name an exception on one line, since UserError messages are one line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def corrupt_file(name: str, path: Path, why: str, fix: str) -> UserError:
    """The one-line error of a damaged file `path` of dataset `name`: why, and the fix."""
    return UserError(f"{name}: {path} is corrupted ({why}); delete it and {fix}")


def cached_arrays(path: Path, make: Callable[[], dict[str, np.ndarray]], what: str) -> dict:
    """The arrays of the .npz cache `path`, made by `make` and written there when missing.

    A folder that cannot be written only costs making the arrays again next time."""
    if not path.exists():
        arrays = make()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Concurrent trials may make it at once: write aside, then rename atomically.
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
                np.savez(f, **arrays)
            os.replace(f.name, path)
        except OSError as exc:
            print(f"lbs-tune: warning: cannot cache {what} as {path} ({exc})", file=sys.stderr)
        return arrays
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: corrupted {what} cache ({exc}); delete it to remake it") from None


_Reader = Callable[["_Format", Path, Sequence[str]], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class _Format:
    """Where torchvision keeps one dataset's files and how to read and download them."""

    name: str
    title: str
    folder: str  # relative to root, as torchvision lays it out; "" for root itself
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta: tuple[str, str] | None  # (file, key) of a pickled list of class names
    num_classes: int
    shape: tuple[int, int, int]
    read: _Reader
    torchvision_class: str
    # Constructor keyword arguments of each torchvision call that downloads, with the files it
    # fetches, so a call runs only when one of its files is missing.
    downloads: tuple[tuple[tuple[str, ...], dict[str, Any]], ...]

    @property
    def files(self) -> tuple[str, ...]:
        meta = (self.meta[0],) if self.meta else ()
        return self.train_files + self.test_files + meta


def _corrupt(fmt: _Format, path: Path, why: str) -> UserError:
    fix = "download it again (set data.download: true, or copy torchvision's file there)"
    return corrupt_file(fmt.name, path, why, fix)


def _check_split(fmt: _Format, x_path: Path, x: np.ndarray, y_path: Path, y: np.ndarray) -> None:
    """Raise UserError naming the file at fault unless x and y are a well-formed split."""
    if x.dtype != np.uint8 or x.shape[1:] != fmt.shape:
        why = f"images are {x.dtype} {x.shape[1:]}, expected uint8 {fmt.shape}"
        raise _corrupt(fmt, x_path, why)
    if len(y) != len(x):
        raise _corrupt(fmt, y_path, f"{len(y)} labels for {len(x)} images")
    if len(y) and (y.min() < 0 or y.max() >= fmt.num_classes):
        why = f"labels span {y.min()}..{y.max()}, expected 0..{fmt.num_classes - 1}"
        raise _corrupt(fmt, y_path, why)


# What a CIFAR batch may hold besides dicts, lists, strings and bytes: numpy arrays. Anything
# else in a pickle (a function to call, an object to build) is refused before it is made, so a
# file that is not a CIFAR batch cannot run code when it is read.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles of Python 3 rebuild bytes
}
# torchvision's MD5 of the archives it downloads (torchvision.datasets.CIFAR10/100.tgz_md5).
ARCHIVE_MD5 = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(
                f"holds {module}.{name}, which no CIFAR batch holds (refused unread)"
            )
        return super().find_class(module, name)


def check_archive(root: Path) -> None:
    """UserError if a CIFAR archive that torchvision downloaded into `root` is there and its MD5
    is not torchvision's (a damaged or replaced download)."""
    for name, md5 in ARCHIVE_MD5.items():
        archive = root / name
        if not archive.exists():
            continue
        digest = hashlib.md5(usedforsecurity=False)
        with archive.open("rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
        if digest.hexdigest() != md5:
            raise UserError(
                f"{archive}: MD5 {digest.hexdigest()} is not torchvision's {md5}: a damaged or "
                "replaced download; delete it and the folder it was unpacked into, and download "
                "again"
            )


def _unpickle(fmt: _Format, path: Path, keys: Sequence[str]) -> dict[str, Any]:
    """Load one CIFAR pickle as torchvision does, building nothing but dicts, lists, strings and
    numpy arrays, and check it is a dict holding `keys`."""
    check_archive(path.parent.parent)
    try:
        with path.open("rb") as f:
            # latin1, as torchvision: the files were pickled by Python 2 with byte-string keys.
            entry = _CifarUnpickler(f, encoding="latin1").load()
    # Unpickling a damaged file can raise nearly any exception type.
    except Exception as exc:
        raise _corrupt(fmt, path, describe(exc)) from exc
    if not isinstance(entry, dict) or not all(key in entry for key in keys):
        raise _corrupt(fmt, path, f"not a pickled dict with keys {', '.join(keys)}")
    return entry


def _read_cifar(
    fmt: _Format, folder: Path, files: Sequence[str], *, label_key: str
) -> tuple[np.ndarray, np.ndarray]:
    size = int(np.prod(fmt.shape))
    xs, ys = [], []
    for file in files:
        path = folder / file
        entry = _unpickle(fmt, path, ("data", label_key))
        data = entry["data"]
        if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != size:
            raise _corrupt(fmt, path, f"'data' is not an array of shape (N, {size})")
        # Each row is the R plane, then G, then B, each row-major: already (C, H, W).
        x = data.reshape(-1, *fmt.shape)
        y = np.asarray(entry[label_key], dtype=np.int64)
        _check_split(fmt, path, x, path, y)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _read_idx(fmt: _Format, path: Path, magic: int) -> np.ndarray:
    """Read one MNIST-family IDX file with torchvision's reader after checking its magic."""
    with path.open("rb") as f:
        found = int.from_bytes(f.read(4), "big")
    if found != magic:
        raise _corrupt(fmt, path, f"IDX magic number is {found}, expected {magic}")
    from torchvision.datasets import mnist as tv_mnist  # here: torchvision takes seconds

    read = tv_mnist.read_image_file if magic == _IDX_IMAGES else tv_mnist.read_label_file
    try:
        return read(str(path)).numpy()
    # torchvision's reader asserts on the header and fails to reshape a short or long body.
    except (AssertionError, RuntimeError, TypeError, ValueError) as exc:
        raise _corrupt(fmt, path, describe(exc)) from exc


def _read_mnist(fmt: _Format, folder: Path, files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (folder / file for file in files)
    x = _read_idx(fmt, images, _IDX_IMAGES)[:, None]  # (N, H, W) to (N, 1, H, W): one channel
    y = _read_idx(fmt, labels, _IDX_LABELS)
    _check_split(fmt, images, x, labels, y)
    return x, y


def _read_svhn(fmt: _Format, folder: Path, files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    (path,) = (folder / file for file in files)
    try:
        mat = scipy.io.loadmat(path)
    # scipy raises many exception types on a damaged or non-MATLAB file.
    except Exception as exc:
        raise _corrupt(fmt, path, describe(exc)) from exc
    if not {"X", "y"} <= mat.keys() or mat["X"].ndim != 4:
        raise _corrupt(fmt, path, "no 'X' array of shape (32, 32, 3, N) and 'y' labels")
    # X is (H, W, C, N); torchvision takes the same (3, 2, 0, 1) transpose to (N, C, H, W).
    x = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)))
    y = mat["y"].astype(np.int64).reshape(-1)
    y[y == 10] = 0  # SVHN labels the digit 0 as 10
    _check_split(fmt, path, x, path, y)
    return x, y


def _cifar(
    name: str,
    title: str,
    folder: str,
    train: tuple[str, ...],
    test: tuple[str, ...],
    meta: tuple[str, str],
    label_key: str,
    num_classes: int,
    torchvision_class: str,
) -> _Format:
    return _Format(
        name=name,
        title=title,
        folder=folder,
        train_files=train,
        test_files=test,
        meta=meta,
        num_classes=num_classes,
        shape=(3, 32, 32),
        read=partial(_read_cifar, label_key=label_key),
        torchvision_class=torchvision_class,
        # One archive holds every file, so one torchvision call fetches both splits.
        downloads=((train + test + (meta[0],), {"train": True}),),
    )


def _mnist(name: str, title: str, torchvision_class: str) -> _Format:
    train = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    test = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    return _Format(
        name=name,
        title=title,
        folder=f"{torchvision_class}/raw",
        train_files=train,
        test_files=test,
        meta=None,
        num_classes=10,
        shape=(1, 28, 28),
        read=_read_mnist,
        torchvision_class=torchvision_class,
        # torchvision's MNIST download fetches all four files whichever split it is built for.
        downloads=((train + test, {"train": True}),),
    )


_FORMATS: dict[str, _Format] = {
    "cifar10": _cifar(
        name="cifar10",
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta=("batches.meta", "label_names"),
        label_key="labels",
        num_classes=10,
        torchvision_class="CIFAR10",
    ),
    "cifar100": _cifar(
        name="cifar100",
        title="CIFAR-100",
        folder="cifar-100-python",
        train=("train",),
        test=("test",),
        meta=("meta", "fine_label_names"),
        label_key="fine_labels",
        num_classes=100,
        torchvision_class="CIFAR100",
    ),
    "mnist": _mnist("mnist", "MNIST", "MNIST"),
    "fashion_mnist": _mnist("fashion_mnist", "Fashion-MNIST", "FashionMNIST"),
    "svhn": _Format(
        name="svhn",
        title="SVHN",
        folder="",
        train_files=("train_32x32.mat",),
        test_files=("test_32x32.mat",),
        meta=None,
        num_classes=10,
        shape=(3, 32, 32),
        read=_read_svhn,
        torchvision_class="SVHN",
        # One file per split; downloading only the missing one leaves the other untouched.
        downloads=(
            (("train_32x32.mat",), {"split": "train"}),
            (("test_32x32.mat",), {"split": "test"}),
        ),
    ),
}


# The image datasets torchvision reads and downloads (also baked into the Docker image).
DATASET_NAMES = tuple(_FORMATS)


def _missing(fmt: _Format, folder: Path) -> list[str]:
    return [file for file in fmt.files if not (folder / file).is_file()]


def _missing_error(fmt: _Format, folder: Path, missing: list[str]) -> UserError:
    # torchvision's download keeps MNIST's .gz archives next to the files it extracts from them.
    listed = ", ".join(
        f"{file} (only its .gz is there: gunzip it)" if (folder / f"{file}.gz").is_file() else file
        for file in missing
    )
    holder = Path(fmt.folder).parts[0] if fmt.folder else "them"
    return UserError(
        f"{fmt.name}: {fmt.title} files missing from {folder}: {listed}; put torchvision's "
        f"{fmt.title} files there, set data.dir or LBS_DATA_DIR to the folder that holds "
        f"{holder}, or set data.download: true on a machine with a network"
    )


def _download(fmt: _Format, root: Path, missing: list[str]) -> None:
    """Fetch the missing files with torchvision's own download, which verifies checksums."""
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, fmt.torchvision_class)
    for files, kwargs in fmt.downloads:
        if set(files) & set(missing):
            try:
                dataset_class(str(root), download=True, **kwargs)
            except (OSError, RuntimeError) as exc:
                raise UserError(
                    f"{fmt.name}: downloading {fmt.title} into {root} failed ({describe(exc)}); "
                    f"check the network, or put torchvision's {fmt.title} files there yourself"
                ) from exc


def _check_meta(fmt: _Format, folder: Path) -> None:
    """Check the class-name file that torchvision's CIFAR classes also require."""
    if fmt.meta is None:
        return
    file, key = fmt.meta
    names = _unpickle(fmt, folder / file, (key,))[key]
    if not isinstance(names, list) or len(names) != fmt.num_classes:
        why = f"'{key}' is not a list of {fmt.num_classes} class names"
        raise _corrupt(fmt, folder / file, why)


def check_files(name: str, root: Path) -> None:
    """UserError, as `read_torchvision` would raise it, if files of dataset `name` (one of
    DATASET_NAMES) are missing under the data folder `root`."""
    fmt = _FORMATS[name]
    folder = Path(root) / fmt.folder
    missing = _missing(fmt, folder)
    if missing:
        raise _missing_error(fmt, folder, missing)


def read_torchvision(name: str, root: Path, download: bool) -> RawData:
    """Read dataset `name` (one of DATASET_NAMES) from torchvision's files under `root`.

    With `download`, torchvision's own download fetches (and checksums) the files first, but only
    when some are missing; nothing is ever deleted. Returns the train and test splits as arrays:
    uint8 images (N, C, H, W), channels first for every dataset, and int64 labels.
    Raises UserError, on one line naming the folder or file and the fix, when files are missing
    (and `download` is off) or a file is corrupted.
    """
    if name not in _FORMATS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    fmt = _FORMATS[name]
    root = Path(root)
    folder = root / fmt.folder
    missing = _missing(fmt, folder)
    if missing and download:
        _download(fmt, root, missing)
        missing = _missing(fmt, folder)
    if missing:
        raise _missing_error(fmt, folder, missing)
    train_x, train_y = fmt.read(fmt, folder, fmt.train_files)
    test_x, test_y = fmt.read(fmt, folder, fmt.test_files)
    _check_meta(fmt, folder)
    return RawData(train_x, train_y, test_x, test_y, fmt.num_classes)
