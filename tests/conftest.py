"""Shared fixtures: one data folder per test run, tiny sweep files, the CLI in-process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from lbs_tune.cli import main
from lbs_tune.spec import set_dotted

# Small enough to generate in a second or two, large enough for batches of 256.
TINY_MNIST1D = 2000


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data folder shared by the whole run; subprocesses find it through LBS_DATA_DIR."""
    path = tmp_path_factory.mktemp("data")
    os.environ["LBS_DATA_DIR"] = str(path)
    return path


def tiny_base(**changes) -> dict:
    """A trial config that trains in about a second on the CPU."""
    base = {
        "dataset": "mnist1d",
        "data": {"samples": TINY_MNIST1D},
        "model": "mlp",
        "batch_size": 32,
        "epochs": 2,
        "eval_every": 0.5,
        "checkpoint_every": 0.5,
        "optimizer": {"name": "sgd", "momentum": 0.9},
        "lr": {"base": 0.05, "base_batch_size": 32},
        "device": "cpu",
    }
    for key, value in changes.items():
        set_dotted(base, key.replace("__", "."), value)
    return base


def write_spec(path: Path, base: dict, grid: dict | None = None, **extra) -> Path:
    """Write a sweep file and return its path."""
    spec = {"name": path.stem, "base": base, "grid": grid or {}, **extra}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def cli(capsys):
    """Run `lbs-tune ARGS...` in this process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
