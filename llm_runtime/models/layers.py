"""The position-wise pieces of the bundled Llama: RMS norm and rotary position embeddings."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm", "RotaryEmbedding", "apply_rotary"]


class RMSNorm(nn.Module):
    """Root-mean-square norm (no mean subtraction, no bias), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        as_float = hidden.float()
        normed = as_float * torch.rsqrt(as_float.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(hidden) * self.weight

    def reset_parameters(self) -> None:
        """Back to the identity scale; called by :meth:`Llama.init_weights`."""
        with torch.no_grad():
            self.weight.fill_(1.0)


class RotaryEmbedding(nn.Module):
    """Precomputed rotary cos/sin tables for positions ``0 .. max_seq_len-1``.

    The tables are non-persistent buffers: they are derived from the config,
    so checkpoints need not carry them, and a model materialised from the meta
    device gets them from :meth:`tables` (``Llama.init_fn``) or :meth:`reset_parameters`.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        cos, sin = self._tables(device=None)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos and sin tables, computed on the CPU (also for a module on the meta device)."""
        return self._tables(device=torch.device("cpu"))

    def _tables(self, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        inverse_frequencies = 1.0 / (self.theta ** (exponents / self.head_dim))
        positions = torch.arange(self.max_seq_len, dtype=torch.float32, device=device)
        angles = torch.outer(positions, inverse_frequencies)  # [max_seq_len, head_dim/2]
        return angles.cos(), angles.sin()

    def reset_parameters(self) -> None:
        """Recompute the tables in place on the buffers' current device (they are not parameters,
        but this is the hook a generic materialisation calls)."""
        if self.cos.is_meta:
            return
        cos, sin = self._tables(device=self.cos.device)
        with torch.no_grad():
            self.cos.copy_(cos)
            self.sin.copy_(sin)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``[seq_len, head_dim/2]`` cos and sin tables for the first positions."""
        if seq_len > self.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds LlamaConfig.max_seq_len ({self.max_seq_len})"
            )
        if self.cos.dtype != torch.float32:
            # ``model.to(torch.bfloat16)`` casts buffers too; bf16 angles would
            # blur positions, so rebuild float32 tables instead of using them.
            cos, sin = self._tables(device=self.cos.device)
            return cos[:seq_len], sin[:seq_len]
        return self.cos[:seq_len], self.sin[:seq_len]


def apply_rotary(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``states`` ``[B, T, H, D]`` by position-dependent angles.

    Done in float32 so that bf16 activations do not lose the position signal.
    """
    pairs = states.float().unflatten(-1, (-1, 2))  # [B, T, H, D/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    cos = cos[None, :, None, :].float()
    sin = sin[None, :, None, :].float()
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(states)
