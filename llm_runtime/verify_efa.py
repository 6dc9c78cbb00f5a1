"""``llm-runtime verify-efa LOGFILE``: which network NCCL chose, read from its NCCL_DEBUG=INFO output.

A job on EFA hosts that silently falls back to TCP sockets trains at a fraction of its speed
with no error at all; this reads the log and says which path NCCL took:

* ``efa+gdrdma``: the OFI plugin (aws-ofi-nccl) with libfabric's efa provider, and inter-node
  channels over GPUDirect RDMA (``via NET/...Libfabric/N/GDRDMA``);
* ``efa``: the same provider, channels staged through host memory (no GDRDMA);
* ``ofi-other``: the OFI plugin with another provider (``tcp``, ``sockets``): a fallback;
* ``socket``: NCCL's internal socket transport (``Using network Socket``): a fallback;
* ``ib``: InfiniBand verbs (not EFA);
* ``unknown``: no NCCL network line in the log (NCCL_DEBUG=INFO not set, or no inter-node comm).

Exit status: 0 for efa / efa+gdrdma, 1 for a fallback or another network, 2 when it cannot tell.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

__all__ = ["EfaReport", "analyse", "debug_file", "exit_code", "startup_action"]

_NETWORK = re.compile(r"NCCL INFO Using network (?P<name>[A-Za-z ]+?)\s*$")
_PROVIDER = re.compile(r"NET/OFI Selected [Pp]rovider is (?P<provider>[\w;-]+)(?:.*?found (?P<nics>\d+) nics)?")
_CHANNEL = re.compile(r"NCCL INFO Channel \S+ : .* via NET/(?P<net>[A-Za-z ]+?)/\d+(?P<gdr>/GDRDMA)?")
_NCCL_VERSION = re.compile(r"NCCL version (?P<version>[\w.+-]+)")
_OFI_VERSION = re.compile(r"NET/OFI Initializing aws-ofi-nccl (?P<version>[\w.+-]+)")
_LIBFABRIC = re.compile(r"NET/OFI Using Libfabric version (?P<version>[\w.]+)")
_HOST = re.compile(r"^(?P<host>[^\s:]+):\d+:\d+ \[\d+\] NCCL ")
_WARN = re.compile(r"NCCL WARN (?P<text>.*)$")

VERDICT_OK = ("efa", "efa+gdrdma")


@dataclass
class EfaReport:
    verdict: str = "unknown"
    network: str = ""
    provider: str = ""
    nics: int = 0
    channels: int = 0
    gdrdma_channels: int = 0
    nccl_version: str = ""
    ofi_nccl_version: str = ""
    libfabric_version: str = ""
    hosts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.verdict == "unknown":
            return ("verify-efa: no NCCL network selection found in the log (run with NCCL_DEBUG=INFO and at "
                    "least one collective across hosts)")
        parts = [f"verify-efa: {self.verdict}: NCCL used network {self.network or '?'}"]
        if self.provider:
            parts.append(f"provider {self.provider}" + (f" ({self.nics} NICs)" if self.nics else ""))
        if self.channels:
            parts.append(f"{self.gdrdma_channels}/{self.channels} inter-node channels over GPUDirect RDMA")
        versions = ", ".join(f"{k} {v}" for k, v in (("NCCL", self.nccl_version),
                                                       ("aws-ofi-nccl", self.ofi_nccl_version),
                                                       ("libfabric", self.libfabric_version)) if v)
        if versions:
            parts.append(versions)
        if self.hosts:
            parts.append(f"hosts {', '.join(self.hosts)}")
        line = "; ".join(parts)
        if self.verdict not in VERDICT_OK:
            line += ("\nverify-efa: FALLBACK: inter-node traffic is not on EFA. Check that the image has "
                     "aws-ofi-nccl and libfabric with the efa provider (fi_info -p efa), FI_PROVIDER=efa, "
                     "and that the security group allows all traffic within itself")
        return line

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def analyse(text: str) -> EfaReport:
    """The network NCCL chose, from its INFO log (several hosts' logs may be concatenated)."""
    report = EfaReport()
    networks, providers, hosts = set(), set(), []
    for line in text.splitlines():
        line = line.rstrip()
        if match := _HOST.match(line):
            if match.group("host") not in hosts:
                hosts.append(match.group("host"))
        if match := _NETWORK.search(line):
            networks.add(match.group("name").strip())
        elif match := _PROVIDER.search(line):
            providers.add(match.group("provider"))
            report.nics = max(report.nics, int(match.group("nics") or 0))
        elif match := _CHANNEL.search(line):
            report.channels += 1
            report.gdrdma_channels += bool(match.group("gdr"))
            networks.add(match.group("net").strip())
        elif match := _NCCL_VERSION.search(line):
            report.nccl_version = report.nccl_version or match.group("version")
        elif match := _OFI_VERSION.search(line):
            report.ofi_nccl_version = report.ofi_nccl_version or match.group("version")
        elif match := _LIBFABRIC.search(line):
            report.libfabric_version = report.libfabric_version or match.group("version")
        if match := _WARN.search(line):
            if len(report.warnings) < 20:
                report.warnings.append(match.group("text").strip())
    report.hosts = hosts
    report.network = ", ".join(sorted(networks))
    report.provider = ", ".join(sorted(providers))
    report.verdict = _verdict(networks, providers, report)
    return report


def _verdict(networks: set[str], providers: set[str], report: EfaReport) -> str:
    if not networks and not providers:
        return "unknown"
    if any(n == "Socket" for n in networks):
        return "socket"  # any host on sockets slows every collective to its pace
    if any(n == "IB" for n in networks):
        return "ib"
    ofi = any("Libfabric" in n for n in networks) or bool(providers)
    if ofi and providers and providers <= {"efa"}:
        all_gdr = report.channels > 0 and report.gdrdma_channels == report.channels
        return "efa+gdrdma" if all_gdr else "efa"
    return "ofi-other" if ofi else "unknown"


def exit_code(report: EfaReport) -> int:
    if report.verdict in VERDICT_OK:
        return 0
    return 2 if report.verdict == "unknown" else 1


def debug_file(template: str, host: str, pid: int) -> str:
    """The file NCCL_DEBUG_FILE names for one process (%h: hostname, %p: pid)."""
    return template.replace("%h", host).replace("%p", str(pid))


def startup_action(mode: str, report: EfaReport) -> tuple[int, int]:
    """(log level, exit code) for the check at start: a fallback is an error with ``require``
    (exitcodes.NETWORK_FALLBACK), a warning with ``auto``; an unreadable log is a warning."""
    import logging

    from .exitcodes import NETWORK_FALLBACK

    if report.verdict in VERDICT_OK:
        return logging.INFO, 0
    if report.verdict != "unknown" and mode == "require":
        return logging.ERROR, NETWORK_FALLBACK
    return logging.WARNING, 0
