"""From cluster facts to a launch plan (pure).

``plan_launch`` decides, as a value, what this host does (run the target here, start the
local workers with PyTorch's elastic agent, run mpirun across hosts, wait for the first
host's mpirun, or nothing); :func:`llm_runtime.spawn.execute` is the one place that starts processes.
"""
from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .cluster import ClusterInfo

__all__ = ["TORCH_FLOOR", "LaunchError", "LaunchPlan", "Target", "mpi_export_names", "mpi_status_port", "mpirun_argv",
           "plan_launch", "sagemaker_target", "torch_too_old", "torchrun_argv"]

log = logging.getLogger(__name__)

#: Variables every MPI rank needs besides the network plan (names only: values never hit argv).
_MPI_PASS_PREFIXES = ("SM_", "SAGEMAKER_", "AWS_", "LLM_RUNTIME_", "NCCL_", "FI_", "TORCH_", "OMP_",
                      "MLFLOW_", "WANDB_")  # the trackers' own variables (metrics.mlflow, metrics.wandb)
_MPI_PASS_NAMES = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "MASTER_PORT", "TRAINING_JOB_NAME")


class LaunchError(ValueError):
    """The launch request cannot be carried out; the message says why and what to change."""


TORCH_FLOOR = (2, 9)
"""The first torch whose torch.distributed.run leaves SIGTERM to the runtime (``--signals-to-handle``):
without it a job stop or a spot interruption tears the workers down with no final checkpoint."""


def torch_too_old(version: str) -> str | None:
    """Why this torch cannot run the launcher (None: it can), from its version string."""
    head = version.split("+")[0].split(".")
    try:
        found = (int(head[0]), int("".join(c for c in head[1] if c.isdigit()) or 0))
    except (IndexError, ValueError):
        return f"torch {version!r}: not a version llm-runtime can read; it needs torch >= 2.9"
    if found >= TORCH_FLOOR:
        return None
    return (f"torch {version} is too old: llm-runtime needs torch >= {TORCH_FLOOR[0]}.{TORCH_FLOOR[1]}, whose "
            "launcher leaves SIGTERM to it (--signals-to-handle), so a job stop saves a checkpoint first; "
            "install torch>=2.9")


@dataclass(frozen=True)
class Target:
    """What each worker runs: a module (``-m``) or a script, with its arguments."""

    module: str | None = None
    script: str | None = None
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.module is None) == (self.script is None):
            raise LaunchError("give exactly one of -m MODULE or SCRIPT.py to launch")

    def entry(self) -> list[str]:
        return (["-m", self.module] if self.module else [self.script]) + list(self.args)

    def argv(self, python: str = sys.executable) -> list[str]:
        return [python, *self.entry()]


@dataclass(frozen=True)
class LaunchPlan:
    """What this host does, decided before anything starts."""

    action: str
    """``exec``, ``torchrun``, ``mpirun``, ``mpi-wait``, ``group-command`` or ``idle``."""
    argv: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    """Variables added to the children's environment (never secrets)."""
    message: str = ""
    wait_addr: str = ""
    wait_port: int = 0
    ssh_hosts: tuple[str, ...] = ()
    """MPI over ssh: start sshd here, and (first host) wait until these hosts accept ssh."""
    start_sshd: bool = False


def mpi_status_port(info: ClusterInfo) -> int:
    """Where the first host publishes mpirun's exit status to the others."""
    return info.master_port + 1


def torchrun_argv(info: ClusterInfo, target: Target, *, nproc: int, max_restarts: int) -> list[str]:
    """Arguments for torch.distributed.run on this node."""
    if info.num_nodes == 1 and info.kind == "local":
        # One machine: a c10d rendezvous on a free port, so two jobs never collide.
        head = ["--standalone", "--nnodes", "1"]
    else:
        head = ["--nnodes", str(info.num_nodes), "--node-rank", str(info.node_rank),
                "--master-addr", info.master_addr, "--master-port", str(info.master_port)]
    # A worker's exit (a failure, or the end of the job) is noticed within 0.1 s: torchrun's default.
    return [*head, "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
            "--monitor-interval", "0.1", *target.entry()]


def mpirun_argv(
    info: ClusterInfo,
    target: Target,
    *,
    nproc: int,
    export: Sequence[str],
    python: str = sys.executable,
    mpirun: str = "mpirun",
) -> list[str]:
    """The mpirun line the first host runs: every host with its slots, variables by name."""
    if not info.hosts:
        raise LaunchError("mpirun needs the list of hosts (SageMaker resourceconfig.json); none is known")
    iface = info.network_interface or "eth0"
    argv = [
        mpirun, "--allow-run-as-root",
        "--host", ",".join(f"{host}:{nproc}" for host in info.hosts),
        "-np", str(nproc * len(info.hosts)),
        "-bind-to", "none", "-map-by", "slot",
        "-mca", "pml", "ob1", "-mca", "btl", "^openib",
        # vader's single-copy (CMA) needs CAP_SYS_PTRACE, which containers usually lack.
        "-mca", "btl_vader_single_copy_mechanism", "none",
        "-mca", "btl_tcp_if_include", iface, "-mca", "oob_tcp_if_include", iface,
        "-mca", "plm_rsh_no_tree_spawn", "1",
        "-mca", "orte_abort_on_non_zero_status", "1",
        "-x", f"MASTER_ADDR={info.master_addr}",
    ]
    for name in sorted(set(export)):
        argv += ["-x", name]
    return argv + target.argv(python)


