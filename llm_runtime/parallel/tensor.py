"""Tensor parallelism for the bundled Llama blocks (Megatron-style column/row splits).

Attention: wq/wk/wv split by heads (column-wise), wo row-wise; SwiGLU: w1/w3 column-wise,
w2 row-wise. Without sequence parallelism each sub-layer all-reduces its output and the
embeddings, norms and head stay replicated; with it (the default) the norms work on a
slice of the sequence and the embeddings and head are split too.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

__all__ = ["apply_tensor_parallel", "check_tensor_parallel", "llama_root_tp_plan", "llama_tp_plan"]


def llama_tp_plan(sequence_parallel: bool = True) -> dict[str, object]:
    """Per-block plan (module path inside a TransformerBlock -> ParallelStyle).

    With sequence parallelism the residual stream between blocks is split along the
    sequence: the norms run on their slice, attention and the MLP all-gather their input and
    reduce-scatter their output instead of an all-reduce (same traffic, 1/tp activations).
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    block_out = {"output_layouts": Shard(1)} if sequence_parallel else {}
    plan: dict[str, object] = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(**block_out),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(**block_out),
    }
    if sequence_parallel:
        plan.update({
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                            desired_input_layouts=(Replicate(), None, None), use_local_output=True),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                               use_local_output=True),
        })
    return plan


def llama_root_tp_plan(sequence_parallel: bool = True) -> dict[str, object]:
    """Plan for the modules around the blocks: only needed to enter and leave sequence parallelism."""
    if not sequence_parallel:
        return {}
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    return {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }


def check_tensor_parallel(tp: int, *, heads: int, kv_heads: int, ffn_hidden: int, vocab: int = 0,
                          seq_len: int = 0, sequence_parallel: bool = False) -> None:
    """A tp size the model cannot split is a ValueError naming both numbers."""
    if tp == 1:
        return
    sizes = [("model.heads", heads), ("key/value heads", kv_heads), ("the FFN hidden size", ffn_hidden)]
    if sequence_parallel:
        sizes += [("the vocabulary", vocab), ("train.seq_len (sequence parallel)", seq_len)]
    for what, size in sizes:
        if size % tp:
            raise ValueError(f"parallel.tp={tp} must divide {what} ({size})")


def apply_tensor_parallel(parts: list[nn.Module], blocks: list[nn.Module], tp_mesh, plan: Mapping[str, object],
                          root_plan: Mapping[str, object] | None = None) -> None:
    """Parallelize every block with ``plan``, and each model part with the modules of
    ``root_plan`` it holds (a pipeline stage may lack the embeddings or the head)."""
    from torch.distributed.tensor.parallel import parallelize_module

    for part in parts:
        present = {name: style for name, style in (root_plan or {}).items() if getattr(part, name, None) is not None}
        if present:
            parallelize_module(part, tp_mesh, present)
    for block in blocks:
        parallelize_module(block, tp_mesh, dict(plan))
