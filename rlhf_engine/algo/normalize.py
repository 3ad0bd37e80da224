"""Masked statistics, advantage whitening, reward clipping and a running reward normalizer.

Mask convention: ``mask`` is a (B, T) tensor of 0/1 (bool or float); statistics use only
positions where it is 1. Nothing here syncs with the host.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ._checks import check_mask_for, masked, valid_mask


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    check_mask_for("x", x, mask)
    xm = masked(x, mask)
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; 0 where the mask is empty (never NaN)."""
    check_mask_for("x", x, mask)
    xm, m = masked(x, mask), valid_mask(mask, x.dtype)
    num = xm.sum() if dim is None else xm.sum(dim)
    den = m.sum() if dim is None else m.sum(dim)
    return num / den.clamp(min=1)


def _all_reduce(stats: torch.Tensor, distributed: bool) -> torch.Tensor:
    if distributed and dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    return stats


def _global_mean_var(x: torch.Tensor, mask: torch.Tensor, distributed: bool, unbiased: bool = True):
    """(mean, variance) of ``x`` over the mask, all-reduced over ranks if asked.

    Two passes (the mean, then the squared deviations from it): the one-pass E[x²] - E[x]² cancels in fp32 when
    |mean| >> std (returns that carry a reward model's offset: a 2% variance error at 3.0 +- 0.01)."""
    check_mask_for("x", x, mask)
    m = valid_mask(mask, x.dtype)
    n, s = _all_reduce(torch.stack([m.sum(), masked(x, mask).sum()]), distributed)
    n1 = n.clamp(min=1)
    mean = s / n1
    d = masked(x - mean, mask)
    var = _all_reduce((d * d).sum(), distributed) / n1
    if unbiased:
        var = var * n / (n - 1).clamp(min=1)
    return mean, var


def masked_var(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True, distributed: bool = False) -> torch.Tensor:
    """Variance of ``x`` over the mask (Bessel-corrected by default), optionally across ranks."""
    return _global_mean_var(x, mask, distributed, unbiased)[1]


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
                  distributed: bool = False) -> torch.Tensor:
    """Whiten ``x`` with masked statistics over the whole batch: (x - mu) / sqrt(var + eps).

    Args:
        x: (B, T) float tensor (e.g. advantages).
        mask: (B, T) 0/1 tensor.
        shift_mean: if False the mean is added back (only the scale changes).
        eps: added to the variance.
        distributed: all-reduce the statistics over the default process group (when initialised).
    Returns:
        (B, T) whitened tensor, zero outside the mask.
    """
    mean, var = _global_mean_var(x, mask, distributed)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return masked(out, mask)


def clip_rewards(rewards: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Clamp rewards to [-clip, clip]; ``None`` leaves them unchanged."""
    if clip is None:
        return rewards
    if not torch.compiler.is_compiling() and not (math.isfinite(clip) and clip > 0):  # NaN would clamp to NaN
        raise ValueError(f"clip: expected a positive finite number or None, got {clip}")
    return rewards.clamp(-clip, clip)


class RunningMoments:
    """Running mean and standard deviation of a stream of scalars (e.g. reward-model scores).

    Batches are merged with Chan et al.'s parallel update, in float64, so the result does not
    depend on how the stream was split. State stays on the tensors' device (no host sync).
    """

    def __init__(self) -> None:
        self.count = torch.zeros((), dtype=torch.float64)
        self.mean = torch.zeros((), dtype=torch.float64)
        self.m2 = torch.zeros((), dtype=torch.float64)

    @property
    def std(self) -> torch.Tensor:
        return torch.sqrt(self.m2 / (self.count - 1).clamp(min=1))

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).to(torch.float64)
        if x.numel() == 0:
            raise ValueError("x: expected a non-empty tensor of scores")
        dev = x.device
        self.count, self.mean, self.m2 = (t.to(dev) for t in (self.count, self.mean, self.m2))
        n_b = torch.tensor(float(x.numel()), dtype=torch.float64, device=dev)
        mean_b = x.mean()
        m2_b = ((x - mean_b) ** 2).sum()
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / total
        self.m2 = self.m2 + m2_b + delta * delta * self.count * n_b / total
        self.count = total

    def normalize(self, x: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
        """(x - mean) / std with the running statistics (scale only if ``shift_mean`` is False)."""
        std = self.std.to(x.device, torch.float64)
        out = x.to(torch.float64)
        if shift_mean:
            out = out - self.mean.to(x.device)
        return (out / (std + eps)).to(x.dtype)

    def state_dict(self) -> dict:
        return {"count": self.count.cpu(), "mean": self.mean.cpu(), "m2": self.m2.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = (state[k].to(torch.float64) for k in ("count", "mean", "m2"))
