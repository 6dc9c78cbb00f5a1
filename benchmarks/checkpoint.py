"""Checkpoint claims, one run on this machine against a local S3 server (moto on 127.0.0.1):

* training-blocked seconds of the runtime's async hierarchical save vs a synchronous DCP save of
  the same state followed by each rank uploading its own files (target <= 0.1);
* data objects written per checkpoint, one per rank (baseline) vs one per node (target: reduced by
  the ranks per node; each side adds one: DCP's .metadata, the manifest), with the PUT requests
  (multipart parts included) of each;
* upload MB/s vs a raw s5cmd copy of the same bytes (target >= 0.8);
* restore MB/s (fetch + verify, no DCP load) vs ``s5cmd cp`` of the node tar (target >= 0.9) and
  the peak RSS growth of ``checkpoints verify`` on the >= 1 GB node tar (target < 100 MB):
  benchmarks/checkpoint_restore.py.

The save goes through a counting proxy in front of moto (tests/s3server.py's FaultProxy, no
faults): its PUTs are counted there, on the wire, as are the GETs of a second restore.

The state is an FSDP2 Llama of ~100M parameters with its AdamW moments (~1.2 GB), 2 ranks on one
node. moto shares the 2 CPU cores with the ranks, so absolute MB/s are this machine's, not S3's.
usage: python benchmarks/checkpoint.py [--dim 768] [--layers 14]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record, result_line, start_moto  # noqa: E402
from checkpoint_restore import REPO, measure  # noqa: E402

WORKER = str(Path(__file__).with_name("checkpoint_worker.py"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--nproc", type=int, default=2)
    ns = parser.parse_args()
    proc, endpoint = start_moto()
    sys.path.insert(0, str(REPO))
    from tests.s3server import FaultProxy

    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        with FaultProxy(endpoint) as proxy:
            env = {**os.environ, "AWS_ENDPOINT_URL_S3": proxy.endpoint, "GLOO_SOCKET_IFNAME": "lo"}
            with tempfile.TemporaryDirectory() as work:
                done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc-per-node", str(ns.nproc), WORKER, work, str(ns.dim), str(ns.layers)],
                                      env=env, capture_output=True, text=True, timeout=1800)
            if done.returncode:
                raise SystemExit(f"worker failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            save_puts = sum(n for (method, top), n in proxy.by_prefix.items()
                            if method in ("PUT", "POST") and top == "bench/ck")
            restore = measure("s3://bench/ck", proxy, endpoint)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    r = json.loads(next(line.split(" ", 1)[1] for line in done.stdout.splitlines()
                        if line.startswith("CHECKPOINT_RESULT ")))
    mb = r["state_bytes"] / 1e6
    ours_rate, raw_rate = mb / r["upload_s"], r["raw_bytes"] / 1e6 / r["raw_s5cmd_s"]
    lines = [
        result_line("checkpoint_blocked_s_vs_sync_dcp_then_per_rank_upload", r["blocked_s"], r["baseline_blocked_s"],
                    "<=0.1"),
        # Data objects: the per-rank baseline writes one per rank (+ DCP's .metadata), the runtime one per
        # node (+ the manifest); the reduction is the ranks per node.
        result_line("checkpoint_data_objects_per_rank_uploads_vs_per_node", r["baseline_objects"] - 1,
                    r["objects"] - 1, f">={r['ranks']} (ranks per node)"),
        result_line("checkpoint_upload_mb_s_vs_raw_s5cmd", ours_rate, raw_rate, ">=0.8"),
        result_line("checkpoint_restore_mb_s_vs_s5cmd_cp", restore["member_bytes"] / 1e6 / restore["ours_s"],
                    restore["tar_bytes"] / 1e6 / restore["raw_s"], ">=0.9"),
        # Memory: verify's peak RSS growth against the node tar it checks (what a whole-object read holds).
        result_line("checkpoint_verify_peak_rss_growth_mb_vs_node_tar_mb",
                    (restore["verify_peak_rss"] - restore["verify_base_rss"]) / 1e6, restore["tar_bytes"] / 1e6,
                    "value<100"),
    ]
    details = [
        f"{r['params'] / 1e6:.0f}M-parameter Llama (dim {ns.dim}, {ns.layers} layers), FSDP2 over {r['ranks']} ranks "
        f"on one node, AdamW state: {mb:.0f} MB per checkpoint",
        f"sync DCP save + per-rank upload: {r['baseline_blocked_s']:.2f} s blocked, {r['baseline_objects']} objects, "
        f"{r['baseline_puts']} PUT requests (64 MB parts)",
        f"async hierarchical: {r['blocked_s']:.3f} s blocked (max over ranks), upload+commit {r['upload_s']:.2f} s "
        f"in the background, {r['objects']} objects (node tar + manifest), {r['puts']} PUT requests",
        f"raw s5cmd cp of the node's {r['raw_bytes'] / 1e6:.0f} MB: {r['raw_s5cmd_s']:.2f} s",
        f"on the wire (proxy): the save's checkpoint PUT+POST requests {save_puts}; the restore's GETs "
        f"{restore['restore_gets']} for {restore['members']} members",
        f"restore (straight from moto): fetch + verify of {restore['member_bytes'] / 1e6:.0f} MB in "
        f"{restore['ours_s']:.2f} s (4 ranged GETs at a time); s5cmd cp of the {restore['tar_bytes'] / 1e6:.0f} MB "
        f"node tar {restore['raw_s']:.2f} s; through the proxy {restore['proxied_ours_s']:.2f} s vs "
        f"{restore['proxied_raw_s']:.2f} s",
        f"checkpoints verify: RSS {restore['verify_base_rss'] / 1e6:.0f} MB after imports, peak "
        f"{restore['verify_peak_rss'] / 1e6:.0f} MB",
    ]
    record("checkpoint", lines, details)


if __name__ == "__main__":
    main()
