"""Dataset zoo: every split is one tensor on the training device, batches are made by tensor ops.

No DataLoader and no worker processes: the uint8 images (or float vectors, or token ids) of a
split live on the device, a batch is an index into them, and augmentation (random crop with
padding, horizontal flip; the same crop and flip for an image and its segmentation mask) runs as
batched tensor ops with a seeded generator. This is how the fastest CIFAR-10 trainers work, and
it lets a small-batch trial keep a GPU busy.

Three kinds of data, one per task a model serves (`lbs_tune.models.model_task`): images or
vectors with a class each, images with a class mask each (segmentation, 255 = ignore), and
token streams (language modelling). The `synthetic` dataset is of the kind the trial's model
takes.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lbs_tune.config import DataConfig, TrialConfig, data_dir
from lbs_tune.errors import UserError
from lbs_tune.formats import (
    RawData,
    TokenData,
    cityscapes_files,
    read_cityscapes,
    read_torchvision,
    read_wikitext2,
)
from lbs_tune.models import Task, model_task
from lbs_tune.segmentation import IGNORE_INDEX

# The validation split is the same for every trial of a sweep, whatever the trial's seed.
SPLIT_SEED = 0
MNIST1D_SEED = 42  # the mnist1d package's own default generator seed
MNIST1D_TRAIN_SPLIT = 0.8
MNIST1D_LENGTH = 40  # the mnist1d package's default final_seq_length


# ============================================================================ The zoo


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset, known without loading it.

    For a language model an example is a token: `train_examples` counts tokens, `shape` is one
    sequence of data.bptt token ids and `classes` is the vocabulary size.
    """

    train_examples: int | Callable[[DataConfig], int]  # the full training set
    shape: tuple[int, ...] | Callable[[DataConfig], tuple[int, ...]]  # one input, no batch dim
    classes: int | Callable[[DataConfig], int]
    crop_padding: int = 0
    flip: bool = False
    task: Task = "classification"
    # The dataset has its own validation split: data.val_fraction takes nothing from training.
    own_val: bool = False

    def train_size(self, data: DataConfig) -> int:
        """Examples in the training split after the validation split is taken out."""
        full = self.train_examples
        full = full if isinstance(full, int) else full(data)
        return full if self.own_val else full - _val_count(full, data.val_fraction)

    def input_shape(self, data: DataConfig) -> tuple[int, ...]:
        return tuple(self.shape if isinstance(self.shape, tuple) else self.shape(data))

    def num_classes(self, data: DataConfig) -> int:
        return self.classes if isinstance(self.classes, int) else self.classes(data)

    def max_batch(self, data: DataConfig) -> int:
        """The largest batch the training split fills: its examples, or for a language model
        the rows of data.bptt + 1 tokens (a window and its next-token targets) it holds."""
        size = self.train_size(data)
        return size // (data.bptt + 1) if self.task == "language_model" else size


