"""Resuming a DeepSpeed checkpoint on another number of ranks: DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds each data-parallel rank's slice of the optimizer state, so it loads only on
the world that wrote it. DeepSpeed's ``ds_to_universal`` merges the slices into one file per
parameter and state (``zero/<name>/fp32.pt``, ``exp_avg.pt``, ...), which any number of ranks
loads (``checkpoint.load_universal``). The runtime does that when a DeepSpeed job resumes on
another world size:

- each node's local rank 0 fetches the whole DeepSpeed checkpoint (every node's objects, verified
  against the manifest) and converts it in a subprocess bounded by ``checkpoint.upload_timeout_s``;
  nodes convert side by side, so the wall time is one conversion's;
- the conversion writes about the optimizer state twice more (fragments, deleted as it ends, and the
  merged files), so it needs ``SPACE_FACTOR`` times the DeepSpeed files' bytes free, checked first;
- the converted copy is deleted once every rank has loaded it; the data position comes from rank 0's
  state, as for the fsdp backend.

The decision (:func:`resume_mode`) and the disk check (:func:`check_space`) are pure; the
subprocess is :func:`convert`.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["SPACE_FACTOR", "UniversalError", "check_space", "convert", "resume_mode"]

log = logging.getLogger(__name__)

SPACE_FACTOR = 2.0
"""Free bytes needed per byte of DeepSpeed checkpoint: the fragments and the merged files each hold
about the optimizer state (three fp32 tensors per parameter), which is most of the checkpoint."""


class UniversalError(ValueError):
    """A DeepSpeed checkpoint that cannot be resumed on this run's ranks (the message says why)."""


def resume_mode(saved: dict, ours: dict, saved_world: int, world: int, step: int) -> str:
    """``same`` (load the engine's files as they are) or ``universal`` (convert first), from the saved
    and this run's ``parallel`` config sections; raises UniversalError for what cannot be resumed."""
    if saved_world == world:
        return "same"
    where = f"checkpoint step {step} was written by {saved_world} DeepSpeed ranks, this run has {world}"
    saved_pp, our_pp = int(saved.get("pp", 1)), int(ours.get("pp", 1))
    if saved_pp > 1 or our_pp > 1:
        raise UniversalError(f"{where}: a DeepSpeed pipeline checkpoint (parallel.pp={saved_pp}) resumes only "
                             f"on the same number of ranks and stages (this run: parallel.pp={our_pp}); the fsdp "
                             "backend (DCP) reshards pipeline checkpoints")
    saved_stage, our_stage = _stage(saved), _stage(ours)
    if saved_stage != our_stage:
        raise UniversalError(f"{where}: it was saved with parallel.zero_stage={saved_stage}, this run uses "
                             f"{our_stage}; resume on another rank count with the same ZeRO stage")
    if int(saved.get("shard_group_size", 0)) or int(ours.get("shard_group_size", 0)):
        raise UniversalError(f"{where}: checkpoints of hpZ/MiCS shard groups (parallel.shard_group_size) resume "
                             "only on the same number of ranks")
    return "same" if saved_stage == 0 else "universal"  # ZeRO-0 keeps the whole optimizer state on each rank


def _stage(parallel: dict) -> int:
    """parallel.zero_stage as the engine resolves it (-1: 3 without a pipeline, which is refused above)."""
    stage = int(parallel.get("zero_stage", -1))
    return stage if stage >= 0 else 3


def check_space(need_bytes: int, free_bytes: int, where: Path, step: int) -> None:
    if free_bytes < need_bytes:
        raise UniversalError(f"converting DeepSpeed checkpoint step {step} for another number of ranks needs "
                             f"about {need_bytes / 1e9:.2f} GB free under {where} ({SPACE_FACTOR:g} x its "
                             f"files); {free_bytes / 1e9:.2f} GB are free. Free disk there or set "
                             "checkpoint.local_dir to a larger disk")


def convert(source: Path, target: Path, timeout_s: float) -> float:
    """Run DeepSpeed's ds_to_universal on ``source`` (an engine's tag directory) into ``target``;
    returns the seconds it took. Its output goes to the log; a failure raises UniversalError."""
    workers = max(1, min(4, os.cpu_count() or 1))
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
               "--output_folder", str(target), "--inject_missing_state",
               "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2))]
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise UniversalError(f"converting {source} to a universal checkpoint did not finish within "
                             f"{timeout_s:g}s (checkpoint.upload_timeout_s)") from None
    for line in (done.stdout + done.stderr).splitlines()[-20:]:
        log.debug("ds_to_universal: %s", line)
    if done.returncode != 0:
        tail = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        raise UniversalError(f"DeepSpeed's ds_to_universal failed on {source} (exit {done.returncode}): {tail[0]}")
    return time.monotonic() - started
