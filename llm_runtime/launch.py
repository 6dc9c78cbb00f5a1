"""From cluster facts to started workers.

``plan_launch`` decides, as a value, what this host does (run the target here, start the
local workers with PyTorch's elastic agent, run mpirun across hosts, wait for the first
host's mpirun, or nothing); ``execute`` is the one place that starts processes.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .cluster import ClusterInfo
from .exitcodes import DOCUMENTED, launcher_exit
from .workerenv import STOP_FILE_ENV

__all__ = ["LaunchError", "LaunchPlan", "Target", "execute", "mpi_status_port", "mpirun_argv",
           "plan_launch", "sagemaker_target", "torchrun_argv"]

log = logging.getLogger(__name__)

#: Variables every MPI rank needs besides the network plan (names only: values never hit argv).
_MPI_PASS_PREFIXES = ("SM_", "SAGEMAKER_", "AWS_", "LLM_RUNTIME_", "NCCL_", "FI_", "TORCH_", "OMP_")
_MPI_PASS_NAMES = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "MASTER_PORT")


class LaunchError(ValueError):
    """The launch request cannot be carried out; the message says why and what to change."""


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
    return [*head, "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
            "--monitor-interval", "1", *target.entry()]


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
    if max_restarts < 0:
        raise LaunchError(f"--max-restarts must be >= 0, got {max_restarts}")
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


# ---------------------------------------------------------------- edges: starting processes


def execute(plan: LaunchPlan, info: ClusterInfo, *, mpi_wait_timeout_s: float = 600.0,
            stop_deadline_s: float = 100.0) -> int:
    """Carry out a plan; returns the exit status this host should exit with."""
    log.info("%s", plan.message)
    if plan.action == "idle":
        print(f"llm-runtime: {plan.message}", flush=True)
        return 0
    env = {**os.environ, **plan.env}
    if plan.action in ("exec", "group-command"):
        # Replace this process: a launcher's SIGTERM must reach the target, not orphan it.
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvpe(plan.argv[0], list(plan.argv), env)
    if plan.action == "torchrun":
        return _run_torchrun(plan.argv, plan.env, stop_deadline_s)
    if plan.start_sshd:
        _start_sshd()
    if plan.action == "mpirun":
        if not _wait_for_ssh(plan.ssh_hosts, mpi_wait_timeout_s):
            return 1
        return _run_mpirun(plan.argv, env, info, len(info.hosts) - 1)
    if plan.action == "mpi-wait":
        return _wait_for_mpirun(plan.wait_addr, plan.wait_port, info.current_host, mpi_wait_timeout_s)
    raise LaunchError(f"unknown launch action {plan.action!r}")


class _StopRequest:
    """The platform's SIGTERM (job stop, spot interruption) on the launcher: ask the workers to save
    at their next step boundary and stop (a file they look for each step), and tear them down
    after ``deadline_s`` or at a second SIGTERM. torch.distributed.run is told not to handle
    SIGTERM itself (TORCHELASTIC_SIGNALS_TO_HANDLE), so a worker's own SIGTERM only ever means
    "exit now"."""

    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s
        self.path = ""
        self.requested = False
        self._previous: dict = {}

    def install(self) -> dict[str, str]:
        self.path = os.path.join(tempfile.mkdtemp(prefix="llm-runtime-stop-"), "stop")  # private to this launch
        self._previous = {sig: signal.signal(sig, handler)
                          for sig, handler in ((signal.SIGTERM, self._on_term), (signal.SIGALRM, self._on_deadline))}
        return {STOP_FILE_ENV: self.path, "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT"}

    def _on_term(self, signum, frame) -> None:
        if self.requested or self.deadline_s <= 0:
            self._raise()
        self.requested = True
        with open(self.path, "w") as sink:  # the workers look for it at every step
            sink.write("stop\n")
        print(f"llm-runtime: SIGTERM: the workers save a checkpoint at their next step and stop "
              f"(deadline {self.deadline_s:g}s)", file=sys.stderr, flush=True)
        signal.setitimer(signal.ITIMER_REAL, self.deadline_s)

    def _on_deadline(self, signum, frame) -> None:
        print(f"llm-runtime: the workers did not stop within {self.deadline_s:g}s of SIGTERM; stopping them",
              file=sys.stderr, flush=True)
        self._raise()

    @staticmethod
    def _raise() -> None:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        raise SignalException("stop requested", sigval=signal.Signals.SIGTERM)

    def remove(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.path:
            shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)


def _run_torchrun(argv: Sequence[str], extra_env: Mapping[str, str], stop_deadline_s: float = 100.0) -> int:
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run

    from torch.distributed.run import get_args_parser

    os.environ.update(extra_env)
    stop = _StopRequest(stop_deadline_s)
    argv = list(argv)
    if "--signals-to-handle" in get_args_parser()._option_string_actions:
        os.environ.update(stop.install())
        argv = ["--signals-to-handle", os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"], *argv]
    else:  # an older torch: its agent owns SIGTERM and stops the workers at once
        log.warning("this torch's launcher cannot leave SIGTERM to llm-runtime: a stop tears the workers down "
                    "without a final checkpoint")
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        failures = err.failures
        first = min(failures.values(), key=lambda f: f.timestamp) if failures else None
        where = f" (first: local rank {first.local_rank}, exit code {first.exitcode})" if first else ""
        code = launcher_exit((f.timestamp, f.exitcode) for f in failures.values())
        meaning = f": {DOCUMENTED[code]}" if code in DOCUMENTED else ""
        print(f"llm-runtime: {len(failures)} worker(s) failed{where}; exit code {code}{meaning}", file=sys.stderr,
              flush=True)
        return code
    except SignalException as err:
        # The platform stopped the job (SIGTERM): the agent already stopped the workers.
        print(f"llm-runtime: stopped by {err.sigval.name}; workers were stopped", file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    except (RendezvousError, DistError) as err:
        print(f"llm-runtime: the hosts could not rendezvous: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop.remove()
    if stop.requested:
        print("llm-runtime: stopped on request; the workers saved their state and exited", file=sys.stderr,
              flush=True)
        return 128 + int(signal.SIGTERM)
    return 0


def _start_sshd() -> None:
    """mpirun reaches the other hosts over ssh: make sure this host answers (as SageMaker's MPI images do)."""
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    if sshd is None:
        log.warning("sshd is not installed: mpirun cannot reach this host over ssh")
        return
    if _port_open("127.0.0.1", 22, 1.0):
        return
    subprocess.Popen([sshd, "-D"], stdin=subprocess.DEVNULL, start_new_session=True)


def _port_open(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _wait_for_ssh(hosts: Sequence[str], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    for host in hosts:
        while not _port_open(host, 22, 2.0):
            if time.monotonic() > deadline:
                print(f"llm-runtime: host {host} did not accept ssh (port 22) within {timeout_s:.0f}s; "
                      "mpirun needs sshd on every host", file=sys.stderr)
                return False
            time.sleep(1.0)
    return True


def _status_store(addr: str, port: int, *, is_master: bool, timeout_s: float):
    from datetime import timedelta

    from torch.distributed import TCPStore

    return TCPStore(addr, port, is_master=is_master, timeout=timedelta(seconds=timeout_s),
                    wait_for_workers=False)


def _run_mpirun(argv: Sequence[str], env: Mapping[str, str], info: ClusterInfo, others: int) -> int:
    store = None
    if others:
        try:
            store = _status_store("0.0.0.0", mpi_status_port(info), is_master=True, timeout_s=60)
        except (RuntimeError, OSError) as err:
            print(f"llm-runtime: cannot publish mpirun's status on port {mpi_status_port(info)} "
                  f"(MASTER_PORT + 1): {err}", file=sys.stderr)
            return 1
    log.info("mpirun command: %s", shlex.join(argv))
    try:
        status = subprocess.run(list(argv), env=dict(env)).returncode
    except FileNotFoundError:
        print(f"llm-runtime: {argv[0]} not found; install Open MPI or launch without --mpi", file=sys.stderr)
        status = 127
    if store is not None:
        store.set("mpirun_exit_status", str(status))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and store.add("acks", 0) < others:
            time.sleep(0.2)
    return status


def _wait_for_mpirun(addr: str, port: int, host: str, timeout_s: float) -> int:
    """A non-first host: wait for the first host's mpirun to finish and exit with its status.

    Reaching the first host is bounded by ``timeout_s``; after that the wait lasts as long
    as the job, and ends the moment the first host's store goes away (its launcher died).
    """
    try:
        store = _status_store(addr, port, is_master=False, timeout_s=timeout_s)
    except (RuntimeError, OSError) as err:
        print(f"llm-runtime: host {host} could not reach the first host {addr}:{port} within "
              f"{timeout_s:.0f}s to wait for mpirun: {err}", file=sys.stderr)
        return 1
    while True:
        try:
            if store.check(["mpirun_exit_status"]):
                status = int(store.get("mpirun_exit_status"))
                store.add("acks", 1)
                return status
        except (RuntimeError, OSError) as err:
            print(f"llm-runtime: lost the first host {addr} while waiting for mpirun: {err}", file=sys.stderr)
            return 1
        time.sleep(1.0)

