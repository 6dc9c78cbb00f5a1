"""Where prepare-data reads inputs and writes shards: local paths or S3 (boto3 multipart uploads).

Output objects can be spread over several key prefixes (``p00/``, ``p01/``, ...) so that
readers of a large dataset do not all hit one S3 prefix's request-rate limit.
"""
from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .sources import parse_s3_uri

__all__ = ["LocalOutput", "S3Output", "download", "list_s3_inputs", "open_output", "s3_client", "shard_name"]


def s3_client(max_attempts: int = 8):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client("s3", config=Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts}, max_pool_connections=32))


def shard_name(number: int, *, host: int = 0, num_hosts: int = 1, prefixes: int = 1) -> str:
    """``shard-000012.tar``; ``shard-h001-000012.tar`` from host 1 of several; ``p03/...`` when spread."""
    base = f"shard-h{host:03d}-{number:06d}.tar" if num_hosts > 1 else f"shard-{number:06d}.tar"
    return f"p{(number * num_hosts + host) % prefixes:02d}/{base}" if prefixes > 1 else base


def list_s3_inputs(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """Every object under an ``s3://bucket/prefix`` whose key ends with one of ``suffixes``."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_uri(uri)
    found = []
    try:
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            found += [f"s3://{bucket}/{item['Key']}" for item in page.get("Contents", ())
                      if item["Key"].endswith(suffixes)]
    except (ClientError, BotoCoreError) as err:
        raise OSError(f"cannot list {uri}: {getattr(err, 'response', {}).get('Error', {}).get('Code', type(err).__name__)}") from None
    return found


def download(uri: str, dest: str) -> None:
    """One S3 object to a local file (multipart, retried by botocore)."""
    bucket, key = parse_s3_uri(uri)
    s3_client().download_file(bucket, key, dest)


class LocalOutput:
    def __init__(self, path: str):
        self.root = Path(path)
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = str(self.root)

    def scratch_dir(self) -> Path:
        return self.root

    def put(self, name: str, local: Path) -> None:
        """A finished shard written in the scratch dir: move it to its name (a subdir when spread)."""
        target = self.root / name
        if target != local:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, target)

    def write_text(self, name: str, text: str) -> None:
        tmp = self.root / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.root / name)

    def read_text(self, name: str) -> str | None:
        try:
            return (self.root / name).read_text()
        except FileNotFoundError:
            return None

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def wait(self) -> None:
        pass

    def close(self) -> None:
        pass


class S3Output:
    """Shards go up as they are finished (a few uploads in flight), index files last."""

    def __init__(self, uri: str, scratch: str, part_size: int = 64 << 20, concurrency: int = 4):
        from boto3.s3.transfer import TransferConfig

        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.client = s3_client()
        self.transfer = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size,
                                       max_concurrency=concurrency)
        self.scratch = Path(scratch)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-upload")
        self.pending: list[Future] = []

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def scratch_dir(self) -> Path:
        return self.scratch

    def _upload(self, name: str, local: Path) -> None:
        self.client.upload_file(str(local), self.bucket, self.key(name), Config=self.transfer)
        local.unlink()

    def put(self, name: str, local: Path) -> None:
        while len([f for f in self.pending if not f.done()]) >= 4:  # bounded: scratch disk stays small
            time.sleep(0.05)
        for future in [f for f in self.pending if f.done()]:
            future.result()  # an upload that failed stops the run now, not at the end
            self.pending.remove(future)
        self.pending.append(self.pool.submit(self._upload, name, local))

    def wait(self) -> None:
        for future in self.pending:
            future.result()  # re-raises an upload's error
        self.pending = []

    def write_text(self, name: str, text: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=text.encode())

    def read_text(self, name: str) -> str | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read().decode()
        except self.client.exceptions.NoSuchKey:
            return None

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(name))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.scratch, ignore_errors=True)


def open_output(uri: str, scratch_parent: str | None = None):
    if uri.startswith("s3://"):
        import tempfile

        return S3Output(uri, tempfile.mkdtemp(prefix="llm-runtime-prepare-", dir=scratch_parent))
    return LocalOutput(uri)
