"""``parallelize``: one model, any of DDP / FSDP2 / HSDP x TP x PP, behind one training-step API.

The built-in trainer and user code call the same thing (``rt.parallelize(model, ...)``).
The user supplies a tensor-parallel plan (per block) and, for pipeline parallelism, where the
layers are and which modules belong only to the first / last stage.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .batching import resolve_stages_per_rank
from .dims import ParallelDims
from .fsdp import apply_activation_checkpointing, apply_compile, apply_fsdp, mixed_precision_policy
from .materialize import InitFn, has_meta, materialize
from .pipeline import build_schedule, build_stage_modules, split_layers, stage_indices
from .tensor import apply_tensor_parallel
from ..faults import drilled_loss

__all__ = ["ParallelModel", "build_mesh", "cross_entropy", "parallelize"]

log = logging.getLogger(__name__)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The built-in trainer's loss (a ``nan`` / ``spike`` drill, when one is in force, scales it)."""
    return drilled_loss(nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()))


def build_mesh(dims: ParallelDims, device_type: str):
    """The DeviceMesh over the axes larger than 1 (None for a world of one)."""
    axes = dims.mesh_axes()
    if not axes:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    names, sizes = zip(*axes)
    return init_device_mesh(device_type, tuple(sizes), mesh_dim_names=tuple(names))


def _full_mesh(dims: ParallelDims, device_type: str):
    """All four axes, size-1 ones included (HSDP needs a shard axis even when it is 1 wide)."""
    from torch.distributed.device_mesh import DeviceMesh

    from .dims import AXES

    layout = torch.arange(dims.world_size).reshape(*(dims.sizes()[axis] for axis in AXES))
    return DeviceMesh(device_type, layout, mesh_dim_names=AXES)


