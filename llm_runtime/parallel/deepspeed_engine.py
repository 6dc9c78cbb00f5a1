"""The DeepSpeed backend: the engine on the runtime's own process group, same training-step API.

DeepSpeed's launcher is not involved: ``llm-runtime launch`` (SageMaker, torchrun, MPI) starts
the workers, ``llm_runtime.init`` makes the process group with its timeouts, and DeepSpeed's
communication layer adopts that group (the groups DeepSpeed adds get the same train timeout).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .deepspeed_config import DeepSpeedLayout, deepspeed_config, read_user_config, resolve_user_config
from ..gather import gather_json
from ..runtime import set_group_timeouts
from .fsdp import apply_activation_checkpointing

__all__ = ["DeepSpeedModel", "build_model", "import_deepspeed", "llama_pipeline_specs", "mics_available"]

log = logging.getLogger(__name__)
INSTALL_HINT = "parallel.backend=deepspeed needs DeepSpeed: pip install 'llm-runtime[deepspeed]'"


def import_deepspeed(device_type: str):
    """DeepSpeed, told to use the runtime's device before it guesses (ImportError names the extra)."""
    wanted = "cuda" if device_type == "cuda" else "cpu"
    preset = os.environ.get("DS_ACCELERATOR")
    if preset and preset != wanted:
        raise ValueError(f"DS_ACCELERATOR={preset} but the runtime trains on {device_type}; unset it or "
                         f"set dist.backend to match")
    os.environ["DS_ACCELERATOR"] = wanted
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from None
    if wanted == "cpu":
        _skip_shared_memory_all_reduce(deepspeed)
    return deepspeed


