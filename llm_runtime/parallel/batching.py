"""How one global batch is cut: per replica, into micro-batches (accumulation or pipeline micro-batches).

One rule for both backends, checked by the launcher before any worker starts and used by the
trainers; a batch that does not divide is a ConfigError naming the keys and the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Batching", "batching", "resolve_stages_per_rank", "stages_per_rank"]


@dataclass(frozen=True)
class Batching:
    micro_batch: int
    """Sequences per forward pass on one replica."""
    count: int
    """Micro-batches per step: gradient accumulation steps, or the pipeline's micro-batches."""

    @property
    def per_replica(self) -> int:
        return self.micro_batch * self.count


def resolve_stages_per_rank(stages_per_rank: int, pp_schedule: str) -> int:
    """Pipeline stages per rank: as given, else 2 for the interleaved schedule and 1 otherwise."""
    return stages_per_rank or (2 if pp_schedule == "interleaved" else 1)


def stages_per_rank(parallel) -> int:
    """``parallel.stages_per_rank`` with its default (:func:`resolve_stages_per_rank`)."""
    return resolve_stages_per_rank(parallel.stages_per_rank, parallel.pp_schedule)


def _error(text: str):
    from ..config import ConfigError

    return ConfigError(text)


def batching(train, parallel, dp: int, pp: int, *, stages: int = 1, schedule_rules: bool = True) -> Batching:
    """The global ``train.batch_size`` over ``dp`` replicas; with ``pp`` > 1 the pipeline's
    ``parallel.microbatches`` (default: one per stage, ``pp x stages``) cut each replica's share.
    ``schedule_rules``: torch's pipeline schedules need at least one micro-batch per stage (and the
    interleaved one a multiple of pp); DeepSpeed's pipeline engine has no such rule."""
    batch = train.batch_size
    if batch % dp:
        raise _error(f"train.batch_size={batch} (global, in sequences) does not divide over {dp} data-parallel "
                     "replicas")
    per_replica = batch // dp
    where = f"the per-replica batch of {per_replica} (train.batch_size={batch} over {dp} replicas)"
    if pp == 1:
        micro = train.micro_batch_size or per_replica
        if per_replica % micro:
            raise _error(f"train.micro_batch_size={micro} does not divide {where}")
        return Batching(micro, per_replica // micro)
    count = parallel.microbatches or pp * stages
    if schedule_rules and count < pp:
        raise _error(f"parallel.microbatches={count} is fewer than the {pp} pipeline stages; the schedule needs "
                     "at least one per stage")
    if per_replica % count:
        raise _error(f"parallel.microbatches={count} does not divide {where}")
    if schedule_rules and parallel.pp_schedule == "interleaved" and count % pp:
        raise _error(f"the interleaved schedule needs parallel.microbatches ({count}) to be a multiple of "
                     f"parallel.pp ({pp})")
    return Batching(per_replica // count, count)
