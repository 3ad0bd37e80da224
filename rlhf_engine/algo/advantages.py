"""Critic-free advantage estimators: GRPO, Dr. GRPO, RLOO and REINFORCE++ (with and without a
group baseline).

Grouping convention: ``scores`` is (B,) with B = n_prompts * group_size and the ``group_size``
samples of one prompt stored consecutively (rows g*n .. g*n + n - 1), which is how the
orchestrator lays out n samples per prompt. Sequence-level advantages are broadcast to tokens
with :func:`broadcast_to_tokens`.
"""
from __future__ import annotations

import torch

from ._checks import check_1d, check_2d, check_same, valid_mask
from .gae import discounted_returns, last_valid_index
from .normalize import masked_whiten


def _grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    check_1d("scores", scores)
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size: expected an int >= 2 (samples per prompt), got {group_size!r}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(f"scores: expected a length divisible by group_size={group_size}, got {scores.shape[0]}")
    if not scores.is_floating_point():  # integer (pass/fail) scores: means need a float type
        scores = scores.float()
    return scores.reshape(-1, group_size)  # (n_prompts, group_size)


def grpo_advantages(scores: torch.Tensor, group_size: int, *, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024): A_i = (R_i - mean_group) / (std_group + eps); std is Bessel-corrected.
    Args: scores (B,). Returns (B,)."""
    g = _grouped(scores, group_size)
    return ((g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, keepdim=True) + eps)).reshape(-1)


def dr_grpo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): A_i = R_i - mean_group (no std division). Returns (B,)."""
    g = _grouped(scores, group_size)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = R_i - mean of the other n - 1 samples
    = n / (n - 1) * (R_i - mean_group). Returns (B,)."""
    g = _grouped(scores, group_size)
    n = group_size
    return ((g.sum(dim=1, keepdim=True) - g) / (n - 1)).neg().add(g).reshape(-1)


def broadcast_to_tokens(seq_advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sequence advantages -> (B, T) token advantages, zero outside the mask."""
    check_2d("mask", mask)
    check_1d("seq_advantages", seq_advantages, mask.shape[0])
    dtype = torch.promote_types(seq_advantages.dtype, torch.float32)
    return seq_advantages[:, None].to(dtype) * valid_mask(mask, dtype)


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
                            whiten: bool = True, distributed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): discounted return-to-go of the per-token rewards (KL penalty plus the
    score on the last token), then whitened over the global batch.

    Args: token_rewards (B, T), mask (B, T). Returns (advantages (B, T), returns (B, T)).
    """
    check_same({"token_rewards": token_rewards, "mask": mask})
    returns = discounted_returns(token_rewards, mask, gamma=gamma)
    adv = masked_whiten(returns, mask, distributed=distributed) if whiten else returns
    return adv, returns


def reinforce_pp_baseline_advantages(scores: torch.Tensor, token_rewards: torch.Tensor, mask: torch.Tensor,
                                     group_size: int, *, gamma: float = 1.0, whiten: bool = True,
                                     distributed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ with a group baseline: each score has its group mean subtracted before it is
    placed on the last token; then as :func:`reinforce_pp_advantages`.

    Args: scores (B,) raw scores; token_rewards (B, T) per-token rewards that do NOT include the
    score (e.g. only the KL penalty, or zeros); mask (B, T). Returns (advantages, returns).
    """
    check_same({"token_rewards": token_rewards, "mask": mask})
    centred = dr_grpo_advantages(scores, group_size).to(token_rewards.dtype)
    last = last_valid_index(mask)
    placed = centred * (last >= 0).to(token_rewards.dtype)
    rewards = token_rewards.scatter_add(1, last.clamp(min=0)[:, None], placed[:, None])
    return reinforce_pp_advantages(rewards, mask, gamma=gamma, whiten=whiten, distributed=distributed)
