"""Where shard bytes come from: a POSIX directory (NVMe, FSx for Lustre, a SageMaker channel) or S3.

A source opens a byte range of one shard as a sequential stream: one request per shard
read, many records per request. The S3 stream survives throttling and cut connections:
botocore's standard retry mode retries a failed request (503 SlowDown, 500, resets), and a
body that ends early is resumed with a ranged GET from the byte already read, with
exponential backoff and jitter, up to ``max_attempts`` per range; then the error names the
object. Endpoints come from the standard variables (``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL``), which boto3 reads itself.
"""
from __future__ import annotations

import os
import random
import re
import threading
import time
from dataclasses import dataclass, field

__all__ = ["LocalSource", "S3Source", "SourceError", "SourceStats", "check_member_name", "open_source",
           "parse_s3_uri"]

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


class SourceError(OSError):
    """Data that cannot be read; the message names the object or file."""


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


_MEMBER = re.compile(r"^[A-Za-z0-9._\-]+(/[A-Za-z0-9._\-]+)*$")


def check_member_name(name: str, where: str) -> str:
    """A shard or member name from an index: a relative path of plain characters, no '.' or '..' parts
    (nothing that could leave the data directory or mean something to a shell, s5cmd or a glob)."""
    if not _MEMBER.match(name) or any(p in (".", "..") for p in name.split("/")):
        raise ValueError(f"{where}: name {name!r} is not a plain relative path")
    return name


@dataclass
class SourceStats:
    """Requests, bytes and retries, for the data section of the metrics."""
    requests: int = 0
    bytes: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, requests: int = 0, nbytes: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes += nbytes
            self.retries += retries

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "bytes": self.bytes, "retries": self.retries}


class LocalSource:
    """A directory: a local disk, an FSx for Lustre mount or a SageMaker File/FastFile channel."""

    def __init__(self, root: str, read_size: int = 1 << 20):
        self.root, self.read_size = root, read_size
        self.stats = SourceStats()
        self.uri = root

    def read_text(self, name: str) -> str:
        path = os.path.join(self.root, name)
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read()
        except OSError as err:
            raise SourceError(f"cannot read {path}: {err.strerror}") from None

    def open(self, name: str, offset: int, length: int) -> "_LocalStream":
        path = os.path.join(self.root, name)
        try:
            handle = open(path, "rb", buffering=self.read_size)
        except OSError as err:
            raise SourceError(f"cannot open shard {path}: {err.strerror}") from None
        handle.seek(offset)
        self.stats.add(requests=1)
        return _LocalStream(handle, path, offset, length, self.stats)


class _LocalStream:
    def __init__(self, handle, path: str, offset: int, length: int, stats: SourceStats):
        self.handle, self.path, self.offset, self.end, self.stats = handle, path, offset, offset + length, stats

    def read(self, size: int) -> bytes:
        size = min(size, self.end - self.offset)
        data = self.handle.read(size)
        if len(data) < size:
            raise SourceError(f"shard {self.path} is truncated at byte offset {self.offset + len(data)}")
        self.offset += len(data)
        self.stats.add(nbytes=len(data))
        return data

    def close(self) -> None:
        self.handle.close()

    def stop(self) -> None:
        self.close()


