"""Training diagnostics, returned as detached tensors (no host sync)."""
from __future__ import annotations

import torch

from ._checks import check_mask_for, check_same, masked
from .normalize import masked_mean, masked_var


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[G - V] / Var[G] over the mask: 1 is a perfect critic, 0 no better than a constant.
    Args: values, returns, mask (B, T). Returns a 0-dim tensor (NaN-free: 0 when Var[G] is 0)."""
    check_same({"values": values, "returns": returns, "mask": mask})
    var_g = masked_var(returns, mask)
    var_res = masked_var(returns - values, mask)
    return torch.where(var_g > 0, 1.0 - var_res / var_g.clamp(min=1e-12), torch.zeros_like(var_g))


@torch.no_grad()
def masked_entropy_mean(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean of a (B, T) per-token entropy over the mask."""
    return masked_mean(entropy, mask)


@torch.no_grad()
def sequence_kl(kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of the summed per-token KL (what the adaptive controller tracks)."""
    check_mask_for("kl", kl, mask)
    return masked(kl, mask).sum(dim=1).mean()
