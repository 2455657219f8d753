"""Shared fixtures and helpers (the one module tests import them from): one data folder per
test run, tiny sweep files, the CLI in-process, the shared Ray cluster, synthetic studies, the
report page parsed, killed drivers and full disks."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

# One torch thread per test process and per process it starts: pytest-xdist runs one worker per
# core, and tiny models gain nothing from more threads, only contention. (Ray's trials set their
# threads to the CPUs Ray gave them.) Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from lbs_tune.cli import main
from lbs_tune.cluster import start_ray
from lbs_tune.errors import UserError
from lbs_tune.experiment import STATE_FILE
from lbs_tune.names import METRICS, set_dotted
from lbs_tune.studies import Objective, StudyRecord, read_studies

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


TIMING = {"images_per_s", "time_s"}  # the report's keys that measure time


def without_timing(row: dict) -> dict:
    """A report's metrics without the ones that measure time."""
    return {k: row.get(k) for k in METRICS if k not in TIMING}


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


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
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


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of the shared Ray cluster are one group (pytest-xdist's `--dist loadgroup`): one
    worker runs them all, in file order, while the others run the rest (the fast tier, and a
    Ray test that starts a Ray of its own).

    Run without workers (`-n 0`), the fast tier comes first: the shared Ray cluster starts with
    the first Ray test, and its daemons then take a share of the cores from every test after it.
    """
    for item in items:
        if _on_the_shared_cluster(item):
            item.add_marker(pytest.mark.xdist_group("ray"))
    items.sort(key=lambda item: item.get_closest_marker("ray") is not None)


def _on_the_shared_cluster(item: pytest.Item) -> bool:
    return "ray_cluster" in getattr(item, "fixturenames", ())


@pytest.fixture(autouse=True)
def _ray_tests_are_marked(request):
    """A test that starts (or joins) the shared Ray cluster must carry @pytest.mark.ray, so that
    `pytest -m "not ray"` is the fast tier that never starts Ray."""
    if "ray_cluster" in request.fixturenames and request.node.get_closest_marker("ray") is None:
        pytest.fail(f"{request.node.nodeid} uses Ray: mark it @pytest.mark.ray")


@pytest.fixture(scope="session")
def ray_cluster(data_dir, tmp_path_factory, request):
    """One local Ray head for the whole test run: 4 logical CPUs, 4 fake GPUs, dashboard on.

    Every sweep of the test run joins it (`--address`), so Ray starts once. The GPUs are only
    declared: trials get GPU ids from Ray and train on the CPU.
    """
    import ray

    # Under pytest-xdist, one worker runs every test of it (pytest_collection_modifyitems), or
    # each worker would start a cluster of its own. xdist names a test's group by a suffix of
    # its id, which pytest 9.2 no longer takes (pytest-dev/pytest-xdist#1386).
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items = request.session.items
        loose = [i.nodeid for i in items if _on_the_shared_cluster(i) and "@" not in i.nodeid]
        if loose:
            pytest.fail(
                f"{len(loose)} Ray tests are not grouped onto one worker (e.g. {loose[0]}): run "
                "with --dist loadgroup (setup.cfg's addopts) and pytest < 9.2, or with -n 0",
                pytrace=False,
            )

    # Token authentication stays on, as on a user's cluster: make a token if there is none.
    ray_cli = str(Path(sys.executable).with_name("ray"))
    if not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run([ray_cli, "get-auth-token", "--generate"], check=True, capture_output=True)
    ports = {name: free_port() for name in ("gcs", "dashboard", "metrics")}
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
            kill_tree(head.pid)
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
    snapshots, failures = [], []

    def watch() -> None:
        if (folder / "lbs_sweep.json").exists():
            # Kept for the tests that read them, not raised at the end of the sweep.
            try:
                snapshots.append((status(str(folder)), where(str(folder), ["batch_size=16"])))
            except Exception as exc:
                failures.append(exc)

    with pytest.MonkeyPatch.context() as patch, polling(watch, every_s=0.1):
        # Ray copies trial results and states into the experiment folder when it saves the
        # experiment state, every 10 s or more by default: every second here, for a short sweep.
        patch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")
        code = run(QUICKSTART, overrides, storage=str(storage), address=ray_cluster.address)
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
def tiny_branch(tmp_path_factory) -> Path:
    """The committed folder of the tiny branched sweep (tests/test_branch_sweep.py makes it)."""
    return _committed("quickstart_branch", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_broken(tmp_path_factory) -> Path:
    """The committed folder of the sweep with an errored trial (as `broken_experiment`)."""
    return _committed("broken", tmp_path_factory)


def sweep_spec(tmp_path: Path, name: str, **changes) -> Path:
    """Four tiny MNIST-1D trials: batch 32/64 x none/linear, 4 epochs, reports every half epoch.
    Two at a time: on a 2-core machine more only adds trial processes to start (each imports
    torch), and Ray makes the last two trials after the first two."""
    base = tiny_base(epochs=4, checkpoint_every=1, **changes)
    grid = {"batch_size": [32, 64], "lr.scaling": ["none", "linear"]}
    return write_spec(
        tmp_path / f"{name}.yaml", base, grid, resources={"cpu": 0.5}, max_concurrent=2
    )


@pytest.fixture(scope="session")
def reference(ray_cluster, tmp_path_factory):
    """An uninterrupted run of the four-trial sweep: what every faulted run must reproduce."""
    from lbs_tune.runner import run

    folder = tmp_path_factory.mktemp("reference")
    spec = sweep_spec(folder, "tiny")
    assert run(spec, storage=str(folder / "results"), address=ray_cluster.address) == 0
    return folder / "results" / "tiny"


# ============================================================================ Shared by test files
# Helpers that several test files use: the one place they are imported from.


def histories(experiment: Path) -> dict[tuple, list[dict]]:
    """Per trial (keyed by its grid values): its reports, a re-made step replacing the earlier."""
    found = {}
    for params in experiment.glob("*/params.json"):
        config = json.loads(params.read_text())
        key = (config["batch_size"], config["lr"]["scaling"], config["seed"])
        rows = {}
        for line in (params.parent / "result.json").read_text().splitlines():
            row = json.loads(line)
            rows[row["step"]] = row
        found[key] = [rows[s] for s in sorted(rows)]
    return found


def states(folder: Path) -> list[Path]:
    """Ray's experiment states in `folder`, newest last."""
    return sorted(p for p in folder.iterdir() if STATE_FILE.match(p.name))


def staged_folders(folder: Path, state: Path) -> set[Path]:
    """The Ray staging folders of the experiment `folder` that hold its saved state `state`:
    Ray's driver writes its files in `<session>/artifacts/<stamp>/<name>/driver_artifacts` of
    its Ray session (session_latest links to the session: each folder once)."""
    pattern = f"session_*/artifacts/*/{folder.name}/*/{state.name}"
    return {p.parent.resolve() for p in Path("/tmp/ray").glob(pattern)}


def plant_in_dead_staging(folder: Path, reference: Path) -> None:
    """What a killed driver may have written in its Ray staging folder and never copied to the
    experiment `folder`, planted for every trial of `reference` (the same sweep uninterrupted):
    a params.json and a report at step 1."""
    state = states(folder)[-1]
    (staged,) = staged_folders(folder, state)
    first = json.loads(json.loads(state.read_text())["trial_data"][0][0])["trial_id"]
    prefix = first.split("_")[0]
    for trial in reference.glob("train_trial_*"):
        index_and_tag = trial.name.removeprefix("train_trial_").partition("_")[2]
        planted = staged / f"train_trial_{prefix}_{index_and_tag}"
        planted.mkdir(exist_ok=True)
        shutil.copy(trial / "params.json", planted / "params.json")
        with (planted / "result.json").open("a") as result:
            result.write(json.dumps({"step": 1, "planted": True}) + "\n")


def driver_command(spec: Path, storage: Path, address: str, *extra: str) -> list[str]:
    """`lbs-tune run` of `spec` on the Ray at `address` as its own process (to kill it)."""
    return [
        *(sys.executable, "-m", "lbs_tune.cli", "run", str(spec)),
        *("--storage", str(storage), "--address", address, *extra),
    ]


def kill_when(
    command: list[str], ready: Callable[[], bool], wait_s: float = 240, env: dict | None = None
) -> None:
    """Start the driver `command` (environment `env`, os.environ by default), SIGKILL it and
    its process group once `ready()`."""
    # Ray saves its experiment state every second.
    env = {**(env or os.environ), "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    with tempfile.TemporaryFile("w+") as log:
        driver = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        try:
            deadline = time.monotonic() + wait_s
            while not ready():
                if driver.poll() is not None:
                    log.seek(0)
                    pytest.fail(
                        f"the driver ended before it could be killed:\n{log.read()[-3000:]}"
                    )
                assert time.monotonic() < deadline, "the driver never got there"
                time.sleep(0.02)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()


def process_tree(root: int) -> list[int]:
    """`root` and every process below it, from the parents in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def kill_tree(root: int) -> None:
    """SIGKILL `root` (a process that leads its own group, e.g. `ray start`) and every process
    below it, at once: Ray gives each worker process a process group of its own, which a
    SIGKILL to the group of `ray start` leaves running until it notices its raylet gone."""
    below = process_tree(root)
    os.killpg(root, signal.SIGKILL)
    for pid in below:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def polling(poll: Callable[[], bool | None], every_s: float) -> Iterator[None]:
    """Call `poll` every `every_s` seconds in a thread while the body runs (a sweep, mostly),
    until it returns True. What it raises is raised again once the body has ended, instead of
    ending the thread unseen."""
    stop, raised = threading.Event(), []

    def loop() -> None:
        try:
            while not stop.is_set() and not poll():
                stop.wait(every_s)
        except BaseException as exc:  # raised in the test's thread below
            raised.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if raised:
        raise raised[0]


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "64k", full: bool = True) -> Iterator[Path]:
    """A real tmpfs of `size` at `folder`, filled up unless not `full` (its filler is
    `folder/filler`); skips the test where mounting is not permitted."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {mount.stderr.strip()}")
    try:
        if full:
            with contextlib.suppress(OSError), (folder / "filler").open("wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def same_results(a: list[dict], b: list[dict]) -> bool:
    """Equal reports, bit for bit, apart from the timing fields."""
    strip = [{k: v for k, v in row.items() if k not in TIMING} for row in a]
    return strip == [{k: v for k, v in row.items() if k not in TIMING} for row in b]


class Page(HTMLParser):
    """Every script element (attributes and text) and all text outside scripts."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.scripts: list[tuple[dict, str]] = []
        self.text: list[str] = []
        self._script: dict | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self._script = dict(attrs)
            self.scripts.append((self._script, ""))

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None

    def handle_data(self, data):
        if self._script is not None:
            attrs, body = self.scripts[-1]
            self.scripts[-1] = (attrs, body + data)
        else:
            self.text.append(data)

    def figure(self, name: str) -> dict:
        (body,) = [b for a, b in self.scripts if a.get("id") == f"fig-{name}"]
        return json.loads(body)


def trace(figure: dict, name: str, axis: str = "x") -> dict:
    (found,) = [t for t in figure["data"] if t.get("name") == name and t.get("xaxis", "x") == axis]
    return found


QUICKSTART_TUNED = Path(__file__).parent.parent / "sweeps" / "quickstart_tuned.yaml"
# quickstart_tuned.yaml, tiny: 2 batch sizes x 3 trials of at most 4 epochs of 1440 examples,
# evaluated every quarter epoch (every 11 steps at batch 32, every 3 at 128), to 30%; the best
# of each study again on seeds 1 and 2.
TINY_TUNED = [
    f"base.data.samples={TINY_MNIST1D}",
    "base.epochs=4",
    "base.min_steps=null",
    "base.eval_every=0.25",
    "base.checkpoint_every=1",
    "grid.batch_size=[32, 128]",
    "search.trials_per_point=3",
    "search.confirm={top: 1, seeds: 2}",
    "target.value=0.3",
    "max_concurrent=2",
]
STUDIES = ["batch_size=32", "batch_size=128"]


def told(folder: Path) -> int:
    """Trials told to their study (COMPLETE, FAIL or PRUNED) so far, over all studies."""
    return sum(r.finished for r in read_studies(folder))


def check_studies(folder: Path) -> None:
    """Each study: trials 0..n-1, each asked once and told once, each by a Ray trial of its own
    whose reports are in the folder; its best trial confirmed on seeds 1 and 2, once each. Ray's
    newest state holds no trial of its own beside them (it may lack one told just before a
    kill, before Ray saved its state: the study keeps it)."""
    found = {r.name: r for r in read_studies(folder)}
    assert list(found) == STUDIES
    ray_ids = []
    for name, r in found.items():
        trials = sorted(r.trials, key=lambda t: t["number"])
        assert [t["number"] for t in trials] == [0, 1, 2], name
        assert all(t["state"] in ("COMPLETE", "FAIL", "PRUNED") for t in trials), (name, trials)
        assert r.confirmed == (r.best()["number"],) and r.seeds == (1, 2)
        runs = sorted(r.confirmations, key=lambda c: c["number"])
        assert [(c["number"], c["seed"], c["state"] != "RUNNING") for c in runs] == [
            (0, 1, True),
            (1, 2, True),
        ]
        ray_ids += [t["ray_trial_id"] for t in [*trials, *runs]]
    assert len(set(ray_ids)) == 10
    for ray_id in ray_ids:
        (trial,) = folder.glob(f"train_trial_{ray_id}_*")
        assert (trial / "result.json").read_text(), ray_id
    state = max(folder.glob("experiment_state-*.json"))  # the newest: Tuner.restore's
    saved = {json.loads(t)["trial_id"] for t, _ in json.loads(state.read_text())["trial_data"]}
    assert saved <= set(ray_ids)


STEPS = Objective("steps_to_target", "val/accuracy", "max", 0.5)
# McCandlish et al.'s form with S_min = 100, B_noise = 200: S(B) = 100 (1 + 200 / B).
S_MIN, B_NOISE = 100.0, 200.0
SIZES = [16, 32, 64, 128, 256, 512, 1024, 2048]


def steps_at(batch: int) -> float:
    return S_MIN * (1 + B_NOISE / batch)


def trial(
    number: int,
    value: float | None,
    lr: float = 0.1,
    state: str | None = None,
    diverged: bool = False,
    at_value: float | None = None,
    values: dict[int, float] | None = None,
    total_steps: int | None = None,
    pruned_at: int | None = None,
) -> dict:
    """A trial as `read_studies` gives it: COMPLETE with a value, else FAIL (or `state`)."""
    state = state or ("COMPLETE" if value is not None else "FAIL")
    return {
        "number": number,
        "state": state,
        "value": value,
        "at_value": at_value if at_value is not None else (0.5 if value is not None else None),
        "params": {"lr.base": lr, "optimizer.momentum": 0.9},
        "ray_trial_id": f"r{number}-{lr}",
        "reason": None if state != "FAIL" else ("diverged" if diverged else "not reached"),
        "diverged": diverged,
        "ray_errors": 0,
        "pruned_at": pruned_at,
        "total_steps": total_steps,
        "values": values or ({int(value): 0.5} if value is not None else {}),
    }


def study(point: dict, index: int, trials: list[dict], objective=STEPS) -> StudyRecord:
    name = ",".join(f"{k}={v}" for k, v in point.items())
    return StudyRecord(name, point, index, objective, trials)


def formula_studies(seeds=(0,), scale=(1.0,), never=()) -> list[StudyRecord]:
    """One study per batch size (x seed) whose best trial needs steps_at(B) x scale[seed] steps
    (rounded), with a worse and an infeasible trial beside it; batch sizes in `never` reach the
    target in no trial."""
    found = []
    for batch in SIZES:
        for seed, factor in zip(seeds, scale, strict=True):
            best = None if batch in never else round(steps_at(batch) * factor)
            point = {"batch_size": batch, "seed": seed} if len(seeds) > 1 else {"batch_size": batch}
            found.append(
                study(
                    point,
                    len(found),
                    [
                        trial(0, None if best is None else best * 2, lr=0.01),
                        trial(1, best, lr=0.1 * math.sqrt(batch / 16)),
                        trial(2, None, lr=5.0, diverged=True),
                    ],
                )
            )
    return found


class KeepingReporter:
    """Keeps every report and a copy of every checkpoint state (the loop's state shares the
    live tensors, so it is copied through torch.save as a checkpoint file would be)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.states: dict[int, dict] = {}

    def step(self, step: int, total: int) -> None:
        pass

    def report(self, metrics: dict, checkpoint: dict | None) -> None:
        self.rows.append(metrics)
        if checkpoint is not None:
            import torch

            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            buffer.seek(0)
            self.states[metrics["step"]] = torch.load(buffer, weights_only=True)
