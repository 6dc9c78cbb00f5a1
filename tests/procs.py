"""Running real launchers from tests: every process has a timeout and its output is kept."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[1]
BIN = Path(PYTHON).parent


STRAGGLERS = Path(os.environ.get("TMPDIR") or "/tmp") / f"llm-runtime-test-stragglers-{os.getpid()}.jsonl"
"""Every job started with :func:`clean_env` judges stragglers every ``STRAGGLER_EVERY`` steps (with
the default factor and floor) and appends any rank it names here; tests/conftest.py fails a test
whose jobs named one unless it is marked ``stragglers_expected``."""
STRAGGLER_EVERY = 5


def free_port(span: int = 1) -> int:
    """A port P with P .. P+span-1 all free now (a launcher may use MASTER_PORT + 1 too)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + span > 65535:
            continue
        try:
            for offset in range(1, span):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no run of {span} free ports found")


def clean_env(*, loopback: bool = True, **extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables, plus ``extra``.

    ``loopback`` pins gloo and Open MPI to the lo interface, so no test traffic goes to an
    address outside 127.0.0.0/8 whatever this machine's hostname resolves to. Simulated
    SageMaker hosts turn it off: their hostnames resolve to their own 127.0.1.x address.
    """
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RUN_ID", "GROUP_RANK", "SAGEMAKER_BASE_DIR", "SAGEMAKER_PROGRAM")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("OMPI_", "PMI_", "SM_", "LLM_RUNTIME_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env["OMPI_MCA_oob_tcp_if_include"] = "lo"
    env["OMPI_MCA_btl_tcp_if_include"] = "lo"
    if loopback:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    env["LLM_RUNTIME_WATCHDOG_STRAGGLER_EVERY"] = str(STRAGGLER_EVERY)
    env["LLM_RUNTIME_WATCHDOG_STRAGGLER_FILE"] = str(STRAGGLERS)
    env.update(extra)
    return env


def run(argv, *, timeout: float, env=None, cwd=None, check: bool = True) -> subprocess.CompletedProcess:
    """Run to completion; on a timeout the whole process tree is killed (no stray workers
    keep ports for later tests); on a non-zero exit (when ``check``) the message has all output."""
    proc = subprocess.Popen(argv, env=env or clean_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        stdout, stderr = proc.communicate(timeout=30)
        raise AssertionError(f"{argv} did not finish in {timeout}s\nstdout:\n{stdout}\nstderr:\n{stderr}") from None
    result = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}")
    return result


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found through /proc), whatever their session:
    torch.distributed.run starts each worker in a session of its own."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as handle:
                    children = [int(c) for c in handle.read().split()]
            except OSError:
                continue
            found.extend(children)
            queue.extend(children)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a process started with start_new_session=True, its session and every descendant."""
    victims = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def read_rank_reports(out: Path, expected: int) -> list[dict]:
    """Per-rank JSON reports written by tests/workers/report.py, tracebacks surfaced."""
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]
    errors = [r["traceback"] for r in reports if r.get("traceback")]
    assert not errors, "worker tracebacks:\n" + "\n".join(errors)
    assert len(reports) == expected, f"expected {expected} rank reports in {out}, found {len(reports)}"
    return sorted(reports, key=lambda r: r["rank"])


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
