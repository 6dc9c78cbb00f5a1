"""Tier 2 of the checkpoints: S3 (boto3 multipart, bounded concurrency) or a shared directory.

Keys are relative to ``<uri>/<run_id>``. Every store counts its requests, so a test (or a
user) can check that a checkpoint costs nodes x k + 1 objects, not one per rank.
"""
from __future__ import annotations

import math
import os
import shutil
import threading
from pathlib import Path

from ..data.sources import parse_s3_uri
from .layout import MANIFEST, parse_step_dir

__all__ = ["LocalStore", "S3Store", "StoreError", "open_store"]


class StoreError(OSError):
    """A checkpoint object that cannot be written or read; the message names it."""


class _Counts:
    def __init__(self):
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + n


class S3Store:
    def __init__(self, uri: str, run_id: str, *, part_size: int = 64 << 20, concurrency: int = 8,
                 max_attempts: int = 8):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        bucket, prefix = parse_s3_uri(uri)
        self.bucket, self.base = bucket, f"{prefix}/{run_id}" if prefix else run_id
        self.uri = f"s3://{bucket}/{self.base}"
        self.client = boto3.session.Session().client("s3", config=Config(
            retries={"mode": "standard", "total_max_attempts": max_attempts}, max_pool_connections=max(10, concurrency)))
        self.part_size = part_size
        self.transfer = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size,
                                       max_concurrency=concurrency, use_threads=concurrency > 1)
        self.stats = _Counts()

    def _key(self, key: str) -> str:
        return f"{self.base}/{key}"

    def _fail(self, what: str, key: str, err: Exception) -> StoreError:
        code = getattr(err, "response", {}).get("Error", {}).get("Code") or type(err).__name__
        return StoreError(f"{what} s3://{self.bucket}/{self._key(key)} failed: {code}")

    def put_file(self, key: str, path: Path) -> None:
        size = os.path.getsize(path)
        parts = math.ceil(size / self.part_size) if size > self.part_size else 0
        self.stats.add("PUT", parts + 2 if parts else 1)  # multipart: create + parts + complete
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)
        except Exception as err:  # noqa: BLE001 - botocore/boto3 transfer errors
            raise self._fail("upload to", key, err) from None

    def put_stream(self, key: str, stream) -> None:
        """Upload what ``stream.read()`` yields (multipart above the part size, parts in parallel)."""
        try:
            self.client.upload_fileobj(stream, self.bucket, self._key(key), Config=self.transfer)
        except Exception as err:  # noqa: BLE001 - botocore/boto3 transfer errors
            raise self._fail("upload to", key, err) from None
        size = stream.position
        self.stats.add("PUT", math.ceil(size / self.part_size) + 2 if size > self.part_size else 1)

    def put_text(self, key: str, text: str) -> None:
        self.stats.add("PUT")
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=text.encode())
        except Exception as err:  # noqa: BLE001
            raise self._fail("PUT", key, err) from None

    def get_text(self, key: str) -> str | None:
        self.stats.add("GET")
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read().decode()
        except self.client.exceptions.NoSuchKey:
            return None
        except Exception as err:  # noqa: BLE001
            raise self._fail("GET", key, err) from None

    def get_range(self, key: str, offset: int, size: int) -> bytes:
        self.stats.add("GET")
        if size == 0:
            return b""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key),
                                          Range=f"bytes={offset}-{offset + size - 1}")["Body"].read()
        except Exception as err:  # noqa: BLE001
            raise self._fail("GET", key, err) from None
        if len(body) != size:
            raise StoreError(f"GET s3://{self.bucket}/{self._key(key)} bytes {offset}+{size}: got {len(body)} bytes")
        return body

    def steps(self) -> dict[int, bool]:
        """Every step with objects under the run -> whether its manifest exists."""
        found: dict[int, bool] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.base + "/"):
                self.stats.add("LIST")
                for item in page.get("Contents", ()):
                    parts = item["Key"][len(self.base) + 1:].split("/")
                    step = parse_step_dir(parts[0])
                    if step is not None:
                        found[step] = found.get(step, False) or parts[1:] == [MANIFEST]
        except Exception as err:  # noqa: BLE001
            raise self._fail("LIST", "", err) from None
        return found

    def delete_step(self, step_prefix: str) -> None:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.base}/{step_prefix}/"):
            self.stats.add("LIST")
            keys = [{"Key": item["Key"]} for item in page.get("Contents", ())]
            # The manifest first: a half-deleted checkpoint must never look complete.
            keys.sort(key=lambda k: not k["Key"].endswith("/" + MANIFEST))
            for key in keys:
                self.stats.add("DELETE")
                self.client.delete_object(Bucket=self.bucket, Key=key["Key"])


class LocalStore:
    """A shared directory (FSx for Lustre, EFS) in place of S3."""

    def __init__(self, path: str, run_id: str):
        self.root = Path(path) / run_id
        self.uri = str(self.root)
        self.stats = _Counts()

    def put_file(self, key: str, path: Path) -> None:
        self.stats.add("PUT")
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target.with_suffix(target.suffix + ".tmp"))
        os.replace(target.with_suffix(target.suffix + ".tmp"), target)

    def put_stream(self, key: str, stream) -> None:
        self.stats.add("PUT")
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".tmp")
        with open(tmp, "wb") as sink:
            for block in iter(lambda: stream.read(8 << 20), b""):
                sink.write(block)
        os.replace(tmp, target)

    def put_text(self, key: str, text: str) -> None:
        self.stats.add("PUT")
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.with_suffix(".tmp").write_text(text)
        os.replace(target.with_suffix(".tmp"), target)

    def get_text(self, key: str) -> str | None:
        self.stats.add("GET")
        try:
            return (self.root / key).read_text()
        except FileNotFoundError:
            return None

    def get_range(self, key: str, offset: int, size: int) -> bytes:
        self.stats.add("GET")
        with open(self.root / key, "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        if len(data) != size:
            raise StoreError(f"{self.root / key} bytes {offset}+{size}: got {len(data)} bytes")
        return data

    def steps(self) -> dict[int, bool]:
        if not self.root.is_dir():
            return {}
        return {step: (self.root / entry.name / MANIFEST).exists()
                for entry in self.root.iterdir() if (step := parse_step_dir(entry.name)) is not None}

    def delete_step(self, step_prefix: str) -> None:
        (self.root / step_prefix / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(self.root / step_prefix, ignore_errors=True)


def open_store(uri: str, run_id: str, *, part_size: int = 64 << 20, concurrency: int = 8):
    if not uri:
        return None
    if uri.startswith("s3://"):
        return S3Store(uri, run_id, part_size=part_size, concurrency=concurrency)
    if "://" in uri:
        raise ValueError(f"checkpoint.uri={uri!r}: use s3://bucket/prefix or a directory path")
    return LocalStore(uri, run_id)