def _skip_shared_memory_all_reduce(deepspeed) -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce when its comm starts (about
    50 s on 2 cores, once per environment). Only ``inference_all_reduce`` uses it, and falls back to
    the process group's all-reduce without it; training never calls it. Marked incompatible, it is
    not built."""
    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(ops, dict):
        ops["deepspeed_shm_comm"] = False


def mics_available() -> bool:
    """Whether the installed DeepSpeed still has MiCS (0.19 removed it)."""
    try:
        from deepspeed.runtime import config as ds_config
    except ImportError:
        return False
    return "mics_shard_size" not in getattr(ds_config, "_REMOVED_ZERO_CONFIG_KEYS", {})


def _materialize(config, seed: int, keep) -> nn.Module:
    """The bundled Llama on the meta device with only ``keep(model)``'s modules made real and
    initialised: same names, so the same weights as the full model built from ``seed``."""
    from ..models import Llama

    with torch.device("meta"):
        model = Llama(config)
    for module in keep(model):
        module.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


class _Embed(nn.Module):
    """Pipeline layer 0: token ids -> hidden states."""

    def __init__(self, config, seed: int):
        super().__init__()
        self.tok_embeddings = _materialize(config, seed, lambda m: [m.tok_embeddings]).tok_embeddings

    def forward(self, tokens):
        return self.tok_embeddings(tokens)


class _Block(nn.Module):
    """Pipeline layers 1..L: one transformer block with its rotary tables."""

    def __init__(self, config, seed: int, index: int, checkpoint: str = "none", every: int = 2):
        super().__init__()
        model = _materialize(config, seed, lambda m: [m.layers[index], m.rotary])
        self.block, self.rotary = model.layers[index], model.rotary
        if checkpoint == "full" or (checkpoint == "every" and index % every == 0):
            apply_activation_checkpointing([self.block], "full")

    def forward(self, hidden):
        cos, sin = self.rotary(self.rotary.max_seq_len)
        return self.block(hidden, cos, sin)


class _Head(nn.Module):
    """The last pipeline layer: final norm and output projection."""

    def __init__(self, config, seed: int):
        super().__init__()
        model = _materialize(config, seed, lambda m: [m.norm, m.output])
        self.norm, self.output = model.norm, model.output

    def forward(self, hidden):
        return self.output(self.norm(hidden))


def llama_pipeline_specs(config, seed: int, checkpoint: str = "none", every: int = 2) -> list:
    """The bundled Llama as DeepSpeed LayerSpecs: each rank builds only its own stage's layers,
    initialised exactly as ``Llama(config).init_weights(Generator().manual_seed(seed))`` would."""
    from deepspeed.pipe import LayerSpec

    return [LayerSpec(_Embed, config, seed),
            *(LayerSpec(_Block, config, seed, index, checkpoint, every) for index in range(config.layers)),
            LayerSpec(_Head, config, seed)]


def build_model(deepspeed, build: Callable[[], nn.Module], init_fn, ds_config: dict, rank: int) -> nn.Module:
    """The model for a non-pipeline engine, its weights filled by ``init_fn(model)`` per parameter.

    ZeRO-3: built under ``zero.Init``, so no rank ever holds the whole model; each parameter is
    then gathered in turn, filled on rank 0 and re-partitioned from it (one full parameter at a
    time). Otherwise every rank builds the whole model and fills it (the stages below need it)."""
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    if stage != 3:
        model = build()
        fill = init_fn(model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                fill(name, param.data)
        return model
    # No dtype=: DeepSpeed 0.19 then takes bf16 on a CPU accelerator whatever is passed (an operator
    # precedence slip in Init._set_dtype); from the config it is the engine's own (bf16 or fp32).
    mics = (ds_config.get("zero_optimization") or {}).get("mics_shard_size", -1) > 0
    with (deepspeed.zero.MiCS_Init if mics else deepspeed.zero.Init)(config_dict_or_path=ds_config):
        model = build()
    fill, error = init_fn(model), None
    with torch.no_grad():
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank == 0 and error is None:
                    try:
                        fill(name, param.data)
                    except Exception as err:  # noqa: BLE001 - raised on every rank below, after every gather
                        error = f"{name}: {type(err).__name__}: {err}"
    failed = gather_json(error or "", None)[0] if dist.is_initialized() and dist.get_world_size() > 1 else error
    if failed:
        raise RuntimeError(f"filling the ZeRO-3 model on rank 0 failed at {failed}")
    log.info("DeepSpeed ZeRO-3: the model was built partitioned (zero.Init) and filled one parameter at a time")
    return model


class DeepSpeedModel:
    """A DeepSpeed engine (ZeRO 0-3, hpZ, or the pipeline engine) behind the trainer's step API."""

    def __init__(self, build: Callable[[], nn.Module], init_fn, config, layout: DeepSpeedLayout, *, rank: int,
                 local_rank: int, device: torch.device, micro_batch: int, accumulation: int,
                 scheduler_factory: Callable, loss_fn: Callable, train_timeout_s: float, init_seed: int = 0,
                 model_config=None):
        """``build()`` makes the model (under ``deepspeed.zero.Init`` for ZeRO-3: each rank holds only
        its partition from the start) and ``init_fn(model)`` -> ``fill(name, full_tensor)`` fills each
        parameter, one at a time. The pipeline engine builds the bundled Llama's stages from
        ``model_config`` instead."""
        deepspeed = import_deepspeed(device.type)
        os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeed reads it even in a world of one
        # Adopt the runtime's process group (PipelineModule needs deepspeed.comm before initialize).
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False,
                                   dist_init_required=False)
        ds_config = deepspeed_config(config, layout, micro_batch=micro_batch, accumulation=accumulation,
                                     device_type=device.type, mics_available=mics_available())
        if config.deepspeed.config:
            ds_config, conflicts, layout = resolve_user_config(
                ds_config, read_user_config(config.deepspeed.config), layout)
            if rank == 0 and conflicts:  # the launcher already listed them, before the workers started
                log.info("DeepSpeed config: %d value(s) from %s override the runtime's", len(conflicts),
                         config.deepspeed.config)
        self.layout, self.accumulation, self.loss_fn = layout, accumulation, loss_fn
        self.pipeline = layout.pp > 1
        parallel = config.parallel
        # Non-reentrant checkpointing of the blocks themselves: PipelineModule's own interval
        # would also checkpoint the embedding, whose integer input cannot carry a gradient.
        if self.pipeline:
            from deepspeed.pipe import PipelineModule

            specs = llama_pipeline_specs(model_config, init_seed, parallel.activation_checkpoint, parallel.ac_every)
            model = PipelineModule(layers=specs, num_stages=layout.pp, loss_fn=loss_fn,
                                   partition_method=config.deepspeed.partition_method)
        else:
            model = build_model(deepspeed, build, init_fn, ds_config, rank)
            apply_activation_checkpointing(list(model.layers), parallel.activation_checkpoint, parallel.ac_every)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, config=ds_config, model_parameters=[p for p in model.parameters() if p.requires_grad],
            lr_scheduler=scheduler_factory, dist_init_required=False)
        set_group_timeouts(train_timeout_s)
        hpz = self.engine.zero_hpz_partition_size() if self.engine.zero_optimization_stage() == 3 else 1
        log.info("DeepSpeed engine: ZeRO stage %d, %d data-parallel x %d pipeline%s, %d micro-batches of %d",
                 self.engine.zero_optimization_stage(), layout.dp, layout.pp,
                 f", hpZ shard groups of {hpz}" if hpz > 1 else "", accumulation, micro_batch)

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Forward, backward and optimizer step of one global step; returns (local loss, grad norm)."""
        if self.pipeline:
            micro = list(zip(inputs.chunk(self.accumulation), targets.chunk(self.accumulation)))
            loss = self.engine.train_batch(data_iter=iter(micro)).detach().float()
            return loss, self._grad_norm(None)
        total = torch.zeros((), device=inputs.device)
        fallback = None
        for index, (chunk_in, chunk_out) in enumerate(zip(inputs.chunk(self.accumulation),
                                                          targets.chunk(self.accumulation))):
            loss = self.loss_fn(self.engine(chunk_in), chunk_out)
            self.engine.backward(loss)  # scaled by 1/accumulation inside; all-reduced at the boundary
            if index == self.accumulation - 1 and self.engine.zero_optimization_stage() == 0:
                # Without ZeRO, DeepSpeed keeps no global norm: take it from the reduced gradients.
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                fallback = float(torch.nn.utils.get_total_norm(grads)) if grads else None
            self.engine.step()
            total += loss.detach().float() / self.accumulation
        return total, self._grad_norm(fallback)

    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward only, in eval mode: this replica's mean loss (the pipeline engine's is already
        averaged over the replicas, as its training loss is)."""
        micro = list(zip(inputs.chunk(self.accumulation), targets.chunk(self.accumulation)))
        if self.pipeline:
            return self.engine.eval_batch(data_iter=iter(micro)).detach().float()
        self.engine.eval()
        try:
            with torch.no_grad():
                return sum(self.loss_fn(self.engine(chunk_in), chunk_out).float() for chunk_in, chunk_out in micro) \
                    / self.accumulation
        finally:
            self.engine.train()

    def _grad_norm(self, fallback: float | None) -> float:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = fallback
        return float(norm) if norm is not None else float("nan")  # NaN: not kept (ZeRO-0 pipeline)

    def global_loss(self, local_loss: torch.Tensor) -> float:
        return self.global_losses(local_loss.reshape(1))[0]

    def global_losses(self, local_losses: torch.Tensor) -> list[float]:
        """Several steps' global losses (a vector of local ones) in one all-reduce."""
        if self.pipeline:
            return local_losses.tolist()  # the pipeline engine already averaged over replicas
        total = local_losses.detach().clone()
        if dist.get_world_size() > 1:
            dist.all_reduce(total)
        return [value / self.layout.dp for value in total.tolist()]

    def last_lr(self) -> float:
        return self.engine.get_lr()[0]
