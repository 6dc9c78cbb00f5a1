"""Ordered detection of the cluster kind, with an explicit override.

Order, and why:
1. torchrun: its variables describe this very process; an agent (ours or the user's) already
   spawned it. Checked first so workers of ``llm-runtime launch`` never try to spawn again.
2. MPI: also process-level. A rank started by mpirun carries OMPI_*/PMI_* and, once the
   runtime mapped them, RANK & co. too, so MPI is preferred over the plain-variable torchrun
   rule unless TORCHELASTIC_RUN_ID says a torchrun agent is the parent.
3. SageMaker: node-level facts from /opt/ml; the launcher spawns the workers.
4. local: one machine.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

from . import local, mpi, sagemaker, torchrun
from .base import KINDS, ClusterError, ClusterInfo

__all__ = ["detect", "detect_here", "probe_gpus"]


def detect(
    env: Mapping[str, str],
    sagemaker_dir: str | Path | None = None,
    *,
    kind: str | None = None,
    hostname: str = "localhost",
    num_gpus: int = 0,
    cpu_procs: int = 2,
) -> ClusterInfo:
    """Describe this process's cluster from ``env`` and the SageMaker tree; mutates nothing.

    ``kind`` (``--cluster KIND``) forces a choice, and it is an error when that kind's facts
    are absent. ``torchrun`` / ``mpi`` pick whose rank variables to read; ``sagemaker`` /
    ``local`` pick where the node facts come from. A forced node-level kind never hides
    the ranks of a process that a launcher already started: a worker stays a worker, or
    it would spawn workers of its own.
    """
    if kind is not None and kind not in KINDS:
        raise ClusterError(f"unknown cluster kind {kind!r}; expected one of {', '.join(KINDS)}")
    sm = sagemaker.read_config(env, sagemaker_dir) if kind != "local" else None
    node = sagemaker.node_info(sm, env, num_gpus=num_gpus, cpu_procs=cpu_procs) if sm else None
    if kind == "sagemaker" and node is None:
        raise ClusterError(f"cluster kind 'sagemaker' was requested but "
                           f"{sagemaker.config_dir(env, sagemaker_dir) / 'resourceconfig.json'} or SM_HOSTS is not present")

    if kind == "torchrun":
        if not torchrun.matches(env):
            raise ClusterError("cluster kind 'torchrun' was requested but neither TORCHELASTIC_RUN_ID nor "
                               "all of RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are set")
        return torchrun.worker_info(env, hostname, node)
    if kind == "mpi":
        if not mpi.matches(env):
            raise ClusterError("cluster kind 'mpi' was requested but no OMPI_COMM_WORLD_RANK/SIZE or "
                               "PMI_RANK/PMI_SIZE variables are set")
        return mpi.worker_info(env, hostname, node)
    # A torchrun agent's children carry TORCHELASTIC_RUN_ID; without it, MPI's own variables
    # outrank a RANK/WORLD_SIZE set that the runtime may have mapped from them.
    if env.get("TORCHELASTIC_RUN_ID") or (torchrun.matches(env) and not mpi.matches(env)):
        return torchrun.worker_info(env, hostname, node)
    if mpi.matches(env):
        return mpi.worker_info(env, hostname, node)
    if node is not None:
        return node
    return local.node_info(env, hostname, num_gpus=num_gpus, cpu_procs=cpu_procs)


def probe_gpus() -> int:
    """Number of CUDA devices (0 without torch or without a GPU)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def detect_here(kind: str | None = None, sagemaker_dir: str | Path | None = None, cpu_procs: int = 2) -> ClusterInfo:
    """Edge: detect from this process's real environment, hostname and GPUs."""
    return detect(os.environ, sagemaker_dir, kind=kind, hostname=socket.gethostname(),
                  num_gpus=probe_gpus(), cpu_procs=cpu_procs)