def _mnist1d_train_examples(data: DataConfig) -> int:
    # mnist1d makes samples // 10 examples per class and trains on the first 80% of them.
    return int(data.samples // 10 * 10 * MNIST1D_TRAIN_SPLIT)


def _samples(data: DataConfig) -> int:
    return data.samples


# The synthetic dataset of each task: random inputs of the kind the trial's model takes.
SYNTHETIC: dict[Task, DatasetInfo] = {
    "classification": DatasetInfo(_samples, lambda d: d.shape, lambda d: d.classes),
    "segmentation": DatasetInfo(
        _samples, lambda d: d.shape, lambda d: d.classes, task="segmentation"
    ),
    "language_model": DatasetInfo(
        _samples, lambda d: (d.bptt,), lambda d: d.classes, task="language_model"
    ),
}

DATASETS: dict[str, DatasetInfo] = {
    "mnist1d": DatasetInfo(_mnist1d_train_examples, (MNIST1D_LENGTH,), 10),
    "cifar10": DatasetInfo(50_000, (3, 32, 32), 10, crop_padding=4, flip=True),
    "cifar100": DatasetInfo(50_000, (3, 32, 32), 100, crop_padding=4, flip=True),
    "svhn": DatasetInfo(73_257, (3, 32, 32), 10, crop_padding=4),
    "mnist": DatasetInfo(60_000, (1, 28, 28), 10),
    "fashion_mnist": DatasetInfo(60_000, (1, 28, 28), 10),
    # Merity et al. 2016, Table 1: 2,088,628 training tokens over 33,278 words; its own
    # validation split (217,646 tokens) is the val split.
    "wikitext2": DatasetInfo(
        2_088_628, lambda d: (d.bptt,), 33_278, task="language_model", own_val=True
    ),
    # Cordts et al. 2016: 2,975 finely annotated training images, 19 evaluated classes.
    "cityscapes": DatasetInfo(
        2_975, lambda d: (3, *d.image_size), 19, flip=True, task="segmentation"
    ),
    "synthetic": SYNTHETIC["classification"],
}


def dataset_info(config: TrialConfig) -> DatasetInfo:
    """The facts of the config's dataset; `synthetic` is of the task of the config's model.
    KeyError for an unknown dataset, ValueError for an unknown model of a synthetic one."""
    if config.dataset == "synthetic":
        return SYNTHETIC[model_task(config.model)]
    return DATASETS[config.dataset]


def batch_too_large(
    config: TrialConfig, max_batch: int, where: str = "", task: Task = "classification"
) -> str | None:
    """The message for a batch larger than the training split (`where` names its folder), or
    None; `max_batch` as `DatasetInfo.max_batch` (for a language model, in rows of tokens)."""
    if config.batch_size <= max_batch:
        return None
    if task == "language_model":
        return (
            f"batch_size {config.batch_size} rows of data.bptt + 1 = {config.data.bptt + 1} "
            f"tokens need more than the training tokens of {config.dataset}{where}; use at "
            f"most {max_batch}, or a smaller data.bptt"
        )
    return (
        f"batch_size {config.batch_size} is larger than the {max_batch} training examples of "
        f"{config.dataset}{where}; use at most {max_batch}"
    )


def _val_count(full: int, fraction: float) -> int:
    return round(full * fraction)


# ============================================================================ Raw arrays


def load_raw(config: TrialConfig) -> RawData | TokenData:
    """The dataset as host arrays, read from (or generated into) the data folder: RawData of
    images or vectors (with labels or masks), TokenData for a language model's corpus."""
    if config.dataset == "mnist1d":
        return _mnist1d(config.data)
    if config.dataset == "synthetic":
        return _synthetic(config.data, model_task(config.model))
    if config.dataset == "wikitext2":
        return read_wikitext2(data_dir(config.data))
    if config.dataset == "cityscapes":
        return _cityscapes(config.data)
    return read_torchvision(config.dataset, data_dir(config.data), config.data.download)


def _cached(path: Path, make: Callable[[], dict[str, np.ndarray]], what: str) -> dict:
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


def _mnist1d(data: DataConfig) -> RawData:
    """MNIST-1D generated by the mnist1d package with its fixed seed, cached as .npz."""
    path = data_dir(data) / "mnist1d" / f"mnist1d_{data.samples}_seed{MNIST1D_SEED}.npz"
    arrays = _cached(path, lambda: _generate_mnist1d(data.samples), "MNIST-1D")
    if not {"x", "y", "x_test", "y_test"} <= arrays.keys():
        raise UserError(f"{path}: corrupted MNIST-1D cache (arrays missing); delete it")
    return RawData(
        arrays["x"].astype(np.float32),
        arrays["y"].astype(np.int64),
        arrays["x_test"].astype(np.float32),
        arrays["y_test"].astype(np.int64),
        10,
    )


def _generate_mnist1d(samples: int) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = samples
    args.seed = MNIST1D_SEED
    args.train_split = MNIST1D_TRAIN_SPLIT
    # The generator reseeds the global numpy and Python RNGs; leave them as they were.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        made = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: made[k] for k in ("x", "y", "x_test", "y_test")}


def _cityscapes(data: DataConfig) -> RawData:
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

    arrays = _cached(root / "cityscapes" / name, resize, "Cityscapes")
    return RawData(arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"], 19)


def _synthetic(data: DataConfig, task: Task) -> RawData | TokenData:
    """Random data of the task's kind. Classification: inputs of data.shape with random labels,
    uint8 images for 3-D shapes, else floats. Segmentation: uint8 images of data.shape with
    random masks, about one pixel in classes + 1 ignored (255). Language model: a stream of
    data.samples random tokens over data.classes words, the last data.val_fraction of it the
    validation split."""
    rng = np.random.default_rng(SPLIT_SEED)
    if task == "language_model":
        tokens = rng.integers(0, data.classes, size=data.samples, dtype=np.int64)
        cut = data.samples - _val_count(data.samples, data.val_fraction)
        vocab = tuple(str(i) for i in range(data.classes))
        return TokenData(tokens[:cut], tokens[cut:], tokens[:0], vocab)
    shape = (data.samples, *data.shape)
    if len(data.shape) == 3:
        x = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        x = rng.standard_normal(size=shape, dtype=np.float32)
    if task == "segmentation":
        masks = rng.integers(0, data.classes + 1, size=(data.samples, *data.shape[1:]))
        y = np.where(masks == data.classes, IGNORE_INDEX, masks).astype(np.uint8)
    else:
        y = rng.integers(0, data.classes, size=data.samples, dtype=np.int64)
    return RawData(x, y, None, None, data.classes)


# ============================================================================ On the device


@dataclass
class Split:
    """One split as tensors on the device: inputs (uint8 images or float vectors) and targets
    (int64 labels, or uint8 masks (N, H, W) for segmentation)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DeviceData:
    """The splits on the device and the batch transforms (normalise, crop, flip)."""

    train: Split
    val: Split | None
    test: Split | None
    num_classes: int
    input_shape: tuple[int, ...]
    mean: torch.Tensor | None  # per channel, images only
    std: torch.Tensor | None
    crop_padding: int
    flip: bool
    channels_last: bool = False

    def train_batch(
        self, index: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented, not yet normalised inputs of the training examples at `index`, and
        their targets: a mask is cropped (its padding ignored) and flipped with its image."""
        x, y = self.train.x[index], self.train.y[index]
        masks = y.ndim > 1
        if self.crop_padding:
            offsets = crop_offsets(len(x), self.crop_padding, generator, x.device)
            x = crop(x, offsets, self.crop_padding)
            if masks:
                y = crop(y[:, None], offsets, self.crop_padding, IGNORE_INDEX)[:, 0]
        if self.flip:
            flips = torch.rand(len(x), generator=generator, device=x.device) < 0.5
            x = flip(x, flips)
            if masks:
                y = flip(y, flips)
        return x, y

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float, standardised per channel; float vectors pass through."""
        if self.mean is None:
            return x
        x = (x.float() - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def eval_batches(
        self, split: Split, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised inputs, targets) of `split` in order, `batch_size` at a time."""
        for start in range(0, len(split), batch_size):
            stop = start + batch_size
            yield self.normalise(split.x[start:stop]), split.y[start:stop]


@dataclass
class TokenStreams:
    """A language model's splits on the device: int64 token ids (T,) each, in corpus order."""

    train: torch.Tensor
    val: torch.Tensor | None
    test: torch.Tensor | None
    num_classes: int  # the vocabulary size
    input_shape: tuple[int, ...]  # (bptt,)
    channels_last: bool = False


def crop_offsets(
    n: int, padding: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Random (row, column) offsets (2, n) into images padded by `padding` on each side."""
    return torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=device)


def crop(x: torch.Tensor, offsets: torch.Tensor, padding: int, fill: int = 0) -> torch.Tensor:
    """Crops of the original size from images (N, C, H, W) padded with `fill`, image i's window
    at offsets[:, i]."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding), value=fill)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def flip(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """x[i] flipped left-right (its last axis) where flips[i]."""
    return torch.where(flips.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crops of the original size from zero-padded images, one offset per image."""
    return crop(x, crop_offsets(len(x), padding, generator, x.device), padding)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image flipped left-right with probability 1/2."""
    return flip(x, torch.rand(len(x), generator=generator, device=x.device) < 0.5)


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and standard deviation of uint8 images (N, C, H, W).

    From a 256-bin histogram per channel: ten times faster than numpy's float64 mean and std.
    """
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].ravel(), minlength=256)
        mean = counts @ values / counts.sum()
        means.append(mean)
        stds.append(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))
    return np.array(means), np.array(stds)


