"""The final model in Hugging Face format, streamed: ``from_pretrained(train.model_dir)`` loads it.

What lands in the model dir: ``config.json``, ``generation_config.json``, the weights as
``model-0000k-of-0000n.safetensors`` files of at most ``train.model_shard_mb`` each, and
``model.safetensors.index.json`` naming the file of every tensor. The bundled Llama is written as
a ``LlamaForCausalLM`` (names and rotary convention mapped, models/llama_hf.py).

Streaming: the parameters are gathered one at a time (``DTensor.full_tensor``, a collective of
the stage's ranks), and one rank per pipeline stage (data-parallel rank 0, tensor rank 0) keeps
them until its current file is complete, writes it and lets it go. No rank holds more than one
file's worth of full tensors; files never span two stages (each has one writer). DeepSpeed
gathers the whole model on rank 0 (ZeRO-3's consolidated state dict), which then writes it the
same way.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..gather import gather_json

__all__ = ["ExportSpec", "bundled_spec", "export_model", "file_names", "plan_files"]

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
Convert = Callable[[str, torch.Tensor], torch.Tensor]
"""A full parameter (by its name in the trained model) as the exported tensor."""


@dataclass
class ExportSpec:
    """What the exported directory calls the model's tensors and what it writes beside them."""

    name_of: Callable[[str], str]
    """A parameter's name in the trained model -> its name in the checkpoint."""
    convert: Convert
    config_json: Callable[[torch.dtype], dict]
    """config.json, given the exported weights' dtype."""
    dtype: torch.dtype | None = None
    """The exported dtype (None: the parameters' own)."""
    dtypes: Mapping[str, torch.dtype] = field(default_factory=dict)
    """Exported names whose dtype is not ``dtype`` (an input that keeps its norms in float32, say)."""
    extra_files: Sequence[Path] = field(default_factory=list)
    """Copied beside the weights (the tokenizer's files)."""


def bundled_spec(model_config) -> ExportSpec:
    """The bundled Llama as a ``LlamaForCausalLM`` checkpoint (names and rotary rows mapped)."""
    from ..models.llama_hf import hf_config, hf_name, to_hf

    return ExportSpec(name_of=hf_name, convert=lambda name, tensor: to_hf(name, tensor, model_config)[1],
                      config_json=lambda dtype: hf_config(model_config, dtype))


def plan_files(entries: Sequence[tuple[str, int, int]], max_bytes: int) -> list[list[str]]:
    """Names per file, in order, from (name, bytes, stage) entries: a file closes before a tensor
    that would take it past ``max_bytes`` (a bigger tensor gets a file of its own) and at every
    change of stage (each file has one writer)."""
    files: list[list[str]] = []
    size, stage = 0, None
    for name, nbytes, owner in entries:
        if not files or owner != stage or (size + nbytes > max_bytes and size > 0):
            files.append([])
            size, stage = 0, owner
        files[-1].append(name)
        size += nbytes
    return files


def file_names(count: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def export_model(trainer, rt, directory: str, spec: ExportSpec, *, shard_mb: int = 5000) -> Path | None:
    """Write the final model to ``directory`` on rank 0's host (every rank takes part); returns the
    index's path on rank 0. A failure on any rank raises on every rank, after every collective ran."""
    out = Path(directory)
    group = None
    if dist.is_initialized() and dist.get_world_size() > 1:  # gloo: the files travel through host memory
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=rt.config.comm.train_timeout_s))
    try:
        engine = getattr(trainer, "engine", None)
        if engine is not None:  # DeepSpeed
            written = _export_deepspeed(engine, rt, out, spec, shard_mb << 20, group)
        else:
            written = _export_parallel(trainer.model, rt.rank, out, spec, shard_mb << 20, group)
    finally:
        if group is not None:
            dist.destroy_process_group(group)
    if written is None or rt.rank != 0:
        return None
    weight_map, total, dtype = written
    _write_json(out / "config.json", spec.config_json(spec.dtype or dtype))
    if not any(path.name == "generation_config.json" for path in spec.extra_files):
        _write_json(out / "generation_config.json", {"_from_model_config": True})
    for path in spec.extra_files:
        _atomic(out / path.name, lambda tmp, path=path: shutil.copyfile(path, tmp))
    _remove_stale(out, set(weight_map.values()))
    index = {"metadata": {"total_size": total, "producer": "llm_runtime"}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out / INDEX, index)  # last: the index names a complete set of files
    log.info("model: %d tensors, %.1f MB in %d file(s), Hugging Face format -> %s", len(weight_map), total / 1e6,
             len(set(weight_map.values())), out)
    return out / INDEX


