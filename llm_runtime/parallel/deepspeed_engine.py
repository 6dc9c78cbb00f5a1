"""The DeepSpeed backend: the engine on the runtime's own process group, same training-step API.

DeepSpeed's launcher is not involved: ``llm-runtime launch`` (SageMaker, torchrun, MPI) starts
the workers, ``llm_runtime.init`` makes the process group with its timeouts, and DeepSpeed's
communication layer adopts that group.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .fsdp import apply_activation_checkpointing
from .deepspeed_config import DeepSpeedLayout, deepspeed_config, merge_user_config, read_user_config

__all__ = ["DeepSpeedModel", "import_deepspeed", "llama_pipeline_layers"]

log = logging.getLogger(__name__)
INSTALL_HINT = "parallel.backend=deepspeed needs DeepSpeed: pip install 'llm-runtime[deepspeed]'"


def import_deepspeed(device_type: str):
    """DeepSpeed, told which accelerator to use before it guesses (ImportError names the extra)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device_type == "cuda" else "cpu")
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from None
    return deepspeed


def mics_available() -> bool:
    try:
        from deepspeed.runtime import config as ds_config
    except ImportError:
        return False
    return "mics_shard_size" not in getattr(ds_config, "_REMOVED_ZERO_CONFIG_KEYS", {})


class _Embed(nn.Module):
    def __init__(self, embeddings: nn.Embedding):
        super().__init__()
        self.tok_embeddings = embeddings

    def forward(self, tokens):
        return self.tok_embeddings(tokens)


class _Block(nn.Module):
    def __init__(self, block: nn.Module, rotary: nn.Module):
        super().__init__()
        self.block = block
        self.rotary = rotary

    def forward(self, hidden):
        cos, sin = self.rotary(self.rotary.max_seq_len)
        return self.block(hidden, cos, sin)


class _Head(nn.Module):
    def __init__(self, norm: nn.Module, output: nn.Module):
        super().__init__()
        self.norm = norm
        self.output = output

    def forward(self, hidden):
        return self.output(self.norm(hidden))


def llama_pipeline_layers(model) -> list[nn.Module]:
    """The bundled Llama as a flat layer list for DeepSpeed's PipelineModule."""
    return [_Embed(model.tok_embeddings), *(_Block(block, model.rotary) for block in model.layers),
            _Head(model.norm, model.output)]


class DeepSpeedModel:
    """A DeepSpeed engine (ZeRO 0-3, hpZ, or the pipeline engine) behind the trainer's step API."""

    def __init__(self, model: nn.Module, config, layout: DeepSpeedLayout, *, rank: int, device: torch.device,
                 micro_batch: int, accumulation: int, scheduler_factory: Callable, loss_fn: Callable,
                 train_timeout_s: float):
        deepspeed = import_deepspeed(device.type)
        from datetime import timedelta

        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False,
                                   dist_init_required=False, timeout=timedelta(seconds=train_timeout_s))
        ours = deepspeed_config(config, layout, micro_batch=micro_batch, accumulation=accumulation,
                                device_type=device.type, mics_available=mics_available())
        if config.deepspeed.config:
            ours, conflicts = merge_user_config(ours, read_user_config(config.deepspeed.config))
            for line in conflicts:
                log.warning("DeepSpeed config: %s", line)
        self.layout, self.rank, self.device = layout, rank, device
        self.accumulation = accumulation
        self.pipeline = layout.pp > 1
        parallel = config.parallel
        if self.pipeline:
            from deepspeed.pipe import PipelineModule

            # Layers are the embedding, each block and the head; checkpoint every k-th of them.
            interval = {"none": 0, "full": 1, "every": parallel.ac_every}[parallel.activation_checkpoint]
            model = PipelineModule(layers=llama_pipeline_layers(model), num_stages=layout.pp, loss_fn=loss_fn,
                                   partition_method=config.deepspeed.partition_method,
                                   activation_checkpoint_interval=interval)
        else:
            apply_activation_checkpointing(list(model.layers), parallel.activation_checkpoint, parallel.ac_every)
        self.loss_fn = loss_fn
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, config=ours, model_parameters=[p for p in model.parameters() if p.requires_grad],
            lr_scheduler=scheduler_factory, dist_init_required=False)
        self.ds_config = ours
        log.info("DeepSpeed engine: ZeRO stage %d, %d data-parallel x %d pipeline%s", layout.zero_stage,
                 layout.dp, layout.pp,
                 f", shard groups of {layout.shard_group_size} ({layout.shard_mode})" if layout.shard_group_size else "")

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, accumulation: int = 1) -> torch.Tensor:
        """Forward, backward and the optimizer step (DeepSpeed steps at the accumulation boundary)."""
        if self.pipeline:
            micro = list(zip(inputs.chunk(self.accumulation), targets.chunk(self.accumulation)))
            return self.engine.train_batch(data_iter=iter(micro)).detach().float()
        total = torch.zeros((), device=inputs.device)
        for chunk_in, chunk_out in zip(inputs.chunk(self.accumulation), targets.chunk(self.accumulation)):
            loss = self.loss_fn(self.engine(chunk_in), chunk_out)
            self.engine.backward(loss)  # scaled by 1/accumulation inside
            self.engine.step()
            total += loss.detach().float() / self.accumulation
        return total

    def grad_norm(self) -> float:
        """DeepSpeed's global gradient norm (NaN where it keeps none, e.g. the ZeRO-0 pipeline engine)."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def global_loss(self, local_loss: torch.Tensor) -> float:
        if self.pipeline:
            return local_loss.item()  # the pipeline engine already averaged over replicas
        total = local_loss.detach().clone()
        if dist.get_world_size() > 1:
            dist.all_reduce(total)
        return total.item() / self.layout.dp

    def last_lr(self) -> float:
        return self.engine.get_lr()[0]
