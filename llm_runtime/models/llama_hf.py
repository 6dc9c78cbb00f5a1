"""The bundled Llama as a Hugging Face ``LlamaForCausalLM`` checkpoint: config, names, rotary.

Pure functions (no transformers import): the exporter writes what ``from_pretrained`` reads.
The bundled attention rotates adjacent pairs of each head (Meta's original convention); HF's
Llama rotates the first half of each head against the second. The same model in HF's
convention has the rows of ``wq`` and ``wk`` permuted within each head: pair ``j``'s two rows
(``2j``, ``2j+1``) go to ``j`` and ``j + head_dim/2``. Nothing else changes.
"""
from __future__ import annotations

import torch

from .llama import LlamaConfig

__all__ = ["from_hf", "hf_config", "hf_name", "to_hf"]

_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
          "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
          "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
          "ffn_norm": "post_attention_layernorm"}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config(config: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """``config.json`` of the equivalent ``LlamaForCausalLM``."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.dim, "intermediate_size": config.ffn_hidden_dim,
        "num_hidden_layers": config.layers, "num_attention_heads": config.heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "initializer_range": 0.02, "dtype": DTYPE_NAMES.get(dtype, "float32"),
        "torch_dtype": DTYPE_NAMES.get(dtype, "float32"),  # the key transformers before 4.56 reads
    }


def hf_name(name: str) -> str:
    """``layers.3.attention.wq.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".", 2)
    module, _, leaf = parts[-1].rpartition(".")
    if len(parts) != 3 or parts[0] != "layers" or module not in _BLOCK:
        raise KeyError(f"{name!r} is not a parameter of the bundled Llama")
    return f"model.layers.{parts[1]}.{_BLOCK[module]}.{leaf}"


def _heads_of(name: str, config: LlamaConfig) -> int:
    if name.endswith("attention.wq.weight"):
        return config.heads
    if name.endswith("attention.wk.weight"):
        return config.num_kv_heads
    return 0


def to_hf(name: str, tensor: torch.Tensor, config: LlamaConfig) -> tuple[str, torch.Tensor]:
    """One full parameter of the bundled model as (HF name, HF tensor)."""
    heads = _heads_of(name, config)
    if heads:  # rows of each head: pairs (2j, 2j+1) -> halves (j, j + D/2)
        rows, cols = tensor.shape
        tensor = tensor.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    return hf_name(name), tensor


def from_hf(name: str, tensor: torch.Tensor, config: LlamaConfig) -> tuple[str, torch.Tensor]:
    """The inverse of :func:`to_hf`: an HF ``LlamaForCausalLM`` tensor as the bundled model's."""
    if name in _TOP_BACK:
        return _TOP_BACK[name], tensor
    parts = name.split(".", 3)
    module, _, leaf = parts[-1].rpartition(".")
    if len(parts) != 4 or parts[:2] != ["model", "layers"] or module not in _BLOCK_BACK:
        raise KeyError(f"{name!r} is not a tensor of a LlamaForCausalLM checkpoint")
    ours = f"layers.{parts[2]}.{_BLOCK_BACK[module]}.{leaf}"
    heads = _heads_of(ours, config)
    if heads:
        rows, cols = tensor.shape
        tensor = tensor.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)
    return ours, tensor
