"""Hardening (issue 11): one writer per experiment, atomic metadata, full disks, damaged files,
terminal escapes, what a local sweep opens to the network, mixed code in one sweep, CIFAR files
checked against torchvision's MD5 sums.

The fast tests read the committed tiny experiment folders of conftest (what a real sweep wrote)
and damage copies of them; the Ray tests run real sweeps.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import (
    QUICKSTART_TUNED,
    TINY_TUNED,
    check_studies,
    driver_command,
    histories,
    kill_when,
    process_tree,
    sweep_spec,
    tiny_base,
    tmpfs,
    without_timing,
    write_spec,
)
from fixtures_formats import write_cifar10

from analysis.status import status
from lbs_tune.errors import UserError, cut, printable
from lbs_tune.experiment import disk_room
from lbs_tune.lock import exclusive, lock_location
from lbs_tune.preflight import check_writable, prepare_folder
from lbs_tune.record import mixed_runs, read_record, record_start, write_record
from lbs_tune.spec import load_spec
from lbs_tune.storage import locate, size_text
from lbs_tune.studies import create_storage

# Sequences that set the terminal's title and clear its screen.
TITLE, CLEAR = "\x1b]0;pwned\x07", "\x1b[2J"


def _unused_port() -> int:
    with socket.socket() as s:  # free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line(code: int, err: str) -> str:
    """The one error line of a command that exited 2 without a traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("lbs-tune: error: "), err
    return err.strip()


# ============================================================================ An experiment


@pytest.fixture
def copy(tiny_quickstart, tmp_path) -> Path:
    """A copy of the committed tiny quickstart experiment (conftest), to damage."""
    return Path(shutil.copytree(tiny_quickstart, tmp_path / "quickstart"))


# ============================================================================ One writer


def test_a_second_writer_is_refused_naming_host_pid_and_start(tmp_path):
    experiment = locate(tmp_path / "results" / "tiny")
    with exclusive(experiment):
        lock = json.loads(Path(lock_location(experiment).path).read_text())
        with pytest.raises(UserError) as info, exclusive(experiment):
            pytest.fail("a second writer got the lock")
    message = str(info.value)
    assert "\n" not in message
    assert f"{socket.gethostname()} pid {os.getpid()} since {lock['started']}" in message
    assert not Path(lock_location(experiment).path).exists(), "released"
    with exclusive(experiment):  # and free again
        pass


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _write_lock(experiment, host: str, pid: int) -> dict:
    holder = {"host": host, "pid": pid, "started": "2026-01-01T00:00:00+00:00",
              "command": ["lbs-tune", "run", "sweep.yaml"]}  # fmt: skip
    path = Path(lock_location(experiment).path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder))
    return holder


def test_the_lock_of_a_dead_run_on_this_host_is_taken_over_with_a_warning(tmp_path, capsys):
    experiment = locate(tmp_path / "results" / "tiny")
    dead = _dead_pid()
    _write_lock(experiment, socket.gethostname(), dead)
    with exclusive(experiment):
        held = json.loads(Path(lock_location(experiment).path).read_text())
        assert held["pid"] == os.getpid()
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("lbs-tune: warning: taking over the lock of a dead run")
    assert f"pid {dead} since 2026-01-01T00:00:00+00:00" in line
    assert not Path(lock_location(experiment).path).exists()


def test_the_lock_of_another_host_is_refused_and_taken_with_force(tmp_path, capsys):
    experiment = locate(tmp_path / "results" / "tiny")
    holder = _write_lock(experiment, "elsewhere.example", 1)
    with pytest.raises(UserError) as info, exclusive(experiment):
        pytest.fail("another host's lock was taken without force")
    assert "elsewhere.example pid 1 since 2026-01-01T00:00:00+00:00" in str(info.value)
    assert "--force-unlock" in str(info.value)
    assert json.loads(Path(lock_location(experiment).path).read_text()) == holder, "left alone"
    with exclusive(experiment, force=True):
        assert json.loads(Path(lock_location(experiment).path).read_text())["pid"] == os.getpid()
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("lbs-tune: warning: --force-unlock: taking over the lock of ")
    assert "elsewhere.example" in line


