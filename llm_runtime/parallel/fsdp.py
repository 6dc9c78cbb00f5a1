"""Data parallelism (FSDP2 / HSDP, or DDP for plain replication), activation checkpointing, compile."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["apply_activation_checkpointing", "apply_compile", "apply_fsdp", "mixed_precision_policy"]

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def mixed_precision_policy(param: str, reduce: str, device_type: str):
    """FSDP2's policy; on CPU everything runs in fp32 (bf16 matmuls there are slow and inexact)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device_type == "cpu":
        param = reduce = "fp32"  # parallelize() prints the one-line notice
    if param == reduce == "fp32":
        return MixedPrecisionPolicy()  # the parameters' own dtype: nothing to cast
    return MixedPrecisionPolicy(param_dtype=_DTYPES[param], reduce_dtype=_DTYPES[reduce])


def apply_activation_checkpointing(blocks: Sequence[nn.Module], mode: str, every: int = 2) -> int:
    """Recompute block activations in backward: ``full`` = every block, ``every`` = every k-th.

    The block's forward is wrapped in place, so parameter names (and checkpoints) do not change.
    Returns how many blocks were wrapped.
    """
    if mode == "none":
        return 0
    if mode == "every" and every < 1:
        raise ValueError(f"parallel.ac_every must be >= 1, got {every}")
    wrapped = 0
    for index, block in enumerate(blocks):
        if mode == "full" or index % every == 0:
            inner = block.forward

            def forward(*args, _inner=inner, **kwargs):
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            block.forward = forward
            wrapped += 1
    return wrapped


def apply_compile(blocks: Sequence[nn.Module]) -> None:
    for block in blocks:
        block.compile()


def apply_fsdp(parts: Sequence[nn.Module], blocks_per_part: Sequence[Sequence[nn.Module]], dp_mesh,
               policy, *, reshard_after_forward: bool = True) -> None:
    """fully_shard each transformer block, then each part (embeddings, norm, head with it).

    ``dp_mesh`` is 1-D (FSDP over the shard group) or 2-D (replicate, shard) for HSDP:
    parameters are sharded inside a shard group and replicated across groups, as MiCS does.
    """
    from torch.distributed.fsdp import fully_shard

    for part, blocks in zip(parts, blocks_per_part):
        for block in blocks:
            fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        fully_shard(part, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