@dataclass
class ParallelModel:
    """The parallelized model parts held by this rank and how to run one training step."""

    parts: list[nn.Module]
    dims: ParallelDims
    rank: int
    mesh: object = None
    schedule: object = None
    has_first_stage: bool = True
    has_last_stage: bool = True
    loss_fn: Callable = cross_entropy
    data_parallel: str = "none"
    """``none``, ``ddp`` or ``fsdp``."""
    autocast_dtype: torch.dtype | None = None
    """bf16 autocast for layouts FSDP's mixed-precision policy does not cover (DDP, TP only)."""
    stages: list[int] = field(default_factory=lambda: [0])
    """The pipeline stage index of each part."""
    _pp_group: object = field(default=None, repr=False)

    def parameters(self) -> Iterator[nn.Parameter]:
        return itertools.chain.from_iterable(part.parameters() for part in self.parts)

    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank(self.rank)

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, accumulation: int = 1) -> torch.Tensor:
        """Forward and backward of this replica's batch; returns its mean loss (0 off the last stage).

        Without pipelining the batch runs as ``accumulation`` micro-batches with gradient
        sync only on the last; with it, the schedule splits it into its microbatches.
        """
        if self.schedule is not None:
            losses: list[torch.Tensor] = []
            args = (inputs,) if self.has_first_stage else ()
            if self.has_last_stage:
                self.schedule.step(*args, target=targets, losses=losses)
                return torch.stack([loss.detach() for loss in losses]).mean()
            self.schedule.step(*args)
            return torch.zeros((), device=inputs.device)
        model = self.parts[0]
        if accumulation < 1 or inputs.shape[0] % accumulation:
            raise ValueError(f"a batch of {inputs.shape[0]} sequences does not split into {accumulation} "
                             "equal micro-batches")
        total = torch.zeros((), device=inputs.device)
        for index, (chunk_in, chunk_out) in enumerate(zip(inputs.chunk(accumulation), targets.chunk(accumulation))):
            last = index == accumulation - 1
            with self._sync(model, last), self._autocast(inputs.device):
                loss = self.loss_fn(model(chunk_in), chunk_out) / accumulation
                loss.backward()
            total += loss.detach()
        return total

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor, accumulation: int = 1) -> torch.Tensor:
        """Forward only, in eval mode: this replica's mean loss over its rows (0 off the last stage),
        in ``accumulation`` micro-batches (the pipeline: its own microbatches)."""
        modes = [part.training for part in self.parts]
        for part in self.parts:
            part.train(False)
        try:
            if self.schedule is not None:
                losses: list[torch.Tensor] = []
                args = (inputs,) if self.has_first_stage else ()
                self.schedule.eval(*args, target=targets if self.has_last_stage else None, losses=losses)
                return torch.stack(losses).float().mean() if self.has_last_stage else torch.zeros((), device=inputs.device)
            total = torch.zeros((), device=inputs.device)
            for chunk_in, chunk_out in zip(inputs.chunk(accumulation), targets.chunk(accumulation)):
                with self._autocast(inputs.device):
                    total += self.loss_fn(self.parts[0](chunk_in), chunk_out).float() / accumulation
            return total
        finally:
            for part, mode in zip(self.parts, modes):
                part.train(mode)

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def _sync(self, model: nn.Module, last: bool):
        if self.data_parallel == "ddp" and not last:
            return model.no_sync()
        if self.data_parallel == "fsdp":
            model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def global_loss(self, local_loss: torch.Tensor) -> float:
        """The step's loss over the global batch: mean over replicas, from the last stage."""
        return self.global_losses(local_loss.reshape(1))[0]

    def global_losses(self, local_losses: torch.Tensor) -> list[float]:
        """:meth:`global_loss` of several steps' local losses (a vector) in one all-reduce."""
        if self.dims.world_size == 1:
            return local_losses.tolist()
        coords = self.dims.coords(self.rank)
        mine = local_losses if (self.has_last_stage and coords["tp"] == 0) else torch.zeros_like(local_losses)
        total = mine.detach().clone()
        dist.all_reduce(total)
        return [value / self.dims.dp_size for value in total.tolist()]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the global gradient norm (across shards, tensor and pipeline ranks); returns it.

        The norm stays a tensor: reading it (``float()``) waits for the device, so callers do
        that only when they log, not every step.
        """
        # Group by layout: foreach kernels refuse a mix of plain tensors and DTensors, and
        # each DTensor group's norm needs its own reduction over its mesh.
        groups: dict[object, list[nn.Parameter]] = {}
        for param in self.parameters():
            if param.grad is not None:
                grad = param.grad
                key = (id(grad.device_mesh), tuple(grad.placements)) if hasattr(grad, "device_mesh") else "local"
                groups.setdefault(key, []).append(param)
        device = next(self.parameters()).device
        squared = torch.zeros((), device=device, dtype=torch.float32)
        for params in groups.values():
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            squared += norm.float() ** 2
        if self._pp_group is not None:
            dist.all_reduce(squared, group=self._pp_group)  # each stage holds different parameters
        total = squared.sqrt()
        if max_norm > 0:
            for params in groups.values():
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    *,
    rank: int,
    device: torch.device,
    mesh=None,
    tp_plan: Mapping[str, object] | None = None,
    root_tp_plan: Mapping[str, object] | None = None,
    layers_attr: str = "layers",
    first_only: Sequence[str] = ("tok_embeddings",),
    last_only: Sequence[str] = ("norm", "output"),
    pp_schedule: str = "1f1b",
    microbatches: int = 0,
    stages_per_rank: int = 0,
    split_points: Sequence[int] = (),
    mixed_precision: str = "bf16",
    reduce_dtype: str = "fp32",
    activation_checkpoint: str = "none",
    ac_every: int = 2,
    compile: bool = False,
    loss_fn: Callable = cross_entropy,
    init_fn: InitFn | None = None,
) -> ParallelModel:
    """Apply the PP split, then TP, activation checkpointing, compile and FSDP/DDP, in that order.

    A model on the meta device is laid out first and only then materialised: each rank allocates
    just its own stages' shards, filled by ``init_fn(name, full_tensor)`` (see materialize.py).
    """
    if dims.world_size > 1 and mesh is None:
        raise ValueError("parallelize needs the DeviceMesh of a multi-rank job (rt.mesh)")
    meta = has_meta(model)
    if meta:
        log.info("parallelize: the model is on the meta device; each rank materialises only its own shards")
    else:
        apply_same_weights(model, dims, device)
    per_rank = resolve_stages_per_rank(stages_per_rank, pp_schedule) if dims.pp > 1 else 1
    num_stages, mine, parts = apply_pipeline_split(model, dims, rank, per_rank, split_points, layers_attr,
                                                   first_only, last_only, None if meta else device)
    blocks_per_part = [_blocks(part, layers_attr) for part in parts]
    all_blocks = [block for blocks in blocks_per_part for block in blocks]
    apply_tp(parts, all_blocks, dims, mesh, tp_plan, root_tp_plan)
    apply_activation_checkpointing(all_blocks, activation_checkpoint, ac_every)
    if compile:
        apply_compile(all_blocks)
    parts, data_parallel = data_parallel_and_weights(parts, blocks_per_part, dims, mesh, device, mixed_precision,
                                                     reduce_dtype, meta, init_fn)
    autocast_dtype = autocast_for(mixed_precision, device, data_parallel, num_stages)
    schedule, pp_group = apply_schedule(parts, mine, num_stages, dims, mesh, device, microbatches or num_stages,
                                        loss_fn, pp_schedule)
    log.info("parallelized: %s, %s data parallel, %d stage(s) on this rank of %d", dims.describe(),
             data_parallel, len(parts), num_stages)
    return ParallelModel(parts=parts, dims=dims, rank=rank, mesh=mesh, schedule=schedule,
                         has_first_stage=0 in mine, has_last_stage=(num_stages - 1) in mine,
                         loss_fn=loss_fn, data_parallel=data_parallel, autocast_dtype=autocast_dtype,
                         stages=list(mine), _pp_group=pp_group)


def apply_same_weights(model: nn.Module, dims: ParallelDims, device: torch.device) -> None:
    """Every rank starts from rank 0's weights: FSDP and TP do not broadcast, and a model built
    after init() uses per-rank seeds. Moves the model to ``device`` first (a collective per tensor)."""
    if dims.world_size == 1:
        return
    model.to(device)
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            dist.broadcast(tensor, src=0)


def apply_pipeline_split(model: nn.Module, dims: ParallelDims, rank: int, per_rank: int, split_points, layers_attr: str,
                         first_only, last_only, device: torch.device | None) -> tuple[int, list[int], list[nn.Module]]:
    """(stages in the pipeline, this rank's stage indices, its stage modules on ``device``; left
    where they are for None: on the meta device, to be materialised after the layout)."""
    if dims.pp == 1 and per_rank == 1:
        parts = [model]
        num_stages, mine = 1, [0]
    else:
        num_stages = dims.pp * per_rank
        ranges = split_layers(len(getattr(model, layers_attr)), num_stages, split_points)
        mine = stage_indices(dims.coords(rank)["pp"], dims.pp, per_rank)
        parts = build_stage_modules(model, mine, ranges, layers_attr=layers_attr,
                                    first_only=first_only, last_only=last_only)
    if device is not None:
        for part in parts:
            part.to(device)
    return num_stages, mine, parts


def _blocks(part: nn.Module, layers_attr: str) -> list[nn.Module]:
    layers = getattr(part, layers_attr)
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def apply_tp(parts, all_blocks, dims: ParallelDims, mesh, tp_plan, root_tp_plan) -> None:
    """Tensor parallelism over the mesh's ``tp`` axis, by the model's per-block and root plans."""
    if dims.tp == 1:
        return
    if not tp_plan:
        raise ValueError("parallel.tp > 1 needs a tensor-parallel plan for the model's blocks")
    apply_tensor_parallel(parts, all_blocks, mesh["tp"], tp_plan, root_tp_plan)
    log.info("tensor parallel over %d ranks (%d block styles, %d around the blocks)", dims.tp,
             len(tp_plan), len(root_tp_plan or {}))


def data_parallel_and_weights(parts, blocks_per_part, dims: ParallelDims, mesh, device: torch.device,
                              mixed_precision: str, reduce_dtype: str, meta: bool,
                              init_fn: InitFn | None) -> tuple[list[nn.Module], str]:
    """FSDP2 / HSDP / DDP (apply_data_parallel), with a meta model materialised at the right point:
    after FSDP2 (each rank allocates its shards only), before DDP (which wraps real tensors)."""
    if meta and plain_replication(dims):
        materialize(parts, device, init_fn)
        meta = False
    parts, data_parallel = apply_data_parallel(parts, blocks_per_part, dims, mesh, device, mixed_precision,
                                               reduce_dtype)
    if meta:
        materialize(parts, device, init_fn)
    return parts, data_parallel


def plain_replication(dims: ParallelDims) -> bool:
    """Data parallelism by replication alone (no shards, TP or PP): DDP's layout."""
    return dims.dp_replicate > 1 and dims.dp_shard == 1 and dims.tp == 1 and dims.pp == 1


