"""Tensor parallelism for the bundled Llama blocks (Megatron-style column/row splits).

Attention: wq/wk/wv split by heads (column-wise), wo row-wise; SwiGLU: w1/w3 column-wise,
w2 row-wise. Each block then needs one all-reduce in forward per sub-layer. Embeddings,
norms and the output projection stay replicated (their gradients are identical on every
tensor-parallel rank because the row-wise layers all-reduce the activations they feed).
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

__all__ = ["apply_tensor_parallel", "check_tensor_parallel", "llama_tp_plan"]


def llama_tp_plan() -> dict[str, object]:
    """Per-block plan (module path inside a TransformerBlock -> ParallelStyle)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }


def check_tensor_parallel(tp: int, *, heads: int, kv_heads: int, ffn_hidden: int) -> None:
    """A tp size the model cannot split is a ValueError naming both numbers."""
    if tp == 1:
        return
    for what, size in (("model.heads", heads), ("key/value heads", kv_heads), ("the FFN hidden size", ffn_hidden)):
        if size % tp:
            raise ValueError(f"parallel.tp={tp} must divide {what} ({size})")


def apply_tensor_parallel(blocks: list[nn.Module], tp_mesh, plan: Mapping[str, object]) -> None:
    """Parallelize every block in place with ``plan`` on the 1-D tensor-parallel mesh."""
    from torch.distributed.tensor.parallel import parallelize_module

    for block in blocks:
        parallelize_module(block, tp_mesh, dict(plan))
