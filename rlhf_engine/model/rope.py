"""Rotary position embedding (RoPE), with Llama-3 ("llama3") frequency scaling.

The layout is the Hugging Face one ("rotate half"): a head vector x of size D is split
into halves (x1, x2) and rotated as (x1·cos − x2·sin, x2·cos + x1·sin), with the
frequency of pair i equal to inv_freq[i] = θ^(−2i/D), i < D/2.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig, RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) fp32 on the CPU, computed exactly as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3.1: long wavelengths (low frequencies) are divided by `factor`, short ones kept,
    # and the band between is interpolated smoothly.
    factor, lo, hi = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_ctx = scaling.original_max_position_embeddings
    low_freq_wavelen = old_ctx / lo
    high_freq_wavelen = old_ctx / hi
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) for given positions; holds no parameters or buffers.

    ``inv_freq`` is kept in fp32 on each device it is used on (not a buffer, so that
    ``model.to(torch.bfloat16)`` cannot round it), computed once per device.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self._inv_freq = {"cpu": rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)}
        self._tables: dict[tuple[str, torch.dtype, int], torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._inv_freq:
            self._inv_freq[key] = self._inv_freq["cpu"].to(device)
        return self._inv_freq[key]

    def half_table(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """(L, D) table of rows [cos | sin] for positions 0 .. L - 1 (L = ``length`` rounded up to a power of two,
        at least 256), the very values ``forward(position_ids, dtype, half=True)`` computes for them (the same ops
        on the same fp32 angles), cached per (device, dtype, L): a decode step gathers its rows with one kernel
        instead of computing them with five or six. None while a CUDA graph is being captured on ``device`` and the
        table does not exist yet: a table made there would live in the graph's private memory pool."""
        n = 256
        while n < length:
            n *= 2
        key = (str(device), dtype, n)
        table = self._tables.get(key)
        if table is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None
            cos, sin = self.forward(torch.arange(n, device=device)[None], dtype, half=True)  # (1, n, D/2) each
            table = self._tables[key] = torch.cat((cos[0], sin[0]), dim=-1)
        return table

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype,
                half: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) int -> cos, sin (B, T, D) in ``dtype`` (angles computed in fp32); half=True: only
        the first half, (B, T, D/2) (the second half repeats it), for kernels that read that much."""
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)  # (B, T, D/2)
        emb = freqs if half else torch.cat((freqs, freqs), dim=-1)  # (B, T, D/2 or D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D) rotated by cos, sin (B, T, D); returns (B, T, H, D) in x's dtype."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D)
    return x * cos + rotate_half(x) * sin
