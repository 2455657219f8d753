"""Experiment storage: a local folder or a URI that pyarrow understands (file://, s3://, gs://)."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

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

    def read_text(self) -> str:
        with self.fs.open_input_stream(self.path) as f:
            return f.read().decode()

    def write_text(self, text: str) -> None:
        """Write a small file; on a local disk via a temporary name and an atomic rename."""
        self.fs.create_dir(posixpath.dirname(self.path), recursive=True)
        temp = self.path + ".tmp" if self.is_local else self.path
        with self.fs.open_output_stream(temp) as f:
            f.write(text.encode())
        if temp != self.path:
            self.fs.move(temp, self.path)

    def listdir(self) -> list[pafs.FileInfo]:
        if not self.exists():
            return []
        return self.fs.get_file_info(pafs.FileSelector(self.path))


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
