"""The final model as one consolidated ``model.safetensors`` (plus ``config.json``) in the model dir.

Every rank takes part (gathering shards is a collective); rank 0 writes. Pipeline stages held
by other ranks reach rank 0 as safetensors bytes over a gloo group (no pickles).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch.distributed as dist

from ..gather import gather_bytes

__all__ = ["export_model"]

log = logging.getLogger(__name__)


def export_model(trainer, rt, directory: str, model_config) -> Path | None:
    """Write ``directory/model.safetensors``; returns its path on rank 0."""
    from safetensors.torch import load as load_bytes
    from safetensors.torch import save as save_bytes
    from safetensors.torch import save_file

    engine = getattr(getattr(trainer, "engine", None), "engine", None)
    if engine is not None:  # DeepSpeed
        if getattr(trainer.engine, "pipeline", False):
            log.warning("train.model_dir: exporting a DeepSpeed pipeline model is not supported yet; skipped")
            return None
        if engine.zero_optimization_stage() == 3:
            state = engine._zero3_consolidated_16bit_state_dict()  # a collective; the full model on rank 0
        else:
            state = engine.module.state_dict()
        state = {k: v.detach().cpu().contiguous() for k, v in (state or {}).items()} if rt.rank == 0 else {}
    else:
        model = trainer.model
        full = model.full_state_dict()  # a collective: every rank takes part
        coords = model.dims.coords(model.rank)
        owner = model.dp_rank == 0 and coords["tp"] == 0  # one rank per pipeline stage
        group = dist.new_group(backend="gloo") if dist.get_world_size() > 1 else None
        if group is None:
            state = full
        else:
            payload = save_bytes({k: v.contiguous() for k, v in full.items()}) if owner else b""
            parts = [part for part in gather_bytes(payload, group, dst=0) if part]
            dist.destroy_process_group(group)
            state = {}
            for part in parts:
                state.update(load_bytes(part))
    if rt.rank != 0:
        return None
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "producer": "llm_runtime"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(model_config), indent=1, sort_keys=True) + "\n")
    log.info("model: %d tensors, %.1f MB -> %s", len(state),
             sum(t.numel() * t.element_size() for t in state.values()) / 1e6, out / "model.safetensors")
    return out / "model.safetensors"
