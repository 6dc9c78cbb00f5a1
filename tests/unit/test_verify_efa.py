"""verify-efa on NCCL_DEBUG=INFO logs of each kind (written for these tests in NCCL's format;
no EFA hardware exists here)."""
import json
import logging
from pathlib import Path

import pytest

from llm_runtime.cli import main
from llm_runtime import exitcodes
from llm_runtime.verify_efa import analyse, debug_file, exit_code, startup_action

LOGS = Path(__file__).resolve().parents[1] / "data" / "nccl"


@pytest.mark.parametrize("log,verdict,provider,channels,gdr,code", [
    ("efa_gdrdma.log", "efa+gdrdma", "efa", 6, 6, 0),
    ("efa.log", "efa", "efa", 4, 0, 0),
    ("socket_fallback.log", "socket", "", 2, 0, 1),
    ("ofi_tcp_provider.log", "ofi-other", "tcp", 2, 0, 1),
    ("no_nccl.log", "unknown", "", 0, 0, 2),
])
def test_the_log_says_which_network_nccl_chose(log, verdict, provider, channels, gdr, code):
    report = analyse((LOGS / log).read_text())
    assert (report.verdict, report.provider, report.channels, report.gdrdma_channels) == (verdict, provider,
                                                                                           channels, gdr)
    assert exit_code(report) == code


def test_versions_hosts_and_warnings_are_reported():
    report = analyse((LOGS / "efa_gdrdma.log").read_text())
    assert (report.nccl_version, report.ofi_nccl_version, report.libfabric_version) == ("2.21.5+cuda12.4",
                                                                                         "1.11.0-aws", "1.22")
    assert report.hosts == ["algo-1", "algo-2"] and report.nics == 4
    assert analyse((LOGS / "ofi_tcp_provider.log").read_text()).warnings == ["NET/OFI Couldn't find any optimal provider"]


def test_one_host_on_sockets_makes_the_whole_job_a_fallback():
    joined = (LOGS / "efa_gdrdma.log").read_text() + (LOGS / "socket_fallback.log").read_text()
    assert analyse(joined).verdict == "socket"


@pytest.mark.parametrize("log,code,needle", [
    ("efa_gdrdma.log", 0, "efa+gdrdma: NCCL used network Libfabric; provider efa (4 NICs); 6/6 inter-node"),
    ("socket_fallback.log", 1, "FALLBACK: inter-node traffic is not on EFA"),
    ("no_nccl.log", 2, "run with NCCL_DEBUG=INFO"),
])
def test_the_command_prints_the_verdict_and_exits_with_its_code(log, code, needle, capsys):
    assert main(["verify-efa", str(LOGS / log)]) == code
    assert needle in capsys.readouterr().out


def test_json_output_carries_every_field(capsys):
    assert main(["verify-efa", str(LOGS / "efa.log"), "--json"]) == 0
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
    """The captured sample logs stand in for NCCL on EFA hosts, which this machine has not."""
    report = analyse((LOGS / log_name).read_text())
    assert startup_action(mode, report) == (level, code)


def test_nccl_debug_file_names_one_file_per_host_and_process():
    assert debug_file("/tmp/llm-runtime-nccl.%h.%p.log", "algo-2", 4242) == "/tmp/llm-runtime-nccl.algo-2.4242.log"
