"""The built-in trainer (``llm-runtime train``): the bundled Llama-style model on bundled text.

The global batch is fixed in sequences per step; each data-parallel replica takes its slice
and accumulates micro-batches, so the same seed gives the same loss curve for any number
of processes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .config import Config, ConfigError, TrainConfig
from .models import ByteTokenizer, Llama, LlamaConfig, bundled_text
from .runtime import Runtime, init

__all__ = ["batch_layout", "check", "global_batch_starts", "lr_factor", "main", "run"]

log = logging.getLogger(__name__)


def batch_layout(train: TrainConfig, data_parallel_size: int) -> tuple[int, int]:
    """(micro_batch_size, accumulation_steps) per replica; a batch that does not divide is an error."""
    batch, replicas = train.batch_size, data_parallel_size
    if batch < 1:
        raise ConfigError(f"train.batch_size must be >= 1, got {batch}")
    if batch % replicas:
        raise ConfigError(
            f"train.batch_size={batch} (global, in sequences) does not divide over "
            f"{replicas} data-parallel replicas"
        )
    per_replica = batch // replicas
    micro = train.micro_batch_size or per_replica
    if micro < 1 or per_replica % micro:
        raise ConfigError(
            f"train.micro_batch_size={micro} does not divide the per-replica batch of "
            f"{per_replica} (train.batch_size={batch} over {replicas} replicas)"
        )
    return micro, per_replica // micro


def global_batch_starts(seed: int, step: int, batch_size: int, num_tokens: int, seq_len: int) -> np.ndarray:
    """Start offsets of the step's global batch: a function of (seed, step) only."""
    if num_tokens < seq_len + 2:
        raise ConfigError(f"train.seq_len={seq_len} is longer than the text ({num_tokens} tokens)")
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, num_tokens - seq_len - 1, size=batch_size)


def lr_factor(step: int, train: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to ``min_lr_ratio`` at the last step."""
    if train.warmup_steps and step <= train.warmup_steps:
        return step / train.warmup_steps
    if train.lr_schedule == "constant":
        return 1.0
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def check(config: Config, data_parallel_size: int) -> LlamaConfig:
    """Every config error the job would hit, raised as ConfigError before any worker starts."""
    train = config.train
    for key in ("steps", "seq_len", "log_every"):
        if getattr(train, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(train, key)}")
    batch_layout(train, data_parallel_size)
    model_config = LlamaConfig(dim=config.model.dim, layers=config.model.layers,
                               heads=config.model.heads, max_seq_len=train.seq_len)
    try:
        model_config.validate()
    except ValueError as err:
        raise ConfigError(f"[model] {err}") from None
    text_bytes = len(bundled_text().encode())
    if text_bytes < train.seq_len + 2:
        raise ConfigError(f"train.seq_len={train.seq_len} is longer than the text ({text_bytes} tokens)")
    return model_config


def run(rt: Runtime) -> dict[str, float]:
    """Train on this worker; returns the final metrics (identical on every rank)."""
    config, train = rt.config, rt.config.train
    model_config = check(config, rt.world_size)
    micro, accumulation = batch_layout(train, rt.world_size)
    tokens = torch.from_numpy(ByteTokenizer().encode_array(bundled_text()).astype(np.int64))
    model = Llama(model_config)
    model.init_weights(torch.Generator().manual_seed(train.seed))
    model.to(rt.device)
    wrapped = DistributedDataParallel(model) if rt.world_size > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=(0.9, 0.95),
                                  weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s + 1, train))
    offsets = torch.arange(train.seq_len + 1)
    log.info("model %.2fM parameters, global batch %d x %d tokens, %d replicas x %d micro-batches of %d",
             model.num_parameters() / 1e6, train.batch_size, train.seq_len, rt.world_size, accumulation, micro)

    metrics = {"loss": float("nan"), "tokens_per_s": 0.0, "grad_norm": 0.0}
    window_start, window_steps = time.perf_counter(), 0
    for step in range(1, train.steps + 1):
        starts = global_batch_starts(train.seed, step, train.batch_size, len(tokens), train.seq_len)
        mine = torch.from_numpy(starts[rt.rank * micro * accumulation:(rt.rank + 1) * micro * accumulation])
        local_loss = torch.zeros((), device=rt.device)
        for index in range(accumulation):
            rows = tokens[mine[index * micro:(index + 1) * micro, None] + offsets].to(rt.device)
            last = index == accumulation - 1
            context = wrapped.no_sync() if (rt.world_size > 1 and not last) else contextlib.nullcontext()
            with context:
                logits = wrapped(rows[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()) / accumulation
                loss.backward()
            local_loss += loss.detach()
        if train.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        window_steps += 1
        if step % train.log_every == 0 or step == train.steps:
            # DDP already averaged the gradients (so the norm is global); the loss is averaged here.
            if rt.world_size > 1:
                dist.all_reduce(local_loss)  # SUM: gloo gained AVG only in recent torch
                local_loss /= rt.world_size
            elapsed = time.perf_counter() - window_start
            metrics = {
                "loss": local_loss.item(),
                "grad_norm": float(grad_norm),
                "tokens_per_s": window_steps * train.batch_size * train.seq_len / elapsed,
            }
            lr = scheduler.get_last_lr()[0]
            log.info("step=%d loss=%.4f grad_norm=%.4f lr=%.3e tokens_per_s=%.0f", step, metrics["loss"],
                     metrics["grad_norm"], lr, metrics["tokens_per_s"])
            if rt.is_main and train.metrics_path:
                with open(train.metrics_path, "a") as sink:
                    sink.write(json.dumps({"step": step, "lr": lr, **metrics}) + "\n")
            window_start, window_steps = time.perf_counter(), 0
    log.info("done steps=%d final_loss=%.4f", train.steps, metrics["loss"])
    return metrics


def main(config: Config) -> int:
    """Entry for a worker process: init, train, shut down."""
    rt = init(config)
    try:
        run(rt)
    except BaseException:
        rt.shutdown(barrier=False)
        raise
    rt.shutdown()
    return 0
