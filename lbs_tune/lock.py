"""One writer per experiment: the lock that `lbs-tune run` and `resume` hold while they run.

The lock is the `fcntl.flock` of a file beside the experiment's canonical path (symbolic links
resolved, a `file://` URI as its path), so that however the experiment is named, one process at
a time writes it, and the kernel hands a dead holder's lock to the next taker atomically. The
file records who holds it (host, pid, start, command) for the message a second run gets. On an
object store, where no lock can be taken, the file is checked and then written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import posixpath
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lbs_tune.errors import UserError
from lbs_tune.record import now_iso
from lbs_tune.storage import Location

# The longest a lock may stay empty while its holder writes who it is (one small write).
LOCK_WRITE_S = 2.0


def canonical(experiment: Location) -> Location:
    """The experiment as one name, however it was given: on a local disk, its path with every
    symbolic link resolved (`results/q` linking to `bigdisk/q` is `bigdisk/q`; a `file://` URI
    is its path); elsewhere, as given."""
    if not experiment.is_local:
        return experiment
    path = os.path.realpath(experiment.path)
    return Location(experiment.fs, path, path)


def lock_location(experiment: Location) -> Location:
    """The lock of an experiment: beside its folder (its canonical path), so `--fresh` can move
    the folder aside while the lock stays held, and readers of the folder never meet it."""
    return canonical(experiment).parent().join(f".{canonical(experiment).name}.lbs-lock")


@contextlib.contextmanager
def exclusive(experiment: Location, force: bool = False) -> Iterator[None]:
    """Hold the experiment's lock (host, pid, start time, command) while the body runs.

    A lock held by a live run is a UserError naming the holder. On a local or shared disk the
    holder is who holds `fcntl.flock` on the lock file: the kernel drops it when its process
    dies, so the takeover of a dead run's lock is atomic (of any number of simultaneous takers,
    one gets it). A lock left by a run of this host that died is taken over with a warning; one
    left by another host is taken only with `force` (a file system may not share flocks between
    hosts). On an object store, where no file can be locked, the lock is checked, then written.
    """
    lock = lock_location(experiment)
    mine = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": now_iso(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
    }
    if not lock.is_local:
        with _object_store_lock(experiment, lock, mine, force):
            yield
        return
    fd = _take(experiment, lock.path, mine, force)
    try:
        yield
    finally:
        # Removed while still held: a taker that opened it meanwhile finds, once it holds it,
        # that the path names another file (or none) and opens it again (see `_take`).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock.path)
        os.close(fd)


def _who(holder: dict[str, Any]) -> str:
    return (
        f"{holder.get('host')} pid {holder.get('pid')} since {holder.get('started')} "
        f"({' '.join(map(str, holder.get('command') or []))})"
    )


def _busy(experiment: Location, holder: dict[str, Any], host: str) -> UserError:
    """The error of a lock held by a live run, or left by another host's."""
    if holder.get("host") != host:
        return UserError(
            f"{experiment.uri}: another run holds this sweep: {_who(holder)}; wait for it, or if "
            "that host's run is gone, run again with --force-unlock"
        )
    return UserError(
        f"{experiment.uri}: another run holds this sweep: {_who(holder)}; wait for it to end or "
        "stop it (a second writer would run its trials twice)"
    )


def _take_over(
    experiment: Location, holder: dict[str, Any], host: str, dead: bool, force: bool
) -> None:
    """The lock left by `holder`: taken over, with a warning, when its run is of this `host`
    and `dead`, or of another host with --force-unlock (`force`); else the run is refused."""
    if holder.get("host") == host and dead:
        print(
            f"lbs-tune: warning: taking over the lock of a dead run: {_who(holder)}",
            file=sys.stderr,
        )
    elif holder.get("host") != host and force:
        print(
            f"lbs-tune: warning: --force-unlock: taking over the lock of {_who(holder)}",
            file=sys.stderr,
        )
    else:
        raise _busy(experiment, holder, host)


def _take(experiment: Location, path: str, mine: dict[str, Any], force: bool) -> int:
    """Hold the flock of the lock file at `path` and write `mine` into it; return its fd."""
    os.makedirs(posixpath.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Held: its holder may not have written who it is yet.
            holder = _content(fd, wait=LOCK_WRITE_S) or {"host": "?", "pid": "?"}
            os.close(fd)
            raise _busy(experiment, holder, mine["host"]) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder removed it as it let go: take the file that is there now
            os.close(fd)
            continue
        left = _content(fd)
        if left:
            try:  # its holder let go of the flock: that run is gone
                _take_over(experiment, left, mine["host"], dead=True, force=force)
            except UserError:
                os.close(fd)
                raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
        os.fsync(fd)
        return fd


def _content(fd: int, wait: float = 0.0) -> dict[str, Any] | None:
    """Who the lock file `fd` names; None if it is empty or not JSON, after waiting up to
    `wait` seconds for its holder to write it."""
    waited = 0.0
    while True:
        raw = os.pread(fd, 1 << 16, 0)
        try:
            holder = json.loads(raw)
            return holder if isinstance(holder, dict) else None
        except (ValueError, UnicodeDecodeError):
            if waited >= wait:
                return None
        time.sleep(0.05)
        waited += 0.05


@contextlib.contextmanager
def _object_store_lock(
    experiment: Location, lock: Location, mine: dict[str, Any], force: bool
) -> Iterator[None]:
    """The lock on an object store, where no file can be locked or made atomically: checked,
    then written. A dead run's of this host is taken over; another host's with `force`."""
    if lock.exists():
        try:
            holder = json.loads(lock.read_text())
        except (ValueError, UnicodeDecodeError):
            holder = {}
        holder = holder if isinstance(holder, dict) else {}
        dead = not alive(holder.get("pid"))  # said only of a process of this host
        _take_over(experiment, holder, mine["host"], dead=dead, force=force)
    with lock.fs.open_output_stream(lock.path) as f:
        f.write(json.dumps(mine).encode())
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(lock.read_text()) == mine:
                lock.fs.delete_file(lock.path)


def alive(pid: Any) -> bool:
    """Whether a process of this host has the id `pid`."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
