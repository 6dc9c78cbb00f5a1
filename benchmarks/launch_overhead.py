"""Claim: `llm-runtime launch` costs little over plain torchrun from command start to the first
completed training step (same worker, same machine, same run, alternating to share noise).

usage: python benchmarks/launch_overhead.py [--repeats N] [--nproc N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record, result_line  # noqa: E402

WORKER = str(Path(__file__).with_name("first_step_worker.py"))
BIN = Path(sys.executable).parent


def time_to_first_step(argv: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))}
    start = time.time()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    done = [float(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("FIRST_STEP_DONE")]
    if not done:
        raise SystemExit(f"{argv} printed no FIRST_STEP_DONE:\n{proc.stdout}\n{proc.stderr}")
    return done[0] - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    nproc = str(args.nproc)
    ours_argv = [str(BIN / "llm-runtime"), "launch", "--nproc-per-node", nproc, WORKER]
    base_argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", nproc, WORKER]
    ours, base = [], []
    time_to_first_step(base_argv)  # warm the page cache for both
    for _ in range(args.repeats):
        base.append(time_to_first_step(base_argv))
        ours.append(time_to_first_step(ours_argv))
    value, baseline = statistics.median(ours), statistics.median(base)
    record("launch_overhead", [result_line("launch_time_to_first_step_s", value, baseline, "<=1.15")], [
        f"{args.nproc} CPU workers (gloo), tiny model, median of {args.repeats} alternating runs",
        f"llm-runtime launch: {', '.join(f'{t:.2f}' for t in ours)} s",
        f"torchrun --standalone: {', '.join(f'{t:.2f}' for t in base)} s",
    ])


if __name__ == "__main__":
    main()
