"""Process-level detection for workers started by torchrun (or ``llm-runtime launch``).

torchrun exports RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR,
MASTER_PORT and TORCHELASTIC_RUN_ID to every worker; nothing is left to spawn.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from .base import ClusterError, ClusterInfo, env_int

__all__ = ["REQUIRED", "matches", "worker_info"]

#: Without TORCHELASTIC_RUN_ID, all four must be set: an image often sets a lone MASTER_ADDR.
REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SOURCE = "torchrun"


def matches(env: Mapping[str, str]) -> bool:
    return bool(env.get("TORCHELASTIC_RUN_ID")) or all(env.get(k) for k in REQUIRED)


def worker_info(env: Mapping[str, str], hostname: str, node: ClusterInfo | None) -> ClusterInfo:
    """Ranks from the torchrun variables; node facts from ``node`` when SageMaker described it."""
    missing = [k for k in REQUIRED if not env.get(k)]
    if missing:
        raise ClusterError(f"torchrun worker environment lacks {', '.join(missing)}")
    rank = env_int(env, "RANK", SOURCE)
    world = env_int(env, "WORLD_SIZE", SOURCE)
    local_rank = env_int(env, "LOCAL_RANK", SOURCE, 0)
    local_world = env_int(env, "LOCAL_WORLD_SIZE", SOURCE, world)
    if world < 1 or not 0 <= rank < world:
        raise ClusterError(f"RANK={rank} is outside WORLD_SIZE={world} (set by {SOURCE})")
    if local_world < 1 or not 0 <= local_rank < local_world:
        raise ClusterError(f"LOCAL_RANK={local_rank} is outside LOCAL_WORLD_SIZE={local_world} (set by {SOURCE})")
    node_rank = env_int(env, "GROUP_RANK", SOURCE, rank // local_world)
    num_nodes = -(-world // local_world)
    master_addr = env["MASTER_ADDR"]
    master_port = env_int(env, "MASTER_PORT", SOURCE)
    ranks = dict(rank=rank, local_rank=local_rank, world_size=world, nproc_per_node=local_world,
                 master_addr=master_addr, master_port=master_port)
    if node is not None and node.trains:
        # Spawned by `llm-runtime launch` (or the toolkit) on a SageMaker host: keep the node facts.
        return replace(node, **ranks)
    return ClusterInfo(
        kind="torchrun",
        hosts=(hostname,) if num_nodes == 1 else (),
        current_host=hostname,
        node_rank=node_rank,
        num_nodes=num_nodes,
        **ranks,
    )
