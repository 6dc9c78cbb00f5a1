"""Claims: `llm-runtime train` runs as many steps/s as a hand-written loop on the same model,
processes and data (target >= 0.98): FSDP2 through rt.parallelize vs a plain FSDP2 loop, and
the DeepSpeed backend (ZeRO-3) vs a plain deepspeed.initialize loop. On a GPU it also reports
MFU (model FLOPs per second / the GPU's peak).

usage: python benchmarks/step_overhead.py [--repeats N] [--nproc N] [--dim D] [--layers L] ...
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record, result_line  # noqa: E402

BIN = Path(sys.executable).parent
BASELINE = str(Path(__file__).with_name("fsdp2_baseline_worker.py"))
DS_BASELINE = str(Path(__file__).with_name("deepspeed_baseline_worker.py"))


def ours(args, log_every: int, extra: tuple[str, ...] = ()) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.jsonl"
        cmd = [str(BIN / "llm-runtime"), "train", "--nproc-per-node", str(args.nproc), f"--model.dim={args.dim}",
               f"--model.layers={args.layers}", f"--model.heads={args.heads}", f"--train.seq_len={args.seq}",
               f"--train.batch_size={args.batch}", f"--train.steps={args.steps}", f"--train.log_every={log_every}",
               "--train.lr_schedule=constant", "--train.warmup_steps=0", f"--metrics.jsonl={path}", *extra]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    steady = [r for r in rows if r["step"] > args.warmup]  # windows after the warm-up steps
    tokens_per_step = args.batch * args.seq
    return statistics.mean(r["tokens_per_s"] for r in steady) / tokens_per_step


def baseline(args, worker: str = BASELINE, extra: tuple[str, ...] = ()) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           worker, *map(str, (args.dim, args.layers, args.heads, args.seq, args.batch, args.steps, args.warmup)),
           *extra]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    return float(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("STEPS_PER_S")))


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, default in (("repeats", 3), ("nproc", 2), ("dim", 256), ("layers", 4), ("heads", 8), ("seq", 128),
                          ("batch", 8), ("steps", 40), ("warmup", 10)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed row")
    args = parser.parse_args()
    mine, base = [], []
    for _ in range(args.repeats):  # alternate, so both see the same machine noise
        base.append(baseline(args))
        mine.append(ours(args, log_every=args.warmup))
    value, reference = statistics.median(mine), statistics.median(base)
    lines = [result_line("train_steps_per_s_vs_plain_fsdp2", value, reference, ">=0.98")]
    details = [f"{args.nproc} workers, Llama dim={args.dim} layers={args.layers} heads={args.heads}, "
               f"seq {args.seq}, global batch {args.batch}, steps {args.warmup + 1}-{args.steps} timed, "
               f"median of {args.repeats} alternating runs",
               f"llm-runtime train: {', '.join(f'{v:.3f}' for v in mine)} steps/s",
               f"plain FSDP2 loop: {', '.join(f'{v:.3f}' for v in base)} steps/s"]
    import importlib.util

    if not args.no_deepspeed and importlib.util.find_spec("deepspeed") is not None:
        ds_mine, ds_base = [], []
        for _ in range(args.repeats):
            ds_base.append(baseline(args, DS_BASELINE, ("3",)))
            ds_mine.append(ours(args, log_every=args.warmup,
                                extra=("--parallel.backend=deepspeed", "--parallel.zero_stage=3")))
        lines.append(result_line("deepspeed_train_steps_per_s_vs_plain_deepspeed", statistics.median(ds_mine),
                                 statistics.median(ds_base), ">=0.98"))
        details += [f"llm-runtime train --parallel.backend=deepspeed (ZeRO-3): "
                    f"{', '.join(f'{v:.3f}' for v in ds_mine)} steps/s",
                    f"plain deepspeed.initialize loop (ZeRO-3): {', '.join(f'{v:.3f}' for v in ds_base)} steps/s"]
    import torch

    if torch.cuda.is_available():
        from llm_runtime.models import LlamaConfig

        name = torch.cuda.get_device_name()
        from llm_runtime.metrics import peak_tflops

        peak = peak_tflops(name) * 1e12  # the runtime's own table of dense bf16 peaks
        flops = LlamaConfig(dim=args.dim, layers=args.layers, heads=args.heads,
                            max_seq_len=args.seq).flops_per_token(args.seq)
        achieved = value * args.batch * args.seq * flops / args.nproc
        details.append(f"device: {name}; model FLOPs/token {flops:.3g}; per GPU {achieved / 1e12:.2f} TFLOP/s")
        if peak:
            lines.append(f"RESULT mfu value={achieved / peak:.4g} baseline=1 ratio={achieved / peak:.4g} target=report")
    record("step_overhead", lines, details)


if __name__ == "__main__":
    main()
