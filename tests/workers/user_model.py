"""A user's own model parallelized by rt.parallelize, checked against an unparallelized copy.

The model is not the bundled Llama: a stack of residual MLP blocks with its own tensor-parallel
plan and its own first/last-stage modules. Every rank trains its parallel copy for 3 steps;
rank 0 also trains a plain copy on the whole batch and writes both loss curves. With
USER_MODEL_INIT=meta the parallel copy is built on the meta device and materialised by an init_fn.
usage: user_model.py OUT_DIR
"""
import json
import os
import sys
import zlib

import torch
from torch import nn

import llm_runtime
from side_by_side import side_by_side  # beside this script (its directory is on sys.path)


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, hidden):
        return hidden + self.down(torch.relu(self.up(hidden)))


class Stack(nn.Module):
    def __init__(self, vocab=32, dim=16, depth=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        hidden = self.embed(tokens) if self.embed is not None else tokens
        for block in (self.layers.values() if isinstance(self.layers, nn.ModuleDict) else self.layers):
            hidden = block(hidden)
        return self.head(hidden) if self.head is not None else hidden


def tp_plan():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {"up": ColwiseParallel(), "down": RowwiseParallel()}


def init_fn(name, tensor):
    """A layout-independent init: each parameter from a generator seeded by its name."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)


def main():
    out = sys.argv[1]
    rt = llm_runtime.init()
    torch.manual_seed(100 + rt.rank)  # different on every rank: parallelize must broadcast rank 0's
    if os.environ.get("USER_MODEL_INIT") == "meta":  # built on meta: each rank materialises its shards
        with torch.device("meta"):
            model = Stack()
        reference = Stack()
        with torch.no_grad():
            for name, param in reference.named_parameters():
                init_fn(name, param)
        options = {"init_fn": init_fn}
    else:
        model = Stack()
        reference = Stack()
        reference.load_state_dict(model.state_dict())
        options = {}
    parallel = rt.parallelize(model, tp_plan=tp_plan(), first_only=("embed",), last_only=("head",), **options)
    assert not any(p.is_meta for p in parallel.parameters())
    losses, ref_losses = side_by_side(rt, parallel, reference, vocab=32, steps=3, lr=0.1)
    if rt.rank == 0:
        with open(os.path.join(out, "losses.json"), "w") as sink:
            json.dump({"parallel": losses, "reference": ref_losses, "layout": rt.dims.describe()}, sink)
    rt.shutdown()


if __name__ == "__main__":
    main()
