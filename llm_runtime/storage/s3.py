"""The S3 backend (boto3): the one client factory, ranged streaming reads that resume, multipart
writes, listing and batch deletes.

The endpoint comes from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (or boto3's default);
requests are retried by botocore's standard mode, over a sized connection pool, with bounded
connect and read timeouts. A body that breaks off is resumed from the byte reached, pinned to
the object's ETag, by :func:`.retry.retrying`. Every request on the wire is counted (botocore's
``before-send`` event), retries included.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from .base import RequestStats, Store, join, parse_s3_uri
from .errors import ShortBody, StorageError, describe, error_code, kind_of, wrap
from .retry import retrying

__all__ = ["S3Store", "endpoint", "s3_client"]

CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
PROBE_ATTEMPTS = 3
PROBE_TIMEOUT_S = 3
DELETE_BATCH = 1000  # DeleteObjects' limit
NO_CREDENTIALS = ("no AWS credentials: the credential chain (environment variables, shared credentials and "
                  "config files, container and instance roles) found none")


def endpoint() -> str | None:
    """The endpoint the standard variables name (None: boto3's default for the region)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client(*, max_attempts: int = 8, pool: int = 32, connect_timeout: float = CONNECT_TIMEOUT_S,
              read_timeout: float = READ_TIMEOUT_S):
    """The runtime's only boto3 S3 client factory."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "total_max_attempts": max(1, max_attempts)},
                    max_pool_connections=pool, connect_timeout=connect_timeout, read_timeout=read_timeout,
                    tcp_keepalive=True)
    return boto3.session.Session(botocore_session=_botocore_session()).client("s3", endpoint_url=endpoint(),
                                                                              config=config)


_LOADER = None


def _botocore_session():
    """A new session (credentials and settings are read afresh each time) sharing one loader, so
    botocore parses its service models once per process, not once per client (0.15 s each)."""
    global _LOADER
    import botocore.loaders
    import botocore.session

    session = botocore.session.Session()
    if _LOADER is None:
        _LOADER = botocore.loaders.create_loader()
    session.register_component("data_loader", _LOADER)
    return session


class S3Store(Store):
    """Objects under ``s3://bucket/prefix``; keys are relative to the prefix."""

    def __init__(self, uri: str, *, max_attempts: int = 8, part_size: int = 64 << 20, concurrency: int = 8,
                 _shared=None):
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.max_attempts, self.part_size, self.concurrency = max(1, max_attempts), part_size, concurrency
        if _shared is None:
            client = s3_client(max_attempts=self.max_attempts, pool=max(32, 2 * concurrency))
            _shared = (client, RequestStats())
            _count_requests(client, _shared[1])
        self.client, self.stats = _shared

    def child(self, prefix: str) -> "S3Store":
        """The store rooted at ``prefix`` under this one (same client, same counts)."""
        return S3Store(f"s3://{self.bucket}/{join(self.prefix, prefix)}", max_attempts=self.max_attempts,
                       part_size=self.part_size, concurrency=self.concurrency,
                       _shared=(self.client, self.stats))

    def key(self, name: str) -> str:
        return join(self.prefix, name)

    def url(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def _transfer(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.part_size, multipart_chunksize=self.part_size,
                              max_concurrency=self.concurrency, use_threads=self.concurrency > 1)

    # ---- reads ------------------------------------------------------------------------
    def read_bytes(self, name: str, offset: int = 0, size: int | None = None) -> bytes:
        """A whole (small) object with one GET, or ``size`` bytes of it from ``offset`` (a cut body is
        resumed from the byte reached)."""
        if size is None and offset == 0:
            return self._read_whole(name)
        if size is None:
            size = self.size(name) - offset
        stream = self.open_range(name, offset, size)
        try:
            return stream.read(size)
        finally:
            stream.close()

    def _read_whole(self, name: str) -> bytes:
        def get() -> bytes:
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
            except Exception as err:  # noqa: BLE001 - botocore already retried the request
                raise wrap(err, "GET", self.url(name), self.max_attempts) from None
            body = response["Body"].read()  # a body that breaks off is retried whole (a small object)
            if len(body) != int(response.get("ContentLength", len(body))):
                raise ShortBody(f"{len(body)} of {response['ContentLength']} bytes")
            return body

        try:
            data = retrying(self.max_attempts, on_retry=lambda err: self.stats.add(retries=1))(get)
        except StorageError:
            raise
        except Exception as err:  # noqa: BLE001 - the body kept breaking off
            raise wrap(err, "GET", self.url(name), self.max_attempts) from None
        self.stats.add(read=len(data))
        return data

    def size(self, name: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self.key(name))["ContentLength"])
        except Exception as err:  # noqa: BLE001 - botocore's errors, sorted by wrap()
            raise wrap(err, "HEAD", self.url(name), self.max_attempts) from None

    def open_range(self, name: str, offset: int, length: int) -> "_RangeStream":
        return _RangeStream(self, self.key(name), offset, offset + length)

    def download(self, name: str, path: str | os.PathLike) -> None:
        """One object to a local file (multipart, threaded: boto3's transfer manager, which also
        retries bodies that break off)."""
        try:
            self.client.download_file(self.bucket, self.key(name), str(path), Config=self._transfer())
        except Exception as err:  # noqa: BLE001
            raise wrap(err, "download of", self.url(name), self.max_attempts) from None

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(key relative to this store, size) of every object under ``prefix``."""
        for name, size, _ in self.versions(prefix):
            yield name, size

    def versions(self, prefix: str = "") -> Iterator[tuple[str, int, str]]:
        """(key relative to this store, size, ETag) of every object under ``prefix``: the ETag tells
        an object re-uploaded with the same size from the one a local copy was made of."""
        base = self.key(prefix)
        if base and (not prefix or prefix.endswith("/")):  # a "directory": not its siblings that share a prefix
            base += "/"
        start = len(self.prefix) + 1 if self.prefix else 0
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for item in page.get("Contents", ()):
                    yield item["Key"][start:], int(item["Size"]), str(item.get("ETag", "")).strip('"')
        except Exception as err:  # noqa: BLE001
            raise wrap(err, "LIST", f"s3://{self.bucket}/{base}", self.max_attempts) from None

    def probe(self, read: str = "") -> str | None:
        """Fail in seconds, with one line, when the bucket is missing, the endpoint unreachable or
        no credentials are found (a client of few attempts and short timeouts, one LIST). With
        ``read``, the one request is a GET of that object instead, whose text is returned: None
        when it does not exist or the endpoint answered with a transient error (read it again,
        with the job's retries)."""
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        client = s3_client(max_attempts=PROBE_ATTEMPTS, pool=1, connect_timeout=PROBE_TIMEOUT_S,
                           read_timeout=PROBE_TIMEOUT_S * 3)
        where = client.meta.endpoint_url
        try:
            if read:
                response = client.get_object(Bucket=self.bucket, Key=self.key(read))
                try:
                    body = response["Body"].read()
                except Exception:  # noqa: BLE001 - the endpoint answered; a body cut short is read again
                    return None
                self.stats.add(read=len(body))
                return body.decode()
            client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (NoCredentialsError, PartialCredentialsError):
            raise StorageError(f"{self.uri}: {NO_CREDENTIALS}") from None
        except Exception as err:  # noqa: BLE001
            code = error_code(err)
            if read and code in ("NoSuchKey", "404"):
                return None
            if code is not None and kind_of(err) == "transient":
                return None  # the endpoint answered (throttling, a server error): the job's own retries cope
            if code == "NoSuchBucket":
                raise StorageError(f"{self.uri}: bucket {self.bucket!r} does not exist at {where}") from None
            if code is None and kind_of(err) == "transient":
                raise StorageError(f"{self.uri}: cannot reach the S3 endpoint {where} "
                                   f"({describe(err)} after {PROBE_ATTEMPTS} attempts)") from None
            raise StorageError(f"{self.uri}: {describe(err)} (endpoint {where})") from None
        finally:
            client.close()

    # ---- writes -----------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=text.encode())
        except Exception as err:  # noqa: BLE001
            raise wrap(err, "PUT", self.url(name), self.max_attempts) from None
        self.stats.add(written=len(text.encode()))

    def write_file(self, name: str, path: str | os.PathLike) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self.key(name), Config=self._transfer())
        except Exception as err:  # noqa: BLE001
            raise wrap(err, "upload to", self.url(name), self.max_attempts) from None
        self.stats.add(written=os.path.getsize(path))

    def move_file(self, name: str, path: str | os.PathLike) -> None:
        """Upload a finished local file, then remove it."""
        self.write_file(name, path)
        os.unlink(path)

    def write_stream(self, name: str, stream) -> None:
        """What ``stream.read(n)`` yields, multipart above the part size (parts in parallel)."""
        counted = _Counted(stream)
        try:
            self.client.upload_fileobj(counted, self.bucket, self.key(name), Config=self._transfer())
        except Exception as err:  # noqa: BLE001
            raise wrap(err, "upload to", self.url(name), self.max_attempts) from None
        self.stats.add(written=counted.position)

    def delete(self, names: Iterable[str], *, first: Iterable[str] = ()) -> None:
        """Batch deletes (DeleteObjects, 1000 keys a request); ``first`` go in a request of their own
        before any other (a manifest: a half-deleted checkpoint must never look complete)."""
        first = list(first)
        rest = [n for n in names if n not in set(first)]
        for batch in ([first] if first else []) + [rest[i:i + DELETE_BATCH] for i in range(0, len(rest), DELETE_BATCH)]:
            try:
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": self.key(n)} for n in batch], "Quiet": True})
            except Exception as err:  # noqa: BLE001
                raise wrap(err, "DELETE", self.url(batch[0]), self.max_attempts) from None
            if answer.get("Errors"):
                bad = answer["Errors"][0]
                raise StorageError(f"DELETE s3://{self.bucket}/{bad.get('Key')} failed: {bad.get('Code')} "
                                   f"({len(answer['Errors'])} key(s) not deleted)")


