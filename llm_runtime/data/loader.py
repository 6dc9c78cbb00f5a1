"""The token-shard loader: each data-parallel replica streams its own partitions, resumably.

The order is defined in :mod:`.order`; this module reads it. A DataLoader worker streams its
partitions, each as one sequential read per shard (through :mod:`llm_runtime.storage`), decodes whole
blocks of records at once, and hands one chunk per step to the training process, which
interleaves the workers' chunks into the replica's batch. A background thread per worker
keeps each partition's next block (and so its next shard) loaded.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .order import DataOrder, Segment
from ..storage import StorageError, open_store
from .shards import RecordLayout, ShardIndex, check_member_name, read_index

__all__ = ["LoaderSpec", "ShardLoader", "STATE_VERSION", "load_index"]

log = logging.getLogger(__name__)
STATE_VERSION = 1


def load_index(uri: str, *, max_attempts: int = 8, text: str | None = None) -> tuple[ShardIndex, str]:
    """index.json at ``uri`` (checked: names stay under it) and its fingerprint; ``text``: its
    content as already read (the host launcher's copy), so no request is made."""
    if text is None:
        text = open_store(uri, max_attempts=max_attempts).read_text("index.json")
    if text is None:
        raise StorageError(f"{uri}/index.json does not exist")
    index = read_index(text, f"{uri}/index.json")
    for shard in index.shards:
        check_member_name(shard.name, f"{uri}/index.json")
    fingerprint = hashlib.sha256("".join(f"{s.name}:{s.samples}:{s.sha256};" for s in index.shards).encode())
    return index, fingerprint.hexdigest()[:16]


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a DataLoader worker needs (picklable: sources are opened in the worker)."""
    uri: str
    names: tuple[str, ...]
    order: DataOrder
    layout: RecordLayout
    dp_rank: int
    dp_size: int
    num_workers: int
    threads: int
    max_attempts: int
    read_size: int
    last_step: int | None = None  # the run's last step (from 0): nothing is prefetched past it


class _Partition:
    """One partition's samples, block by block, with the next block loading in the background."""

    def __init__(self, spec: LoaderSpec, source, partition: int, pool: ThreadPoolExecutor,
                 last_key: tuple[int, int] | None = None):
        self.spec, self.source, self.partition, self.pool = spec, source, partition, pool
        self.last_key = last_key  # (epoch, block) of the run's last sample: no prefetch past it
        self.stream = None
        self.stream_at: tuple[int, int, int] | None = None  # (epoch, shard, next sample)
        self.block: tuple[tuple[int, int], np.ndarray] | None = None
        self.pending: tuple[tuple[int, int], Future] | None = None
        self.stopped = False

    def sample(self, epoch: int, local: int) -> np.ndarray:
        key = (epoch, local // self.spec.order.shuffle_block)
        if self.block is None or self.block[0] != key:
            if self.pending is not None and self.pending[0] == key:
                data = self.pending[1].result()
            else:
                data = self._load(key)
            self.block, self.pending = (key, data), None
            following = self._next(key)
            if self.last_key is None or following <= self.last_key:
                self.pending = (following, self.pool.submit(self._load, following))
        return self.block[1][local % self.spec.order.shuffle_block]

    def _next(self, key: tuple[int, int]) -> tuple[int, int]:
        epoch, block = key
        start, stop = self.spec.order.block_bounds(block)
        return (epoch, block + 1) if stop < self.spec.order.partition_len else (epoch + 1, 0)

    def _load(self, key: tuple[int, int]) -> np.ndarray:
        epoch, block = key
        order = self.spec.order
        start, stop = order.block_bounds(block)
        raw = np.concatenate([self._read(epoch, segment) for segment in order.segments(epoch, self.partition,
                                                                                         start, stop)])
        return raw[order.block_permutation(epoch, self.partition, block)]

    def _read(self, epoch: int, segment: Segment) -> np.ndarray:
        size = self.spec.layout.record_bytes
        name = self.spec.names[segment.shard]
        if self.stopped:
            raise StorageError(f"reading {name} stopped: the loader was closed")
        if self.stream_at != (epoch, segment.shard, segment.first):
            self.close()
            # One streaming request for everything this partition reads from the shard this epoch.
            (whole,) = [s for s in self.spec.order.segments(epoch, self.partition, 0, self.spec.order.partition_len)
                        if s.shard == segment.shard]
            end = whole.first + whole.count
            self.stream = self.source.open_range(name, segment.first * size, (end - segment.first) * size)
        offset = segment.first * size
        parts = []
        for chunk_start in range(0, segment.count, max(1, self.spec.read_size // size)):
            count = min(segment.count - chunk_start, max(1, self.spec.read_size // size))
            buffer = self.stream.read(count * size)
            parts.append(self.spec.layout.decode(buffer, name, offset + chunk_start * size))
        self.stream_at = (epoch, segment.shard, segment.first + segment.count)
        return np.concatenate(parts)

    def stop(self) -> None:
        """From the consumer's thread: a prefetch in progress fails fast instead of retrying on."""
        self.stopped = True
        stream = self.stream
        if stream is not None:
            stream.stop()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.stream, self.stream_at = None, None


def last_block(order: DataOrder, last_step: int | None, partition: int,
               rows: list[tuple[int, int]]) -> tuple[int, int] | None:
    """(epoch, block) holding ``partition``'s last sample at ``last_step``; None: no last step."""
    if last_step is None:
        return None
    epoch, inner = order.locate(last_step)
    local = inner * order.per_step + max((i for p, i in rows if p == partition), default=order.per_step - 1)
    return epoch, local // order.shuffle_block


class ShardDataset(torch.utils.data.IterableDataset):
    """Yields (step, worker, rows, stats) forever from ``start_step``: one chunk per step per worker."""

    def __init__(self, spec: LoaderSpec, start_step: int):
        super().__init__()
        self.spec, self.start_step = spec, start_step

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray, dict]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        spec, order = self.spec, self.spec.order
        source = open_store(spec.uri, max_attempts=spec.max_attempts, read_size=spec.read_size)
        rows = [(p, i) for j, (p, i) in enumerate(order.replica_rows(spec.dp_rank, spec.dp_size))
                if j % workers == worker]
        pool = ThreadPoolExecutor(max_workers=spec.threads, thread_name_prefix="shard-prefetch")
        readers = {p: _Partition(spec, source, p, pool, last_block(order, spec.last_step, p, rows))
                   for p in order.worker_partitions(spec.dp_rank, spec.dp_size, worker, workers)}
        try:
            step = self.start_step
            while spec.last_step is None or step <= spec.last_step:
                epoch, inner = order.locate(step)
                chunk = np.stack([readers[p].sample(epoch, inner * order.per_step + i) for p, i in rows])
                yield step, worker, chunk, source.stats.as_dict()
                step += 1
        finally:  # stop prefetches in flight first, so closing never waits out their retries
            for reader in readers.values():
                reader.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            for reader in readers.values():
                reader.close()


def _as_is(item):
    """The DataLoader's collate step: keep the worker's numpy chunk (no per-item tensor conversion)."""
    return item


class ShardLoader:
    """``next_batch()`` -> this replica's rows of the next global batch, [B/D, seq_len + 1] int64."""

    def __init__(self, spec: LoaderSpec, *, fingerprint: str, location: str, timeout_s: float = 900.0,
                 auto_partitions: bool = False, max_open_shards: int = 0):
        self.spec, self.fingerprint, self.location, self.timeout_s = spec, fingerprint, location, timeout_s
        self.auto_partitions, self.max_open_shards = auto_partitions, max_open_shards
        self.step = 0
        self._iterator: Iterator | None = None
        self._loader = None
        self._stats: dict[int, dict] = {}

    @property
    def order(self) -> DataOrder:
        return self.spec.order

    def _start(self) -> Iterator:
        dataset = ShardDataset(self.spec, self.step)
        workers = self.spec.num_workers
        if workers == 0:
            self._loader = dataset
            return iter(dataset)
        self._loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                                   prefetch_factor=2, timeout=self.timeout_s,
                                                   collate_fn=_as_is)
        return iter(self._loader)

    def next_batch(self) -> torch.Tensor:
        if self._iterator is None:
            self._iterator = self._start()
        workers = max(1, self.spec.num_workers)
        per_worker = []
        for expected in range(workers):
            try:
                step, worker, chunk, stats = next(self._iterator)
            except StopIteration:
                self.close()
                raise StopIteration(f"data loader ({self.location}): past its last step {self.spec.last_step} "
                                    "(from 0)") from None
            except BaseException as err:
                self.close()  # half a step was taken: the next call starts afresh from self.step
                if isinstance(err, (StorageError, ValueError)):
                    kind = StorageError if isinstance(err, StorageError) else ValueError
                    raise kind(f"data loader ({self.location}): {err}") from None
                raise
            if (step, worker) != (self.step, expected):
                raise RuntimeError(f"data loader out of order: got step {step} worker {worker}, "
                                   f"expected step {self.step} worker {expected}")
            self._stats[worker] = stats
            per_worker.append(chunk)
        rows = np.empty((sum(len(c) for c in per_worker), per_worker[0].shape[1]), dtype=per_worker[0].dtype)
        for worker, chunk in enumerate(per_worker):
            rows[worker::workers] = chunk
        self.step += 1
        return torch.from_numpy(rows.astype(np.int64))

    def stats(self) -> dict[str, int]:
        total = {"requests": 0, "bytes": 0, "retries": 0}
        for stats in self._stats.values():
            for key in total:
                total[key] += stats[key]
        return total

    def state_dict(self) -> dict:
        order = self.order
        epoch, inner = order.locate(self.step)
        return {"version": STATE_VERSION, "step": self.step, "epoch": epoch, "step_in_epoch": inner,
                "num_partitions": order.num_partitions, "batch_size": order.batch_size,
                "shuffle_block": order.shuffle_block, "seed": order.seed, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the data and the order's parameters must match.

        A loader whose ``data.num_partitions`` was left at auto adopts the saved count, so a run
        resumed on another data-parallel size continues the same order.
        """
        saved_parts = state.get("num_partitions")
        if self.auto_partitions and isinstance(saved_parts, int) and saved_parts != self.order.num_partitions:
            import dataclasses

            order = dataclasses.replace(self.order, num_partitions=saved_parts)  # checks P divides the batch
            streams = order.check_layout(self.spec.dp_size, self.spec.num_workers)
            if self.max_open_shards and streams > self.max_open_shards:
                raise ValueError(f"the saved data position has {saved_parts} partitions: each DataLoader worker "
                                 f"would stream {streams} at once, more than data.max_open_shards="
                                 f"{self.max_open_shards}")
            self.close()
            self.spec = dataclasses.replace(self.spec, order=order)
        order = self.order
        expected = {"version": STATE_VERSION, "fingerprint": self.fingerprint, "batch_size": order.batch_size,
                    "num_partitions": order.num_partitions, "shuffle_block": order.shuffle_block,
                    "seed": order.seed}
        wrong = [f"{key} {state.get(key)!r} (now {value!r})" for key, value in expected.items()
                 if state.get(key) != value]
        if wrong:
            raise ValueError(f"the saved data position does not fit this run's data order: {'; '.join(wrong)}")
        self.close()
        self.step = int(state["step"])

    def close(self) -> None:
        """Stop the workers (or the in-process reader and its prefetch threads)."""
        iterator, self._iterator, self._loader = self._iterator, None, None
        if hasattr(iterator, "close"):
            iterator.close()
        elif hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def __enter__(self) -> "ShardLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
