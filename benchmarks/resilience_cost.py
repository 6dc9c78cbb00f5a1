"""Claims: each of the three resilience features (issue 18) costs about nothing, measured alone,
with the other two off: the step rate of `llm-runtime train` with the feature on over the same
job with it off, the mean of pairs in ABBA order with its 95% interval (target >= 0.98 each).

- straggler detection: watchdog.stragglers=warn judging a window every 10 steps, against
  watchdog.stragglers=off (one node, 2 workers, no checkpoints, no spike judging);
- the bad-batch guard's spike judging: train.spike_sigma=6 against 0 (one node, 2 workers, no
  checkpoints, no straggler detection). The non-finite check has no switch: it reads the global
  losses the logged loss's all-reduce brings anyway, in both runs;
- peer replicas: checkpoint.replicate=true against false, on 2 simulated SageMaker hosts
  (tests/hosts.py: own hostname, /opt/ml, loopback address and disk; 1 worker each), saving every
  10 steps to a moto S3 server, with straggler detection and spike judging off. The step rate
  counts every step, the saves' too; the push's own time and size come from the hosts' logs.

Needs root and util-linux (unshare) for the hosts; without them that row is skipped, and says so.

usage: python benchmarks/resilience_cost.py [--repeats N] [--steps N] [--no-replicas] [--no-record]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import mean_ci95, record, result_line, start_moto  # noqa: E402
from benchmarks.step_overhead import pairs, steady_rate  # noqa: E402

MODEL = {"model.dim": 256, "model.layers": 4, "model.heads": 8, "train.seq_len": 128, "train.batch_size": 8,
         "train.lr": 1e-3, "train.lr_schedule": "constant", "train.warmup_steps": 0}
ALL_OFF = {"watchdog.stragglers": "off", "train.spike_sigma": 0, "checkpoint.replicate": "false"}


def one_node(args, features: dict) -> float:
    """Steps/s (after the warm-up) of a 2-worker job on this host without checkpoints."""
    settings = {**MODEL, **ALL_OFF, "train.steps": args.steps, "train.log_every": args.warmup, **features}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.jsonl"
        cmd = [sys.executable, "-m", "llm_runtime", "train", "--nproc-per-node", "2", f"--metrics.jsonl={path}",
               *(f"--{key}={value}" for key, value in settings.items())]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_RUNTIME_")}
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900, env={**env, "GLOO_SOCKET_IFNAME": "lo"})
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    return steady_rate(rows, args.warmup, MODEL["train.batch_size"] * MODEL["train.seq_len"])


class TwoHosts:
    """Jobs on algo-1 and algo-2, each with a disk of its own, checkpointing to one moto bucket."""

    def __init__(self, root: Path, endpoint: str):
        self.root, self.endpoint, self.runs = root, endpoint, 0

    def run(self, args, replicate: bool) -> tuple[float, list[tuple[float, float]]]:
        """(steps/s after the warm-up, [(MB, seconds) of each replica push])."""
        from tests.hosts import HOSTS, Cluster

        self.runs += 1
        root = self.root / f"run-{self.runs}"
        root.mkdir()
        cluster = Cluster(root, {**MODEL, **ALL_OFF, "train.steps": args.steps, "train.log_every": args.every,
                                 "checkpoint.uri": f"s3://bench/run-{self.runs}", "checkpoint.every_steps": args.every,
                                 "checkpoint.keep": 2, "checkpoint.replicate": str(replicate).lower(),
                                 "metrics.jsonl": "/opt/ml/output/metrics.jsonl"})
        try:
            for host in HOSTS:
                cluster.start(host, sys.executable, "-m", "llm_runtime", "launch", "--nproc-per-node", "1", "train",
                              AWS_ENDPOINT_URL_S3=self.endpoint, LLM_RUNTIME_CHECKPOINT_LOCAL_DIR=str(root / f"disk-{host}"))
            codes = cluster.wait_all(timeout=900)
            if codes != {host: 0 for host in HOSTS}:
                raise RuntimeError(f"the two-host job failed {codes}:\n{cluster.logs()[-4000:]}")
            rows = [json.loads(line) for line in (root / "algo-1" / "output" / "metrics.jsonl").read_text().splitlines()]
            pushes = [(float(mb), float(s)) for mb, s in re.findall(r"replica of node \d+ on node \d+: ([\d.]+) MB in "
                                                                     r"([\d.]+)s", cluster.logs())]
        finally:
            cluster.stop()
            shutil.rmtree(root, ignore_errors=True)
        if replicate and not pushes:
            raise RuntimeError("checkpoint.replicate=true pushed no replica (no 'replica of node' line in the logs)")
        return steady_rate(rows, args.every, MODEL["train.batch_size"] * MODEL["train.seq_len"]), pushes


def compare(claim: str, what: str, repeats: int, on, off) -> tuple[str, list[str]]:
    with_it, without = pairs(repeats, on, off)
    ratio, half = mean_ci95([a / b for a, b in zip(with_it, without)])
    line = result_line(claim, statistics.mean(with_it), statistics.mean(without), ">=0.98")
    return line, [f"{what}: on {', '.join(f'{v:.3f}' for v in with_it)} steps/s; off "
                  f"{', '.join(f'{v:.3f}' for v in without)} steps/s; pairwise ratio mean {ratio:.4f}, "
                  f"95% interval {ratio - half:.4f}..{ratio + half:.4f}"]


def replicas(args) -> tuple[list[str], list[str]]:
    from tests.hosts import namespaces_work

    reason = namespaces_work()
    if reason:
        return [], [f"peer replicas: not measured ({reason})"]
    import boto3

    proc, endpoint = start_moto()
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            hosts = TwoHosts(Path(tmp), endpoint)
            pushed: list[tuple[float, float]] = []

            def on() -> float:
                rate, pushes = hosts.run(args, replicate=True)
                pushed.extend(pushes)
                return rate

            line, details = compare("replicas_train_steps_per_s_vs_replicas_off",
                                    f"peer replicas (2 hosts x 1 worker, a save every {args.every} steps)",
                                    args.repeats, on, lambda: hosts.run(args, replicate=False)[0])
    finally:
        proc.kill()
    megabytes = statistics.mean(mb for mb, _ in pushed)
    seconds = statistics.mean(s for _, s in pushed)
    details.append(f"replica pushes: {len(pushed)}, {megabytes:.1f} MB each, {seconds:.2f} s each on average "
                   f"({megabytes / seconds:.0f} MB/s over loopback HTTP), in the launcher's background thread")
    return [line], details


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, default in (("repeats", 6), ("steps", 60), ("warmup", 10), ("every", 10)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--no-replicas", action="store_true", help="skip the two-host row")
    parser.add_argument("--no-record", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()
    lines, details = [], [f"Llama dim={MODEL['model.dim']} layers={MODEL['model.layers']} seq "
                          f"{MODEL['train.seq_len']} global batch {MODEL['train.batch_size']}, {args.steps} steps, "
                          f"steps {args.warmup + 1}-{args.steps} timed, {args.repeats} pairs in ABBA order; each "
                          "feature alone, the other two off"]
    for claim, what, features in (
            ("stragglers_train_steps_per_s_vs_detection_off", "straggler detection (a window every 10 steps)",
             {"watchdog.stragglers": "warn", "watchdog.straggler_every": 10}),
            ("spike_guard_train_steps_per_s_vs_guard_off", "the bad-batch guard's spike judging (sigma 6, window 20: judged from step 21)",
             {"train.spike_sigma": 6, "train.spike_window": 20})):
        line, more = compare(claim, what, args.repeats, lambda f=features: one_node(args, f), lambda: one_node(args, {}))
        lines.append(line)
        details += more
    if not args.no_replicas:
        more_lines, more = replicas(args)
        lines += more_lines
        details += more
    if args.no_record:
        print("\n".join(details + lines))
        return
    record("resilience_cost", lines, details)


if __name__ == "__main__":
    main()
