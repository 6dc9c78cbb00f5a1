"""A small Llama-style decoder-only transformer in plain torch.

It exists so the runtime's parallelism layers have a real model to shard,
pipeline and train.  Attribute names (``layers.N.attention.wq``,
``layers.N.feed_forward.w1``, ``tok_embeddings``, ``norm``, ``output``) are
part of the contract: tensor-parallel plans and pipeline splits refer to them,
so they must not change.

Two choices make the parallel wrappers work without touching this file:

* attention infers its local head count from the projection outputs, so a
  tensor-parallel shard that holds a slice of the heads runs unchanged;
* :meth:`Llama.forward` skips ``tok_embeddings``, ``norm`` and ``output`` when
  they are ``None``, so a pipeline stage can keep only its own part.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as functional
from torch import nn

from .layers import RMSNorm, RotaryEmbedding, apply_rotary

__all__ = [
    "Attention",
    "FeedForward",
    "Llama",
    "LlamaConfig",
    "RMSNorm",
    "RotaryEmbedding",
    "TransformerBlock",
    "apply_rotary",
]

#: Standard deviation of every weight at init (GPT-2 / Llama practice).
INIT_STD = 0.02

#: Seed used by :meth:`Llama.init_weights` when no generator is given.
DEFAULT_INIT_SEED = 0


@dataclass
class LlamaConfig:
    """Shape of a :class:`Llama`; the defaults give a model that trains on a CPU."""

    vocab_size: int = 256
    dim: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int | None = None
    """Key/value heads; ``None`` means ``heads``.  Fewer gives grouped-query attention."""
    ffn_hidden: int | None = None
    """SwiGLU hidden size; ``None`` derives it like Llama from ``dim`` and ``multiple_of``."""
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    multiple_of: int = 32
    """The derived ``ffn_hidden`` is rounded up to a multiple of this (kernel-friendly sizes)."""

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads after resolving the ``None`` default."""
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size: ``ffn_hidden`` or Llama's ``8*dim/3`` rounded up.

        Two thirds of the usual ``4*dim`` keeps the parameter count of a
        three-matrix SwiGLU equal to a two-matrix MLP.
        """
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(8 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def validate(self) -> LlamaConfig:
        """Raise ``ValueError`` naming the first field that cannot build a model.

        Returns the config itself so callers can chain ``config.validate()``.
        """
        positive_ints = {
            "vocab_size": self.vocab_size,
            "dim": self.dim,
            "layers": self.layers,
            "heads": self.heads,
            "max_seq_len": self.max_seq_len,
            "multiple_of": self.multiple_of,
        }
        if self.kv_heads is not None:
            positive_ints["kv_heads"] = self.kv_heads
        if self.ffn_hidden is not None:
            positive_ints["ffn_hidden"] = self.ffn_hidden
        for name, value in positive_ints.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"LlamaConfig.{name} must be an int, got {value!r}")
            if value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {value}")
        for name, value in (("rope_theta", self.rope_theta), ("norm_eps", self.norm_eps)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive number, got {value!r}")
        if self.dim % self.heads != 0:
            raise ValueError(
                f"LlamaConfig.dim ({self.dim}) must be divisible by heads ({self.heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"LlamaConfig.dim / heads ({self.head_dim}) must be even for rotary embeddings"
            )
        if self.heads % self.num_kv_heads != 0:
            raise ValueError(
                f"LlamaConfig.heads ({self.heads}) must be divisible by "
                f"kv_heads ({self.num_kv_heads})"
            )
        return self

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count from the shapes alone, matching :meth:`Llama.num_parameters`."""
        kv_dim = self.num_kv_heads * self.head_dim
        attention = 2 * self.dim * self.dim + 2 * self.dim * kv_dim
        feed_forward = 3 * self.dim * self.ffn_hidden_dim
        norms = 2 * self.dim
        total = self.layers * (attention + feed_forward + norms)
        total += self.dim  # final norm
        total += self.vocab_size * self.dim  # output projection
        if not exclude_embeddings:
            total += self.vocab_size * self.dim
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: ``6*N + 12*layers*dim*seq_len``, for MFU.

        ``N`` counts non-embedding parameters: the token embedding is a lookup
        and costs no matmul, while the output projection is a real matmul and
        is counted.  The second term is the attention score and value matmuls
        (forward plus backward), which grow with the context length.
        """
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        non_embedding = self.num_parameters(exclude_embeddings=True)
        return 6 * non_embedding + 12 * self.layers * self.dim * seq_len


class Attention(nn.Module):
    """Causal multi-head attention with rotary positions and optional grouped KV heads."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        kv_dim = config.num_kv_heads * config.head_dim
        self.wq = nn.Linear(config.dim, config.heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, kv_dim, bias=False)
        self.wv = nn.Linear(config.dim, kv_dim, bias=False)
        self.wo = nn.Linear(config.heads * config.head_dim, config.dim, bias=False)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = hidden.shape
        # The block gets the full position tables and takes its own length from its input:
        # under sequence parallelism the residual stream between blocks holds only a
        # slice of the sequence, while attention always sees all of it.
        if seq_len > cos.shape[0]:
            raise ValueError(f"sequence length {seq_len} exceeds LlamaConfig.max_seq_len ({cos.shape[0]})")
        cos, sin = cos[:seq_len], sin[:seq_len]
        # Head counts come from the projection widths, not the config, so a
        # tensor-parallel shard holding a slice of the heads works unchanged.
        queries = self.wq(hidden).view(batch, seq_len, -1, self.head_dim)
        keys = self.wk(hidden).view(batch, seq_len, -1, self.head_dim)
        values = self.wv(hidden).view(batch, seq_len, -1, self.head_dim)
        queries = apply_rotary(queries, cos, sin)
        keys = apply_rotary(keys, cos, sin)
        group = queries.shape[2] // keys.shape[2]
        if group > 1:
            keys = keys.repeat_interleave(group, dim=2)
            values = values.repeat_interleave(group, dim=2)
        attended = functional.scaled_dot_product_attention(
            queries.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            is_causal=True,
        )
        return self.wo(attended.transpose(1, 2).reshape(batch, seq_len, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.w2(functional.silu(self.w1(hidden)) * self.w3(hidden))


class TransformerBlock(nn.Module):
    """One pre-norm residual block: attention then feed-forward."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attention(self.attention_norm(hidden), cos, sin)
        return hidden + self.feed_forward(self.ffn_norm(hidden))


class Llama(nn.Module):
    """Decoder-only transformer: embeddings, ``layers`` blocks, final norm, untied output.

    Construction initialises the weights with :meth:`init_weights` and the
    default seed, so two freshly built models are already identical.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config.validate()
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(config.vocab_size, config.dim)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.layers))
        self.norm: RMSNorm | None = RMSNorm(config.dim, config.norm_eps)
        self.output: nn.Linear | None = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.init_weights()

    def _blocks(self) -> list[nn.Module]:
        # A pipeline split may turn the list into a ModuleDict to keep layer
        # names stable; iterate either in order.
        if isinstance(self.layers, nn.ModuleDict):
            return list(self.layers.values())
        return list(self.layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` for token ids ``[B, T]``.

        On a pipeline stage without ``tok_embeddings`` the input is already the
        hidden states ``[B, T, dim]``; without ``output`` (and ``norm``) the
        hidden states are returned for the next stage.
        """
        if tokens.dim() < 2:
            raise ValueError(f"tokens must be [batch, seq_len], got shape {tuple(tokens.shape)}")
        if self.tok_embeddings is not None:
            hidden = self.tok_embeddings(tokens)
        else:
            hidden = tokens
        cos, sin = self.rotary(self.rotary.max_seq_len)
        for block in self._blocks():
            hidden = block(hidden, cos, sin)
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.output is not None:
            hidden = self.output(hidden)
        return hidden

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of ``forward(tokens)`` against ``targets`` ``[B, T]``."""
        if self.output is None:
            raise ValueError("Llama.loss needs the output projection; this stage has none")
        logits = self(tokens)
        if targets.shape != logits.shape[:-1]:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} does not match tokens "
                f"shape {tuple(logits.shape[:-1])}"
            )
        return functional.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters this module holds; ``exclude_embeddings`` drops the token embedding.

        The output projection is kept either way because it is a real matmul
        (see :meth:`LlamaConfig.flops_per_token`).
        """
        total = sum(parameter.numel() for parameter in self.parameters())
        if exclude_embeddings and self.tok_embeddings is not None:
            total -= self.tok_embeddings.weight.numel()
        return total

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Deterministic init: the same generator state gives bit-identical weights anywhere.

        Every parameter and buffer not on the meta device is filled by :meth:`init_fn`; those
        on meta are left for ``parallelize`` to materialise shard by shard with the same function.
        """
        fill = self.init_fn(generator)
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            if not tensor.is_meta:
                fill(name, tensor)

    def init_fn(self, generator: torch.Generator | None = None):
        """``init_fn(name, tensor)`` for ``parallelize``: fills one full parameter or buffer by name.

        One number is drawn from ``generator`` (a fresh one seeded with
        :data:`DEFAULT_INIT_SEED` when ``None``); each weight is then drawn on the CPU in float32
        from its own generator seeded by that number and its module's name. So the result depends
        neither on the device, the dtype nor the global RNG (every rank passing the same seed gets
        the same model), nor on which other modules are present or how the parameter is sharded
        (a pipeline stage or an FSDP/TP shard takes its slice of the same full tensor).
        Matrices get ``N(0, 0.02)``; the projections that write into the residual stream (``wo``,
        ``w2``) are scaled by ``1/sqrt(2*layers)`` so the residual does not grow with depth; norms
        start at one and the rotary tables are computed.
        """
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(DEFAULT_INIT_SEED)
        base_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device="cpu").item())
        residual_std = INIT_STD / math.sqrt(2 * self.config.layers)

        @torch.no_grad()
        def fill(name: str, tensor: torch.Tensor) -> None:
            module_name, _, leaf = name.rpartition(".")
            module = self.get_submodule(module_name)
            if isinstance(module, RMSNorm):
                tensor.fill_(1.0)
            elif isinstance(module, RotaryEmbedding):
                cos, sin = module.tables()
                tensor.copy_(cos if leaf == "cos" else sin)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if module_name.endswith((".wo", ".w2")) else INIT_STD
                generator = _named_generator(base_seed, module_name)
                if tensor.dtype == torch.float32 and tensor.device.type == "cpu":
                    tensor.normal_(0.0, std, generator=generator)  # drawn in place: no second copy
                else:
                    tensor.copy_(torch.empty(tensor.shape, dtype=torch.float32).normal_(0.0, std, generator=generator))
            else:
                raise ValueError(f"Llama.init_fn: no initialisation for {name!r}")

        return fill


def _named_generator(base_seed: int, name: str) -> torch.Generator:
    """A CPU generator whose seed depends only on ``base_seed`` and a parameter name."""
    digest = hashlib.sha256(f"{base_seed}:{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
