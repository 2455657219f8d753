"""Experiment storage: a local folder or a URI that pyarrow understands (file://, s3://, gs://)."""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs

from lbs_tune.errors import UserError


@dataclass(frozen=True)
class Location:
    """A folder on a pyarrow filesystem; `uri` is what Ray Tune is given as its storage path."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> Location:
        path = posixpath.join(self.path, *parts)
        uri = posixpath.join(self.uri, *parts) if "://" in self.uri else str(Path(self.uri, *parts))
        return Location(self.fs, path, uri)

    def parent(self) -> Location:
        path = posixpath.dirname(self.path.rstrip("/"))
        uri = (
            self.uri.rstrip("/").rsplit("/", 1)[0]
            if "://" in self.uri
            else str(Path(self.uri).parent)
        )
        return Location(self.fs, path, uri)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_text(self, text: str) -> None:
        """Replace the file with `text` atomically (see `atomic_output`)."""
        with self.atomic_output() as f:
            f.write(text.encode())

    @contextlib.contextmanager
    def atomic_output(self) -> Iterator[BinaryIO]:
        """A stream that replaces this file as a whole: readers and a crash see the old file or
        the new one (see `atomic_outputs`)."""
        with atomic_outputs([self]) as (f,):
            yield f

    def listdir(self) -> list[pafs.FileInfo]:
        if not self.exists():
            return []
        return self.fs.get_file_info(pafs.FileSelector(self.path))


@contextlib.contextmanager
def atomic_outputs(targets: list[Location]) -> Iterator[list[BinaryIO]]:
    """Streams that replace the files `targets`, all of them or none: readers and a crash see
    the old files or the new ones. On a local disk each is a temporary file of a unique name
    beside its target, flushed to disk; once every one is written they are renamed over their
    targets. A failed write (a full disk) removes them all and leaves the targets as they were.
    On an object store each upload is atomic by itself. Folders are made as needed."""
    for target in targets:
        target.fs.create_dir(posixpath.dirname(target.path), recursive=True)
    if not all(target.is_local for target in targets):
        with contextlib.ExitStack() as stack:
            yield [stack.enter_context(t.fs.open_output_stream(t.path)) for t in targets]
        return
    files = []
    try:
        for target in targets:
            folder, name = posixpath.split(target.path)
            # Closed below, on success and on failure alike.
            temporary = tempfile.NamedTemporaryFile(  # noqa: SIM115
                dir=folder, prefix=f".{name}.", delete=False
            )
            files.append(temporary)
        yield files
        for f in files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
    except BaseException:
        for f in files:
            # Closing flushes what is buffered and may fail the same way (a full disk).
            with contextlib.suppress(OSError):
                f.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f.name)
        raise
    for f, target in zip(files, targets, strict=True):
        # NamedTemporaryFile makes the file 0600: give it the mode a plain open would.
        os.chmod(f.name, 0o666 & ~_umask())
        os.replace(f.name, target.path)


def check_space(folder: Location, needed: int) -> None:
    """OSError(ENOSPC) that says how much space is needed and how much is free, unless the disk
    of `folder` (or of its nearest existing parent) has `needed` bytes free. Object stores are
    not checked."""
    if not folder.is_local:
        return
    path = Path(folder.path)
    while not path.exists() and path != path.parent:
        path = path.parent
    stat = os.statvfs(path)
    free = stat.f_bavail * stat.f_frsize
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device: {size_text(needed)} needed, {size_text(free)} free",
        )


def size_text(count: int) -> str:
    """A number of bytes for people: '812 B', '4.1 kB', '1.3 MB', '2.0 GB'."""
    for power, unit in ((3, "GB"), (2, "MB"), (1, "kB")):
        if count >= 1000**power:
            return f"{count / 1000**power:.1f} {unit}"
    return f"{count} B"


@contextlib.contextmanager
def scaffolding(folder: Location) -> Iterator[None]:
    """While the body runs, `folder` may be made (on a local disk); the folders made for it are
    removed again afterwards if still empty, so a refused run leaves nothing behind."""
    made = []
    if folder.is_local:
        path = Path(folder.path)
        while not path.exists() and path != path.parent:
            made.append(path)
            path = path.parent
    try:
        yield
    finally:
        for path in made:  # innermost first; a folder that something filled meanwhile stays
            with contextlib.suppress(OSError):
                path.rmdir()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def locate(where: str | Path) -> Location:
    """A Location for a local path (made absolute) or a URI such as s3://bucket/sweeps."""
    text = str(where)
    if "://" not in text:
        path = str(Path(text).expanduser().resolve())
        return Location(pafs.LocalFileSystem(), path, path)
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise UserError(f"{text}: pyarrow cannot open this storage URI ({exc})") from None
    return Location(fs, path.rstrip("/"), text.rstrip("/"))