def apply_data_parallel(parts, blocks_per_part, dims: ParallelDims, mesh, device: torch.device,
                        mixed_precision: str, reduce_dtype: str) -> tuple[list[nn.Module], str]:
    """(parts, ``none`` | ``ddp`` | ``fsdp``): DDP for plain replication, else FSDP2 / HSDP."""
    dp_axes = [axis for axis in ("dp_replicate", "dp_shard") if dims.sizes()[axis] > 1]
    if not dp_axes:
        return parts, "none"
    if plain_replication(dims):
        # DDP's bucketed all-reduce is the cheapest way to keep copies equal.
        from torch.nn.parallel import DistributedDataParallel

        return [DistributedDataParallel(parts[0], device_ids=[device.index] if device.type == "cuda" else None)], "ddp"
    # FSDP2 over the shard axis, HSDP (replicate x shard) when both exist. Replication next to TP/PP
    # is HSDP with shard groups of one: replicas stay whole copies (all-reduce only, no gathers
    # across what are usually node boundaries).
    if dp_axes == ["dp_replicate"]:
        dp_axes = ["dp_replicate", "dp_shard"]
        dp_mesh = _full_mesh(dims, device.type)[tuple(dp_axes)]
    else:
        dp_mesh = mesh[tuple(dp_axes)] if len(dp_axes) > 1 else mesh[dp_axes[0]]
    log.info("FSDP2 over %s %s", "x".join(dp_axes), tuple(dp_mesh.shape))
    policy = mixed_precision_policy(mixed_precision, reduce_dtype, device.type)
    apply_fsdp(parts, blocks_per_part, dp_mesh, policy, reshard_after_forward=dims.pp == 1)
    return parts, "fsdp"


