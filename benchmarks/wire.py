"""A request-counting proxy in a process of its own, for the benchmarks: requests are counted on the
wire, and the proxy's threads do not compete with the reader being measured for its GIL.

usage (by the benchmarks): python benchmarks/wire.py UPSTREAM COUNTS.json
Prints ``ENDPOINT http://127.0.0.1:PORT`` once listening; on SIGTERM writes the counts
({"requests", "methods", "gets_by_suffix", "bytes_out"}) to COUNTS.json and exits.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Wire:
    """The parent's handle: ``with Wire(upstream) as wire: ... wire.endpoint``; ``wire.counts`` after."""

    def __init__(self, upstream: str, counts: Path):
        self.upstream, self.path, self.counts = upstream, counts, {}

    def __enter__(self) -> "Wire":
        self.proc = subprocess.Popen([sys.executable, __file__, self.upstream, str(self.path)], stdout=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("ENDPOINT "):
            self.proc.kill()
            raise SystemExit(f"the counting proxy did not start: {line!r}")
        self.endpoint = line.split()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.counts = json.loads(self.path.read_text())


def _serve(upstream: str, out: str) -> None:
    from tests.s3server import FaultProxy

    proxy = FaultProxy(upstream).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print(f"ENDPOINT {proxy.endpoint}", flush=True)
    while not done.wait(0.2):
        pass
    time.sleep(0.1)
    gets: dict[str, int] = {}
    for method, path in proxy.paths:
        if method == "GET":
            key = path.split("?")[0]
            suffix = "list" if "list-type" in path else (key.rsplit(".", 1)[-1] if "." in key.rsplit("/", 1)[-1] else "other")
            gets[suffix] = gets.get(suffix, 0) + 1
    Path(out).write_text(json.dumps({"requests": proxy.requests, "methods": proxy.methods, "gets_by_suffix": gets,
                                     "bytes_out": proxy.bytes_out}))
    proxy.stop()


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