def _nbytes(param: torch.Tensor, spec: ExportSpec, exported: str) -> int:
    numel = getattr(param, "ds_numel", None) or param.numel()  # a ZeRO-3 partition knows its full size
    dtype = spec.dtypes.get(exported, spec.dtype)
    return numel * (dtype.itemsize if dtype is not None else param.element_size())


@dataclass
class _Held:
    """What this rank holds of the model, for export."""

    parts: list[torch.nn.Module]
    stages: list[int]
    """Each part's pipeline stage."""
    writer: bool
    """Whether this rank writes its stages' files (one rank per stage)."""
    whole: Callable = contextlib.nullcontext
    """``with whole(param) as full``: the full parameter (a collective over its shards, on every rank)."""
    rename: Callable[[str], str] = lambda name: name
    """A part's parameter name -> the trained model's name (what ``spec`` maps)."""
    dtype: torch.dtype = torch.float32
    """The parameters' dtype, as the writer saw them."""

    def exported(self, spec: ExportSpec, name: str) -> str:
        """A part's parameter name as the exported checkpoint spells it."""
        return spec.name_of(self.rename(name))


@contextlib.contextmanager
def _dtensor_whole(param):
    yield param.full_tensor() if hasattr(param, "full_tensor") else param


def _export_parallel(model, rank: int, out: Path, spec: ExportSpec, max_bytes: int, group):
    """rt.parallelize's model: the data-parallel rank 0, tensor-parallel rank 0 of each stage writes it."""
    writer = model.dp_rank == 0 and model.dims.coords(model.rank)["tp"] == 0
    held = _Held([_unwrapped(part) for part in model.parts], list(model.stages), writer, _dtensor_whole)
    return _export_held(held, rank, out, spec, max_bytes, group)


def _export_held(held: _Held, rank: int, out: Path, spec: ExportSpec, max_bytes: int, group):
    """Stage by stage, parameter by parameter. Each stage's writer writes its files (rank 0 into
    ``out``, the others into a private directory, sent to rank 0 one file at a time afterwards: the
    model lands whole on rank 0's host, as SageMaker uploads it); no rank holds more than one file's
    tensors at a time."""
    mine = [(exported, _nbytes(param, spec, exported), stage)
            for stage, part in zip(held.stages, held.parts) for name, param in part.named_parameters()
            for exported in [held.exported(spec, name)]]
    listed = gather_json(mine if held.writer else [], group) if group is not None else [mine]
    entries = sorted(((*e, owner) for owner, rank_entries in enumerate(listed) for e in rank_entries),
                     key=lambda e: e[2])  # stable: stage order, each stage in its writer's order
    files = plan_files([e[:3] for e in entries], max_bytes)
    names = file_names(len(files))
    where = {name: names[i] for i, file in enumerate(files) for name in file}
    writer_of = {where[e[0]]: e[3] for e in entries}
    local = out if rank == 0 else Path(tempfile.mkdtemp(prefix="llm-runtime-export-")) if held.writer else None
    try:
        error = _write_held(held, rank, out, local, spec, where, writer_of, files, names, group)
    finally:
        if local is not None and local != out:
            shutil.rmtree(local, ignore_errors=True)
    failures = gather_json(error, group) if group is not None else [error]
    bad = [(r, text) for r, text in enumerate(failures) if text]
    if bad:
        raise RuntimeError("the final export to train.model_dir failed: "
                           + "; ".join(f"rank {r}: {text}" for r, text in bad))
    return where, sum(e[1] for e in entries), held.dtype


