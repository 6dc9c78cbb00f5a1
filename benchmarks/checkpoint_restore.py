"""Restore and verify of a committed checkpoint, measured after benchmarks/checkpoint.py's save:

* restore MB/s: fetch and verify every member of the node tar to a fresh local disk (what a
  resume does before DCP reads; the DCP load itself is left out) vs ``s5cmd cp`` of the same node
  tar from the same server, in the same run (target >= 0.9);
* verify memory: peak RSS growth of ``llm-runtime checkpoints verify`` over its after-import
  baseline, on the >= 1 GB node tar (target < 100 MB);
* GETs of the restore and PUTs of the save, counted at a proxy on the wire.

The rates are measured straight from moto, and again through the counting proxy
(tests/s3server.py's FaultProxy, no faults), where the restore's GETs are counted.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VERIFY_PROBE = r"""
import sys, threading, time
from llm_runtime.checkpoint import inspect as ck_inspect  # noqa: E402 - the imports are the baseline
import boto3, botocore, tenacity  # noqa: F401

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

base, peak, done = rss(), [0], threading.Event()

def sample():  # the resident set now, every 5 ms (ru_maxrss would keep the imports' own peak)
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.005)

threading.Thread(target=sample, daemon=True).start()
code = ck_inspect.main(["verify", sys.argv[1]])
done.set()
print(f"VERIFY_RSS {base} {max(peak[0], rss())} {code}", flush=True)
"""

def restore_rates(uri: str, endpoint: str, work: Path, proxy=None) -> dict:
    """Our fetch + verify of every member vs s5cmd cp of the node tar (both via ``endpoint``);
    with ``proxy`` (that endpoint's), the GETs of our fetch as it counted them."""
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
    if proxy is not None:
        proxy.reset_counts()
    started = time.perf_counter()
    fetch_members(manifest, names, work / "ours", store)
    ours_s = time.perf_counter() - started
    gets = proxy.methods.get("GET", 0) if proxy is not None else None
    (obj,) = manifest.objects
    binary = Path(sys.executable).with_name("s5cmd")
    started = time.perf_counter()
    subprocess.run([str(binary), "--endpoint-url", endpoint, "cp", store.url(obj.key), str(work / "raw.tar")],
                   check=True, capture_output=True, timeout=900)
    raw_s = time.perf_counter() - started
    return {"member_bytes": total, "tar_bytes": obj.size, "ours_s": ours_s, "raw_s": raw_s, "members": len(names),
            "gets": gets}


def verify_rss(uri: str, endpoint: str) -> tuple[int, int]:
    done = subprocess.run([sys.executable, "-c", VERIFY_PROBE, uri], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "AWS_ENDPOINT_URL_S3": endpoint}, cwd=REPO)
    line = next((l for l in done.stdout.splitlines() if l.startswith("VERIFY_RSS ")), None)
    if line is None or line.split()[3] != "0":
        raise SystemExit(f"checkpoints verify failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    base, peak = (int(v) for v in line.split()[1:3])
    return base, peak


def measure(uri: str, proxy, endpoint: str) -> dict:
    """Run after the save: the restore rates straight from moto (``endpoint``), the same through the
    counting proxy (its GETs counted), then verify's memory."""
    with tempfile.TemporaryDirectory() as work:
        for sub in ("direct", "proxied"):
            (Path(work) / sub).mkdir()
        direct = restore_rates(uri, endpoint, Path(work) / "direct")
        proxied = restore_rates(uri, proxy.endpoint, Path(work) / "proxied", proxy)
        gets = proxied["gets"]
    base, peak = verify_rss(uri, endpoint)
    return {**direct, "proxied_ours_s": proxied["ours_s"], "proxied_raw_s": proxied["raw_s"], "restore_gets": gets,
            "verify_base_rss": base, "verify_peak_rss": peak}


