"""verify-efa on NCCL_DEBUG=INFO logs of each kind (written for these tests in NCCL's format;
no EFA hardware exists here)."""
import json
import logging
from pathlib import Path

import pytest

from llm_runtime.cli import main
from llm_runtime import exitcodes
from llm_runtime.verify_efa import analyse, debug_file, exit_code, startup_action

# Not captured from a real job: no EFA hardware exists here, so these logs were written by hand in
# NCCL_DEBUG=INFO's line format (NCCL 2.18-2.21, aws-ofi-nccl 1.7-1.11), one per network outcome.
HAND_WRITTEN_LOGS = Path(__file__).resolve().parents[1] / "data" / "nccl"


@pytest.mark.parametrize("log,verdict,provider,channels,gdr,code", [
    ("efa_gdrdma.log", "efa+gdrdma", "efa", 6, 6, 0),
    ("efa.log", "efa", "efa", 4, 0, 0),
    ("socket_fallback.log", "socket", "", 2, 0, 1),
    ("ofi_tcp_provider.log", "ofi-other", "tcp", 2, 0, 1),
    ("no_nccl.log", "unknown", "", 0, 0, 2),
])
def test_the_log_says_which_network_nccl_chose(log, verdict, provider, channels, gdr, code):
    report = analyse((HAND_WRITTEN_LOGS / log).read_text())
    assert (report.verdict, report.provider, report.channels, report.gdrdma_channels) == (verdict, provider,
                                                                                           channels, gdr)
    assert exit_code(report) == code


def test_versions_hosts_and_warnings_are_reported():
    report = analyse((HAND_WRITTEN_LOGS / "efa_gdrdma.log").read_text())
    assert (report.nccl_version, report.ofi_nccl_version, report.libfabric_version) == ("2.21.5+cuda12.4",
                                                                                         "1.11.0-aws", "1.22")
    assert report.hosts == ["algo-1", "algo-2"] and report.nics == 4
    tcp = analyse((HAND_WRITTEN_LOGS / "ofi_tcp_provider.log").read_text())
    assert tcp.warnings == ["NET/OFI Couldn't find any optimal provider"]


def test_one_host_on_sockets_makes_the_whole_job_a_fallback():
    joined = "".join((HAND_WRITTEN_LOGS / name).read_text() for name in ("efa_gdrdma.log", "socket_fallback.log"))
    assert analyse(joined).verdict == "socket"


@pytest.mark.parametrize("log,code,needle", [
    ("efa_gdrdma.log", 0, "efa+gdrdma: NCCL used network Libfabric; provider efa (4 NICs); 6/6 inter-node"),
    ("socket_fallback.log", 1, "FALLBACK: inter-node traffic is not on EFA"),
    ("no_nccl.log", 2, "run with NCCL_DEBUG=INFO"),
])
def test_the_command_prints_the_verdict_and_exits_with_its_code(log, code, needle, capsys):
    assert main(["verify-efa", str(HAND_WRITTEN_LOGS / log)]) == code
    assert needle in capsys.readouterr().out


def test_json_output_carries_every_field(capsys):
    assert main(["verify-efa", str(HAND_WRITTEN_LOGS / "efa.log"), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["verdict"] == "efa" and body["ofi_nccl_version"] == "1.7.4-aws" and body["channels"] == 4


def test_an_unreadable_log_is_one_line_naming_it(tmp_path, capsys):
    assert main(["verify-efa", str(tmp_path / "missing.log")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.log" in err[0]


@pytest.mark.parametrize("log_name,mode,level,code", [
    ("efa_gdrdma.log", "auto", logging.INFO, 0),
    ("efa.log", "require", logging.INFO, 0),
    ("socket_fallback.log", "auto", logging.WARNING, 0),
    ("socket_fallback.log", "require", logging.ERROR, exitcodes.NETWORK_FALLBACK),
    ("ofi_tcp_provider.log", "require", logging.ERROR, exitcodes.NETWORK_FALLBACK),
    ("no_nccl.log", "require", logging.WARNING, 0),  # cannot tell: say so, do not fail a healthy job
])
def test_the_check_at_start_warns_or_fails_on_a_fallback(log_name, mode, level, code):
    """The hand-written logs stand in for NCCL's output on EFA hosts, which this machine does not have."""
    report = analyse((HAND_WRITTEN_LOGS / log_name).read_text())
    assert startup_action(mode, report) == (level, code)


def test_nccl_debug_file_names_one_file_per_host_and_process():
    assert debug_file("/tmp/llm-runtime-nccl.%h.%p.log", "algo-2", 4242) == "/tmp/llm-runtime-nccl.algo-2.4242.log"
