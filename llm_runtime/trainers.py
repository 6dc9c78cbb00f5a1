"""The built-in trainer's two backends behind one interface (step, global_loss, last_lr,
checkpoint_state): torch.distributed through ``rt.parallelize``, and DeepSpeed's engine."""
from __future__ import annotations

import math

import torch

from .config import Config, TrainConfig
from .parallel.batching import batching
from .parallel.tensor import llama_root_tp_plan, llama_tp_plan
from .runtime import Runtime

__all__ = ["DeepSpeedTrainer", "TorchTrainer", "deepspeed_batching", "deepspeed_trainer", "lr_factor"]


def lr_factor(step: int, train: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to ``min_lr_ratio`` at the last step."""
    if train.warmup_steps and step <= train.warmup_steps:
        return step / train.warmup_steps
    if train.lr_schedule == "constant":
        return 1.0
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class TorchTrainer:
    """The torch.distributed backend: rt.parallelize, AdamW, the LR schedule, global-norm clipping.

    One AdamW (and schedule) per model part: the same update as one optimizer over all of them,
    and each part's optimizer state is saved under the unsplit model's parameter names.
    """

    def __init__(self, rt: Runtime, model, init_fn=None, options: dict | None = None):
        train, sequence_parallel = rt.config.train, rt.config.parallel.sequence_parallel
        self.train = train
        if options is None:  # the bundled Llama's plans
            options = dict(tp_plan=llama_tp_plan(sequence_parallel), root_tp_plan=llama_root_tp_plan(sequence_parallel))
        self.model = rt.parallelize(model, init_fn=init_fn, **options)
        self.optimizers = [torch.optim.AdamW(list(part.parameters()), lr=train.lr, betas=(0.9, 0.95),
                                             weight_decay=train.weight_decay) for part in self.model.parts]
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s + 1, train))
                           for optimizer in self.optimizers]

    def step(self, inputs, targets, accumulation: int) -> tuple[torch.Tensor, torch.Tensor]:
        local_loss = self.model.train_step(inputs, targets, accumulation)
        grad_norm = self.model.clip_grad_norm_(self.train.grad_clip)
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        return local_loss, grad_norm

    def eval_loss(self, inputs, targets, accumulation: int) -> torch.Tensor:
        return self.model.eval_loss(inputs, targets, accumulation)

    def global_loss(self, local_loss) -> float:
        return self.model.global_loss(local_loss)

    def global_losses(self, local_losses) -> list[float]:
        return self.model.global_losses(local_losses)

    def last_lr(self) -> float:
        return self.schedulers[0].get_last_lr()[0]

    def checkpoint_state(self):
        from .checkpoint.state import TorchState

        return TorchState(self.model.parts, self.optimizers, self.schedulers)


class DeepSpeedTrainer:
    def __init__(self, engine, convert_timeout_s: float):
        self.engine, self.convert_timeout_s = engine, convert_timeout_s

    def step(self, inputs, targets, accumulation: int) -> tuple[torch.Tensor, float]:
        return self.engine.train_step(inputs, targets)  # the engine has its own micro-batching

    def eval_loss(self, inputs, targets, accumulation: int) -> torch.Tensor:
        return self.engine.eval_loss(inputs, targets)  # the engine has its own micro-batching

    def global_loss(self, local_loss) -> float:
        return self.engine.global_loss(local_loss)

    def global_losses(self, local_losses) -> list[float]:
        return self.engine.global_losses(local_losses)

    def last_lr(self) -> float:
        return self.engine.last_lr()

    def checkpoint_state(self):
        from .checkpoint.state import DeepSpeedState

        return DeepSpeedState(self.engine.engine, self.convert_timeout_s)


def deepspeed_batching(config: Config, dp: int, pp: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) for DeepSpeed: the same rule as the fsdp backend
    (the pipeline's micro-batches are ``parallel.microbatches``, default one per stage)."""
    split = batching(config.train, config.parallel, dp, pp, schedule_rules=False)
    return split.micro_batch, split.count


def deepspeed_trainer(rt: Runtime, build, init_fn, model_config):
    """(the model as built on this rank, the trainer): DeepSpeedModel's arguments from the config."""
    from .parallel.api import cross_entropy
    from .parallel.deepspeed_config import deepspeed_layout
    from .parallel.deepspeed_engine import DeepSpeedModel

    config = rt.config
    layout = deepspeed_layout(config.parallel, rt.world_size)
    micro, accumulation = deepspeed_batching(config, layout.dp, layout.pp)
    engine = DeepSpeedModel(
        build, init_fn, config, layout, rank=rt.rank, local_rank=rt.local_rank, device=rt.device,
        micro_batch=micro, accumulation=accumulation,
        scheduler_factory=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s + 1, config.train)),
        loss_fn=cross_entropy, train_timeout_s=config.comm.train_timeout_s, init_seed=config.train.seed,
        model_config=model_config)
    return engine.engine.module, DeepSpeedTrainer(engine, config.checkpoint.upload_timeout_s)