def test_an_object_stores_lock_is_refused_and_taken_over_as_a_disks(tmp_path, capsys):
    """No flock there: a holder of this host is dead when its pid is. A live run of this host
    and another host's are refused; a dead one's is taken over, another host's with force."""
    import pyarrow.fs as pafs

    from lbs_tune.storage import Location

    bucket = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    experiment = Location(bucket, "results/tiny", "s3://b/results/tiny")
    file = tmp_path / "results" / ".tiny.lbs-lock"
    file.parent.mkdir()

    def left_by(host: str, pid: int) -> None:
        file.write_text(
            json.dumps({"host": host, "pid": pid, "started": "2026-01-01T00:00:00+00:00"})
        )

    refused = "the lock of {} was taken".format
    left_by(socket.gethostname(), os.getpid())  # this process: a live run of this host
    with pytest.raises(UserError, match="wait for it to end or stop it"), exclusive(experiment):
        pytest.fail(refused("a live run"))
    left_by("elsewhere.example", 1)
    with pytest.raises(UserError, match="--force-unlock"), exclusive(experiment):
        pytest.fail(refused("another host without force"))
    assert capsys.readouterr().err == ""
    for host, pid, force in (
        (socket.gethostname(), _dead_pid(), False),
        ("elsewhere.example", 1, True),
    ):
        left_by(host, pid)
        with exclusive(experiment, force=force):
            assert json.loads(file.read_text())["pid"] == os.getpid()
        assert not file.exists()
    dead, forced = capsys.readouterr().err.splitlines()
    assert dead.startswith("lbs-tune: warning: taking over the lock of a dead run: ")
    assert forced.startswith("lbs-tune: warning: --force-unlock: taking over the lock of ")


# A process that holds the lock file's flock and writes who it is only after DELAY seconds.
HOLDER = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
    "started": "2026-01-01T00:00:00", "command": ["lbs-tune", "run", "sweep.yaml"]}).encode(), 0)
