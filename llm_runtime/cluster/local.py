"""The fallback: one machine, nothing launched yet."""
from __future__ import annotations

from collections.abc import Mapping

from .base import ClusterInfo, env_int

__all__ = ["DEFAULT_MASTER_PORT", "node_info"]

DEFAULT_MASTER_PORT = 29500


def node_info(env: Mapping[str, str], hostname: str, *, num_gpus: int, cpu_procs: int = 2) -> ClusterInfo:
    """One node; a worker per GPU, or ``cpu_procs`` CPU workers when there is no GPU."""
    return ClusterInfo(
        kind="local",
        hosts=(hostname,),
        current_host=hostname,
        node_rank=0,
        num_nodes=1,
        nproc_per_node=num_gpus if num_gpus > 0 else cpu_procs,
        master_addr="127.0.0.1",
        master_port=env_int(env, "MASTER_PORT", "the environment", DEFAULT_MASTER_PORT),
    )
