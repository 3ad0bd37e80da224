"""KL estimators, KL-shaped rewards and the KL coefficient controllers.

With x = logp - ref_logp per token (Schulman's "Approximating KL divergence"):
    k1 = x                    unbiased, high variance; used in the reward
    k2 = x^2 / 2              low variance; used in the loss
    k3 = exp(-x) - 1 + x      unbiased for KL(pi || ref), always >= 0; used in the loss
Estimates are clamped to [-clamp, clamp] (10 by default, as OpenRLHF and verl do for k3).
"""
from __future__ import annotations

import math

import torch

from ._checks import check_1d, check_choice, check_same, masked
from .gae import last_valid_index
from .normalize import clip_rewards

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, *, kind: str = "k1",
                clamp: float | None = 10.0) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference.

    Args:
        logp: (...) log-probs of the sampled tokens under the policy.
        ref_logp: (...) same tokens under the reference.
        kind: "k1" | "k2" | "k3".
        clamp: clamp the estimate to [-clamp, clamp]; None to disable.
    Returns: (...) tensor, same shape and dtype as ``logp``.
    """
    check_choice("kind", kind, KL_KINDS)
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp: expected shape {tuple(logp.shape)} (as logp), got {tuple(ref_logp.shape)}")
    x = logp - ref_logp
    if kind == "k1":
        kl = x
    elif kind == "k2":
        kl = 0.5 * x * x
    else:
        xc = x.clamp(-20.0, 20.0)  # keeps exp finite; beyond this the clamp below decides anyway
        kl = torch.exp(-xc) - 1.0 + xc
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl


def kl_penalized_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, *,
                         kl_coef: float | torch.Tensor, kind: str = "k1", clamp: float | None = 10.0,
                         reward_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards with the KL penalty in the reward (InstructGPT / Ziegler et al.).

        r_t = -kl_coef * k(logp_old - logp_ref)_t + [t = last valid token] * clip(score)

    Args:
        scores: (B,) scalar reward-model (or rule) scores, detached.
        logp, ref_logp: (B, T) log-probs of the sampled tokens under the rollout policy and the reference.
        mask: (B, T) 0/1 response mask.
        kl_coef: beta (float or 0-dim tensor, e.g. from an adaptive controller).
        kind, clamp: the KL estimator (see :func:`kl_estimate`).
        reward_clip: clip the scores to [-reward_clip, reward_clip] first (None: no clip).
    Returns:
        rewards (B, T), zero outside the mask (an empty row gets no score), and kl (B, T).
    """
    B, _ = check_same({"logp": logp, "ref_logp": ref_logp, "mask": mask})
    check_1d("scores", scores, B)
    kl = masked(kl_estimate(logp, ref_logp, kind=kind, clamp=clamp), mask)
    rewards = -kl_coef * kl
    if mask.shape[1] == 0:  # no response token: no place for a score
        return rewards, kl
    last = last_valid_index(mask)  # (B,)
    has_token = last >= 0
    s = clip_rewards(scores.to(rewards.dtype), reward_clip) * has_token.to(rewards.dtype)
    rewards = rewards.scatter_add(1, last.clamp(min=0)[:, None], s[:, None])
    return rewards, kl


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        if not (math.isfinite(kl_coef) and kl_coef >= 0):
            raise ValueError(f"kl_coef: expected a finite number >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:  # noqa: ARG002 - same interface as adaptive
        return None

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019):

        e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int = 10000) -> None:
        if not (math.isfinite(init_kl_coef) and init_kl_coef >= 0):
            raise ValueError(f"init_kl_coef: expected a finite number >= 0, got {init_kl_coef}")
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"target: expected a finite number > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon: expected > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """``current_kl``: mean per-sequence KL of the last batch (a float); ``n_steps``: samples seen.
        A non-finite KL is ignored (it would otherwise turn the coefficient into NaN for good)."""
        if n_steps < 0:
            raise ValueError(f"n_steps: expected >= 0, got {n_steps}")
        if not math.isfinite(float(current_kl)):
            return
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        # at most a factor of 0.8..1.2 an update: n_steps > horizon / 0.2 would otherwise make the coefficient negative
        self.value *= 1.0 + error * min(n_steps / self.horizon, 1.0)

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), int(state["horizon"])
