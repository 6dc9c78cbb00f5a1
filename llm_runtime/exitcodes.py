"""The runtime's documented exit codes (README "Exit codes"), for workers and the launcher.

A worker that ends with one of ``DOCUMENTED`` makes the launcher exit with the same code, so a
platform (or a retry script) can tell a stalled job, a bad node and a network fallback apart
from an ordinary error.
"""
from __future__ import annotations

from collections.abc import Iterable

__all__ = ["BAD_NODE", "DOCUMENTED", "FAILED", "NETWORK_FALLBACK", "OK", "STALLED", "STOPPED", "USAGE",
           "launcher_exit"]

OK = 0
FAILED = 1
"""Any other error (a traceback and a failure record say which)."""
USAGE = 2
"""Bad input (config, cluster files, options), found before any worker started."""
STALLED = 86
"""The watchdog saw no progress within a phase's timeout, a collective timed out, or a checkpoint
upload passed its deadline. The failure record names the rank, phase and step."""
BAD_NODE = 87
"""The health check found a node that computes wrong results or cannot allocate memory, or (with
``watchdog.stragglers=fail``) a rank was named a straggler during training; the record names the host."""
NETWORK_FALLBACK = 88
"""``netenv.verify_efa=require``: EFA devices are present, but NCCL did not use them."""
STOPPED = 143
"""Stopped by SIGTERM (the platform's stop or a spot interruption), after saving if it could."""

DOCUMENTED = {
    STALLED: "stalled: no progress within the watchdog timeout, or a collective/upload deadline passed",
    BAD_NODE: "bad node: the health check failed on this node, or a straggler was named (watchdog.stragglers=fail)",
    NETWORK_FALLBACK: "network fallback: EFA present but NCCL chose another transport",
}


def launcher_exit(failures: Iterable[tuple[float, int]]) -> int:
    """The launcher's exit code from its failed workers' (timestamp, exit code): the first documented
    code, in time order, else FAILED. Workers killed by the teardown that followed exit with other
    codes, so the earliest documented one is the cause."""
    ordered = sorted(failures)
    for _, code in ordered:
        if code in DOCUMENTED:
            return code
    return FAILED if ordered else OK
