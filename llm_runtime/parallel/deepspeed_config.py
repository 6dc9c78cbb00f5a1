"""The runtime's config as a DeepSpeed config dict: pure functions, tested as tables.

The same ``[parallel]`` keys drive both backends: ``shard_group_size`` becomes ZeRO++ hpZ's
``zero_hpz_partition_size`` (or MiCS's ``mics_shard_size`` on a DeepSpeed that still has
MiCS), ``train.batch_size`` stays the global batch, and the micro-batch / accumulation
arithmetic is the trainer's own. A user's DeepSpeed JSON is merged on top: their keys win,
and every place where they override a value the runtime chose is reported.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DeepSpeedLayout", "deepspeed_config", "deepspeed_layout", "merge_user_config", "read_user_config",
           "resolve_user_config"]

#: Keys whose values the trainer's own loop depends on: a user JSON may not change them.
RUNTIME_OWNED = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size (or parallel.microbatches with a pipeline)",
    "gradient_accumulation_steps": "train.micro_batch_size (or parallel.microbatches with a pipeline)",
    "scheduler": "train.lr_schedule / train.warmup_steps (the runtime passes its own schedule)",
}


@dataclass(frozen=True)
class DeepSpeedLayout:
    """How DeepSpeed splits the world: data parallel x pipeline (no tensor parallel)."""

    dp: int
    pp: int
    zero_stage: int
    shard_group_size: int
    shard_mode: str


def deepspeed_layout(parallel, world_size: int) -> DeepSpeedLayout:
    """Check the ``[parallel]`` section for the DeepSpeed backend; ValueError names the key."""
    if parallel.compile or parallel.pp_split_points or parallel.stages_per_rank or parallel.pp_schedule != "1f1b":
        raise ValueError("parallel.compile, pp_split_points, stages_per_rank and pp_schedule apply to the fsdp "
                         "backend; with deepspeed use deepspeed.partition_method and parallel.microbatches")
    if parallel.tp != 1:
        raise ValueError(f"parallel.tp={parallel.tp}: the DeepSpeed backend runs without tensor parallelism "
                         "(use parallel.backend=fsdp for tp > 1)")
    if parallel.dp_replicate not in (0, -1) or parallel.dp_shard != -1:
        raise ValueError("with parallel.backend=deepspeed, ZeRO shards over every data-parallel rank; "
                         "set parallel.shard_group_size for hpZ/MiCS groups instead of dp_replicate/dp_shard")
    pp = parallel.pp
    if pp < 1 or world_size % pp:
        raise ValueError(f"parallel.pp={pp} does not divide WORLD_SIZE={world_size}")
    if parallel.zero_stage < -1:
        raise ValueError(f"parallel.zero_stage must be 0-3, or -1 for the default, got {parallel.zero_stage}")
    stage = parallel.zero_stage if parallel.zero_stage >= 0 else (1 if pp > 1 else 3)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {stage}")
    if pp > 1 and stage > 1:
        raise ValueError(f"parallel.zero_stage={stage} with parallel.pp={pp}: DeepSpeed's pipeline engine "
                         "supports ZeRO stage 0 or 1 only")
    dp = world_size // pp
    group = parallel.shard_group_size
    if group < 0 or group == 1:
        raise ValueError(f"parallel.shard_group_size={group}: DeepSpeed's hpZ/MiCS groups need 2 or more ranks "
                         "(0 = no groups)")
    if group:
        if stage != 3:
            raise ValueError(f"parallel.shard_group_size={group} needs parallel.zero_stage=3 "
                             f"(hpZ and MiCS partition ZeRO-3 parameters), got {stage}")
        if dp % group:
            raise ValueError(f"parallel.shard_group_size={group} does not divide the {dp} data-parallel ranks")
    return DeepSpeedLayout(dp=dp, pp=pp, zero_stage=stage, shard_group_size=group,
                           shard_mode=parallel.zero_shard_mode)


def deepspeed_config(config, layout: DeepSpeedLayout, *, micro_batch: int, accumulation: int,
                     device_type: str, mics_available: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON the runtime would write for this job."""
    train, parallel = config.train, config.parallel
    if micro_batch * accumulation * layout.dp != train.batch_size:
        raise ValueError(f"train.batch_size={train.batch_size} != micro-batch {micro_batch} x accumulation "
                         f"{accumulation} x {layout.dp} data-parallel ranks")
    zero: dict[str, Any] = {"stage": layout.zero_stage}
    if layout.shard_group_size:
        if layout.shard_mode == "mics":
            if not mics_available:
                raise ValueError("parallel.zero_shard_mode=mics: this DeepSpeed has removed MiCS; use "
                                 "parallel.zero_shard_mode=hpz (ZeRO++ hierarchical partitioning)")
            zero["mics_shard_size"] = layout.shard_group_size
        else:
            zero["zero_hpz_partition_size"] = layout.shard_group_size
    bf16 = parallel.mixed_precision == "bf16" and device_type == "cuda"
    out: dict[str, Any] = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "optimizer": {
            "type": "AdamW",
            # torch_adam: torch's AdamW, not DeepSpeed's fused op (nothing to compile, same numbers).
            "params": {"lr": train.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": train.weight_decay,
                       "torch_adam": True},
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if bf16 and parallel.reduce_dtype == "fp32":
        out["communication_data_type"] = "fp32"
    return out


def merge_user_config(ours: Mapping[str, Any], user: Mapping[str, Any], path: str = "") -> tuple[dict, list[str]]:
    """User keys win; returns the merged dict and one line per value of ours that they replaced."""
    merged = copy.deepcopy(dict(ours))
    conflicts: list[str] = []
    for key, value in user.items():
        where = f"{path}.{key}" if path else key
        if key in merged and isinstance(merged[key], Mapping) and isinstance(value, Mapping):
            merged[key], inner = merge_user_config(merged[key], value, where)
            conflicts += inner
        else:
            if key in merged and merged[key] != value:
                conflicts.append(f"{where}: the DeepSpeed JSON sets {value!r}, the runtime chose {merged[key]!r}")
            merged[key] = copy.deepcopy(value)
    return merged, conflicts


def read_user_config(path: str) -> dict[str, Any]:
    """The user's DeepSpeed JSON (``deepspeed.config``); a ValueError names the file and the problem."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"deepspeed.config {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"deepspeed.config {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"deepspeed.config {path}: expected a JSON object, found {type(data).__name__}")
    return data


def resolve_user_config(ours: Mapping[str, Any], user: Mapping[str, Any], layout: DeepSpeedLayout
                        ) -> tuple[dict[str, Any], list[str], DeepSpeedLayout]:
    """Merge the user's JSON over ours; refuse the keys the trainer's loop depends on.

    Returns the merged dict, the conflict lines to report, and the layout with the ZeRO stage
    the merged config really asks for (a user JSON may change the stage).
    """
    for key, instead in RUNTIME_OWNED.items():
        if key in user and user.get(key) != ours.get(key):
            raise ValueError(f"deepspeed.config sets {key}={user[key]!r}; the runtime owns it (set {instead})")
    merged, conflicts = merge_user_config(ours, user)
    stage = int(merged.get("zero_optimization", {}).get("stage", layout.zero_stage))
    if layout.pp > 1 and stage > 1:
        raise ValueError(f"deepspeed.config asks for ZeRO stage {stage}, but DeepSpeed's pipeline engine "
                         "supports stage 0 or 1 only")
    return merged, conflicts, DeepSpeedLayout(layout.dp, layout.pp, stage, layout.shard_group_size,
                                              layout.shard_mode)
