"""Models built on the meta device: only this rank's shards are ever allocated.

``parallelize`` applies the layout (pipeline split, TP, FSDP2) to a model whose parameters are
still on the meta device; :func:`materialize` then allocates each rank's shards and fills them.
With an ``init_fn(name, tensor)`` each parameter (and each buffer still on meta) is drawn in full
on the CPU, one at a time, and sliced to this rank's shard (DTensor's ``distribute_tensor`` with
no source rank: every rank slices its own copy, no collective). The weights then depend neither on
the layout nor on the number of ranks, and the peak extra memory is about one full parameter per
rank (its slice is a view). Every rank draws every parameter of its stages in full: CPU time grows
with the stage's size, not the shard's. Without
an ``init_fn``, each module's own ``reset_parameters()`` runs on its local shards: quick, but the
values depend on the layout (and on each rank's RNG), which the log says.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["InitFn", "has_meta", "materialize"]

log = logging.getLogger(__name__)

InitFn = Callable[[str, torch.Tensor], None]
"""Fills ``tensor`` (full shape, on the CPU) in place for the parameter or buffer ``name``
(its name in the unsplit, unwrapped model)."""


def has_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is still on the meta device."""
    return any(t.is_meta for _, t in _named_tensors(module))


def materialize(parts: Sequence[nn.Module], device: torch.device, init_fn: InitFn | None) -> None:
    """Allocate and fill this rank's parameters and buffers of every part (in place). Tensors that
    were already real (a partly meta model, buffers computed at construction) keep their values."""
    for part in parts:
        ties = _ties(part)
        real = {name: _local(tensor).detach().clone() for name, tensor in _named_tensors(part) if not tensor.is_meta}
        part.to_empty(device=device)
        _retie(part, ties)
        with torch.no_grad():
            for name, tensor in _named_tensors(part):
                if name in real:
                    _local(tensor).copy_(real[name])
                elif init_fn is not None:
                    _fill(tensor, name, init_fn)
    if init_fn is None:
        _reset_parameters(parts)


def _named_tensors(module: nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _ties(module: nn.Module) -> list[tuple[str, str]]:
    """(alias, first name) of each parameter reachable under two names (tied embeddings)."""
    seen: dict[int, str] = {}
    ties = []
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            ties.append((name, seen[id(param)]))
        seen.setdefault(id(param), name)
    return ties


def _retie(module: nn.Module, ties: list[tuple[str, str]]) -> None:
    """``to_empty`` gives each module a parameter of its own (plain tensors are replaced, DTensors
    swapped in place): point each alias at its first name's parameter again."""
    for alias, name in ties:
        owner, _, leaf = alias.rpartition(".")
        param = module.get_parameter(name)
        if module.get_parameter(alias) is not param:
            setattr(module.get_submodule(owner), leaf, param)


def _fill(tensor: torch.Tensor, name: str, init_fn: InitFn) -> None:
    """Draw ``name`` in full on the CPU and keep this rank's slice of it (or, for an init_fn with
    ``fill_local``, read only this rank's block: see _fill_block)."""
    if hasattr(tensor, "device_mesh") and _fill_block(tensor, name, init_fn):
        return
    full = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
    init_fn(name, full)
    if hasattr(tensor, "device_mesh"):  # a DTensor (FSDP2 / TP): this rank's shard of the full tensor
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None).to_local()
        tensor.to_local().copy_(local)
    else:
        tensor.copy_(full)


def _fill_block(tensor, name: str, init_fn: InitFn) -> bool:
    """An init_fn that reads stored weights (``fill_local(name, local, offsets)``) fills just this
    rank's block, when the shard is one contiguous block of the full tensor (Shard / Replicate on
    every mesh axis; FSDP over TP's strided shards are not, and take the full path)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    fill_local = getattr(init_fn, "fill_local", None)
    if fill_local is None or any(type(p) not in (Shard, Replicate) for p in tensor.placements):
        return False
    local = tensor.to_local()
    shape, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    if tuple(shape) != tuple(local.shape):
        return False
    fill_local(name, local, tuple(offsets))
    return True


def _reset_parameters(parts: Sequence[nn.Module]) -> None:
    log.warning("parallelize: a meta-device model without init_fn is initialised by each module's "
                "reset_parameters() on this rank's shards: its weights depend on the parallel layout "
                "(pass init_fn(name, tensor) for weights that do not)")
    for part in parts:
        for module in part.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                with torch.no_grad():
                    reset()
