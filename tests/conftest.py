"""Shared fixtures: one data folder per test run, tiny sweep files, the CLI in-process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from lbs_tune.cli import main
from lbs_tune.cluster import start_ray
from lbs_tune.errors import UserError
from lbs_tune.names import METRICS, set_dotted

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


def without_timing(row: dict) -> dict:
    """A report's metrics without the ones that measure time."""
    return {k: row.get(k) for k in METRICS if k not in ("images_per_s", "time_s")}


# A line that Ray's driver prints on behalf of a process of the shared cluster, e.g.
# "(raylet) The node ... has been marked dead" after a test kills a node. It can land in any
# test's captured output at any time; it is Ray's, not the command's.
RAY_RELAYED = re.compile(
    r"^(?:\x1b\[[0-9;]*m)*\((?:raylet|[^()]*pid=\d+[^()]*)\)(?:\x1b\[[0-9;]*m)* "
)


def without_ray_lines(text: str) -> str:
    return "".join(line for line in text.splitlines(True) if not RAY_RELAYED.match(line))


@pytest.fixture
def cli(capsys):
    """Run `lbs-tune ARGS...` in this process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, without_ray_lines(out), without_ray_lines(err)

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


@pytest.fixture(autouse=True)
def _ray_tests_are_marked(request):
    """A test that starts (or joins) the shared Ray cluster must carry @pytest.mark.ray, so that
    `pytest -m "not ray"` is the fast tier that never starts Ray."""
    if "ray_cluster" in request.fixturenames and request.node.get_closest_marker("ray") is None:
        pytest.fail(f"{request.node.nodeid} uses Ray: mark it @pytest.mark.ray")


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
        # Ray's metrics report interval at 1 s (its default is 10 s): a trial's gauges reach the
        # Prometheus endpoint sooner.
        env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_metrics_report_interval_ms": "1000"},
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                start_ray(address=cluster.address, cpus=None, gpus=None)
                break
            except (ConnectionError, UserError):  # the head is not up yet
                if time.monotonic() > deadline or head.poll() is not None:
                    raise
                time.sleep(1)
        yield cluster
    finally:
        try:
            ray.shutdown()
        finally:
            # Ray's processes may ignore SIGTERM while they shut down; a test run leaves none.
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
            log.close()


# ---------------------------------------------------------------------------- Real sweeps

QUICKSTART = Path(__file__).parent.parent / "sweeps" / "quickstart.yaml"
# A string that must reach every page as text, never as markup.
HOSTILE = "<script>alert(1)</script>"
# quickstart.yaml, tiny: 12 trials of 4 epochs (5760 examples) on 1440 training examples.
# lr.base 0.1 scaled linearly to 1.6 at B=256 pushes the train loss of both seeds past the
# bound of 3 (deterministic on the CPU; the tests read which from the files). Two at a time: two
# actors, each importing torch once, train all twelve, one torch thread each. 0.25 of a (fake)
# GPU each, so that trials carry GPU ids. eval_batch_size 64: a key that ends in batch_size.
QUICKSTART_TINY = [
    f"base.data.samples={TINY_MNIST1D}",
    "base.examples=5760",
    "base.eval_batch_size=64",
    "base.lr.base=0.1",
    "base.divergence_loss=3",
    "grid.batch_size=[16, 64, 256]",
    "grid.lr.scaling=[none, linear]",
    "grid.seed=[0, 1]",
    "target.value=0.3",
    "max_concurrent=2",
    "resources.gpu=0.25",
    f"description=quickstart, tiny {HOSTILE}",
]


@pytest.fixture(scope="session")
def quickstart_experiment(ray_cluster, tmp_path_factory) -> Path:
    """sweeps/quickstart.yaml run once per test run (QUICKSTART_TINY); copy it to change it."""
    from lbs_tune.runner import run

    storage = tmp_path_factory.mktemp("quickstart")
    assert run(QUICKSTART, QUICKSTART_TINY, storage=str(storage), address=ray_cluster.address) == 0
    return storage / "quickstart"


@dataclass(frozen=True)
class WatchedSweep:
    """A sweep's folder, and what `status` and `where batch_size=16` answered while it ran."""

    folder: Path
    snapshots: list[tuple[str, list[str]]]
    failures: list[Exception]