def _count_requests(client, stats: RequestStats) -> None:
    """Count every HTTP request botocore sends, retries included; a retry is a request whose
    ``amz-sdk-request`` header says attempt 2 or later (resumed bodies add their own).

    Counting from the request alone keeps a snapshot taken mid-call consistent: counting calls
    separately read retries = -1 while a call had begun and its first request was not yet sent.
    """
    def sent(request, **_):
        stats.request(request.method)
        if _attempt(request.headers.get("amz-sdk-request")) > 1:
            stats.add(retries=1)

    client.meta.events.register("before-send.s3", sent)


def _attempt(header) -> int:
    """The attempt number in botocore's ``amz-sdk-request: attempt=2; max=5`` header (1 if absent)."""
    if isinstance(header, bytes):
        header = header.decode("ascii", "replace")
    for part in (header or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == "attempt" and value.isdigit():
            return int(value)
    return 1


class _Counted:
    """A read-only stream wrapper that counts what was read."""

    def __init__(self, stream):
        self.stream, self.position = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.position += len(data)
        return data


class _RangeStream:
    """Bytes ``[offset, end)`` of one object, read sequentially with one GET that streams; a body
    that breaks off is resumed from the byte reached (``If-Match`` the first answer's ETag)."""

    def __init__(self, store: S3Store, key: str, offset: int, end: int):
        self.store, self.key, self.offset, self.end = store, key, offset, end
        self.body = None
        self.etag: str | None = None
        self.stopped = False

    @property
    def where(self) -> str:
        return f"s3://{self.store.bucket}/{self.key}"

    def _open(self) -> None:
        if self.stopped:
            raise StorageError(f"{self.where}: reading stopped (the reader was closed)")
        extra = {"IfMatch": self.etag} if self.etag else {}
        try:
            response = self.store.client.get_object(Bucket=self.store.bucket, Key=self.key,
                                                    Range=f"bytes={self.offset}-{self.end - 1}", **extra)
        except Exception as err:  # noqa: BLE001 - botocore already retried the request
            raise wrap(err, f"GET bytes {self.offset}-{self.end - 1} of", self.where, self.store.max_attempts) from None
        content_range = response.get("ContentRange") or ""
        if not content_range.startswith(f"bytes {self.offset}-"):
            response["Body"].close()
            raise StorageError(f"GET {self.where}: the answer covers {content_range or 'the whole object'}, "
                               f"not bytes {self.offset}-{self.end - 1} (a proxy that ignores Range?)")
        self.etag = self.etag or response.get("ETag")
        self.body = response["Body"]

    def _read_some(self, size: int) -> bytes:
        try:
            if self.body is None:
                self._open()
            data = self.body.read(size)
            if not data:
                raise ShortBody(f"the body ended at byte {self.offset}, before byte {self.end}")
            return data
        except BaseException:
            self.close()  # the next attempt opens a new GET from self.offset
            raise

    def read(self, size: int) -> bytes:
        size = min(size, self.end - self.offset)
        chunks, got = [], 0
        while got < size:
            # Attempts in a row without progress are bounded; any bytes read start the count afresh.
            policy = retrying(self.store.max_attempts, give_up=lambda: self.stopped,
                              on_retry=lambda err: self.store.stats.add(retries=1))
            try:
                data = policy(self._read_some, size - got)
            except StorageError:
                raise
            except Exception as err:  # noqa: BLE001 - a body that kept breaking off
                raise StorageError(f"GET {self.where}: the body broke off at byte {self.offset} "
                                   f"{self.store.max_attempts} times in a row (last: {describe(err)})") from None
            chunks.append(data)
            got += len(data)
            self.offset += len(data)
            self.store.stats.add(read=len(data))
        return b"".join(chunks)

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