def mpi_export_names(environ: Mapping[str, str], planned: Sequence[str]) -> list[str]:
    """Names (never values) of the variables mpirun forwards to remote ranks."""
    names = set(planned)
    names.update(n for n in environ if n.startswith(_MPI_PASS_PREFIXES) or n in _MPI_PASS_NAMES)
    names.discard("MASTER_ADDR")  # set explicitly to the first host
    return sorted(names)


def sagemaker_target(hyperparameters: Mapping[str, object], environ: Mapping[str, str],
                     code_dir: str | Path) -> Target | None:
    """The job's own program (``sagemaker_program`` / SAGEMAKER_PROGRAM), or None for the built-in trainer.

    Its arguments are the job's hyperparameters as ``--key value``, as the SageMaker
    toolkit passes them.
    """
    program = hyperparameters.get("sagemaker_program") or environ.get("SAGEMAKER_PROGRAM")
    if not program:
        return None
    program = str(program)
    if not program.endswith(".py"):
        raise LaunchError(f"sagemaker_program={program!r}: only Python scripts (*.py) can be launched")
    submit = str(hyperparameters.get("sagemaker_submit_directory") or "")
    if submit and "://" not in submit and Path(submit).is_dir():
        code_dir = submit  # local mode: the code was not uploaded anywhere
    path = Path(program)
    if not path.is_absolute() and (Path(code_dir) / path).exists():
        path = Path(code_dir) / path
    if not path.is_file():
        hint = (f"; llm-runtime does not download sagemaker_submit_directory ({submit}): put the code in the "
                f"image under {code_dir}") if "://" in submit else ""
        raise LaunchError(f"sagemaker_program {program!r} is not in {code_dir} nor at that path{hint}")
    args: list[str] = []
    for key, value in hyperparameters.items():
        if key.startswith("sagemaker_"):
            continue
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return Target(script=str(path), args=tuple(args))


def plan_launch(
    info: ClusterInfo,
    target: Target,
    *,
    nproc: int = 0,
    max_restarts: int = 0,
    mpi: bool = False,
    env_exports: Sequence[str] = (),
    group_commands: Mapping[str, str] | None = None,
    python: str = sys.executable,
    ssh: bool = True,
) -> LaunchPlan:
    """Decide what this host does. Pure: no process, file or variable is touched."""
    nproc = nproc or info.nproc_per_node
    if nproc < 1:
        raise LaunchError(f"--nproc-per-node must be >= 1, got {nproc}")
    if info.is_worker:
        return LaunchPlan("exec", tuple(target.argv(python)),
                          message=f"already a {info.kind} worker (rank {info.rank}): running the target here")
    if not info.trains:
        command = (group_commands or {}).get(info.current_group or "")
        if command:
            return LaunchPlan("group-command", tuple(shlex.split(command)),
                              message=f"host {info.current_host} (group {info.current_group}) runs its group command")
        return LaunchPlan("idle", message=(
            f"host {info.current_host} is in instance group {info.current_group!r}, which is not "
            f"among the distribution instance groups; nothing to run here (exit 0)"))
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if max_restarts else {}
    if mpi:
        if max_restarts:
            raise LaunchError("--max-restarts works with the elastic launcher, not with --mpi")
        # ssh=False when Open MPI was told to reach hosts another way (plm_rsh_agent).
        others = tuple(h for h in info.hosts if h != info.current_host) if ssh else ()
        if info.node_rank == 0:
            return LaunchPlan("mpirun", tuple(mpirun_argv(info, target, nproc=nproc, export=env_exports, python=python)),
                              message=f"first host: mpirun over {len(info.hosts)} hosts x {nproc} ranks",
                              ssh_hosts=others, start_sshd=ssh and len(info.hosts) > 1)
        return LaunchPlan("mpi-wait", message=f"waiting for {info.master_addr}'s mpirun to finish",
                          wait_addr=info.master_addr, wait_port=mpi_status_port(info), start_sshd=ssh)
    return LaunchPlan("torchrun", tuple(torchrun_argv(info, target, nproc=nproc, max_restarts=max_restarts)),
                      env=env, message=f"node {info.node_rank}/{info.num_nodes}: {nproc} workers via torch.distributed.run")
