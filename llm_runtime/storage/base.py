"""What both backends share: URIs and keys, request counts, and the choice of backend."""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

from .errors import ObjectMissing

__all__ = ["RequestStats", "Store", "join", "open_store", "parse_s3_uri"]

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (bucket, "some/prefix") with the bucket name checked."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, prefix = uri[5:].partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(f"{uri!r}: {bucket!r} is not a valid S3 bucket name")
    if any(part in ("..", ".") for part in prefix.split("/")):
        raise ValueError(f"{uri!r}: the key prefix may not contain '.' or '..' parts")
    if any(ch in prefix for ch in '"\'\n\r\t\0'):
        raise ValueError(f"{uri!r}: the key prefix may not contain quotes or control characters")
    return bucket, prefix.strip("/")


def join(*parts: str) -> str:
    """Key parts joined with single slashes; empty parts dropped (``join("", "a/", "b") == "a/b"``)."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


@dataclass
class RequestStats:
    """Requests by HTTP method (every attempt botocore sent, retries included), bytes moved and
    retries, for the data section of the metrics and a checkpoint's object count."""
    counts: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def request(self, method: str, n: int = 1) -> None:
        with self._lock:
            self.counts[method] = self.counts.get(method, 0) + n

    def add(self, *, read: int = 0, written: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.bytes_read += read
            self.bytes_written += written
            self.retries += retries

    @property
    def requests(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        """The data loader's view: requests, bytes read, retries."""
        return {"requests": self.requests, "bytes": self.bytes_read, "retries": self.retries}


class Store:
    """What every backend derives from its own ``read_bytes``."""

    def read_bytes(self, name: str, offset: int = 0, size: int | None = None) -> bytes:
        raise NotImplementedError

    def read_text(self, name: str) -> str | None:
        """A small object as text; None when it does not exist."""
        try:
            return self.read_bytes(name).decode("utf-8")
        except ObjectMissing:
            return None


def open_store(uri: str, *, max_attempts: int = 8, part_size: int = 64 << 20, concurrency: int = 8,
               read_size: int = 1 << 20):
    """The store rooted at ``uri``: ``s3://bucket/prefix`` (S3) or a directory (local disk, FSx, EFS)."""
    if uri.startswith("s3://"):
        from .s3 import S3Store

        return S3Store(uri, max_attempts=max_attempts, part_size=part_size, concurrency=concurrency)
    if "://" in uri:
        raise ValueError(f"{uri!r}: use s3://bucket/prefix or a directory path")
    from .files import FileStore

    return FileStore(uri, read_size=read_size)
