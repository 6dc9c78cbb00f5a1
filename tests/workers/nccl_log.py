"""A worker for the NCCL-log tests: plays NCCL's part (writes its log), then runs the runtime's code.

usage: nccl_log.py verify LOG MODE HOST RANK OUT_DIR
       nccl_log.py error LOG HOST RANK OUT_DIR

First LOG (hand-written in NCCL's format: no EFA hardware or GPU exists here) is copied where NCCL
would write it for this process: NCCL_DEBUG_FILE with %h and %p expanded for this host and pid
(expanded here on purpose, not through llm_runtime, as NCCL itself does it).

verify: the start-up network check, ``runtime.verify_network(MODE, watchdog, HOST)``; it may
        ``os._exit(88)``. When it returns, prints "verify_network returned" and exits 0.
error:  the training thread dies of ``RuntimeError("boom")``: ``Watchdog.on_error``; exits 3.

Logging is set up as in a worker (``setup_logging(RANK)``: rank 0 on stdout, others on stderr).
"""
import os
import shutil
import socket
import sys


def nccl_writes(log: str) -> str:
    path = os.environ["NCCL_DEBUG_FILE"].replace("%h", socket.gethostname()).replace("%p", str(os.getpid()))
    shutil.copyfile(log, path)
    return path


def main() -> int:
    command, log, *rest = sys.argv[1:]
    nccl_writes(log)

    from llm_runtime.config import WatchdogConfig
    from llm_runtime.runtime import setup_logging, verify_network
    from llm_runtime.watchdog import Watchdog

    if command == "verify":
        mode, host, rank, out = rest
    else:
        host, rank, out = rest
    setup_logging(int(rank))
    watchdog = Watchdog(WatchdogConfig(enabled=False), rank=int(rank), world_size=16, host=host, output_dir=out)
    if command == "verify":
        verify_network(mode, watchdog, host)
        print("verify_network returned", flush=True)
        return 0
    watchdog.on_error(RuntimeError("boom"))
    return 3


if __name__ == "__main__":
    sys.exit(main())
