"""Restore and verify of a committed checkpoint, measured after benchmarks/checkpoint.py's save:

* restore MB/s: fetch and verify every member of the node tar to a fresh local disk (what a
  resume does before DCP reads; the DCP load itself is left out) vs ``s5cmd cp`` of the same node
  tar from the same server, in the same run (target >= 0.9);
* verify memory: peak RSS growth of ``llm-runtime checkpoints verify`` over its after-import
  baseline, on the >= 1 GB node tar (target < 100 MB);
* GETs of the restore and PUTs of the save, counted at a proxy on the wire.

Both transfers go through the same counting proxy (tests/s3server.py's FaultProxy, no faults)
in front of moto, so they share its cost.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VERIFY_PROBE = r"""
import resource, sys
from llm_runtime.checkpoint import inspect as ck_inspect  # noqa: E402 - the imports are the baseline
import boto3, botocore, tenacity  # noqa: F401
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = ck_inspect.main(["verify", sys.argv[1]])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"VERIFY_RSS {base} {peak} {code}", flush=True)
"""


def restore_rates(uri: str, endpoint: str, work: Path) -> dict:
    """Our fetch + verify of every member vs s5cmd cp of the node tar (both via ``endpoint``)."""
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    from llm_runtime.checkpoint.commit import store_steps
    from llm_runtime.checkpoint.layout import MANIFEST, Manifest, run_id_for, step_dir
    from llm_runtime.checkpoint.transfer import fetch_members
    from llm_runtime.storage import open_store

    store = open_store(uri).child(run_id_for(uri))
    step = max(s for s, ok in store_steps(store).items() if ok)
    manifest = Manifest.parse(store.read_text(f"{step_dir(step)}/{MANIFEST}"), "manifest")
    names = manifest.member_names()
    total = sum(manifest.member(n)[1].size for n in names)
    started = time.perf_counter()
    fetch_members(manifest, names, work / "ours", store)
    ours_s = time.perf_counter() - started
    (obj,) = manifest.objects
    binary = Path(sys.executable).with_name("s5cmd")
    started = time.perf_counter()
    subprocess.run([str(binary), "--endpoint-url", endpoint, "cp", store.url(obj.key), str(work / "raw.tar")],
                   check=True, capture_output=True, timeout=900)
    raw_s = time.perf_counter() - started
    return {"member_bytes": total, "tar_bytes": obj.size, "ours_s": ours_s, "raw_s": raw_s, "members": len(names)}


def verify_rss(uri: str, endpoint: str) -> tuple[int, int]:
    done = subprocess.run([sys.executable, "-c", VERIFY_PROBE, uri], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "AWS_ENDPOINT_URL_S3": endpoint}, cwd=REPO)
    line = next((l for l in done.stdout.splitlines() if l.startswith("VERIFY_RSS ")), None)
    if line is None or line.split()[3] != "0":
        raise SystemExit(f"checkpoints verify failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    base, peak = (int(v) for v in line.split()[1:3])
    return base * 1024, peak * 1024  # ru_maxrss is in KiB on Linux


def measure(uri: str, proxy) -> dict:
    """Run after the save: the restore rates (GETs counted), then verify's memory."""
    with tempfile.TemporaryDirectory() as work:
        proxy.reset_counts()
        rates = restore_rates(uri, proxy.endpoint, Path(work))
        gets = proxy.methods.get("GET", 0)
        shutil.rmtree(Path(work) / "ours", ignore_errors=True)
    base, peak = verify_rss(uri, proxy.endpoint)
    return {**rates, "restore_gets": gets, "verify_base_rss": base, "verify_peak_rss": peak}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], None)))
