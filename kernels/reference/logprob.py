"""Plain PyTorch references for token log-probs (+ entropy) and the LM head + log-prob.

Written for clarity, not speed: the whole (N, V) logits tensor is materialized in
``compute_dtype`` (fp64 in the tests, fp32 for the CPU fallback of the public ops).

Math, with z = logits / temperature (one row of V logits, target token y):
    lse      = log Σ_j exp(z_j)
    logp     = z_y − lse                      (log-softmax at the target)
    entropy  = lse − Σ_j softmax(z)_j · z_j   (= −Σ_j p_j log p_j)
Rows whose target equals ``ignore_index`` give logp = 0 and entropy = 0, and no gradient.
"""
from __future__ import annotations

import torch


def logprobs_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token under softmax(logits / temperature), optionally the entropy.

    Args:
        logits: (..., V) any float dtype.
        targets: (...) int64/int32 token ids in [0, V), or ``ignore_index``.
        temperature: divides the logits before the softmax (> 0).
        ignore_index: target value of rows to skip (logp = entropy = 0, zero gradient).
        with_entropy: also return the entropy of each row's distribution.
        compute_dtype: dtype of the whole computation (and of the outputs).

    Returns:
        logp: (...) ``compute_dtype``; with ``with_entropy`` also entropy: (...) ``compute_dtype``.
        Both are differentiable w.r.t. ``logits`` through plain autograd.
    """
    z = logits.to(compute_dtype) / temperature                       # (..., V)
    keep = targets != ignore_index                                   # (...)
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets)).long()
    log_p = torch.log_softmax(z, dim=-1)                             # (..., V)
    logp = log_p.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # (...)
    zero = torch.zeros((), dtype=compute_dtype, device=logits.device)
    logp = torch.where(keep, logp, zero)
    if not with_entropy:
        return logp
    entropy = torch.logsumexp(z, dim=-1) - (log_p.exp() * z).sum(-1)  # (...)
    entropy = torch.where(keep, entropy, zero)
    return logp, entropy


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LM head then log-probs: logits = hidden @ weight.T + bias, then :func:`logprobs_reference`.

    Args:
        hidden: (..., H) float.
        weight: (V, H) float (the LM head, or a tied embedding matrix).
        targets: (...) int64/int32 token ids, or ``ignore_index``.
        bias: (V,) float or None.
        temperature, ignore_index, with_entropy, compute_dtype: as in :func:`logprobs_reference`.

    Returns:
        logp: (...) ``compute_dtype`` [, entropy: (...) ``compute_dtype``], differentiable
        w.r.t. hidden, weight and bias.
    """
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T   # (..., V)
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    return logprobs_reference(logits, targets, temperature, ignore_index, with_entropy, compute_dtype)
