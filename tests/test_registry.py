"""The dataset registry (lbs_tune.datasets): a dataset is one entry, and adding one touches one
place. A toy dataset registered here, through the public API alone, is checked before a sweep
starts, prepared once, refused where it does not fit, and trained by `lbs-tune train`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import read_jsonl, tiny_base, write_spec

from lbs_tune.config import DataConfig, TrialConfig, data_dir
from lbs_tune.datasets import DATASETS, Dataset, dataset_info, register_dataset
from lbs_tune.errors import UserError
from lbs_tune.formats import RawData
from lbs_tune.preflight import prepare_data
from lbs_tune.spec import load_spec

ROOT = Path(__file__).parent.parent
TOY_FILE = "toy.npz"


def toy_path(data: DataConfig) -> Path:
    return data_dir(data) / TOY_FILE


@pytest.fixture
def toy():
    """A dataset `toy`: 200 vectors of 6 features in 3 classes, read from toy.npz in the data
    folder; returns the list of the configs it was read for."""
    reads: list[TrialConfig] = []

    def files(data: DataConfig) -> None:
        if not toy_path(data).is_file():
            raise UserError(f"toy: {toy_path(data)} missing; write it there")

    def read(config: TrialConfig) -> RawData:
        reads.append(config)
        with np.load(toy_path(config.data)) as f:
            return RawData(f["x"], f["y"], None, None, 3)

    register_dataset(
        "toy",
        Dataset(read=read, train_examples=200, shape=(6,), classes=3, files=files, prepare=True),
    )
    try:
        yield reads
    finally:
        DATASETS.pop("toy")


def write_toy(folder: Path) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    x = rng.standard_normal((200, 6), dtype=np.float32)
    np.savez(folder / TOY_FILE, x=x, y=(x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1))


def test_a_registered_dataset_is_checked_prepared_and_trained(toy, cli, tmp_path):
    folder = tmp_path / "data"
    base = tiny_base(dataset="toy", data={"dir": str(folder), "val_fraction": 0.1}, steps=6)
    spec = write_spec(tmp_path / "toy.yaml", base, {"batch_size": [16, 32]})
    # Before Ray starts: its own files check, one line.
    with pytest.raises(UserError, match=f"^toy: .*{TOY_FILE} missing"):
        prepare_data(load_spec(spec))
    write_toy(folder)
    prepare_data(load_spec(spec))
    assert len(toy) == 1  # prepared once for both grid points: one dataset, one data section
    code, _, err = cli("train", spec, "--out", tmp_path / "run")
    assert code == 0, err
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["step"] == 6 and rows[-1]["examples"] == 6 * 16
    assert 0 <= rows[-1]["val/accuracy"] <= 1
    assert dataset_info(TrialConfig.model_validate(base)).train_size(DataConfig()) == 180
    # The zoo checks read its facts: 180 training examples, vectors of 6.
    code, _, err = cli("train", spec, "--out", tmp_path / "big", "--set", "batch_size=181")
    assert code == 2 and "larger than the 180 training examples of toy; use at most 180" in err
    code, _, err = cli("train", spec, "--out", tmp_path / "cnn", "--set", "model=lenet")
    assert code == 2 and "lenet cannot take toy inputs of shape (6,)" in err


def test_a_name_is_registered_once(toy):
    with pytest.raises(ValueError, match="registered already"):
        register_dataset("toy", DATASETS["toy"])
    register_dataset("toy", DATASETS["toy"], replace=True)
    with pytest.raises(ValueError, match="not 'a b'"):
        register_dataset("a b", DATASETS["toy"])


def test_an_unknown_dataset_names_the_registered_ones(toy, cli, tmp_path):
    spec = write_spec(tmp_path / "typo.yaml", tiny_base(dataset="tyo"))
    code, _, err = cli("train", spec, "--out", tmp_path / "run")
    assert code == 2 and "unknown dataset 'tyo'" in err and "toy" in err


def test_the_map_says_where_a_dataset_is_added():
    text = (ROOT / "docs" / "architecture.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `lbs_tune/datasets.py`"))
    assert "register_dataset" in row
