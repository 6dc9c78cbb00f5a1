"""The one place that starts processes: a :class:`llm_runtime.launch.LaunchPlan` carried out.

torch.distributed.run's elastic agent for the local workers (with the platform's SIGTERM turned
into a save-and-stop request), sshd and mpirun across hosts, or waiting for the first host's mpirun.
Every wait has a timeout.
"""
from __future__ import annotations

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

from .cluster import ClusterInfo
from .exitcodes import DOCUMENTED, launcher_exit
from .faults import inject
from .launch import LaunchError, LaunchPlan, mpi_status_port
from .workerenv import COMMIT_AGENT_ENV, STOP_FILE_ENV

__all__ = ["default_sigterm", "early_sigterm", "execute"]

log = logging.getLogger(__name__)


def execute(plan: LaunchPlan, info: ClusterInfo, *, mpi_wait_timeout_s: float = 600.0,
            stop_deadline_s: float = 100.0, agent=None) -> int:
    """Carry out a plan; returns the exit status this host should exit with. ``agent`` (a
    checkpoint CommitAgent, torchrun only) commits the node's saves and is given its time at the end."""
    log.info("%s", plan.message)
    inject(info.node_rank, None, phase="launch")
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
        return _run_torchrun(plan.argv, {**plan.env, **({COMMIT_AGENT_ENV: "1"} if agent else {})},
                             stop_deadline_s, agent)
    if plan.action == "mpirun":
        return _run_mpirun(plan, env, info, mpi_wait_timeout_s)
    if plan.action == "mpi-wait":
        return _wait_for_mpirun(plan, info, mpi_wait_timeout_s)
    raise LaunchError(f"unknown launch action {plan.action!r}")


def early_sigterm() -> None:
    """From the launcher's first line: a SIGTERM before the workers start (the platform stopping
    the job while the host still detects, checks or stages) exits 143 at once, with one line. The
    stop-and-save handler replaces it while the workers run (PID 1 in the image is tini)."""
    def stop(signum, frame):
        print("llm-runtime: SIGTERM before the workers started: nothing to save; exiting 143", file=sys.stderr,
              flush=True)
        raise SystemExit(128 + int(signal.SIGTERM))

    signal.signal(signal.SIGTERM, stop)


def default_sigterm() -> None:
    """In a worker: its own SIGTERM means exit now (the launcher turns the platform's into a save)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
        self.requested_at = 0.0
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
        self.requested_at = time.monotonic()
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

    def time_left(self) -> float:
        """Seconds left of the stop deadline (after SIGTERM)."""
        return max(0.0, self.deadline_s - (time.monotonic() - self.requested_at))

    def remove(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.path:
            shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)


def _run_torchrun(argv: Sequence[str], extra_env: Mapping[str, str], stop_deadline_s: float = 100.0,
                  agent=None) -> int:
    """torch.distributed.run in this process; then the commit agent's last commit, within its deadline."""
    stop = _StopRequest(stop_deadline_s)
    code = _torchrun(argv, extra_env, stop)
    if agent is not None:
        left = stop.time_left() if stop.requested else agent.timeout_s
        if not agent.finish(left) and code == 0:
            code = 1  # the last checkpoint is not committed: not a clean end
        _exit_if_stuck(code)
    return code


def _exit_if_stuck(code: int) -> None:
    """An abandoned upload's transfer threads (not daemons) would hold the interpreter's exit until
    their requests time out; the host exits now instead, with its code."""
    import threading

    stuck = [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()
             and (not t.daemon or t.name.startswith("ThreadPoolExecutor"))]  # both are joined at exit
    if stuck:
        log.warning("exiting with %d transfer thread(s) still blocked (%s)", len(stuck), ", ".join(stuck[:3]))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _torchrun(argv: Sequence[str], extra_env: Mapping[str, str], stop: "_StopRequest") -> int:
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import get_args_parser, parse_args, run

    os.environ.update(extra_env)
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


def _job_ssh(plan: LaunchPlan, store, info: ClusterInfo, timeout_s: float):
    """The job's ssh keys and this host's sshd (see sshkeys.py); None when ssh is not used."""
    if not plan.start_sshd or store is None:
        return None
    from .sshkeys import SshSetupError, setup

    try:
        return setup(store, info.current_host, list(info.hosts), timeout_s)
    except (SshSetupError, OSError, subprocess.SubprocessError) as err:
        print(f"llm-runtime: setting up ssh for mpirun failed: {err}", file=sys.stderr, flush=True)
        return False


def _run_mpirun(plan: LaunchPlan, env: Mapping[str, str], info: ClusterInfo, timeout_s: float) -> int:
    """The first host: publish the job's ssh keys and mpirun's exit status, run mpirun across the hosts."""
    from .sshkeys import rsh_env

    store, others = None, len(info.hosts) - 1
    if others:
        try:  # torch's store listens on every address of this host; only the first host listens on this port
            store = _status_store("0.0.0.0", mpi_status_port(info), is_master=True, timeout_s=60)
        except (RuntimeError, OSError) as err:
            print(f"llm-runtime: cannot publish mpirun's status on port {mpi_status_port(info)} "
                  f"(MASTER_PORT + 1): {err}", file=sys.stderr)
            return 1
    ssh = _job_ssh(plan, store, info, timeout_s)
    if ssh is False:
        return 1
    try:
        if ssh is not None:
            env = {**env, **rsh_env(ssh.directory)}
        if not _wait_for_ssh(plan.ssh_hosts, timeout_s):
            return 1
        log.info("mpirun command: %s", shlex.join(plan.argv))
        try:
            status = subprocess.run(list(plan.argv), env=dict(env)).returncode
        except FileNotFoundError:
            print(f"llm-runtime: {plan.argv[0]} not found; install Open MPI or launch without --mpi", file=sys.stderr)
            status = 127
    finally:
        if ssh is not None:
            ssh.stop()
    if store is not None:
        store.set("mpirun_exit_status", str(status))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and store.add("acks", 0) < others:
            time.sleep(0.2)
    return status


def _wait_for_mpirun(plan: LaunchPlan, info: ClusterInfo, timeout_s: float) -> int:
    """A non-first host: publish its ssh keys, start its sshd, then wait for the first host's mpirun
    to finish and exit with its status.

    Reaching the first host is bounded by ``timeout_s``; after that the wait lasts as long
    as the job, and ends the moment the first host's store goes away (its launcher died).
    """
    addr, port, host = plan.wait_addr, plan.wait_port, info.current_host
    try:
        store = _status_store(addr, port, is_master=False, timeout_s=timeout_s)
    except (RuntimeError, OSError) as err:
        print(f"llm-runtime: host {host} could not reach the first host {addr}:{port} within "
              f"{timeout_s:.0f}s to wait for mpirun: {err}", file=sys.stderr)
        return 1
    ssh = _job_ssh(plan, store, info, timeout_s)
    if ssh is False:
        return 1
    try:
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
    finally:
        if ssh is not None:
            ssh.stop()