def _write_held(held: _Held, rank: int, out: Path, local: Path | None, spec: ExportSpec, where, writer_of, files,
                names, group) -> str:
    """Every parameter through ``held.whole`` (all ranks), written by the writers file by file, then
    each file shipped to rank 0; '' or this rank's first failure."""
    left = {target: len(file) for target, file in zip(names, files)}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    error = ""
    for part in held.parts:
        for name, param in part.named_parameters():
            with held.whole(param) as full:  # the stage's collective: every rank of it takes part
                if not held.writer:
                    continue
                held.dtype, exported = full.dtype, held.exported(spec, name)
                target = where[exported]
                tensor = spec.convert(held.rename(name), full.detach().cpu()).contiguous()
                shared = tensor.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
                pending.setdefault(target, {})[exported] = tensor.clone() if shared else tensor  # outlives `whole`
            left[target] -= 1
            if not left[target]:
                tensors = pending.pop(target)
                error = error or _try(_write_safetensors, local / target, tensors)
    for target in names if group is not None else ():
        if writer_of[target] != 0:
            source = local / target if rank == writer_of[target] else None
            error = _ship(source, out / target, writer_of[target], rank, group) or error
    return error


def _try(action, *args) -> str:
    """'' or what went wrong: a writer keeps joining the stage's collectives after a failure."""
    try:
        action(*args)
    except (OSError, RuntimeError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return ""


def _ship(source: Path | None, target: Path, sender: int, rank: int, group) -> str:
    """One file from its writer (``source``) to rank 0 (``target``): point to point, its bytes once
    in memory on each side."""
    if rank == sender:
        try:
            data = source.read_bytes()
        except OSError as err:
            dist.send(torch.tensor([-1], dtype=torch.int64), dst=0, group=group)
            return f"{type(err).__name__}: {err}"
        dist.send(torch.tensor([len(data)], dtype=torch.int64), dst=0, group=group)
        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst=0, group=group)
        return ""
    if rank != 0:
        return ""
    size = torch.zeros(1, dtype=torch.int64)
    dist.recv(size, src=sender, group=group)
    if size.item() < 0:
        return ""  # the sender reports its own failure
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(data, src=sender, group=group)
    return _try(_atomic, target, lambda tmp: tmp.write_bytes(data.numpy().tobytes()))


def _unwrapped(part: torch.nn.Module) -> torch.nn.Module:
    """DDP's wrapper prefixes every name with ``module.``; the model's own names are under it."""
    from torch.nn.parallel import DistributedDataParallel

    return part.module if isinstance(part, DistributedDataParallel) else part


def _export_deepspeed(trainer_engine, rt, out: Path, spec: ExportSpec, max_bytes: int, group):
    """DeepSpeed's engines: ZeRO-3 gathers one parameter at a time (rank 0 writes); the pipeline
    engine's data-parallel rank 0 of each stage writes its layers, named as the bundled Llama's."""
    engine = trainer_engine.engine
    if getattr(trainer_engine, "pipeline", False):
        layers = len(engine.module._layer_specs) - 2  # embedding, blocks, head
        held = _Held([engine.module], [engine.stage_id], engine.grid.get_data_parallel_rank() == 0,
                     rename=lambda name: _pipeline_name(name, layers))
    elif engine.zero_optimization_stage() == 3:
        held = _Held([engine.module], [0], rt.rank == 0, _zero3_whole)
    else:
        held = _Held([engine.module], [0], rt.rank == 0)
    return _export_held(held, rt.rank, out, spec, max_bytes, group)


@contextlib.contextmanager
def _zero3_whole(param):
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        yield param.data


def _pipeline_name(name: str, layers: int) -> str:
    """A PipelineModule parameter (``<layer index>.<name in that layer>``, layer 0 the embedding,
    1..L the blocks, L+1 the head) -> its bundled-Llama name."""
    index, _, rest = name.partition(".")
    if 1 <= int(index) <= layers:
        return f"layers.{int(index) - 1}.{rest.removeprefix('block.')}"
    return rest


def _remove_stale(out: Path, current: set[str]) -> None:
    """Weight files of an earlier export in the same directory (``from_pretrained`` would prefer a
    single ``model.safetensors`` over the index)."""
    for path in [out / "model.safetensors", *out.glob("model-*-of-*.safetensors")]:
        if path.name not in current and path.exists():
            path.unlink()


def _atomic(path: Path, fill: Callable[[Path], object]) -> None:
    """``fill(tmp)`` beside ``path``, then renamed over it: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fill(tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    _atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def _write_json(path: Path, value) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2) + "\n"))