def load_dataset(
    config: TrialConfig, device: torch.device, channels_last: bool = False
) -> DeviceData | TokenStreams:
    """Load the config's dataset, split off the seeded validation set and move it to `device`:
    DeviceData of images or vectors, or TokenStreams for a language model."""
    raw = load_raw(config)
    where = f" in {data_dir(config.data)}"
    if isinstance(raw, TokenData):
        return _token_streams(config, raw, device, where)
    info = dataset_info(config)
    n_val = _val_count(len(raw.train_y), config.data.val_fraction)
    order = torch.randperm(len(raw.train_y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train_idx, val_idx = order[n_val:].numpy(), order[:n_val].numpy()
    problem = batch_too_large(config, len(train_idx), where)
    if problem:
        raise UserError(problem)

    def split(x: np.ndarray | None, y: np.ndarray | None) -> Split | None:
        if x is None or len(x) == 0:
            return None
        return Split(
            torch.from_numpy(np.ascontiguousarray(x)).to(device),
            torch.from_numpy(np.ascontiguousarray(y)).to(device),
        )

    train_x = raw.train_x[train_idx]
    image = train_x.ndim == 4
    mean = std = None
    if image:
        mean, std = (
            torch.tensor(s, dtype=torch.float32, device=device)[None, :, None, None]
            for s in channel_stats(train_x)
        )
    pad = info.crop_padding if config.data.crop_padding is None else config.data.crop_padding
    flips = info.flip if config.data.flip is None else config.data.flip
    return DeviceData(
        train=split(train_x, raw.train_y[train_idx]),
        val=split(raw.train_x[val_idx], raw.train_y[val_idx]),
        test=split(raw.test_x, raw.test_y),
        num_classes=raw.num_classes,
        input_shape=tuple(raw.train_x.shape[1:]),
        mean=mean,
        std=std.clamp_min(1e-6) if std is not None else None,
        crop_padding=pad if image else 0,
        flip=flips and image,
        channels_last=channels_last and image,
    )


def _token_streams(
    config: TrialConfig, raw: TokenData, device: torch.device, where: str
) -> TokenStreams:
    problem = batch_too_large(
        config, len(raw.train) // (config.data.bptt + 1), where, "language_model"
    )
    if problem:
        raise UserError(problem)

    def stream(tokens: np.ndarray) -> torch.Tensor | None:
        # A split of one token has no next token to predict.
        return torch.from_numpy(tokens).to(device) if len(tokens) > 1 else None

    return TokenStreams(
        train=stream(raw.train),
        val=stream(raw.valid),
        test=stream(raw.test),
        num_classes=raw.vocab_size,
        input_shape=(config.data.bptt,),
    )


# ============================================================================ Data order


class BatchSampler:
    """Seeded epoch permutations read as one stream: the batch of 0-based step s holds examples
    s*B .. (s+1)*B - 1 of the concatenated permutations of epochs 0, 1, 2, ...

    Every example is seen once per epoch and no tail is dropped: a batch may end one epoch and
    begin the next, so every batch size sees the same examples for the same budget. Steps are
    asked for in increasing order. The generator state and the permutations in use go into
    checkpoints, so a resumed run sees the same batches. With a batch schedule the stream is
    read by `rows`, each step's batch at its own size.
    """

    def __init__(self, size: int, batch_size: int, seed: int, device: torch.device):
        self.size, self.batch_size, self.device = size, batch_size, device
        # On the training device: a new epoch's order costs no host-device transfer.
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.first = 0  # the epoch of perms[0]
        self.perms: list[torch.Tensor] = []

    def batch(self, step: int) -> torch.Tensor:
        """The training-set indices of the batch of 0-based `step`, on the device."""
        return self.rows(step * self.batch_size, self.batch_size)

    def rows(self, start: int, count: int) -> torch.Tensor:
        """The indices of examples start .. start + count - 1 of the stream, on the device (a
        batch schedule's steps: each starts where the one before ended, at its own size)."""
        first, last = start // self.size, (start + count - 1) // self.size
        while self.first + len(self.perms) <= last:
            self.perms.append(
                torch.randperm(self.size, generator=self.generator, device=self.device)
            )
        del self.perms[: first - self.first]
        self.first = first
        offset = start - first * self.size
        if first == last:
            return self.perms[0][offset : offset + count]
        return torch.cat(self.perms[: last - first + 1])[offset : offset + count]

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "first": self.first,
            "perms": [p.cpu() for p in self.perms],
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.first = state["first"]
        self.perms = [p.to(self.device) for p in state["perms"]]
