"""Process-level detection for ranks started by mpirun (Open MPI, MPICH, Intel MPI).

MPI tells each rank its place but not where the torch.distributed store lives, so the
master address is chosen here: the first SageMaker host, 127.0.0.1 when every rank is on
this node, else MASTER_ADDR as the launcher exported it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from .base import ClusterError, ClusterInfo, env_int
from .local import DEFAULT_MASTER_PORT

__all__ = ["matches", "worker_info"]
# (rank, size, local rank, local size) variable names per MPI implementation.
_FLAVOURS = (
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MPICH/Intel MPI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


def _flavour(env: Mapping[str, str]):
    for flavour in _FLAVOURS:
        if env.get(flavour[1]) is not None and env.get(flavour[2]) is not None:
            return flavour
    return None


def matches(env: Mapping[str, str]) -> bool:
    return _flavour(env) is not None


def worker_info(env: Mapping[str, str], hostname: str, node: ClusterInfo | None) -> ClusterInfo:
    flavour = _flavour(env)
    if flavour is None:
        raise ClusterError("no MPI rank variables (OMPI_COMM_WORLD_RANK/SIZE or PMI_RANK/PMI_SIZE) are set")
    name, rank_var, size_var, local_rank_var, local_size_var = flavour
    rank = env_int(env, rank_var, name)
    world = env_int(env, size_var, name)
    local_rank = env_int(env, local_rank_var, name, 0 if world == 1 else None)
    local_world = env_int(env, local_size_var, name, 1 if world == 1 else None)
    if local_rank is None or local_world is None:
        raise ClusterError(f"{name} sets {rank_var} but not {local_rank_var}/{local_size_var}")
    if world < 1 or not 0 <= rank < world:
        raise ClusterError(f"{rank_var}={rank} is outside {size_var}={world}")
    if not 0 <= local_rank < local_world <= world:
        raise ClusterError(f"{local_rank_var}={local_rank} is inconsistent with {local_size_var}={local_world}, {size_var}={world}")
    for var, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank)):
        other = env.get(var)
        if other not in (None, "") and other != str(value):
            raise ClusterError(
                f"conflicting launchers: {var}={other} but {name} says {value} "
                f"(unset {var} or launch with only one of mpirun / torchrun)"
            )
    on_sagemaker = node is not None and node.trains
    if on_sagemaker:
        master = node.hosts[0]
    elif local_world == world:
        master = "127.0.0.1"
    elif env.get("MASTER_ADDR"):
        master = env["MASTER_ADDR"]
    else:
        raise ClusterError(
            f"{name} ranks span several hosts but MASTER_ADDR is not set: export the first "
            "host's address to every rank, e.g. mpirun -x MASTER_ADDR=<first host> ..."
        )
    default_port = node.master_port if on_sagemaker else DEFAULT_MASTER_PORT
    facts = dict(
        kind="mpi",
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        nproc_per_node=local_world,
        master_addr=master,
        master_port=env_int(env, "MASTER_PORT", "the environment", default_port),
    )
    if on_sagemaker:
        return replace(node, **facts)
    num_nodes = -(-world // local_world)
    return ClusterInfo(
        hosts=(hostname,) if num_nodes == 1 else (),
        current_host=hostname,
        node_rank=rank // local_world,
        num_nodes=num_nodes,
        **facts,
    )
