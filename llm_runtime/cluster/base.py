"""The cluster facts every later layer reads: one frozen value per process.

Detection never touches ``os.environ`` or the disk beyond reading the SageMaker
config directory it is given; see :mod:`llm_runtime.cluster.detect`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

__all__ = ["ClusterError", "ClusterInfo", "InstanceGroup", "KINDS", "env_int"]

#: Every kind of cluster the runtime knows, in detection order.
KINDS = ("torchrun", "mpi", "sagemaker", "local")


class ClusterError(ValueError):
    """The cluster description is wrong or inconsistent; the message says where."""


@dataclass(frozen=True)
class InstanceGroup:
    """One SageMaker instance group (heterogeneous clusters have several)."""

    name: str
    instance_type: str
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class ClusterInfo:
    """What this process knows about the job's hosts and its own place in them."""

    kind: str
    """``sagemaker``, ``torchrun``, ``mpi`` or ``local``."""
    hosts: tuple[str, ...]
    """Hosts that train, in the order the platform lists them (never re-sorted)."""
    current_host: str
    node_rank: int
    """Index of ``current_host`` in ``hosts``."""
    num_nodes: int
    nproc_per_node: int
    """Worker processes per host (GPUs, or 2 on a CPU-only host)."""
    master_addr: str
    master_port: int
    rank: int | None = None
    """Global rank; set only when a launcher already started this process as a worker."""
    local_rank: int | None = None
    world_size: int | None = None
    network_interface: str | None = None
    instance_type: str | None = None
    instance_groups: tuple[InstanceGroup, ...] = field(default_factory=tuple)
    current_group: str | None = None
    """SageMaker instance group of this host (heterogeneous clusters)."""

    @property
    def trains(self) -> bool:
        """False for a host outside the distribution instance groups (it has nothing to run)."""
        return self.node_rank >= 0

    @property
    def is_worker(self) -> bool:
        """True when this process is one rank of the job (nothing left to spawn)."""
        return self.rank is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; the keys are the field names (``info --json``)."""
        out = dataclasses.asdict(self)
        out["hosts"] = list(self.hosts)
        out["instance_groups"] = [
            {"name": g.name, "instance_type": g.instance_type, "hosts": list(g.hosts)}
            for g in self.instance_groups
        ]
        return out


def env_int(env: Mapping[str, str], name: str, source: str, default: int | None = None) -> int | None:
    """Read an integer variable; a malformed value is a ClusterError naming it and its source."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ClusterError(f"{name}={raw!r} is not an integer (set by {source})") from None
