"""The dataset registry: one entry per dataset, the one place that says what a dataset is.

An entry (`Dataset`) holds everything the rest of lbs-tune asks of a dataset: its reader (the raw
arrays: `RawData` of images or vectors, `TokenData` of a corpus, or the noisy quadratic's
`lbs_tune.nqm.Quadratic`), the static facts known without reading it (training examples, the
shape of one input, classes, the task it serves, its augmentation), the files checked before a
sweep starts, whether it is prepared once on the driver (MNIST-1D's generation, Cityscapes'
resizing), and the checks of a trial config that only it knows. Adding a dataset is one
`register_dataset` call (the built-in ones are at the end of this module); the loop, the checks
of `lbs_tune.checks`, the runner's preparation and the device loader (`lbs_tune.data`) all ask
this registry.

The `synthetic` dataset is of the kind the trial's model takes (`dataset_info`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from lbs_tune.cityscapes import cityscapes_files, load_cityscapes
from lbs_tune.config import MAX_BATCH, DataConfig, TrialConfig, data_dir
from lbs_tune.errors import UserError
from lbs_tune.formats import RawData, TokenData, cached_arrays, check_files, read_torchvision
from lbs_tune.models import Task, model_task
from lbs_tune.nqm import Quadratic
from lbs_tune.quadratic import check_quadratic, read_quadratic
from lbs_tune.segmentation import IGNORE_INDEX
from lbs_tune.wikitext import read_wikitext2, wikitext2_paths

# The validation split is the same for every trial of a sweep, whatever the trial's seed.
SPLIT_SEED = 0
MNIST1D_SEED = 42  # the mnist1d package's own default generator seed
MNIST1D_TRAIN_SPLIT = 0.8
MNIST1D_LENGTH = 40  # the mnist1d package's default final_seq_length

Raw = RawData | TokenData | Quadratic


# ============================================================================ An entry


@dataclass(frozen=True)
class Dataset:
    """One dataset: how to read it and what is known of it without reading it.

    A fact that depends on the trial's data section (`data.samples`, `data.bptt`, ...) is a
    function of the `DataConfig`. For a language model an example is a token: `train_examples`
    counts tokens, `shape` is one sequence of data.bptt token ids and `classes` is the
    vocabulary size.
    """

    read: Callable[[TrialConfig], Raw]  # the raw arrays of a trial's dataset
    train_examples: int | Callable[[DataConfig], int]  # the full training set (or an epoch)
    shape: tuple[int, ...] | Callable[[DataConfig], tuple[int, ...]]  # one input, no batch dim
    classes: int | Callable[[DataConfig], int]
    task: Task = "classification"
    crop_padding: int = 0
    flip: bool = False
    # The dataset has its own validation split: data.val_fraction takes nothing from training.
    own_val: bool = False
    # A batch can hold at most the training split (False: fresh examples every step).
    bounded: bool = True
    # UserError naming what is missing, before a sweep starts (None: nothing to check).
    files: Callable[[DataConfig], object] | None = None
    # Read once on the driver before the trials start, which then find it made (a cache).
    prepare: bool = False
    # The checks of a trial config only this dataset knows: KeyedError(key, message).
    check: Callable[[TrialConfig], None] | None = None

    def train_size(self, data: DataConfig) -> int:
        """Examples in the training split after the validation split is taken out."""
        full = self.train_examples
        full = full if isinstance(full, int) else full(data)
        return full if self.own_val else full - val_count(full, data.val_fraction)

    def input_shape(self, data: DataConfig) -> tuple[int, ...]:
        return tuple(self.shape if isinstance(self.shape, tuple) else self.shape(data))

    def num_classes(self, data: DataConfig) -> int:
        return self.classes if isinstance(self.classes, int) else self.classes(data)

    def max_batch(self, data: DataConfig) -> int:
        """The largest batch the training split fills: its examples, or for a language model
        the rows of data.bptt + 1 tokens (a window and its next-token targets) it holds;
        MAX_BATCH for a dataset that is not bounded."""
        if not self.bounded:
            return MAX_BATCH
        size = self.train_size(data)
        return size // (data.bptt + 1) if self.task == "language_model" else size


def val_count(full: int, fraction: float) -> int:
    """Examples of a split of `full` that go to validation."""
    return round(full * fraction)


# ============================================================================ The registry

DATASETS: dict[str, Dataset] = {}


def register_dataset(name: str, dataset: Dataset, replace: bool = False) -> None:
    """Make `dataset` known as `name` (the trial config's `dataset`): the checks, the runner's
    preparation, `lbs-tune train` and every trial then use it. ValueError for a name already
    taken (unless `replace`) or one that is not a plain word."""
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"a dataset's name is letters, digits, '_' and '-', not {name!r}")
    if name in DATASETS and not replace:
        raise ValueError(f"dataset {name!r} is registered already; pass replace=True")
    DATASETS[name] = dataset


def dataset_info(config: TrialConfig) -> Dataset:
    """The entry of the config's dataset; `synthetic` is of the task of the config's model
    (classification for a task that has no synthetic data). KeyError for an unknown dataset,
    ValueError for an unknown model of a synthetic one."""
    if config.dataset == "synthetic":
        return SYNTHETIC.get(model_task(config.model), SYNTHETIC["classification"])
    return DATASETS[config.dataset]


def load_raw(config: TrialConfig) -> Raw:
    """The config's dataset as host arrays, read from (or generated into) the data folder."""
    return dataset_info(config).read(config)


def prepare_datasets(configs: Iterable[TrialConfig]) -> None:
    """What a sweep on this machine needs before its trials start, once per dataset and data
    section: the dataset's files checked (a missing file is a UserError now, not a failure of
    every trial), and a dataset prepared on the driver read once (generated or resized and
    cached), so that trials starting together don't all do it."""
    seen = set()
    for config in configs:
        key = (config.dataset, config.data)
        if key in seen:
            continue
        seen.add(key)
        dataset = dataset_info(config)
        if dataset.files is not None:
            dataset.files(config.data)
        if dataset.prepare:
            dataset.read(config)


def batch_too_large(
    config: TrialConfig, max_batch: int, where: str = "", task: Task = "classification"
) -> str | None:
    """The message for a batch larger than the training split (`where` names its folder), or
    None; `max_batch` as `Dataset.max_batch` (for a language model, in rows of tokens)."""
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


# ============================================================================ Generated data


def _mnist1d(config: TrialConfig) -> RawData:
    """MNIST-1D generated by the mnist1d package with its fixed seed, cached as .npz."""
    data = config.data
    path = data_dir(data) / "mnist1d" / f"mnist1d_{data.samples}_seed{MNIST1D_SEED}.npz"
    arrays = cached_arrays(path, lambda: _generate_mnist1d(data.samples), "MNIST-1D")
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


def _mnist1d_train_examples(data: DataConfig) -> int:
    # mnist1d makes samples // 10 examples per class and trains on the first 80% of them.
    return int(data.samples // 10 * 10 * MNIST1D_TRAIN_SPLIT)


def _synthetic(config: TrialConfig) -> RawData | TokenData:
    """Random data of the kind the config's model takes. Classification: inputs of data.shape
    with random labels, uint8 images for 3-D shapes, else floats. Segmentation: uint8 images
    of data.shape with random masks, about one pixel in classes + 1 ignored (255). Language
    model: a stream of data.samples random tokens over data.classes words, the last
    data.val_fraction of it the validation split."""
    data, task = config.data, model_task(config.model)
    rng = np.random.default_rng(SPLIT_SEED)
    if task == "language_model":
        tokens = rng.integers(0, data.classes, size=data.samples, dtype=np.int64)
        cut = data.samples - val_count(data.samples, data.val_fraction)
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


def _samples(data: DataConfig) -> int:
    return data.samples


# ============================================================================ The datasets


def _torchvision(name: str, examples: int, shape: tuple[int, ...], classes: int, **kw) -> Dataset:
    """A torchvision image dataset read from (or downloaded into) the data folder."""

    def files(data: DataConfig) -> None:
        # A dataset to download may be missing: the trial downloads it.
        if not data.download:
            check_files(name, data_dir(data))

    return Dataset(
        read=lambda c: read_torchvision(name, data_dir(c.data), c.data.download),
        train_examples=examples,
        shape=shape,
        classes=classes,
        files=files,
        **kw,
    )


# The synthetic dataset of each task: random inputs of the kind the trial's model takes.
SYNTHETIC: dict[Task, Dataset] = {
    task: Dataset(
        read=_synthetic,
        train_examples=_samples,
        shape=(lambda d: (d.bptt,)) if task == "language_model" else (lambda d: d.shape),
        classes=lambda d: d.classes,
        task=task,
    )
    for task in ("classification", "segmentation", "language_model")
}

for _name, _dataset in {
    "mnist1d": Dataset(
        read=_mnist1d,
        train_examples=_mnist1d_train_examples,
        shape=(MNIST1D_LENGTH,),
        classes=10,
        prepare=True,
    ),
    "cifar10": _torchvision("cifar10", 50_000, (3, 32, 32), 10, crop_padding=4, flip=True),
    "cifar100": _torchvision("cifar100", 50_000, (3, 32, 32), 100, crop_padding=4, flip=True),
    "svhn": _torchvision("svhn", 73_257, (3, 32, 32), 10, crop_padding=4),
    "mnist": _torchvision("mnist", 60_000, (1, 28, 28), 10),
    "fashion_mnist": _torchvision("fashion_mnist", 60_000, (1, 28, 28), 10),
    # Merity et al. 2016, Table 1: 2,088,628 training tokens over 33,278 words; its own
    # validation split (217,646 tokens) is the val split. Never downloaded: files must be there.
    "wikitext2": Dataset(
        read=lambda c: read_wikitext2(data_dir(c.data)),
        train_examples=2_088_628,
        shape=lambda d: (d.bptt,),
        classes=33_278,
        task="language_model",
        own_val=True,
        files=lambda d: wikitext2_paths(data_dir(d)),
    ),
    # Cordts et al. 2016: 2,975 finely annotated training images, 19 evaluated classes.
    "cityscapes": Dataset(
        read=lambda c: load_cityscapes(c.data),
        train_examples=2_975,
        shape=lambda d: (3, *d.image_size),
        classes=19,
        task="segmentation",
        flip=True,
        files=lambda d: cityscapes_files(data_dir(d)),
        prepare=True,
    ),
    "synthetic": SYNTHETIC["classification"],
    # Zhang et al. 2019's noisy quadratic model (lbs_tune.quadratic): an epoch is data.samples
    # examples, fresh Gaussian gradient noise every step, so a batch may be of any size.
    "nqm": Dataset(
        read=read_quadratic,
        train_examples=_samples,
        shape=lambda d: (d.nqm.dimension,),
        classes=1,
        task="nqm",
        own_val=True,
        bounded=False,
        check=check_quadratic,
    ),
}.items():
    register_dataset(_name, _dataset)
