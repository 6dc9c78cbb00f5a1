"""Claim: setting a model up costs each rank about its own shard, not the whole model.

A >= 1 GB (fp32) bundled Llama, FSDP2 over 4 CPU ranks. Per rank: the peak RSS during setup over
its RSS after imports, against the fp32 bytes of the parameters it holds. Target: at most
1.25 x the shard + 0.3 GB. The baseline, measured in the same run, is the eager setup every rank
did before issue 15 (whole model built and initialised, broadcast from rank 0, then sharded);
it is still what rt.parallelize does with a model that is not on the meta device.

usage: python benchmarks/model_memory.py [--nproc 4] [--dim 1024] [--layers 22] [--heads 16]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record, result_line  # noqa: E402

BIN = Path(sys.executable).parent
WORKER = str(Path(__file__).with_name("model_memory_worker.py"))


def setup_memory(args, mode: str) -> list[dict]:
    cmd = [str(BIN / "llm-runtime"), "launch", "--nproc-per-node", str(args.nproc), WORKER, mode,
           str(args.dim), str(args.layers), str(args.heads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{mode} setup failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("MEMORY ")]
    assert len(rows) == args.nproc, proc.stdout
    return sorted(rows, key=lambda row: row["rank"])


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, default in (("nproc", 4), ("dim", 1024), ("layers", 22), ("heads", 16)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    from llm_runtime.models import LlamaConfig

    config = LlamaConfig(dim=args.dim, layers=args.layers, heads=args.heads)
    model_gb = config.num_parameters() * 4 / (1 << 30)
    eager = setup_memory(args, "eager")
    meta = setup_memory(args, "meta")
    worst = max(meta, key=lambda row: row["peak_over_gb"] - 1.25 * row["shard_gb"])
    worst_eager = max(eager, key=lambda row: row["peak_over_gb"])
    lines = [
        result_line("setup_peak_rss_gb_vs_own_shard_gb", worst["peak_over_gb"], worst["shard_gb"],
                    "value<=1.25*baseline+0.3"),
        result_line("eager_setup_peak_rss_gb_vs_own_shard_gb", worst_eager["peak_over_gb"], worst_eager["shard_gb"],
                    "none (the baseline: the setup before meta-device materialisation)"),
        result_line("setup_peak_rss_gb_meta_vs_eager", worst["peak_over_gb"], worst_eager["peak_over_gb"], "<1"),
    ]
    details = [f"bundled Llama dim={args.dim} layers={args.layers} heads={args.heads}: "
               f"{config.num_parameters() / 1e6:.0f}M parameters, {model_gb:.2f} GB fp32; FSDP2 over "
               f"{args.nproc} CPU ranks (gloo), setup = build + rt.parallelize",
               "meta (llm-runtime train's way): peak over baseline per rank "
               + ", ".join(f"{row['peak_over_gb']:.3f}" for row in meta) + " GB; shard "
               + ", ".join(f"{row['shard_gb']:.3f}" for row in meta) + " GB",
               "eager (a model built whole on every rank): peak over baseline per rank "
               + ", ".join(f"{row['peak_over_gb']:.3f}" for row in eager) + " GB",
               f"RSS after imports and init: {meta[0]['baseline_gb']:.2f} GB per rank"]
    record("model_memory", lines, details)


if __name__ == "__main__":
    main()
