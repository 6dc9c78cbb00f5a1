"""Pipeline parallelism with torch.distributed.pipelining: stages by layer count, three schedules.

A stage is a shallow copy of the model that keeps only its layers (in a ModuleDict keyed by
the original index, so parameter names match the unsplit model) and drops the modules that
only the first stage (embeddings) or the last stage (final norm, output head) uses. The
model's forward must skip modules that are None, as the bundled Llama does.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

from torch import nn

__all__ = ["SCHEDULES", "build_schedule", "build_stage_modules", "parse_split_points", "split_layers", "stage_indices"]

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def parse_split_points(text: str) -> list[int]:
    """``parallel.pp_split_points`` ("3,6") as layer indices."""
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"parallel.pp_split_points must be comma-separated layer indices, got {text!r}") from None


def split_layers(num_layers: int, num_stages: int, split_points: Sequence[int] = ()) -> list[range]:
    """Layer ranges of each stage: even split (earlier stages take the remainder) or explicit starts."""
    if num_stages < 1:
        raise ValueError(f"need at least one pipeline stage, got {num_stages}")
    if num_stages > num_layers:
        raise ValueError(f"{num_stages} pipeline stages need at least as many layers; the model has {num_layers} "
                         f"(lower parallel.pp / parallel.stages_per_rank or add layers)")
    if split_points:
        points = list(split_points)
        if len(points) != num_stages - 1:
            raise ValueError(f"parallel.pp_split_points={points} gives {len(points) + 1} stages, "
                             f"but the pipeline has {num_stages}")
        if points != sorted(set(points)) or points[0] <= 0 or points[-1] >= num_layers:
            raise ValueError(f"parallel.pp_split_points={points} must be increasing layer indices "
                             f"inside 1..{num_layers - 1}")
        bounds = [0, *points, num_layers]
    else:
        base, extra = divmod(num_layers, num_stages)
        bounds = [0]
        for stage in range(num_stages):
            bounds.append(bounds[-1] + base + (1 if stage < extra else 0))
    return [range(bounds[i], bounds[i + 1]) for i in range(num_stages)]


def stage_indices(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """Stages this rank holds: looped placement (rank r holds r, r + pp, ...)."""
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def build_stage_modules(
    model: nn.Module,
    stages: Sequence[int],
    ranges: Sequence[range],
    *,
    layers_attr: str = "layers",
    first_only: Sequence[str] = ("tok_embeddings",),
    last_only: Sequence[str] = ("norm", "output"),
) -> list[nn.Module]:
    """One module per stage index, sharing the model's parameters (no copy of weights)."""
    layers = getattr(model, layers_attr)
    out = []
    for stage in stages:
        part = copy.copy(model)
        # A shallow copy shares every table of the model; each stage needs its own, or a hook
        # (FSDP's, say) registered on one stage would fire when another one runs.
        for name, value in vars(model).items():
            if isinstance(value, dict) and name.startswith("_"):
                setattr(part, name, type(value)(value))
        setattr(part, layers_attr, nn.ModuleDict({str(i): layers[i] for i in ranges[stage]}))
        if stage != 0:
            for name in first_only:
                setattr(part, name, None)
        if stage != len(ranges) - 1:
            for name in last_only:
                setattr(part, name, None)
        out.append(part)
    return out


def build_schedule(stages: list, n_microbatches: int, loss_fn: Callable, name: str):
    """The pipelining schedule; gradients are scaled by 1/microbatches (a mean over the batch)."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    if name == "interleaved":
        return ScheduleInterleaved1F1B(stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
    if len(stages) != 1:
        raise ValueError(f"parallel.pp_schedule={name} runs one stage per rank; use interleaved for {len(stages)}")
    schedule = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]
    return schedule(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
