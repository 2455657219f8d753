"""Shared fixtures: one data folder per test run, tiny sweep files, the CLI in-process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from lbs_tune.cli import main
from lbs_tune.runner import start_ray
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


# ---------------------------------------------------------------------------- Ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RayCluster:
    address: str
    dashboard: str
    metrics_port: int
    gpus: int
    cpus: int


@pytest.fixture(scope="session")
def ray_cluster(data_dir, tmp_path_factory):
    """One local Ray head for the whole test run: 4 logical CPUs, 4 fake GPUs, dashboard on.

    Every sweep of the test run joins it (`--address`), so Ray starts once. The GPUs are only
    declared: trials get GPU ids from Ray and train on the CPU.
    """
    import ray

    # Token authentication stays on, as on a user's cluster: make a token if there is none.
    ray_cli = str(Path(sys.executable).with_name("ray"))
    if not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run([ray_cli, "get-auth-token", "--generate"], check=True, capture_output=True)
    ports = {name: _free_port() for name in ("gcs", "dashboard", "metrics")}
    cluster = RayCluster(
        address=f"127.0.0.1:{ports['gcs']}",
        dashboard=f"http://127.0.0.1:{ports['dashboard']}",
        metrics_port=ports["metrics"],
        gpus=4,
        cpus=4,
    )
    log = (tmp_path_factory.mktemp("ray") / "head.log").open("w")
    head = subprocess.Popen(
        [
            ray_cli,
            "start",
            "--head",
            "--block",
            f"--port={ports['gcs']}",
            f"--num-cpus={cluster.cpus}",
            f"--num-gpus={cluster.gpus}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={ports['dashboard']}",
            f"--metrics-export-port={ports['metrics']}",
            "--disable-usage-stats",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                start_ray(address=cluster.address, cpus=None, gpus=None)
                break
            except ConnectionError:
                if time.monotonic() > deadline or head.poll() is not None:
                    raise
                time.sleep(1)
        yield cluster
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