@pytest.fixture(scope="session")
def broken_sweep(ray_cluster, tmp_path_factory) -> WatchedSweep:
    """Two trials, one at a time, with a data folder whose path holds HOSTILE: 2,880 steps on
    synthetic data finish, then a CIFAR-10 trial fails for real (no CIFAR-10 files there) and
    ends in ERROR. A thread asks `status` and `where` every 0.1 s while the sweep runs."""
    from analysis.status import status, where
    from lbs_tune.runner import run

    storage = tmp_path_factory.mktemp("broken")
    folder = storage / "broken"
    data = storage / f"data {HOSTILE}"
    data.mkdir(parents=True)
    overrides = broken_overrides(data)
    snapshots, failures, stop = [], [], threading.Event()

    def watch():
        while not stop.is_set():
            if (folder / "lbs_sweep.json").exists():
                # An exception raised in this thread would vanish: keep it for the tests.
                try:
                    snapshots.append((status(str(folder)), where(str(folder), ["batch_size=16"])))
                except Exception as exc:
                    failures.append(exc)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with pytest.MonkeyPatch.context() as patch:
        # Ray copies trial results and states into the experiment folder when it saves the
        # experiment state, every 10 s or more by default: every second here, for a short sweep.
        patch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")
        try:
            code = run(QUICKSTART, overrides, storage=str(storage), address=ray_cluster.address)
        finally:
            stop.set()
            watcher.join()
    assert code == 1
    return WatchedSweep(folder, snapshots, failures)


@pytest.fixture(scope="session")
def broken_experiment(broken_sweep) -> Path:
    """The folder of `broken_sweep`: one finished trial, one in ERROR."""
    return broken_sweep.folder


@dataclass(frozen=True)
class RawTrial:
    """One trial of an experiment folder as read with plain json, for expected values."""

    trial_id: str
    state: str
    folder: Path
    config: dict
    reports: list[dict]  # result.json in step order; of a step reported twice, the last

    @property
    def key(self) -> tuple:
        return (self.config["batch_size"], self.config["lr"]["scaling"], self.config["seed"])


def raw_trials(experiment: Path) -> list[RawTrial]:
    """The trials of Ray's newest experiment state, ordered by trial id."""
    state = json.loads(max(experiment.glob("experiment_state-*.json")).read_text())
    found = []
    for trial_json, _ in state["trial_data"]:
        trial = json.loads(trial_json)
        folder = experiment / trial["relative_logdir"]
        result = folder / "result.json"
        by_step = {}
        for line in result.read_text().splitlines() if result.exists() else []:
            row = json.loads(line)
            by_step[row["step"]] = row
        config = json.loads((folder / "params.json").read_text())
        reports = [by_step[s] for s in sorted(by_step)]
        found.append(RawTrial(trial["trial_id"], trial["status"], folder, config, reports))
    return sorted(found, key=lambda t: t.trial_id)


# ---------------------------------------------------------------------------- Committed sweeps

# tests/make_tiny_experiment.py writes here what the two sweeps above write (text files only):
# quickstart/ (QUICKSTART_TINY: 12 trials, B=256 linear diverges) and broken/ (one errored).
# A Ray test in tests/test_analysis_load.py checks that a real sweep still writes the same.
TINY_EXPERIMENTS = Path(__file__).parent / "experiments"


def broken_overrides(data: Path) -> list[str]:
    """The overrides of `broken_sweep` (sweeps/quickstart.yaml), with its data folder `data`."""
    return [
        *QUICKSTART_TINY,
        "name=broken",
        f"base.data.dir={data}",
        "base.data.shape=[40]",
        "base.examples=46080",  # 2,880 steps: long enough that status sees it mid-run
        "grid.batch_size=[16]",
        "grid.lr.scaling=[none]",
        "grid.seed=[0]",
        "grid.dataset=[synthetic, cifar10]",
        "max_concurrent=1",
        "max_failures=0",
    ]


def _committed(name: str, tmp_path_factory) -> Path:
    """A copy of a committed experiment folder: loading writes a cache, reports a report.html."""
    target = tmp_path_factory.mktemp("committed") / name
    shutil.copytree(TINY_EXPERIMENTS / name, target)
    return target


@pytest.fixture(scope="session")
def tiny_quickstart(tmp_path_factory) -> Path:
    """The committed folder of the tiny quickstart sweep (as `quickstart_experiment`, no Ray);
    shared by the test run: copy it to change it."""
    return _committed("quickstart", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_broken(tmp_path_factory) -> Path:
    """The committed folder of the sweep with an errored trial (as `broken_experiment`)."""
    return _committed("broken", tmp_path_factory)


def sweep_spec(tmp_path: Path, name: str, **changes) -> Path:
    """Four tiny MNIST-1D trials: batch 32/64 x none/linear, 4 epochs, reports every half epoch."""
    base = tiny_base(epochs=4, checkpoint_every=1, **changes)
    grid = {"batch_size": [32, 64], "lr.scaling": ["none", "linear"]}
    return write_spec(tmp_path / f"{name}.yaml", base, grid, resources={"cpu": 0.5})


@pytest.fixture(scope="session")
def reference(ray_cluster, tmp_path_factory):
    """An uninterrupted run of the four-trial sweep: what every faulted run must reproduce."""
    from lbs_tune.runner import run

    folder = tmp_path_factory.mktemp("reference")
    spec = sweep_spec(folder, "tiny")
    assert run(spec, storage=str(folder / "results"), address=ray_cluster.address) == 0
    return folder / "results" / "tiny"
