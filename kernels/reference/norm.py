"""Plain PyTorch reference for RMSNorm (optionally after a residual add): the model's eager definition.

transformers (Llama, Qwen2): y = weight * (s_f32 / sqrt(mean(s_f32²) + eps)).to(s.dtype), s = x (+ residual),
the statistics in fp32 and the cast back to s's dtype before the weight multiply.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: Optional[torch.Tensor] = None):
    """out, or (out, x + residual) with a residual. F.rms_norm is one fused kernel on recent CUDA builds."""
    s = x if residual is None else x + residual
    y = weight * F.rms_norm(s.float(), (s.shape[-1],), eps=eps).to(s.dtype)
    return y if residual is None else (y, s)
