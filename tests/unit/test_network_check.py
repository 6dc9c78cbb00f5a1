"""The start-up EFA check (exit 88 on a fallback) and NCCL's WARN lines in the job log.

No EFA hardware or GPU exists here, so NCCL never runs: its NCCL_DEBUG=INFO log is hand-written in
NCCL's line format (tests/data/nccl/*.log and the WARN lines below, NCCL 2.18-2.21) and put where
NCCL would write it (NCCL_DEBUG_FILE, %h and %p expanded for the reading process). The check itself
ends the process with ``os._exit``, so it runs in a real subprocess (tests/workers/nccl_log.py).
"""
import json
import logging
import os
import socket

import pytest

from llm_runtime import exitcodes
from llm_runtime.cluster import ClusterInfo
from llm_runtime.config import Config, NetenvConfig, WatchdogConfig
from llm_runtime.failures import log_nccl_warnings
from llm_runtime.netenv import Fabric
from llm_runtime.runtime import World, check_network
from llm_runtime.watchdog import Watchdog
from tests.procs import PYTHON, REPO, clean_env, run

HAND_WRITTEN_LOGS = REPO / "tests" / "data" / "nccl"
WORKER = REPO / "tests" / "workers" / "nccl_log.py"
TEMPLATE = "nccl.%h.%p.log"


def worker(tmp_path, *args, nccl_debug="INFO"):
    out = tmp_path / "output"
    out.mkdir(exist_ok=True)
    env = clean_env(NCCL_DEBUG=nccl_debug, NCCL_DEBUG_FILE=str(tmp_path / TEMPLATE))
    proc = run([PYTHON, str(WORKER), *args, str(out)], timeout=120, env=env, cwd=str(tmp_path), check=False)
    return proc, out


# ---- exit 88 from the start-up check ---------------------------------------------------------------

def test_a_socket_fallback_with_require_exits_88_and_leaves_a_failure_record_naming_the_host(tmp_path):
    proc, out = worker(tmp_path, "verify", str(HAND_WRITTEN_LOGS / "socket_fallback.log"), "require", "algo-2", "8")
    assert proc.returncode == 88 == exitcodes.NETWORK_FALLBACK, proc.stdout + proc.stderr
    assert "verify_network returned" not in proc.stdout
    failure = (out / "failure").read_text()
    assert failure.startswith("llm-runtime network: host=algo-2 rank=8 "), failure
    assert "phase=start" in failure and "socket: NCCL used network Socket" in failure
    record = json.loads((out / "failures" / "rank-00008.json").read_text())
    assert (record["kind"], record["host"], record["rank"]) == ("network", "algo-2", 8)
    logged = proc.stdout + proc.stderr
    assert "FALLBACK: inter-node traffic is not on EFA" in logged  # what to check is in the job log
    assert "llm-runtime network: host=algo-2" in logged            # and so is the record's line


