"""How the world's ranks split into pipeline x data-parallel (replicate x shard) x tensor parallel.

Pure arithmetic, checked before any process group exists. Mesh order is
[pp, dp_replicate, dp_shard, tp] with tp varying fastest, so tensor-parallel peers (and, by
default, FSDP shard groups) are consecutive ranks, which launchers place on one node.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

__all__ = ["AXES", "ParallelDims", "dims_for", "resolve_dims"]

log = logging.getLogger(__name__)

AXES = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the four parallel axes; their product is the world size."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int

    def __post_init__(self) -> None:
        for axis in AXES:
            if getattr(self, axis) < 1:
                raise ValueError(f"parallel.{axis} must be >= 1 once resolved, got {getattr(self, axis)}")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: the number of distinct batch slices per step."""
        return self.dp_replicate * self.dp_shard

    def sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    def mesh_axes(self) -> list[tuple[str, int]]:
        """(name, size) of the axes larger than 1, in mesh order."""
        return [(axis, size) for axis, size in self.sizes().items() if size > 1]

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along every axis (tp fastest)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        out = {}
        for axis in reversed(AXES):
            size = getattr(self, axis)
            out[axis] = rank % size
            rank //= size
        return {axis: out[axis] for axis in AXES}

    def dp_rank(self, rank: int) -> int:
        """Which slice of the global batch this rank's replica takes (tp/pp peers share it)."""
        c = self.coords(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    def describe(self) -> str:
        return " x ".join(f"{axis}={size}" for axis, size in self.sizes().items())


def _factors(dp_replicate, dp_shard, tp, pp) -> str:
    return (f"parallel.dp_replicate={dp_replicate} x parallel.dp_shard={dp_shard} x "
            f"parallel.tp={tp} x parallel.pp={pp}")


def _default_shard(dp: int, tp: int, nproc_per_node: int | None, num_nodes: int) -> int:
    """Neither replicas nor a shard size given: one shard group per node on several nodes, else all of dp."""
    if num_nodes > 1 and nproc_per_node:
        per_node = nproc_per_node // tp if nproc_per_node % tp == 0 else 0
        if per_node and dp % per_node == 0 and per_node < dp:
            return per_node  # one shard group per node: gathers stay on the node's fast links
        if tp <= nproc_per_node:  # (tp beyond a node gets its own warning)
            log.warning("no shard group fits one node (%d processes per node, tp=%d, %d data-parallel "
                        "ranks): FSDP shards over all of them, across nodes; set "
                        "parallel.shard_group_size to choose", nproc_per_node, tp, dp)
    return dp


def dims_for(parallel, world_size: int, *, nproc_per_node: int | None = None, num_nodes: int = 1) -> ParallelDims:
    """The ``[parallel]`` section's layout on this world (the one caller of :func:`resolve_dims` with a
    config); a layout that does not fit is a ConfigError naming every factor."""
    from ..config import ConfigError

    try:
        return resolve_dims(world_size=world_size, dp_replicate=parallel.dp_replicate, dp_shard=parallel.dp_shard,
                            tp=parallel.tp, pp=parallel.pp, shard_group_size=parallel.shard_group_size,
                            nproc_per_node=nproc_per_node, num_nodes=num_nodes)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def resolve_dims(
    *,
    world_size: int,
    dp_replicate: int = 0,
    dp_shard: int = -1,
    tp: int = 1,
    pp: int = 1,
    shard_group_size: int = 0,
    nproc_per_node: int | None = None,
    num_nodes: int = 1,
) -> ParallelDims:
    """Fill in the inferred sizes and check the product against the world size.

    ``dp_shard=-1`` infers the shard size; ``dp_replicate=0`` (or -1) infers the replica count.
    ``shard_group_size`` is the one key both backends read for the shard group (FSDP's HSDP
    here, DeepSpeed's MiCS/hpZ there). With neither it nor ``dp_replicate`` given: plain
    FSDP over every data-parallel rank on one node, one shard group per node on several.
    """
    if dp_replicate == -1:
        dp_replicate = 0  # both spellings of "infer"
    given = _factors(dp_replicate, dp_shard, tp, pp)
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if tp < 1 or pp < 1:
        raise ValueError(f"parallel.tp and parallel.pp must be >= 1 ({given})")
    if dp_replicate < 0 or dp_shard == 0 or dp_shard < -1 or shard_group_size < 0:
        raise ValueError(f"dp sizes must be >= 1 (dp_shard=-1 and dp_replicate=0 mean infer): {given}, "
                         f"parallel.shard_group_size={shard_group_size}")
    if world_size % (tp * pp):
        raise ValueError(f"{given}: WORLD_SIZE={world_size} is not divisible by tp x pp = {tp * pp}")
    dp = world_size // (tp * pp)
    if shard_group_size:
        if dp_shard not in (-1, shard_group_size):
            raise ValueError(f"parallel.shard_group_size={shard_group_size} contradicts parallel.dp_shard={dp_shard}")
        dp_shard = shard_group_size
    if dp_replicate == 0 and dp_shard == -1:
        dp_shard = _default_shard(dp, tp, nproc_per_node, num_nodes)
    if dp_replicate == 0:
        if dp % dp_shard:
            source = f" (parallel.shard_group_size={shard_group_size})" if shard_group_size else ""
            raise ValueError(f"{_factors('auto', dp_shard, tp, pp)}{source}: the {dp} data-parallel ranks of "
                             f"WORLD_SIZE={world_size} do not split into shard groups of {dp_shard}")
        dp_replicate = dp // dp_shard
    elif dp_shard == -1:
        if dp % dp_replicate:
            raise ValueError(f"{_factors(dp_replicate, 'auto', tp, pp)}: the {dp} data-parallel ranks of "
                             f"WORLD_SIZE={world_size} do not split into {dp_replicate} replicas")
        dp_shard = dp // dp_replicate
    dims = ParallelDims(dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp, pp=pp)
    if dims.world_size != world_size:
        raise ValueError(f"{_factors(dp_replicate, dp_shard, tp, pp)} = {dims.world_size}, "
                         f"but WORLD_SIZE is {world_size}")
    if nproc_per_node and tp > nproc_per_node:
        log.warning("parallel.tp=%d exceeds the %d processes per node: tensor-parallel traffic "
                    "will cross nodes", tp, nproc_per_node)
    return dims
