"""The sample order: a pure function of (shard sizes, seed, global batch, partitions, shuffle block).

Definition, per epoch ``e``:

1. The shards are taken in a seeded permutation (``seed``, ``e``) and concatenated into the
   epoch sequence. Its first ``steps_per_epoch * batch_size`` samples are used; the rest (less
   than one global batch, a different set each epoch) is dropped.
2. The used samples are cut into ``num_partitions`` contiguous, equal partitions, so each
   partition is a sequential byte range over a few shards: one streaming read per shard.
3. Within a partition, blocks of ``shuffle_block`` consecutive samples are permuted with a
   seed of their own: a bounded shuffle buffer whose contents never need saving, because
   a block can always be re-read from its start.
4. Step ``s`` of the epoch takes ``batch_size / num_partitions`` samples from every partition.
   Its global batch, in order, is row ``g = i * P + p`` = the partition-``p`` sample ``s*c + i``.

A data-parallel replica ``r`` of ``D`` takes the rows ``g % D == r`` (the partitions
``p % D == r``); its DataLoader worker ``w`` of ``W`` takes every ``W``-th of them. The set of
samples per step and the position (epoch, step) do not depend on ``D`` or ``W``, so a run
resumes exactly, on another data-parallel size too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DataOrder", "OrderError", "Segment", "auto_partitions"]


class OrderError(ValueError):
    """A layout the order cannot serve; the message names the keys to change."""


@dataclass(frozen=True)
class Segment:
    """``count`` consecutive samples of shard ``shard`` starting at sample ``first``."""
    shard: int
    first: int
    count: int


def auto_partitions(dp_size: int, num_workers: int) -> int:
    """The default ``data.num_partitions``: one stream per DataLoader worker of every replica."""
    return dp_size * max(1, num_workers)


@dataclass(frozen=True)
class DataOrder:
    shard_samples: tuple[int, ...]
    batch_size: int
    num_partitions: int
    shuffle_block: int
    seed: int

    def __post_init__(self) -> None:
        total, batch, parts = sum(self.shard_samples), self.batch_size, self.num_partitions
        if parts < 1 or batch % parts:
            raise OrderError(f"data.num_partitions={parts} must divide train.batch_size={batch} "
                             "(every step takes the same number of samples from each partition)")
        if self.shuffle_block < 1:
            raise OrderError(f"data.shuffle_block must be >= 1, got {self.shuffle_block}")
        if total < batch:
            raise OrderError(f"the data has {total} samples, fewer than one global batch "
                             f"(train.batch_size={batch})")

    @property
    def total_samples(self) -> int:
        return sum(self.shard_samples)

    @property
    def steps_per_epoch(self) -> int:
        return self.total_samples // self.batch_size

    @property
    def partition_len(self) -> int:
        return self.steps_per_epoch * self.batch_size // self.num_partitions

    @property
    def per_step(self) -> int:
        """Samples each partition gives to every step."""
        return self.batch_size // self.num_partitions

    def check_layout(self, dp_size: int, num_workers: int = 0) -> int:
        """Partitions each DataLoader worker streams; an error names the keys when D or W do not fit."""
        parts = self.num_partitions
        if parts % dp_size:
            raise OrderError(f"data.num_partitions={parts} is not a multiple of the data-parallel size {dp_size}; "
                             "choose a num_partitions that every data-parallel size you run divides")
        mine = parts // dp_size
        workers = max(1, num_workers)
        if mine % workers:
            raise OrderError(f"data.num_workers={num_workers} does not divide the {mine} partitions of each "
                             f"data-parallel replica (data.num_partitions={parts} over {dp_size} replicas)")
        return mine // workers

    def epoch_shards(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shard_samples))

    def segments(self, epoch: int, partition: int, start: int, stop: int) -> list[Segment]:
        """The shard ranges holding partition-local samples [start, stop) in read order."""
        order = self.epoch_shards(epoch)
        sizes = np.asarray(self.shard_samples, dtype=np.int64)[order]
        ends = np.cumsum(sizes)
        begin, end = partition * self.partition_len + start, partition * self.partition_len + stop
        out: list[Segment] = []
        position = begin
        slot = int(np.searchsorted(ends, position, side="right"))
        while position < end:
            shard_start = int(ends[slot] - sizes[slot])
            take = min(end, int(ends[slot])) - position
            if take > 0:
                out.append(Segment(int(order[slot]), position - shard_start, take))
            position += take
            slot += 1
        return out

    def block_bounds(self, block: int) -> tuple[int, int]:
        start = block * self.shuffle_block
        return start, min(start + self.shuffle_block, self.partition_len)

    def block_permutation(self, epoch: int, partition: int, block: int) -> np.ndarray:
        start, stop = self.block_bounds(block)
        return np.random.default_rng([self.seed, epoch, partition, block, 1]).permutation(stop - start)

    def locate(self, step: int) -> tuple[int, int]:
        """Global step (from 0, across epochs) -> (epoch, step within the epoch)."""
        return divmod(step, self.steps_per_epoch)

    def worker_partitions(self, dp_rank: int, dp_size: int, worker: int, num_workers: int) -> list[int]:
        """The partitions one DataLoader worker of one replica streams, in the replica's row order."""
        mine = list(range(dp_rank, self.num_partitions, dp_size))
        return mine[worker::max(1, num_workers)]

    def replica_rows(self, dp_rank: int, dp_size: int) -> list[tuple[int, int]]:
        """(partition, i) of each row of a replica's batch, i = the sample's index within the step."""
        return [(g % self.num_partitions, g // self.num_partitions)
                for g in range(dp_rank, self.batch_size, dp_size)]

    def global_ids(self, step: int) -> list[tuple[int, int]]:
        """(shard, sample) of each row of the global batch at ``step``; the reference for tests."""
        epoch, inner = self.locate(step)
        rows = []
        for g in range(self.batch_size):
            partition, i = g % self.num_partitions, g // self.num_partitions
            rows.append(self.sample_id(epoch, partition, inner * self.per_step + i))
        return rows

    def sample_id(self, epoch: int, partition: int, local: int) -> tuple[int, int]:
        """(shard, sample) at partition-local position ``local`` of ``epoch``."""
        block, within = divmod(local, self.shuffle_block)
        start, _ = self.block_bounds(block)
        source = start + int(self.block_permutation(epoch, partition, block)[within])
        (segment,) = self.segments(epoch, partition, source, source + 1)
        return segment.shard, segment.first
