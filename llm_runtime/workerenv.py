"""What a launcher tells its workers through their environment, read and written only here.

torch.distributed.run sets the elastic variables (``TORCHELASTIC_*``); the runtime's launcher adds
the stop file; MPI ranks get the torch.distributed variables from :func:`process_env`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

from .cluster import ClusterInfo

__all__ = ["COMMIT_AGENT_ENV", "STOP_FILE_ENV", "commit_agent", "launch_tag", "process_env", "restart_count", "stop_file"]

STOP_FILE_ENV = "LLM_RUNTIME_STOP_FILE"
"""The launcher creates this file when the platform asked the job to stop (SIGTERM): save and stop."""
COMMIT_AGENT_ENV = "LLM_RUNTIME_COMMIT_AGENT"
"""Set by ``llm-runtime launch`` when its agent commits this node's checkpoints (they outlive the workers)."""


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def restart_count(env: Mapping[str, str] | None = None) -> int:
    """Which elastic attempt this is (torch.distributed.run's TORCHELASTIC_RESTART_COUNT; 0 outside it)."""
    return int(_env(env).get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def launch_tag(env: Mapping[str, str] | None = None) -> str:
    """What the local ranks of one launch attempt share: torchrun's run id and restart count (empty without)."""
    run_id = _env(env).get("TORCHELASTIC_RUN_ID", "")
    return f"{run_id}/{restart_count(env)}" if run_id else ""


def stop_file(env: Mapping[str, str] | None = None) -> str:
    """The stop file this worker's launcher watches for it ("" when the launcher has none)."""
    return _env(env).get(STOP_FILE_ENV, "")


def commit_agent(env: Mapping[str, str] | None = None) -> bool:
    """Whether this worker's launcher commits the node's checkpoints (else local rank 0 does)."""
    return _env(env).get(COMMIT_AGENT_ENV, "") == "1"


def process_env(info: ClusterInfo) -> dict[str, str]:
    """The torch.distributed variables for a worker (MPI ranks get them from here)."""
    if not info.is_worker:
        return {}
    return {
        "RANK": str(info.rank),
        "LOCAL_RANK": str(info.local_rank),
        "WORLD_SIZE": str(info.world_size),
        "LOCAL_WORLD_SIZE": str(info.nproc_per_node),
        "MASTER_ADDR": info.master_addr,
        "MASTER_PORT": str(info.master_port),
    }
