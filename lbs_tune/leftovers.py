"""What a sweep's processes leave in the temporary folder ($TMPDIR), found and removed.

Ray's dashboard starts its modules through a multiprocessing forkserver, whose socket lives in
a `pymp-*` folder of the temporary folder. Python removes that folder when the process exits
normally; Ray stops its dashboard with a signal, so every local sweep (finished or killed) left
one behind. `forkserver_folders` finds those whose sockets no live process listens on; they are
removed when a local sweep starts and once its Ray has stopped.

The driver's own temporary files (W&B, which Ray imports to count the callbacks it is given,
makes two folders at import and removes them at exit) go to a folder of its own while a sweep
runs (`driver_folder`), removed at exit, or by the next sweep once its process is gone.

Ray Tune's driver writes the trials' report files (result.json, params.json) in a staging
folder of its Ray session (`<session>/artifacts/<stamp>/<name>/driver_artifacts`) and copies it
to the storage now and then. A sweep resumed on the same Ray session takes up the staging folder
of the run it resumes (the trials Ray restores carry its stamp), with what a killed driver wrote
there and never copied: a trial that Ray starts again from scratch had its old reports there
before its new ones, and a trial that Ray's saved state does not know found a folder of its name
and was filed under another (`..._f564`), the old one copied to the storage beside it.
`remove_dead_staging` removes those folders before such a run, so that it resumes from the
storage alone, as on any other machine.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from lbs_tune.lock import alive

# The bound Unix sockets of every process of this machine (Linux).
UNIX_SOCKETS = Path("/proc/net/unix")


def _listening() -> set[str] | None:
    """The paths of the Unix sockets bound now; None where the system does not say."""
    try:
        lines = UNIX_SOCKETS.read_text().splitlines()[1:]
    except OSError:
        return None
    # Num RefCount Protocol Flags Type St Inode [Path]
    return {fields[7] for fields in map(str.split, lines) if len(fields) >= 8}


def pymp_folders() -> set[Path]:
    """Every `pymp-*` folder of the temporary folder now."""
    return set(Path(tempfile.gettempdir()).glob("pymp-*"))


def forkserver_folders() -> list[Path]:
    """The `pymp-*` folders of the temporary folder left by processes that are gone: each
    holds only `listener-*` sockets, and none is bound. A folder that also holds anything else,
    or nothing, may belong to a live process and is left alone; so is every folder where the
    system does not list its sockets."""
    bound = _listening()
    if bound is None:
        return []
    found = []
    for candidate in pymp_folders():
        with contextlib.suppress(OSError):
            entries = list(candidate.iterdir())
            if entries and all(
                e.name.startswith("listener-")
                and stat.S_ISSOCK(e.lstat().st_mode)
                and str(e) not in bound
                for e in entries
            ):
                found.append(candidate)
    return found


def remove_forkserver_folders(wait_for: set[Path] = frozenset(), wait_s: float = 0.0) -> None:
    """Remove the `forkserver_folders`, waiting up to `wait_s` seconds for those of `wait_for`
    (the forkservers of a Ray just shut down, which stop a moment after it) to be left too."""
    deadline = time.monotonic() + wait_s
    while True:
        for gone in forkserver_folders():
            with contextlib.suppress(OSError):
                for entry in gone.iterdir():
                    entry.unlink()
                gone.rmdir()
        if not (wait_for & pymp_folders()) or time.monotonic() >= deadline:
            return
        time.sleep(0.1)


# A driver's temporary folder: `lbs-driver-<pid>-<random>`.
DRIVER_FOLDER = re.compile(r"^lbs-driver-(\d+)-")


@contextlib.contextmanager
def driver_folder() -> Iterator[Path]:
    """While the body runs, this process's temporary files go to a folder of its own in the
    temporary folder; it is removed when the process exits (after the libraries that made files
    there removed theirs). Folders of drivers that are gone (killed) are removed first."""
    for old in Path(tempfile.gettempdir()).glob("lbs-driver-*"):
        match = DRIVER_FOLDER.match(old.name)
        if match and not alive(int(match.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    folder = tempfile.mkdtemp(prefix=f"lbs-driver-{os.getpid()}-")
    # Registered now, so it runs after the exit handlers of what the body imports.
    atexit.register(shutil.rmtree, folder, True)
    before, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield Path(folder)
    finally:
        tempfile.tempdir = before


def open_below(folder: Path) -> bool | None:
    """Whether a process of this machine has a file open below `folder` (a live driver keeps
    its trials' report files open in its staging folder); None where the system does not say."""
    prefix = f"{folder}/"
    try:
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return None
    for pid in pids:
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to read
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                        return True
    return False


def staging_folders(artifacts: Path, name: str, states: Iterable[str]) -> list[Path]:
    """The driver staging folders of experiment `name` below a Ray session's `artifacts` that
    hold one of `states` (the names of the experiment's saved Ray states): those of this sweep's
    runs (their `<stamp>/<name>/driver_artifacts`)."""
    states = list(states)
    return [
        folder
        for folder in artifacts.glob(f"*/{glob.escape(name)}/driver_artifacts")
        if any((folder / state).is_file() for state in states)
    ]


def dead_staging(artifacts: Path, name: str, states: Iterable[str]) -> list[Path]:
    """The `staging_folders` in which no process has a file open: those of earlier runs of the
    sweep, whose drivers are gone (the sweep's lock is held). A copy of a sweep has its
    original's states: where the original still runs on the same Ray with a trial under way,
    its folder is left (Ray would stage the copy's files in it too, whatever this does: resume a
    copy once its original has stopped)."""
    return [f for f in staging_folders(artifacts, name, states) if open_below(f) is False]


def _session_artifacts() -> Path | None:
    """Where Ray's storage stages the driver's files in the Ray session this process has
    joined; None through Ray Client (`ray://`): Tune stages on the cluster, out of reach."""
    from ray.train.constants import _get_ray_train_session_dir
    from ray.util.client import ray as client

    return None if client.is_connected() else Path(_get_ray_train_session_dir())


def remove_dead_staging(name: str, states: Iterable[str]) -> None:
    """Remove the `dead_staging` folders of the joined Ray session: call it when resuming,
    before Ray restores."""
    artifacts = _session_artifacts()
    for folder in dead_staging(artifacts, name, states) if artifacts else []:
        shutil.rmtree(folder, ignore_errors=True)


def remove_staged(name: str, states: Iterable[str], file: str) -> None:
    """Remove `file` from this sweep's staging folders in the joined Ray session. On resume Ray
    copies the experiment's .json files into its staging folder, then back over the storage's
    at every sync, in place: a file of lbs-tune's there (the sweep record) would be rewritten
    under its readers, empty for a moment, and a newer write of it undone."""
    artifacts = _session_artifacts()
    for folder in staging_folders(artifacts, name, states) if artifacts else []:
        (folder / file).unlink(missing_ok=True)
