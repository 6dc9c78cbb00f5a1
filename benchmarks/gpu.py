"""The GPU run (benchmarks/gpu.sh): what a GPU machine can tell us that 2 CPU cores cannot, quickly.

On one GPU, with nothing installed (PYTHONPATH=., torch, transformers; no boto3, no DeepSpeed):
1. ``llm-runtime healthcheck`` on the device;
2. the NCCL path: ``llm-runtime launch`` with NCCL_DEBUG=INFO on 1 GPU, then ``verify-efa`` on
   its log, which must report a socket fallback or nothing (never EFA: the machine has none);
3. MFU of the bundled Llama at about 1B parameters in bf16, and of a Hugging Face Llama config of
   the same size (random weights, config.json only), both with a checkpoint saved to local disk
   after the timed windows, whose blocked time is the checkpoint claim;
4. step overhead: `llm-runtime train` against a plain FSDP2 loop with the same precision.

``--dry-run`` runs the same steps on CPU with a tiny model (the suite does, so the script works
the day a GPU is lent). Each step has its own time limit; one failing step is recorded and the
rest still run. The section goes to RESULTS.md (``--results`` elsewhere; the dry run writes
nowhere unless told).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, mean_ci95, result_line, section  # noqa: E402

PY = [sys.executable, "-m", "llm_runtime"]
SIZES = {  # the timed model: ~1B parameters on a GPU, tiny for the dry run
    "gpu": dict(dim=2048, layers=20, heads=16, seq=2048, batch=16, steps=30, log_every=5, save_at=25,
                hf=dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=18, num_attention_heads=16,
                        num_key_value_heads=16, vocab_size=32000),
                overhead=dict(dim=1024, layers=8, heads=16, seq=1024, batch=8, steps=40, warmup=10, repeats=3)),
    "dry": dict(dim=64, layers=2, heads=4, seq=64, batch=4, steps=12, log_every=2, save_at=10,
                hf=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=300),
                overhead=dict(dim=64, layers=2, heads=4, seq=64, batch=4, steps=12, warmup=4, repeats=1)),
}


def run(cmd: list[str], limit_s: float, log: Path, **env: str) -> tuple[int, str]:
    """(exit code, output); 124 past ``limit_s``. The output is also kept in ``log``."""
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s, env={**os.environ, **env})
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, out = 124, f"{err.stdout or ''}{err.stderr or ''}\n[timed out after {limit_s:g}s]"
        out = out if isinstance(out, str) else out.decode(errors="replace")
    log.write_text(out)
    print(f"[gpu.sh] {' '.join(cmd[2:5])} ... exit {code} in {time.monotonic() - started:.1f}s", flush=True)
    return code, out


def healthcheck(work: Path) -> list[str]:
    code, out = run([*PY, "healthcheck", "--nproc-per-node", "1"], 120, work / "healthcheck.log")
    tail = [line for line in out.splitlines() if "health" in line.lower()][-3:]
    return [f"healthcheck: exit {code}; " + " | ".join(t.strip()[-160:] for t in tail)]


def nccl_path(work: Path, dry: bool) -> list[str]:
    log = work / "nccl.log"
    code, _ = run([*PY, "launch", "--nproc-per-node", "1", "train", "--train.steps=3", "--train.log_every=1",
                   "--model.dim=64", "--model.layers=2", "--model.heads=4", "--train.seq_len=64",
                   "--train.batch_size=2"], 150, log, NCCL_DEBUG="INFO")
    efa_code, efa_out = run([*PY, "verify-efa", str(log), "--json"], 30, work / "verify-efa.log")
    try:
        verdict = json.loads(efa_out[efa_out.index("{"):efa_out.rindex("}") + 1])
    except ValueError:
        verdict = {"raw": efa_out.strip()[-200:]}
    claims_efa = efa_code == 0
    lines = [f"NCCL path: `llm-runtime launch` on 1 {'CPU process (gloo: no NCCL in a dry run)' if dry else 'GPU'}, "
             f"exit {code}; verify-efa exit {efa_code} ({'CLAIMS EFA: wrong on this machine' if claims_efa else 'no EFA claimed'}): "
             f"{json.dumps(verdict)[:300]}",
             "exercised at world size 1: NCCL's init, its network plugin choice (logged), one-rank collectives "
             "(the loss's all-reduce); not exercised: any transport between ranks (P2P, SHM, NET), EFA, "
             "inter-node rings and trees"]
    return lines


def hf_config(path: Path, spec: dict) -> Path:
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    transformers.LlamaConfig(**spec, max_position_embeddings=4096, tie_word_embeddings=False).save_pretrained(path)
    return path


def train_run(work: Path, name: str, size: dict, *extra: str) -> dict:
    """One timed `llm-runtime train` run with a save after the timed windows: MFU, tokens/s, blocked_s."""
    jsonl = work / f"{name}.jsonl"
    cmd = [*PY, "train", "--nproc-per-node", "1", f"--model.dim={size['dim']}", f"--model.layers={size['layers']}",
           f"--model.heads={size['heads']}", f"--train.seq_len={size['seq']}", f"--train.batch_size={size['batch']}",
           f"--train.steps={size['steps']}", f"--train.log_every={size['log_every']}", "--train.lr_schedule=constant",
           "--train.warmup_steps=0", f"--metrics.jsonl={jsonl}", f"--checkpoint.local_dir={work / name}-ck",
           f"--checkpoint.every_steps={size['save_at']}", "--checkpoint.at_end=false", "--checkpoint.resume=never",
           *extra]
    code, out = run(cmd, 240, work / f"{name}.log")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    timed = [r for r in rows if 2 * size["log_every"] < r["step"] <= size["save_at"]]  # after warm-up, before the save
    blocked = [float(m) for m in re.findall(r"checkpoint step=\d+ blocked_s=([0-9.]+)", out)]
    params = re.findall(r"model ([0-9.]+)M parameters", out)
    return {"code": code, "mfu": statistics.mean(r["mfu"] if r["mfu"] is not None else float("nan") for r in timed)
            if timed else float("nan"),
            "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in timed) if timed else float("nan"),
            "step_time_s": statistics.mean(r["step_time_s"] for r in timed) if timed else float("nan"),
            "blocked_s": blocked[0] if blocked else float("nan"), "params_m": float(params[0]) if params else 0.0,
            "memory_gb": max((r["memory_gb"] for r in rows), default=float("nan"))}


def mfu_and_checkpoint(work: Path, size: dict) -> tuple[list[str], list[str]]:
    bundled = train_run(work, "bundled", size)
    hf = train_run(work, "hf", size, f"--model.hf_path={hf_config(work / 'hf-llama', size['hf'])}")
    lines, details = [], []
    precision = "bf16" if _cuda() else "fp32 (CPU)"
    for claim, res in (("bundled", bundled), ("hf_llama", hf)):
        lines.append(f"RESULT gpu_mfu_{claim} value={res['mfu']:.4g} baseline=1 ratio={res['mfu']:.4g} target=report")
        details.append(f"{claim}: exit {res['code']}, {res['params_m']:.2f}M parameters, {precision}, seq {size['seq']}, "
                       f"batch {size['batch']}: MFU {res['mfu']:.3f}, {res['tokens_per_s']:.0f} tokens/s, "
                       f"{res['step_time_s']:.3f} s/step, peak memory {res['memory_gb']:.1f} GB; checkpoint to "
                       f"local disk after step {size['save_at']} blocked {res['blocked_s']:.3f} s")
    lines.append(result_line("gpu_checkpoint_blocked_s_vs_step_time", bundled["blocked_s"], bundled["step_time_s"],
                             "report"))
    return lines, details


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def overhead(size: dict) -> tuple[list[str], list[str]]:
    import step_overhead

    args = argparse.Namespace(nproc=1, **{k: v for k, v in size.items() if k != "repeats"})
    mine, base, overheads = [], [], []
    for _ in range(size["repeats"]):
        base.append(step_overhead.baseline(args))
        mine.append(step_overhead.ours(args, log_every=args.warmup // 2 or 1, overheads=overheads))
    ratio, half = mean_ci95([m / b for m, b in zip(mine, base)])
    frac = statistics.mean(overheads)
    return ([result_line("gpu_train_steps_per_s_vs_plain_fsdp2", statistics.mean(mine), statistics.mean(base),
                         ">=0.98"),
             f"RESULT gpu_runtime_overhead_fraction_of_step value={frac:.4g} baseline=1 ratio={frac:.4g} target=<=0.01"],
            [f"overhead: dim {size['dim']} layers {size['layers']} seq {size['seq']} batch {size['batch']}, "
             f"{size['repeats']} alternating pairs: ours {', '.join(f'{v:.2f}' for v in mine)} steps/s, plain FSDP2 "
             f"{', '.join(f'{v:.2f}' for v in base)}; pairwise ratio {ratio:.4f} ± {half:.4f} (95%)"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model: checks the script end to end")
    parser.add_argument("--results", default="", help="where the section goes (default RESULTS.md; dry run: nowhere)")
    args = parser.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu.sh: no CUDA device here; use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    size = SIZES["dry" if args.dry_run else "gpu"]
    started = time.monotonic()
    lines, details = [], [f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available()
                                                         else ", CPU (dry run)")]
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        work = Path(tmp)
        for name, step in (("healthcheck", lambda: ([], healthcheck(work))),
                           ("nccl", lambda: ([], nccl_path(work, args.dry_run))),
                           ("mfu", lambda: mfu_and_checkpoint(work, size)),
                           ("overhead", lambda: overhead(size["overhead"]))):
            try:
                more_lines, more_details = step()
            except Exception as err:  # noqa: BLE001 - one failing step must not lose the others' numbers
                more_lines, more_details = [], [f"{name}: FAILED {type(err).__name__}: {err}"]
            lines += more_lines
            details += more_details
    details.append(f"whole run {time.monotonic() - started:.0f} s")
    text = section("gpu" + (" (dry run)" if args.dry_run else ""), lines, details, machine())
    print(text, flush=True)
    target = Path(args.results) if args.results else (None if args.dry_run else RESULTS)
    if target is not None:
        with target.open("a") as sink:
            sink.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
