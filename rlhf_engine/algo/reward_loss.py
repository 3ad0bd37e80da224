"""Pairwise reward-model loss (Bradley-Terry), with the optional margin of LLaMA-2."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_1d


def pairwise_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None,
                         weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """loss = mean(-log sigmoid(r_chosen - r_rejected - margin)), or its ``weight``-ed mean.

    Args:
        chosen, rejected: (B,) scalar rewards of the preferred and the other response.
        margin: None, a float, or a (B,) tensor (LLaMA-2 uses a larger margin for clearer preferences).
        weight: None or (B,) non-negative pair weights with a positive sum: loss = Σ w·l / Σ w (e.g. 1 / the
            number of comparisons of the pair's prompt, InstructGPT's normalization). Checked on the CPU; on a
            GPU the check would cost a host sync per call, so it is the caller's there.
    Returns:
        loss (0-dim) and accuracy (0-dim, detached): the fraction of pairs with r_chosen > r_rejected (unweighted).
    """
    check_1d("chosen", chosen)
    check_1d("rejected", rejected, chosen.shape[0])
    if chosen.shape[0] == 0:
        raise ValueError("chosen: expected at least one preference pair, got an empty batch")
    diff = chosen - rejected
    if margin is not None:
        if isinstance(margin, torch.Tensor) and margin.dim() > 0:
            check_1d("margin", margin, chosen.shape[0])
        diff = diff - margin
    per_pair = -F.logsigmoid(diff)
    if weight is None:
        loss = per_pair.mean()
    else:
        check_1d("weight", weight, chosen.shape[0])
        if weight.device.type == "cpu" and not bool((weight >= 0).all() & (weight.sum() > 0)):
            raise ValueError(f"weight: expected non-negative pair weights with a positive sum, got {weight.tolist()}")
        loss = (per_pair * weight).sum() / weight.sum()
    accuracy = (chosen > rejected).to(chosen.dtype).mean().detach()
    return loss, accuracy