@pytest.mark.parametrize("log,mode", [
    ("efa.log", "require"),
    ("efa_gdrdma.log", "require"),
    ("efa_gdrdma.log", "auto"),
])
def test_a_job_on_efa_passes_the_check_and_writes_no_failure(tmp_path, log, mode):
    proc, out = worker(tmp_path, "verify", str(HAND_WRITTEN_LOGS / log), mode, "algo-1", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verify_network returned" in proc.stdout
    assert "network check: verify-efa: efa" in proc.stdout
    assert not (out / "failure").exists() and not (out / "failures").exists()


def test_a_socket_fallback_with_auto_is_a_warning_and_the_job_goes_on(tmp_path):
    proc, out = worker(tmp_path, "verify", str(HAND_WRITTEN_LOGS / "socket_fallback.log"), "auto", "algo-1", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verify_network returned" in proc.stdout
    assert "WARNING llm_runtime.runtime: network check: verify-efa: socket" in proc.stdout
    assert "FALLBACK" in proc.stdout
    assert not (out / "failure").exists()


def test_require_does_not_fail_a_job_whose_nccl_log_was_not_at_info_level(tmp_path):
    # NCCL_DEBUG=WARN: NCCL writes no network lines, so the check cannot tell; it must not read a
    # stale file as if it were this run's, nor fail a job it knows nothing about.
    proc, out = worker(tmp_path, "verify", str(HAND_WRITTEN_LOGS / "socket_fallback.log"), "require", "algo-1",
                       "0", nccl_debug="WARN")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no NCCL network selection found" in proc.stdout
    assert not (out / "failure").exists()


# ---- when the check runs ---------------------------------------------------------------------------

def _info(num_nodes: int, host: str = "algo-1") -> ClusterInfo:
    hosts = tuple(f"algo-{i + 1}" for i in range(num_nodes))
    return ClusterInfo(kind="sagemaker", hosts=hosts, current_host=host, node_rank=0, num_nodes=num_nodes,
                       nproc_per_node=8, master_addr="algo-1", master_port=7777, rank=0, local_rank=0,
                       world_size=8 * num_nodes)


EFA = Fabric(efa_devices=4, efa_provider=True, gpus=8)
NO_EFA = Fabric(gpus=8)


@pytest.mark.parametrize("fabric,mode,local_rank,nodes,expected", [
    (EFA, "auto", 0, 2, ["auto"]),        # local rank 0 of a multi-node job on EFA hosts
    (EFA, "require", 0, 4, ["require"]),
    (EFA, "off", 0, 2, []),               # switched off
    (EFA, "auto", 3, 2, []),              # one reader per host
    (EFA, "require", 0, 1, []),           # one node: NCCL uses NVLink / shared memory, no EFA traffic to see
    (NO_EFA, "require", 0, 2, []),        # no EFA devices: nothing to fall back from
    (None, "require", 0, 2, []),          # gloo: NCCL never ran
])
def test_the_network_check_runs_on_one_rank_per_host_of_multi_node_efa_jobs(monkeypatch, fabric, mode, local_rank,
                                                                              nodes, expected):
    calls = []
    monkeypatch.setattr("llm_runtime.runtime.verify_network", lambda m, wd, host: calls.append((m, wd, host)))
    watchdog = Watchdog(WatchdogConfig(enabled=False), rank=local_rank, world_size=8 * nodes, host="algo-1")
    config = Config(netenv=NetenvConfig(verify_efa=mode))
    check_network(config, fabric, watchdog, _info(nodes), World(rank=local_rank, local_rank=local_rank, size=8 * nodes))
    assert [m for m, _, _ in calls] == expected
    assert all(wd is watchdog and host == "algo-1" for _, wd, host in calls)


# ---- NCCL's WARN lines in the job log --------------------------------------------------------------

def _nccl_line(n: int, level: str, text: str, host: str = "algo-1") -> str:
    return f"{host}:204:260 [{n % 8}] NCCL {level} {text}\n"


@pytest.fixture
def captured():
    """Records of the llm_runtime.failures logger, whatever earlier tests did to the llm_runtime logger
    (setup_logging turns its propagation off)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("llm_runtime.failures")
    handler = Keep(level=logging.DEBUG)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_nccl_warn_lines_reach_the_job_log_as_errors_with_secrets_redacted(tmp_path, monkeypatch, captured):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]  # the fake one conftest sets
    lines = [_nccl_line(0, "INFO", "Bootstrap : Using eth0:10.0.5.9<0>")]
    for i in range(25):
        lines.append(_nccl_line(i, "WARN", f"NET/OFI Request {i} completed with error. RC: 21. Error: unknown"))
        lines.append(_nccl_line(i, "INFO", f"Channel {i:02d}/0 : 0[0] -> 8[0] [send] via NET/Socket/0"))
    lines.append(_nccl_line(7, "WARN", f"Could not connect: aws_secret_access_key={secret} was refused"))
    template = tmp_path / TEMPLATE
    (tmp_path / f"nccl.{socket.gethostname()}.{os.getpid()}.log").write_text("".join(lines))
    (tmp_path / f"nccl.{socket.gethostname()}.1.log").write_text(_nccl_line(0, "WARN", "another process's line"))
    monkeypatch.setenv("NCCL_DEBUG_FILE", str(template))

    log_nccl_warnings()

    messages = [r.getMessage() for r in captured]
    assert all(r.levelno == logging.ERROR for r in captured)
    assert all(m.startswith("nccl: ") and "NCCL WARN" in m for m in messages), messages
    assert len(messages) == 20  # the last 20: the newest errors, not the whole log
    assert "Request 5 completed" not in "".join(messages) and "Request 6 completed" in messages[0]
    assert "Could not connect" in messages[-1]
    assert secret not in "".join(messages) and "<redacted>" in messages[-1]
    assert "another process's line" not in "".join(messages)


def test_no_nccl_log_adds_nothing_to_the_job_log(tmp_path, monkeypatch, captured):
    monkeypatch.setenv("NCCL_DEBUG_FILE", str(tmp_path / TEMPLATE))  # NCCL never wrote it
    log_nccl_warnings()
    monkeypatch.delenv("NCCL_DEBUG_FILE")
    log_nccl_warnings()
    assert captured == []


def test_a_worker_dying_of_an_error_prints_nccls_warnings_to_its_log(tmp_path):
    log = tmp_path / "written-by-nccl.log"
    log.write_text(_nccl_line(0, "INFO", "Using network AWS Libfabric")
                   + _nccl_line(0, "WARN", "NET/OFI Request completed with error. RC: 21. Error: 113 (No route "
                                           "to host)")
                   + _nccl_line(0, "INFO", "comm 0x5630 rank 1 nranks 16 - Abort COMPLETE"))
    proc, out = worker(tmp_path, "error", str(log), "algo-2", "1")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "nccl: " in line]
    assert warned == ["[rank 1] ERROR llm_runtime.failures: nccl: algo-1:204:260 [0] NCCL WARN NET/OFI Request "
                      "completed with error. RC: 21. Error: 113 (No route to host)"], proc.stderr
    assert "reason=RuntimeError: boom" in (out / "failure").read_text()