def autocast_for(mixed_precision: str, device: torch.device, data_parallel: str, num_stages: int):
    """bf16 autocast where FSDP's mixed-precision policy does not apply (DDP, TP only); a pipeline
    without FSDP runs fp32 (the stages exchange activations in their parameters' dtype), with a warning."""
    if mixed_precision == "fp32":
        return None
    if device.type == "cpu":
        log.info("parallel.mixed_precision=%s: running fp32 on CPU", mixed_precision)
        return None
    if data_parallel == "fsdp":
        return None
    if num_stages == 1:
        return torch.bfloat16
    log.warning("parallel.mixed_precision=%s is applied through FSDP's policy; this pipeline layout has no "
                "data-parallel axis (dp_shard = dp_replicate = 1), so nothing wraps it in FSDP and it runs fp32 "
                "(add a dp_shard axis, or use parallel.backend=deepspeed)", mixed_precision)
    return None


def apply_schedule(parts, mine, num_stages: int, dims: ParallelDims, mesh, device: torch.device, microbatches: int,
                   loss_fn: Callable, pp_schedule: str):
    """(pipeline schedule, pipeline group) over this rank's stages; (None, None) without pipelining."""
    if num_stages == 1:
        return None, None
    from torch.distributed.pipelining import PipelineStage

    pp_group = mesh["pp"].get_group() if dims.pp > 1 else None
    stages = [PipelineStage(part, index, num_stages, device, group=pp_group) for part, index in zip(parts, mine)]
    return build_schedule(stages, microbatches, loss_fn, pp_schedule), pp_group
