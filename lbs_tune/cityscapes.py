"""Cityscapes (Cordts et al. 2016), fine annotations, read in torchvision's Cityscapes layout with
Pillow, as torchvision's own Cityscapes class reads it (Pillow is a requirement of torchvision,
whose `torchvision.io` PNG decoding is deprecated since 0.29), resized once to the trial's
`data.image_size` and cached beside the files (`load_cityscapes`). Never downloaded here (it
needs a registration): a missing file is a one-line error naming it and where to get it.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from lbs_tune.config import DataConfig, data_dir
from lbs_tune.errors import UserError
from lbs_tune.formats import RawData, cached_arrays, corrupt_file, describe
from lbs_tune.segmentation import IGNORE_INDEX

CITYSCAPES_FOLDER = "cityscapes"
CITYSCAPES_SPLITS = ("train", "val")  # the test split's labels are withheld
CITYSCAPES_CLASSES = 19
CITYSCAPES_SOURCE = (
    "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
    "https://www.cityscapes-dataset.com/downloads/ (free registration)"
)
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"

# labelId -> trainId for the 19 evaluated classes, from cityscapesscripts' labels.py (the table
# that torchvision.datasets.Cityscapes.classes also holds); every other id is ignored.
_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11}
_TRAIN_IDS |= {25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
LABEL_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
LABEL_TO_TRAIN_ID[list(_TRAIN_IDS)] = list(_TRAIN_IDS.values())


def _cityscapes_missing(root: Path, what: str) -> UserError:
    return UserError(
        f"cityscapes: {what}; unzip {CITYSCAPES_SOURCE} into {root / CITYSCAPES_FOLDER}, "
        f"or set data.dir or LBS_DATA_DIR to the folder that holds {CITYSCAPES_FOLDER}"
    )


def _cityscapes_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, labelIds) paths of `split` in torchvision's layout, sorted; UserError naming
    the folder when it holds no images, or the first label file missing."""
    folder = root / CITYSCAPES_FOLDER
    images = sorted((folder / "leftImg8bit" / split).glob(f"*/*{_IMAGE_SUFFIX}"))
    if not images:
        where = folder / "leftImg8bit" / split
        raise _cityscapes_missing(root, f"no <city>/*{_IMAGE_SUFFIX} images in {where}")
    pairs = []
    for image in images:
        stem = image.name.removesuffix(_IMAGE_SUFFIX)
        label = folder / "gtFine" / split / image.parent.name / f"{stem}{_LABEL_SUFFIX}"
        pairs.append((image, label))
    missing = [label for _, label in pairs if not label.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise _cityscapes_missing(root, f"label file {missing[0]}{more} missing")
    return pairs


def cityscapes_files(root: Path) -> list[Path]:
    """Every image and label file of Cityscapes' train and val splits under `root`, sorted by
    split then name; UserError naming what is missing, as `read_cityscapes` would."""
    return [
        path
        for split in CITYSCAPES_SPLITS
        for pair in _cityscapes_pairs(root, split)
        for path in pair
    ]


def _cityscapes_corrupt(path: Path, why: str) -> UserError:
    return corrupt_file("cityscapes", path, why, f"unzip it again from {CITYSCAPES_SOURCE}")


def _read_png(path: Path) -> Image.Image:
    """The PNG file `path`, decoded; UserError naming it if Pillow cannot read it."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    # Pillow raises OSError (UnidentifiedImageError, truncated data), SyntaxError or ValueError
    # on a damaged file.
    except (OSError, SyntaxError, ValueError) as exc:
        raise _cityscapes_corrupt(path, f"not a PNG Pillow can decode: {describe(exc)}") from exc


def _read_cityscapes_pair(
    image_path: Path, label_path: Path, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """One image (3, H, W) and its train-id mask (H, W), uint8, resized to `size` (H, W)."""
    image = _read_png(image_path).convert("RGB")
    label = _read_png(label_path)
    if label.mode != "L":
        why = f"mode {label.mode}, expected L: one 8-bit channel of label ids"
        raise _cityscapes_corrupt(label_path, why)
    if label.size != image.size:
        why = f"labels {label.height}x{label.width} for an image of {image.height}x{image.width}"
        raise _cityscapes_corrupt(label_path, why)
    height, width = size
    if image.size != (width, height):
        # Pillow's bilinear filter widens with the scale (antialiasing) when shrinking;
        # nearest (pixel centres) never blends label ids into another class.
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        label = label.resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(image).transpose(2, 0, 1), LABEL_TO_TRAIN_ID[np.asarray(label)]


def _read_cityscapes_split(
    root: Path, split: str, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    pairs = _cityscapes_pairs(root, split)
    images = np.empty((len(pairs), 3, *size), dtype=np.uint8)
    masks = np.empty((len(pairs), *size), dtype=np.uint8)

    def read(index: int) -> None:
        images[index], masks[index] = _read_cityscapes_pair(*pairs[index], size)

    # Pillow decodes and resizes without the GIL: threads cut the minutes a split takes (about
    # 0.1 s per full-size pair on one core) by the cores there are.
    pool = ThreadPoolExecutor(min(8, len(os.sched_getaffinity(0))))
    try:
        for _ in pool.map(read, range(len(pairs))):
            pass  # map re-raises a worker's error here, in file order
    finally:
        # After an error, drop the files not yet started rather than decode them all first.
        pool.shutdown(cancel_futures=True)
    return images, masks


def read_cityscapes(root: Path, size: tuple[int, int]) -> RawData:
    """Read Cityscapes' fine annotations under `root`/cityscapes in torchvision's layout:
    `leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png` and
    `gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png`.

    Every image is resized to `size` (H, W): Pillow's bilinear (antialiased) for the images,
    nearest for the label maps, whose label ids become the 19 training ids (255: ignore). Returns
    RawData with uint8 images (N, 3, H, W) and uint8 masks (N, H, W) in file-name order; the
    training split is `train` (2,975 images in the real files) and the test split is the
    official `val` (500), since the official test split's labels are withheld. UserError on one
    line naming the folder or file when one is missing or cannot be decoded.
    """
    root = Path(root)
    size = (int(size[0]), int(size[1]))
    train_x, train_y = _read_cityscapes_split(root, "train", size)
    val_x, val_y = _read_cityscapes_split(root, "val", size)
    return RawData(train_x, train_y, val_x, val_y, CITYSCAPES_CLASSES)


def load_cityscapes(data: DataConfig) -> RawData:
    """Cityscapes resized to data.image_size, cached as .npz beside the files: resizing every
    PNG takes minutes, reading the cache seconds. The cache's name holds a digest of the files'
    names, sizes and times, so other files never read a stale cache."""
    root = data_dir(data)
    height, width = data.image_size
    digest = hashlib.sha256()
    for path in cityscapes_files(root):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    name = f"lbs_resized_{height}x{width}_{digest.hexdigest()[:16]}.npz"

    def resize() -> dict[str, np.ndarray]:
        raw = read_cityscapes(root, data.image_size)
        return {"x": raw.train_x, "y": raw.train_y, "x_test": raw.test_x, "y_test": raw.test_y}

    arrays = cached_arrays(root / CITYSCAPES_FOLDER / name, resize, "Cityscapes")
    return RawData(arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"], CITYSCAPES_CLASSES)