class S3Source:
    """``s3://bucket/prefix``: every read is one ranged GET that streams until the range ends."""

    def __init__(self, uri: str, *, max_attempts: int = 8, read_size: int = 1 << 20):
        import boto3
        from botocore.config import Config

        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.max_attempts, self.read_size = max(1, max_attempts), read_size
        config = Config(retries={"mode": "standard", "total_max_attempts": self.max_attempts},
                        connect_timeout=20, read_timeout=60, max_pool_connections=32)
        self.client = boto3.session.Session().client("s3", config=config)
        self.stats = SourceStats()

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def read_text(self, name: str) -> str:
        """A small object, whole: a failed request or a broken body is retried (backoff with jitter)."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = self.key(name)
        for attempt in range(1, self.max_attempts + 1):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key)
                body = response["Body"].read()
            except ClientError as err:
                raise SourceError(f"cannot read s3://{self.bucket}/{key}: {_describe(err)}") from None
            except BotoCoreError as err:  # the body broke off (or the connection did)
                self.stats.add(requests=1, retries=1)
                if attempt == self.max_attempts or not _transient(err):
                    raise SourceError(f"cannot read s3://{self.bucket}/{key}: {_describe(err)} "
                                      f"after {attempt} attempts") from None
                time.sleep(random.uniform(0, min(10.0, 0.05 * 2 ** attempt)))
                continue
            self.stats.add(requests=1, nbytes=len(body), retries=response["ResponseMetadata"].get("RetryAttempts", 0))
            return body.decode("utf-8")
        raise AssertionError("unreachable")

    def open(self, name: str, offset: int, length: int) -> "_S3Stream":
        return _S3Stream(self, self.key(name), offset, offset + length)


class _S3Stream:
    """A byte range of one object. Failures in a row without progress are limited to
    ``max_attempts``; a resumed GET must answer from the byte asked for, of the same object (ETag)."""

    def __init__(self, source: S3Source, key: str, offset: int, end: int):
        self.source, self.key, self.offset, self.end = source, key, offset, end
        self.body = None
        self.failures = 0
        self.etag: str | None = None
        self.stopped = False

    def _request(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        source = self.source
        where = f"s3://{source.bucket}/{self.key}: GET bytes {self.offset}-{self.end - 1}"
        extra = {"IfMatch": self.etag} if self.etag else {}
        try:
            response = source.client.get_object(Bucket=source.bucket, Key=self.key,
                                                Range=f"bytes={self.offset}-{self.end - 1}", **extra)
        except (ClientError, BotoCoreError) as err:
            tries = 1 + int(getattr(err, "response", {}).get("ResponseMetadata", {}).get("RetryAttempts", 0))
            source.stats.add(requests=1, retries=tries - 1)
            if getattr(err, "response", {}).get("Error", {}).get("Code") == "PreconditionFailed":
                raise SourceError(f"{where}: the object changed while it was being read (ETag)") from None
            raise SourceError(f"{where} failed after {tries} attempt(s): {_describe(err)}") from None
        source.stats.add(requests=1, retries=response["ResponseMetadata"].get("RetryAttempts", 0))
        content_range = response.get("ContentRange") or ""
        if not content_range.startswith(f"bytes {self.offset}-"):
            response["Body"].close()
            raise SourceError(f"{where}: the answer covers {content_range or 'the whole object'}, not the range "
                              "asked for (a proxy that ignores Range?)")
        self.etag = self.etag or response.get("ETag")
        self.body = response["Body"]

    def read(self, size: int) -> bytes:
        size = min(size, self.end - self.offset)
        chunks, got = [], 0
        while got < size:
            if self.body is None:
                self._request()
            try:
                data = self.body.read(size - got)
            except Exception as err:  # noqa: BLE001 - any failure of the body stream: resume from offset
                data, error = b"", err
            else:
                error = None if data else EOFError("the response body ended early")
            if data:
                chunks.append(data)
                got += len(data)
                self.offset += len(data)
                self.failures = 0  # progress: the limit is on failures in a row
                self.source.stats.add(nbytes=len(data))
                continue
            self._resume(error)
        return b"".join(chunks)

    def _resume(self, error: BaseException | None) -> None:
        """The body ended before the range did: back off, then GET the rest from the current byte."""
        self.close()
        if self.stopped:
            raise SourceError(f"s3://{self.source.bucket}/{self.key}: reading stopped (the loader closed)")
        self.failures += 1
        if self.failures >= self.source.max_attempts:
            raise SourceError(f"s3://{self.source.bucket}/{self.key}: the body broke off at byte {self.offset} "
                              f"{self.failures} times (last: {_describe(error)}); giving up")
        self.source.stats.add(retries=1)
        time.sleep(random.uniform(0, min(10.0, 0.05 * 2 ** self.failures)))  # full jitter

    def close(self) -> None:
        body, self.body = self.body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    def stop(self) -> None:
        """From another thread: make a read in progress fail now instead of retrying."""
        self.stopped = True
        self.close()


def _transient(err: BaseException) -> bool:
    """Errors worth another try: broken connections and bodies, not missing credentials or bad input."""
    from botocore.exceptions import NoCredentialsError, ParamValidationError, PartialCredentialsError

    return not isinstance(err, (NoCredentialsError, PartialCredentialsError, ParamValidationError))


def _describe(err: BaseException | None) -> str:
    """An error without anything secret in it: the S3 error code, or the exception class."""
    response = getattr(err, "response", None)
    if isinstance(response, dict) and "Error" in response:
        return f"{response['Error'].get('Code', '?')} ({response['Error'].get('Message', '')})"
    return type(err).__name__ if err is not None else "unknown"


def open_source(uri: str, *, max_attempts: int = 8, read_size: int = 1 << 20):
    if uri.startswith("s3://"):
        return S3Source(uri, max_attempts=max_attempts, read_size=read_size)
    return LocalSource(uri, read_size=read_size)