time.sleep(60)
"""


def test_a_lock_being_written_is_waited_for_not_taken(tmp_path):
    experiment = locate(tmp_path / "results" / "tiny")
    path = Path(lock_location(experiment).path)
    path.parent.mkdir(parents=True)
    # Another writer holds the lock and writes its content a moment later.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), "0.3"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError) as info, exclusive(experiment):
            pytest.fail("a lock being written was taken")
        assert f"pid {holder.pid} since 2026-01-01T00:00:00" in str(info.value)
        assert json.loads(path.read_text())["pid"] == holder.pid, "left to its writer"
    finally:
        holder.kill()
        holder.wait()
    with exclusive(experiment):  # its holder died: the flock went with it
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_an_empty_lock_left_by_a_writer_that_died_is_taken(tmp_path):
    experiment = locate(tmp_path / "results" / "tiny")
    path = Path(lock_location(experiment).path)
    path.parent.mkdir(parents=True)
    path.write_text("")  # its writer died between creating and writing it
    with exclusive(experiment):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def _take_in_rounds(experiment: Path, rounds: int, start, done, held) -> None:
    """One of the simultaneous takers of `test_six_takers_of_a_dead_runs_lock...`: each round,
    take the lock at `start` and, if taken, hold it until every taker has tried (`done`)."""
    import io

    sys.stderr = io.StringIO()  # the takeover's warning
    for round_ in range(rounds):
        start.wait()
        try:
            with exclusive(locate(experiment)):
                with held.get_lock():
                    held[round_] += 1
                done.wait()
        except UserError:
            done.wait()


def test_six_takers_of_a_dead_runs_lock_give_one_holder_in_each_of_100_rounds(tmp_path):
    import multiprocessing

    rounds, takers = 100, 6
    experiment = tmp_path / "results" / "tiny"
    context = multiprocessing.get_context("fork")
    start, done = context.Barrier(takers + 1), context.Barrier(takers + 1)
    held = context.Array("i", rounds)  # holders in each round
    processes = [
        context.Process(target=_take_in_rounds, args=(experiment, rounds, start, done, held))
        for _ in range(takers)
    ]
    for process in processes:
        process.start()
    try:
        for _ in range(rounds):
            _write_lock(locate(experiment), socket.gethostname(), _dead_pid())
            start.wait(timeout=30)
            done.wait(timeout=30)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert list(held) == [1] * rounds


def test_one_lock_whatever_link_or_uri_names_the_experiment(tmp_path):
    (tmp_path / "bigdisk" / "q").mkdir(parents=True)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "q").symlink_to(tmp_path / "bigdisk" / "q")
    names = [
        locate(tmp_path / "results").join("q"),  # `run --storage results`: the link unresolved
        locate(tmp_path / "results" / "q"),
        locate(tmp_path / "bigdisk" / "q"),
        locate(f"file://{tmp_path}/results/q"),
        locate(f"file://{tmp_path}/bigdisk/q/"),
    ]
    for holder in names:
        with exclusive(holder):
            for other in names:
                with pytest.raises(UserError), exclusive(other):
                    pytest.fail(f"{other.uri} taken while {holder.uri} is held")
    assert lock_location(names[0]).path == f"{tmp_path}/bigdisk/.q.lbs-lock"


def test_run_and_resume_through_a_link_refuse_each_other(cli, tmp_path):
    # CIFAR-10 files missing: a run that gets past the lock stops there, before Ray.
    base = tiny_base(dataset="cifar10", model="lenet", data__dir=str(tmp_path / "no-data"))
    spec = write_spec(tmp_path / "q.yaml", base, {"batch_size": [32]})
    (tmp_path / "bigdisk" / "q").mkdir(parents=True)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "q").symlink_to(tmp_path / "bigdisk" / "q")
    record_start(locate(tmp_path / "bigdisk" / "q"), load_spec(spec).model_dump(mode="json"),
                 load_spec(spec).digest(), None, [])  # fmt: skip
    holder = f"another run holds this sweep: {socket.gethostname()} pid {os.getpid()}"
    with exclusive(locate(tmp_path / "results" / "q")):  # as `resume results/q` does
        line = one_line(*cli("run", spec, "--storage", tmp_path / "results")[::2])
        assert holder in line
    with exclusive(locate(tmp_path / "results").join("q")):  # as `run --storage results` does
        for where in (tmp_path / "results" / "q", f"file://{tmp_path}/bigdisk/q"):
            line = one_line(*cli("resume", where)[::2])
            assert holder in line, where


def test_the_command_line_refuses_a_second_writer_and_force_unlock_takes_another_hosts(
    cli, tmp_path
):
    # CIFAR-10 files missing: a run that gets past the lock stops there, before Ray, in one line.
    missing = tmp_path / "no-data"
    base = tiny_base(dataset="cifar10", model="lenet", data__dir=str(missing))
    spec = write_spec(tmp_path / "tiny.yaml", base, {"batch_size": [32]})
    storage = ("--storage", tmp_path / "results")
    experiment = locate(tmp_path / "results" / "tiny")
    with exclusive(experiment):
        for args in (("run", spec), ("run", spec, "--fresh")):
            line = one_line(*cli(*args, *storage)[::2])
            assert f"another run holds this sweep: {socket.gethostname()} pid {os.getpid()}" in line
    _write_lock(experiment, "elsewhere.example", 1)
    line = one_line(*cli("run", spec, *storage)[::2])
    assert "elsewhere.example pid 1" in line and "--force-unlock" in line
    code, _, err = cli("run", spec, *storage, "--force-unlock")
    warning, error = err.splitlines()
    assert warning.startswith("lbs-tune: warning: --force-unlock: taking over the lock of ")
    assert "elsewhere.example" in warning and code == 2
    assert f"CIFAR-10 files missing from {missing}/cifar-10-batches-py" in error
    assert not lock_location(experiment).exists(), "released"


def test_readers_work_while_the_lock_is_held(cli, tiny_quickstart, tmp_path):
    experiment = tiny_quickstart
    with exclusive(locate(experiment)):
        code, out, err = cli("status", experiment)
        assert code == 0 and "  12 trials: " in out, (out, err)
        code, out, _ = cli("where", experiment, "batch_size=64")
        assert code == 0 and len(out.splitlines()) == 4
        code, out, _ = cli("export", experiment, "-o", tmp_path / "tables")
        assert code == 0 and len(out.splitlines()) == 2
        code, out, _ = cli("report", experiment, "-o", tmp_path / "report.html")
        assert code == 0 and (tmp_path / "report.html").stat().st_size > 0


@pytest.mark.ray
def test_a_second_run_while_the_first_runs_is_refused_and_the_first_runs_as_alone(
    cli, ray_cluster, reference, tmp_path
):
    """Two `lbs-tune run` of one spec into one storage: the second (and `--fresh`, and
    `resume`), started while the first runs, exit 2 naming the holder; readers answer; the
    first sweep's results are exactly those of a lone run."""
    spec = sweep_spec(tmp_path, "tiny")
    storage = tmp_path / "results"
    experiment = storage / "tiny"
    lock = Path(lock_location(locate(experiment)).path)
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(
        driver_command(spec, storage, ray_cluster.address),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (lock.exists() and (experiment / "lbs_sweep.json").exists()):
            assert driver.poll() is None and time.monotonic() < deadline, "the driver never ran"
            time.sleep(0.05)
        holder = f"another run holds this sweep: {socket.gethostname()} pid {driver.pid} since"
        address = ("--address", ray_cluster.address)
        for args in (
            ("run", spec, "--storage", storage, *address),
            ("run", spec, "--storage", storage, "--fresh", *address),
            ("resume", experiment, *address),
        ):
            line = one_line(*cli(*args)[::2])
            assert holder in line, (args, line)
        # Readers never need the lock: once trials have reported, each answers.
        while not list(experiment.glob("*/result.json")):
            assert driver.poll() is None and time.monotonic() < deadline, "no trial reported"
            time.sleep(0.05)
        for args in (
            ("status", experiment),
            ("where", experiment, "batch_size=32"),
            ("export", experiment, "-o", tmp_path / "tables"),
            ("report", experiment, "-o", tmp_path / "report.html"),
        ):
            code, out, err = cli(*args)
            assert code == 0 and out, (args, code, err)
        assert driver.poll() is None, "the first run had ended: nothing was tested"
        assert driver.wait(timeout=300) == 0
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        log.close()
    assert sorted(p.name for p in storage.iterdir()) == ["tiny"], "not moved aside, lock gone"
    expected, found = histories(reference), histories(experiment)
    assert sorted(found) == sorted(expected)
    for key, rows in expected.items():
        assert [without_timing(r) for r in found[key]] == [without_timing(r) for r in rows], key
    assert len(read_record(locate(experiment))["runs"]) == 1


# ============================================================================ Atomic writes


def test_two_writers_of_the_sweep_record_leave_valid_json_and_no_temporary_file(tmp_path):
    experiment = locate(tmp_path / "tiny")
    write_record(experiment, {"writer": -1, "n": 0})
    stop, problems = threading.Event(), []

    def write(writer: int) -> None:
        try:
            for n in range(300):
                write_record(experiment, {"writer": writer, "n": n, "pad": "x" * 5000})
        except Exception as exc:  # kept for the assertion below
            problems.append(exc)

    def read() -> None:
        while not stop.is_set():
            try:
                json.loads((tmp_path / "tiny" / "lbs_sweep.json").read_text())
            except (ValueError, OSError) as exc:
                problems.append(exc)

    reader = threading.Thread(target=read)
    writers = [threading.Thread(target=write, args=(w,)) for w in (1, 2)]
    reader.start()
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    reader.join()
    assert problems == []
    assert os.listdir(tmp_path / "tiny") == ["lbs_sweep.json"]
    assert json.loads((tmp_path / "tiny" / "lbs_sweep.json").read_text())["n"] == 299


# Smaller than the file's buffer (closing flushes it again and fails again) and larger.
@pytest.mark.parametrize("size", [2_000, 100_000])
def test_a_failing_write_leaves_no_temporary_file(tmp_path, size):
    with tmpfs(tmp_path / "disk") as disk:
        with pytest.raises(OSError) as info:
            locate(disk / "lbs_sweep.json").write_text("x" * size)
        assert info.value.errno == errno.ENOSPC
        assert sorted(os.listdir(disk)) == ["filler"]


def _train_spec(tmp_path: Path) -> Path:
    return write_spec(tmp_path / "tiny.yaml", tiny_base(epochs=1), {"batch_size": [32]})


def test_train_on_a_full_disk_says_so_in_one_line(cli, tmp_path, data_dir):
    spec = _train_spec(tmp_path)
    with tmpfs(tmp_path / "disk") as disk:
        line = one_line(*cli("train", spec, "--out", disk / "run", "--device", "cpu")[::2])
        assert "No space left on device" in line


def test_train_whose_checkpoint_does_not_fit_says_so_and_leaves_no_temporary_file(
    cli, tmp_path, data_dir
):
    spec = _train_spec(tmp_path)
    # Room for config.json and metrics.jsonl, not for the MLP's first checkpoint (~700 KB).
    with tmpfs(tmp_path / "disk", size="64k", full=False) as disk:
        line = one_line(*cli("train", spec, "--out", disk / "run", "--device", "cpu")[::2])
        assert "cannot write the run's files (No space left on device)" in line
        assert sorted(os.listdir(disk / "run")) == ["config.json", "metrics.jsonl"]


def test_export_on_a_full_disk_says_what_it_needs_and_leaves_the_last_export(
    cli, tiny_quickstart, tmp_path
):
    with tmpfs(tmp_path / "disk", size="2m", full=False) as disk:
        code, _, err = cli("export", tiny_quickstart, "-o", disk / "tables")
        assert code == 0, err
        before = {p.name: p.read_bytes() for p in (disk / "tables").iterdir()}
        assert sorted(before) == ["history.parquet", "trials.parquet"]
        with contextlib.suppress(OSError), (disk / "filler").open("wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)
        for out_dir in (disk / "tables", disk / "new" / "tables"):
            line = one_line(*cli("export", tiny_quickstart, "-o", out_dir)[::2])
            assert f"-o {out_dir}: cannot write there (No space left on device: " in line
            assert re.search(r"[0-9.]+ kB needed, [0-9.]+ (B|kB) free\)", line), line
        # The export before is whole, nothing half-written beside it, no folder made.
        assert {p.name: p.read_bytes() for p in (disk / "tables").iterdir()} == before
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "tables"]


def _address() -> tuple[str, str]:
    return ("--address", f"127.0.0.1:{_unused_port()}")


def test_run_with_a_storage_under_a_file_is_one_line_and_writes_nothing(cli, tmp_path):
    spec = _train_spec(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    storage = tmp_path / "a-file" / "results"
    line = one_line(*cli("run", spec, "--storage", storage, *_address())[::2])
    assert f"--storage {storage}: cannot write there" in line
    assert sorted(os.listdir(tmp_path)) == ["a-file", "tiny.yaml"]


def test_run_on_a_full_disk_is_one_line_leaves_no_temporary_file_and_fresh_then_runs(cli, tmp_path):
    spec = _train_spec(tmp_path)
    with tmpfs(tmp_path / "disk") as disk:
        storage = disk / "results"
        line = one_line(*cli("run", spec, "--storage", storage, *_address())[::2])
        assert "cannot write there (No space left on device)" in line
        left = sorted(str(p.relative_to(disk)) for p in disk.rglob("*"))
        assert left in (["filler"], ["filler", "results"]), left
        (disk / "filler").unlink()
        # What the failed run left refuses no later run: the steps of `run` before Ray pass.
        experiment = locate(storage / "tiny")
        check_writable(experiment.parent())
        with exclusive(experiment):
            assert prepare_folder(load_spec(spec), experiment, fresh=True) is None


def test_disk_room_counts_the_running_trials_next_checkpoints(tmp_path):
    with tmpfs(tmp_path / "disk", size="2m", full=False) as disk:
        experiment = locate(disk / "tiny")
        trial = disk / "tiny" / "train_trial_1a2b3_00000_batch_size=32" / "checkpoint_000000"
        trial.mkdir(parents=True)
        (trial / "state.pt").write_bytes(b"\0" * 300_000)  # 2 MB disk: ~1.7 MB free
        assert disk_room(experiment, running=2, unfinished=3) is None
        full = disk_room(experiment, running=3, unfinished=3)  # 0.9 MB + 1 MB reserve
        assert str(full) == (
            f"{disk}/tiny: the disk is full ({size_text(shutil.disk_usage(disk).free)} free; this "
            "sweep needs about 1.9 MB more for its 3 trials to go); free some space and run the "
            "same command again: it goes on where it stopped"
        )
        # A checkpoint size known beforehand decides without reading the folder.
        assert disk_room(experiment, 2, 3, checkpoint_bytes=300_000) is None


@pytest.mark.ray
def test_a_sweep_that_fills_its_disk_stops_in_one_line_and_then_runs_exactly(
    cli, ray_cluster, tmp_path
):
    """A tuned sweep on a 3 MB disk: it stops with one line that says how much it needs, exit
    2, no traceback; on a grown disk the same command finishes every study exactly."""

    sets = [arg for override in TINY_TUNED for arg in ("--set", override)]
    with tmpfs(tmp_path / "disk", size="3m", full=False) as disk:
        command = ("run", QUICKSTART_TUNED, "--storage", disk / "results", *sets)
        code, _, err = cli(*command, "--address", ray_cluster.address)
        assert code == 2 and "Traceback" not in err, err
        (line,) = [ln for ln in err.splitlines() if ln.startswith("lbs-tune: error: ")]
        assert line.startswith(f"lbs-tune: error: {disk}/results/quickstart_tuned: the disk is")
        assert re.search(r"\(\S+ .?B free; this sweep needs about \S+ .?B more for its", line)
        assert line.endswith("run the same command again: it goes on where it stopped"), line
        json.loads((disk / "results" / "quickstart_tuned" / "lbs_sweep.json").read_text())
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        code, out, err = cli(*command, "--address", ray_cluster.address)
        count = load_spec(QUICKSTART_TUNED, TINY_TUNED).trial_count
        assert code == 0 and f"{count} of {count} trials: " in out, err
        check_studies(disk / "results" / "quickstart_tuned")


@pytest.mark.ray
def test_a_local_sweep_killed_then_finished_listens_on_the_loopback_only_and_leaves_nothing(
    tmp_path, data_dir
):
    """Its own Ray, started with TMPDIR set and token authentication off: killed once a
    checkpoint is made, then run again to its end while every listening socket of its process
    tree is watched. Ray listens on 127.0.0.0/8 only, its dashboard answers without a token and
    the line under it says so (it said "on" whatever the mode). $TMPDIR keeps Ray's folders (its
    session's logs, its file locks) and torch's compile cache, nothing else: no forkserver
    folder of Ray's dashboard, no checkpoint."""

    # Short: Ray's sockets live below it, and a socket's path has at most 107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="lbs-", dir="/tmp"))
    spec = write_spec(tmp_path / "local.yaml", tiny_base(epochs=2), {"seed": [0, 1]})
    storage = tmp_path / "results"
    env = {**os.environ, "TMPDIR": str(tmp), "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "lbs_tune.cli", "run", str(spec), "--storage",
               str(storage), "--cpus", "1"]  # fmt: skip
    try:
        kill_when(command, lambda: any(storage.glob("local/*/checkpoint_*")), env=env)
        log = tmp_path / "rerun.log"
        code, seen, answered = _run_watching_sockets(command, env, log)
        text = log.read_text()
        assert code == 0, text[-3000:]
        assert "2 of 2 trials: 2 finished" in text
        assert len(seen) >= 2, f"saw too few listening sockets to judge: {seen}"
        outside = [key for key in seen if not _loopback(ipaddress.ip_address(key[1]))]
        assert outside == [], f"listening outside 127.0.0.0/8: {outside}"
        assert answered == 200, f"the dashboard answered {answered} without a token"
        (line,) = [ln for ln in text.splitlines() if "token authentication is" in ln]
        assert "token authentication is OFF" in line, line
        ours = [p for p in os.listdir(tmp) if p not in ("ray", "_ray_lockfiles")]
        assert [p for p in ours if not p.startswith("torchinductor_")] == []
        assert _running_below(tmp) == [], "a Ray process of the sweeps lives on"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _running_below(folder: Path) -> list[int]:
    """The processes whose command line names a path below `folder`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if str(folder).encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
    return found


# ============================================================================ Resources


@pytest.mark.parametrize(
    "resources, flags, line",
    [
        ({"gpu": 0.25}, ["--gpus", "0"],
         "resources.gpu: a trial of batch size 32 asks for 0.25 GPU, but the local Ray has 0 "
         "(--gpus): it would wait forever; run with --set resources.gpu=0 to train on the CPU, "
         "or join a cluster that has them with --address"),
        ({"gpu": {"32": 0, "64": 1}}, ["--gpus", "0"],
         "resources.gpu: a trial of batch size 64 asks for 1 GPU, but the local Ray has 0"),
        ({"cpu": 4096}, [], "resources.cpu: a trial of batch size 32 asks for 4096 CPU, but "
         f"this machine has {os.cpu_count()}: it would wait forever; run with --set "
         f"resources.cpu={os.cpu_count()} (or less)"),
        ({"cpu": 3}, ["--cpus", "2"], "but the local Ray has 2 (--cpus)"),
    ],
    ids=["gpu-fraction", "gpu-by-batch", "cpu", "cpus-flag"],
)  # fmt: skip
def test_a_local_sweep_that_asks_for_more_than_the_machine_has_is_refused_before_ray(
    cli, tmp_path, resources, flags, line
):
    spec = write_spec(tmp_path / "tiny.yaml", tiny_base(), {"batch_size": [32, 64]},
                      resources=resources)  # fmt: skip
    error = one_line(*cli("run", spec, "--storage", tmp_path / "results", *flags)[::2])
    assert line in error
    assert sorted(os.listdir(tmp_path)) == ["tiny.yaml"], "nothing is left behind"


@pytest.mark.ray
def test_a_cluster_that_lacks_what_a_trial_asks_for_is_said_once(ray_cluster, tmp_path, capsys):
    from lbs_tune.preflight import waiting_for

    gpu = {"32": 1, "64": ray_cluster.gpus + 1}
    spec = write_spec(
        tmp_path / "big.yaml", tiny_base(), {"batch_size": [32, 64]}, resources={"gpu": gpu}
    )
    waiting_for(load_spec(spec))
    assert capsys.readouterr().err == (
        "lbs-tune: waiting for the cluster to grow: a trial of batch size 64 asks for "
        f"{ray_cluster.gpus + 1} GPU (resources.gpu) and the cluster has {ray_cluster.gpus} now; "
        "an autoscaler may add nodes; if none will, stop this run and run it with less\n"
    )
    waiting_for(load_spec(spec, ["resources.gpu=1"]))
    assert capsys.readouterr().err == "", "it fits: nothing to say"


# ============================================================================ Damaged files


@pytest.mark.parametrize("command", ["status", "report"])
def test_status_and_report_of_a_sweep_record_that_is_a_json_list(cli, copy, tmp_path, command):
    (copy / "lbs_sweep.json").write_text("[1, 2, 3]\n")
    args = ("-o", tmp_path / "report.html") if command == "report" else ()
    line = one_line(*cli(command, copy, *args)[::2])
    assert f"{copy}/lbs_sweep.json" in line


def _damage_study_storage(db: Path, damage: str) -> None:
    """Make `db` a damaged study storage: `damage` is 'zero bytes', 'garbage' or 'truncated'
    (the first pages of a real one)."""
    if damage == "zero bytes":
        db.write_bytes(b"")
    elif damage == "garbage":
        db.write_bytes(bytes(range(256)) * 40)
    else:
        create_storage(db)
        db.write_bytes(db.read_bytes()[:8192])


@pytest.mark.parametrize("damage", ["zero bytes", "garbage", "truncated"])
def test_every_reader_of_a_damaged_study_storage_says_so_in_one_line_and_leaves_it(
    cli, copy, tmp_path, damage
):
    db = copy / "optuna.db"
    _damage_study_storage(db, damage)
    before = db.read_bytes()
    for args in (
        ("status", copy),
        ("report", copy, "-o", tmp_path / "report.html"),
        ("export", copy, "-o", tmp_path / "tables"),
    ):
        line = one_line(*cli(*args)[::2])
        assert f"{db}: damaged study storage (" in line and "--fresh" in line, (args, line)
    # A reader never writes to the experiment's studies: no schema, no journal.
    assert db.read_bytes() == before
    assert sorted(p.name for p in copy.glob("optuna.db*")) == ["optuna.db"]
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "tables").exists()


def test_report_of_a_recorded_metric_it_does_not_know(cli, copy, tmp_path):
    record = json.loads((copy / "lbs_sweep.json").read_text())
    record["spec"]["metric"] = {"name": "val/f1", "mode": "max"}
    (copy / "lbs_sweep.json").write_text(json.dumps(record))
    line = one_line(*cli("report", copy, "-o", tmp_path / "report.html")[::2])
    assert "val/f1" in line


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"batch_size": "many"}'])
def test_evaluate_of_a_damaged_params_file(cli, copy, text):
    (params,) = sorted(copy.glob("*/params.json"))[:1]
    params.write_text(text)
    line = one_line(*cli("evaluate", copy, "--device", "cpu")[::2])
    assert f"{params}: damaged trial config" in line


def test_report_and_export_to_a_path_under_a_file(cli, tiny_quickstart, tmp_path):
    experiment = tiny_quickstart
    (tmp_path / "a-file").write_text("not a folder")
    line = one_line(*cli("report", experiment, "-o", tmp_path / "a-file" / "report.html")[::2])
    assert f"-o {tmp_path / 'a-file' / 'report.html'}: cannot write there" in line
    line = one_line(*cli("export", experiment, "-o", tmp_path / "a-file" / "tables")[::2])
    assert f"-o {tmp_path / 'a-file' / 'tables'}: cannot write there" in line


def test_where_with_a_filter_that_is_not_yaml(cli, tiny_quickstart):
    line = one_line(*cli("where", tiny_quickstart, "batch_size=[oops")[::2])
    assert "batch_size=[oops" in line


# ============================================================================ Terminal escapes


def _controls(text: str) -> list[str]:
    """The control characters in `text` but newlines (ESC, BEL, CSI ...)."""
    return [c for c in text if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) <= 0x9F]


def set_data_dir(experiment: Path, folder: str) -> Path:
    """Give the first trial of `experiment` the config value data.dir = `folder`, where readers
    find it (Ray's experiment state, params.json) and make data.dir a grid key; returns the
    trial's folder."""
    (state_path,) = experiment.glob("experiment_state-*.json")
    state = json.loads(state_path.read_text())
    trial = json.loads(state["trial_data"][0][0])
    trial["config"]["data"]["dir"] = folder
    state["trial_data"][0][0] = json.dumps(trial)
    state_path.write_text(json.dumps(state))
    params = experiment / trial["relative_logdir"] / "params.json"
    params.write_text(
        json.dumps({**json.loads(params.read_text()), "data": trial["config"]["data"]})
    )
    record = json.loads((experiment / "lbs_sweep.json").read_text())
    record["spec"]["grid"]["data.dir"] = [folder]
    (experiment / "lbs_sweep.json").write_text(json.dumps(record))
    return params.parent


def test_status_prints_no_escape_sequence_from_error_files_and_configs(cli, copy):
    trial = set_data_dir(copy, f"/data/{TITLE}{CLEAR}x")
    record = json.loads((copy / "lbs_sweep.json").read_text())
    record["git_commit"] = f"abc{CLEAR}def"
    (copy / "lbs_sweep.json").write_text(json.dumps(record))
    (trial / "error.txt").write_text(
        f"Traceback (most recent call last):\nValueError: boom {TITLE}{CLEAR}after\n"
    )
    code, out, _ = cli("status", copy)
    assert code == 0 and "boom" in out and "/data/" in out and "abc" in out, out
    assert _controls(out) == [], [line for line in out.splitlines() if _controls(line)]


def test_bidirectional_controls_are_taken_out_of_what_is_echoed():
    # Each would reorder how a terminal shows the rest of the line; letters of any script stay.
    text = "a\u202eb\u2066c\u2069d\u200fe\u061cf\tg\nh é 中"
    assert printable(text) == "abcdef\tg\nh é 中"
    assert cut(f"x{chr(0x202E)}" * 60, 10) == "xxxxxxx..."


def test_a_sweep_file_name_with_escape_sequences_is_printed_without_them(cli, tmp_path):
    spec = tmp_path / f"evil{TITLE}{CLEAR}.yaml"
    spec.write_text("name: [unclosed\n")
    for args in (("run", spec, "--storage", tmp_path / "results"), ("train", spec)):
        code, _, err = cli(*args)
        assert "evil" in one_line(code, err) and _controls(err) == [], err


# ============================================================================ The network


def _listening() -> dict[int, tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """Socket inode -> (address, port) of every TCP socket in LISTEN state."""
    found = {}
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            hexaddr, hexport = fields[1].split(":")
            # The kernel prints each 32-bit word of the address in host (little-endian) order.
            words = [bytes.fromhex(hexaddr[i : i + 8])[::-1] for i in range(0, len(hexaddr), 8)]
            found[int(fields[9])] = (ipaddress.ip_address(b"".join(words)), int(hexport, 16))
    return found


def _sockets(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def _loopback(address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _run_watching_sockets(command: list[str], env: dict, log: Path) -> tuple[int, set, int | None]:
    """Run the driver `command` to its end, logging to `log`, while watching every listening
    socket of its process tree (the driver, the GCS, the raylet, the dashboard and its agents,
    the workers): (its exit code, {(process name, address, port)}, the HTTP status with which
    its dashboard answered a request without a token)."""
    with log.open("w") as out:
        driver = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    seen: set[tuple[str, str, int]] = set()
    answered = None
    try:
        while driver.poll() is None:
            listening = _listening()
            for pid in process_tree(driver.pid):
                for inode in _sockets(pid) & set(listening):
                    address, port = listening[inode]
                    with contextlib.suppress(OSError):
                        name = Path(f"/proc/{pid}/comm").read_text().strip()
                        seen.add((name, str(address), port))
            dashboard = [ln for ln in log.read_text().splitlines() if "Ray dashboard: " in ln]
            if dashboard and answered is None:
                url = dashboard[0].split("Ray dashboard: ")[1].strip() + "/api/version"
                with contextlib.suppress(urllib.error.URLError, OSError):
                    try:
                        answered = urllib.request.urlopen(url, timeout=5).status
                    except urllib.error.HTTPError as exc:
                        answered = exc.code
            time.sleep(0.3)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    return driver.returncode, seen, answered


# ============================================================================ Mixed code


def test_a_run_under_another_commit_warns_in_one_line_and_records_both(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # no git checkout: the commit is $LBS_GIT_COMMIT
    experiment = locate(tmp_path / "tiny")
    spec = {"name": "tiny", "grid": {}}
    monkeypatch.setenv("LBS_GIT_COMMIT", "1111111")
    record_start(experiment, spec, "d1g", None, ["/data/a"])
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LBS_GIT_COMMIT", "2222222")
    record_start(experiment, spec, "d1g", read_record(experiment), ["/data/a"])
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        "lbs-tune: warning: this run differs from the sweep's first: git_commit: 1111111 -> 2222222"
    )
    runs = read_record(experiment)["runs"]
    assert [r["git_commit"] for r in runs] == ["1111111", "2222222"]
    assert [r["data_dirs"] for r in runs] == [["/data/a"], ["/data/a"]]
    assert all(r["lbs_tune_version"] and r["started"] and r["command"] for r in runs)


def test_mixed_runs_of_hand_made_runs():
    first = {"lbs_tune_version": "1.0", "git_commit": "aaa", "data_dirs": ["/d"]}
    assert mixed_runs([]) == mixed_runs([first]) == mixed_runs([first, dict(first)]) == ""
    last = {"lbs_tune_version": "1.1", "git_commit": "aaa", "data_dirs": ["/e"]}
    assert mixed_runs([first, dict(first), last]) == (
        "lbs_tune_version: 1.0 -> 1.1; data_dirs: ['/d'] -> ['/e']"
    )
    # Runs recorded before these keys existed: nothing to compare.
    assert mixed_runs([{"started": "x", "command": []}, last]) == ""


def test_status_shows_a_run_under_another_commit(copy):
    record = json.loads((copy / "lbs_sweep.json").read_text())
    run = record["runs"][0]
    record["runs"] = [{**run, "git_commit": "1111111"}, {**run, "git_commit": "2222222"}]
    (copy / "lbs_sweep.json").write_text(json.dumps(record))
    text = status(str(copy))
    assert "1111111" in text and "2222222" in text


# ============================================================================ CIFAR files


class _Payload:
    """Unpickling it makes a folder: proof that the file's code ran."""

    def __init__(self, proof: Path):
        self.proof = proof

    def __reduce__(self):
        return os.mkdir, (str(self.proof),)


def test_a_cifar_batch_that_would_run_code_is_refused_unread(tmp_path):
    from lbs_tune.formats import read_torchvision

    write_cifar10(tmp_path / "data", n_train=40, n_test=8)
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1"
    proof = tmp_path / "the file's code ran"
    batch.write_bytes(pickle.dumps(_Payload(proof), protocol=2))
    with pytest.raises(UserError) as info:
        read_torchvision("cifar10", tmp_path / "data", download=False)
    assert not proof.exists(), "the file's code ran"
    assert f"{batch} is corrupted" in str(info.value) and "\n" not in str(info.value)


def test_a_cifar_archive_that_is_not_torchvisions_is_refused(tmp_path):
    from lbs_tune.formats import read_torchvision

    expected = write_cifar10(tmp_path / "data", n_train=40, n_test=8)
    assert read_torchvision("cifar10", tmp_path / "data", download=False).train_x.shape == (
        expected.train_x.shape
    ), "no archive there: nothing to check"
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.write_bytes(b"not torchvision's archive")
    with pytest.raises(UserError) as info:
        read_torchvision("cifar10", tmp_path / "data", download=False)
    message = str(info.value)
    assert f"{archive}: MD5 " in message and "c58f30108f718f92721af3b95e74349a" in message


# ============================================================================ The README


def test_every_test_the_readmes_reliability_section_names_exists():
    root = Path(__file__).parent.parent
    text = (root / "README.md").read_text()
    section = text.split("### Reliability")[1].split("\n### ")[0]
    named = set(re.findall(r"`(?:test_\w+\.py::)?(test_\w+)`", section))
    defined = {
        name
        for test_file in (root / "tests").glob("test_*.py")
        for name in re.findall(r"^def (test_\w+)\(", test_file.read_text(), re.MULTILINE)
    }
    assert len(named) >= 15 and sorted(named - defined) == []
