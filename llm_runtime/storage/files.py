"""The file-system backend: a local disk, FSx for Lustre, EFS or a SageMaker File/FastFile channel.

Same interface as :class:`.s3.S3Store`; keys are paths under the root. Writes go to a temporary
name and are renamed into place, so a reader never sees half an object.
"""
from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from .base import RequestStats, Store
from .errors import ObjectMissing, StorageError

__all__ = ["FileStore"]

COPY_BLOCK = 8 << 20


class FileStore(Store):
    def __init__(self, root: str | os.PathLike, *, read_size: int = 1 << 20, _stats: RequestStats | None = None):
        self.root = Path(root)
        self.uri = str(self.root)
        self.read_size = read_size
        self.stats = _stats or RequestStats()

    def child(self, prefix: str) -> "FileStore":
        return FileStore(self.root / prefix, read_size=self.read_size, _stats=self.stats)

    def path(self, name: str) -> Path:
        return self.root / name if name else self.root

    def url(self, name: str = "") -> str:
        return str(self.path(name))

    def _fail(self, what: str, name: str, err: OSError) -> StorageError:
        if isinstance(err, FileNotFoundError):
            return ObjectMissing(f"{self.path(name)} does not exist")
        return StorageError(f"{what} {self.path(name)} failed: {err.strerror or type(err).__name__}")

    def _tmp(self, target: Path) -> Path:
        return target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")

    # ---- reads ------------------------------------------------------------------------
    def read_bytes(self, name: str, offset: int = 0, size: int | None = None) -> bytes:
        self.stats.request("GET")
        try:
            with open(self.path(name), "rb") as handle:
                handle.seek(offset)
                data = handle.read() if size is None else handle.read(size)
        except OSError as err:
            raise self._fail("read of", name, err) from None
        if size is not None and len(data) != size:
            raise StorageError(f"{self.path(name)} bytes {offset}+{size}: the file ends after {len(data)}")
        self.stats.add(read=len(data))
        return data

    def size(self, name: str) -> int:
        try:
            return self.path(name).stat().st_size
        except OSError as err:
            raise self._fail("stat of", name, err) from None

    def open_range(self, name: str, offset: int, length: int) -> "_FileRange":
        try:
            handle = open(self.path(name), "rb", buffering=self.read_size)
        except OSError as err:
            raise self._fail("open of", name, err) from None
        handle.seek(offset)
        self.stats.request("GET")
        return _FileRange(handle, self.path(name), offset, offset + length, self.stats)

    def download(self, name: str, path: str | os.PathLike) -> None:
        try:
            shutil.copyfile(self.path(name), path)
        except OSError as err:
            raise self._fail("copy of", name, err) from None
        self.stats.request("GET")

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(key relative to the root, size) of every file under ``prefix`` (a directory or a name prefix)."""
        directory = self.path(prefix) if not prefix or prefix.endswith("/") else self.path(prefix).parent
        if not directory.is_dir():
            return
        self.stats.request("LIST")
        for path in sorted(directory.rglob("*")):
            key = str(path.relative_to(self.root))
            if path.is_file() and key.startswith(prefix) and not path.name.endswith(".tmp"):
                yield key, path.stat().st_size

    def probe(self) -> None:
        """A file where the store's directory should be fails here (a missing directory is made on write)."""
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"{self.root} is not a directory")

    # ---- writes -----------------------------------------------------------------------
    def _write(self, name: str, fill) -> None:
        target = self.path(name)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._tmp(target)
            with open(tmp, "wb") as sink:
                fill(sink)
            os.replace(tmp, target)
        except OSError as err:
            raise self._fail("write of", name, err) from None
        self.stats.request("PUT")

    def write_text(self, name: str, text: str) -> None:
        self._write(name, lambda sink: sink.write(text.encode()))

    def write_file(self, name: str, path: str | os.PathLike) -> None:
        def fill(sink):
            with open(path, "rb") as source:
                shutil.copyfileobj(source, sink, COPY_BLOCK)
        self._write(name, fill)

    def move_file(self, name: str, path: str | os.PathLike) -> None:
        """A finished local file to its name: renamed when on the same file system, else copied."""
        target = self.path(name)
        if Path(path) == target:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, target)
            self.stats.request("PUT")
        except OSError:
            self.write_file(name, path)
            os.unlink(path)

    def write_stream(self, name: str, stream) -> None:
        self._write(name, lambda sink: [sink.write(block) for block in iter(lambda: stream.read(COPY_BLOCK), b"")])

    def delete(self, names: Iterable[str], *, first: Iterable[str] = ()) -> None:
        """``first`` before the others; empty directories left behind are removed."""
        first = list(first)
        for name in first + [n for n in names if n not in set(first)]:
            self.stats.request("DELETE")
            try:
                self.path(name).unlink(missing_ok=True)
            except OSError as err:
                raise self._fail("delete of", name, err) from None
            parent = self.path(name).parent
            while parent != self.root and parent.is_relative_to(self.root):
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent


class _FileRange:
    def __init__(self, handle, path: Path, offset: int, end: int, stats: RequestStats):
        self.handle, self.path, self.offset, self.end, self.stats = handle, path, offset, end, stats

    def read(self, size: int) -> bytes:
        size = min(size, self.end - self.offset)
        data = self.handle.read(size)
        if len(data) < size:
            raise StorageError(f"{self.path} is truncated at byte offset {self.offset + len(data)}")
        self.offset += len(data)
        self.stats.add(read=len(data))
        return data

    def close(self) -> None:
        self.handle.close()

    def stop(self) -> None:
        self.close()
