"""Small payloads from every rank over a process group, as bytes (no pickles): JSON records and
safetensors blobs. Used by checkpoints (reports, node layout), the final export and the health check."""
from __future__ import annotations

import json

import torch
import torch.distributed as dist

__all__ = ["gather_bytes", "gather_json"]


def gather_bytes(payload: bytes, group, dst: int | None = None) -> list[bytes]:
    """Every rank's ``payload`` in rank order: on all ranks, or (``dst``) only on that rank (others get [])."""
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(payload)], dtype=torch.int64), group=group)
    longest = max(int(s.item()) for s in sizes)
    buffer = torch.zeros(longest, dtype=torch.uint8)
    if payload:
        buffer[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    receiving = dst is None or dist.get_rank(group) == dst
    buffers = [torch.zeros(longest, dtype=torch.uint8) for _ in range(world)] if receiving else None
    if dst is None:
        dist.all_gather(buffers, buffer, group=group)
    else:
        dist.gather(buffer, gather_list=buffers, dst=dst, group=group)
    return [b[:int(s.item())].numpy().tobytes() for b, s in zip(buffers, sizes)] if receiving else []


def gather_json(value, group) -> list:
    """Every rank's JSON-able ``value``, in rank order (bytes over the group; no pickles)."""
    return [json.loads(raw) for raw in gather_bytes(json.dumps(value).encode(), group)]
