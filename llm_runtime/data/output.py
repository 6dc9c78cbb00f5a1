"""Where prepare-data reads its S3 inputs and writes shards, through :mod:`llm_runtime.storage`.

Shards are written in a scratch directory and go to their names as they are finished (a few
uploads in flight, so the scratch disk stays small); index files are written last. Output
objects can be spread over several key prefixes (``p00/``, ``p01/``, ...) so that readers of a
large dataset do not all hit one S3 prefix's request-rate limit.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..storage import open_store, parse_s3_uri

__all__ = ["ShardOutput", "download", "list_inputs", "shard_name"]

IN_FLIGHT = 4


def shard_name(number: int, *, host: int = 0, num_hosts: int = 1, prefixes: int = 1) -> str:
    """``shard-000012.tar``; ``shard-h001-000012.tar`` from host 1 of several; ``p03/...`` when spread."""
    base = f"shard-h{host:03d}-{number:06d}.tar" if num_hosts > 1 else f"shard-{number:06d}.tar"
    return f"p{(number * num_hosts + host) % prefixes:02d}/{base}" if prefixes > 1 else base


def _bucket_store(uri: str):
    bucket, key = parse_s3_uri(uri)
    return open_store(f"s3://{bucket}"), key


def list_inputs(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """Every object under an ``s3://bucket/prefix`` whose key ends with one of ``suffixes``."""
    store, prefix = _bucket_store(uri)
    return [f"s3://{store.bucket}/{key}" for key, _ in store.list(prefix) if key.endswith(suffixes)]


def download(uri: str, dest: str) -> None:
    """One S3 object to a local file (multipart, retried)."""
    store, key = _bucket_store(uri)
    store.download(key, dest)


class ShardOutput:
    """An output directory or ``s3://`` prefix: ``put`` finished shards, then ``wait``, then the index."""

    def __init__(self, uri: str, scratch_parent: str | None = None):
        self.store = open_store(uri, concurrency=4)
        self.uri = self.store.uri
        if uri.startswith("s3://"):
            self.scratch, self._own_scratch = Path(tempfile.mkdtemp(prefix="llm-runtime-prepare-",
                                                                    dir=scratch_parent)), True
        else:  # shards are written in place and renamed to their names
            self.scratch, self._own_scratch = Path(uri), False
            self.scratch.mkdir(parents=True, exist_ok=True)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-upload")
        self.pending: list[Future] = []

    def scratch_dir(self) -> Path:
        return self.scratch

    def put(self, name: str, local: Path) -> None:
        while len([f for f in self.pending if not f.done()]) >= IN_FLIGHT:  # bounded: scratch disk stays small
            time.sleep(0.05)
        for future in [f for f in self.pending if f.done()]:
            future.result()  # an upload that failed stops the run now, not at the end
            self.pending.remove(future)
        self.pending.append(self.pool.submit(self.store.move_file, name, local))

    def wait(self) -> None:
        for future in self.pending:
            future.result()  # re-raises an upload's error
        self.pending = []

    def write_text(self, name: str, text: str) -> None:
        self.store.write_text(name, text)

    def read_text(self, name: str) -> str | None:
        return self.store.read_text(name)

    def delete(self, name: str) -> None:
        self.store.delete([name])

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self._own_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
