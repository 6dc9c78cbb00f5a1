"""Claim: building on the meta device lets a bigger model start training on the same machine.

The largest bundled Llama (fixed width, more layers each try) that sets up and takes one AdamW
step with FSDP2 over 4 CPU ranks, within a host-memory budget (default 92% of MemTotal): meta-device
setup (llm-runtime train's) against the eager setup measured in the same run (every rank builds
and initialises the whole model, then it is broadcast and sharded: rt.parallelize on a model not
on meta). A try that passes the budget is killed and counts as not fitting; nothing relies on
the kernel's OOM killer. Each mode stops at its first failure.

usage: python benchmarks/largest_model.py [--nproc 4] [--dim 2048] [--heads 16] [--layers 8,16,24,32]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record, result_line  # noqa: E402

BIN = Path(sys.executable).parent
WORKER = str(Path(__file__).with_name("model_memory_worker.py"))


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, resident bytes) of every process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                out[int(entry.name)] = (int(fields[1]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE"))
            except (OSError, IndexError, ValueError):
                continue
    return out


def tree(root: int) -> tuple[list[int], float]:
    """(pids, resident GB) of ``root`` and all its descendants: torchrun starts each worker in a
    session of its own, so the process group alone would miss them."""
    table = _processes()
    pids, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, (parent, _) in table.items() if parent in frontier]
        pids += frontier
    return pids, sum(table[pid][1] for pid in pids if pid in table) / (1 << 30)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def attempt(args, mode: str, layers: int, budget_gb: float) -> tuple[bool, float, float, str]:
    """(fits, peak group RSS GB, seconds, why not)."""
    cmd = [str(BIN / "llm-runtime"), "launch", "--nproc-per-node", str(args.nproc), WORKER, mode,
           str(args.dim), str(layers), str(args.heads), "step"]
    start, peak = time.monotonic(), 0.0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    reason = ""
    while proc.poll() is None:
        pids, rss = tree(proc.pid)
        peak = max(peak, rss)
        if peak > budget_gb:
            reason = f"passed the {budget_gb:.1f} GB budget"
        elif time.monotonic() - start > args.timeout:
            reason = f"ran past {args.timeout} s"
        if reason:
            _kill(pids)
            break
        time.sleep(0.2)
    out, _ = proc.communicate()
    stepped = out.count("STEPPED ")
    if not reason and (proc.returncode or stepped != args.nproc):
        reason = f"exit {proc.returncode}, {stepped}/{args.nproc} ranks stepped: {out.strip()[-300:]}"
    return not reason, peak, time.monotonic() - start, reason


def largest(args, mode: str, budget_gb: float, notes: list[str]) -> int:
    from llm_runtime.models import LlamaConfig

    best = 0
    for layers in args.layers:
        params = LlamaConfig(dim=args.dim, layers=layers, heads=args.heads).num_parameters()
        fits, peak, seconds, reason = attempt(args, mode, layers, budget_gb)
        notes.append(f"{mode}: {layers} layers, {params / 1e9:.2f}B parameters: "
                     + (f"set up and stepped, peak {peak:.1f} GB, {seconds:.0f} s" if fits else
                        f"does not fit ({reason}; peak {peak:.1f} GB after {seconds:.0f} s)"))
        print(notes[-1], flush=True)
        if not fits:
            break
        best = params
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, default in (("nproc", 4), ("dim", 2048), ("heads", 16), ("timeout", 1200)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--layers", type=lambda text: [int(x) for x in text.split(",")], default=[8, 16, 24, 32])
    parser.add_argument("--budget-gb", type=float, default=0.0)
    args = parser.parse_args()
    total_gb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / (1 << 30)
    budget = args.budget_gb or 0.92 * total_gb
    notes = [f"bundled Llama dim={args.dim} heads={args.heads}, layers tried in order {args.layers}; FSDP2 over "
             f"{args.nproc} CPU ranks (gloo); one AdamW step of one 64-token sequence per rank; budget {budget:.1f} "
             f"GB of {total_gb:.1f} GB host memory (the launcher and its workers, polled every 0.2 s)"]
    eager = largest(args, "eager", budget, notes)
    meta = largest(args, "meta", budget, notes)
    if not eager:
        raise SystemExit("the eager setup fit none of the sizes: lower --layers")
    lines = [result_line("largest_trainable_params_meta_vs_eager", meta, eager, ">=1 (the largest size tried "
                         "bounds the value)")]
    record("Largest model that sets up and steps (benchmarks/largest_model.py)", lines, notes)


if __name__ == "__main__":
    main()
