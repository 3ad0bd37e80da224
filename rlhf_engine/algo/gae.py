"""Generalized Advantage Estimation (Schulman et al. 2016) and discounted returns.

Conventions (../shared/BASELINES.md): response tokens t = 0..T-1 with mask m_t; V_t is the
critic's value at the position that predicts token t; r_t the per-token reward.

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}
    return_t = A_t + V_t            (value target, taken before any whitening)

Two mask conventions:
  * ``"zero"`` (TRL, OpenRLHF, verl): r and V are zeroed outside the mask and the plain
    recursion runs over every position; outputs are zeroed outside the mask.
  * ``"carry"`` (needed for multi-turn, where tool/user tokens sit inside a response): masked
    positions are skipped. The running advantage and the "next value" pass through them
    unchanged, so a valid token's successor is the next *valid* token.
Both agree when every row's mask is a contiguous block starting at t = 0 (right padding).

Truncation bootstrap: ``last_value`` (B,) is the value of the state after the last valid token
(V of the last position when the response hit the length limit, 0 when it ended with EOS).
It stands in for V_{t+1} at each row's last valid token, in both conventions.

``backend`` picks the implementation: "torch" (this file, the reference), "triton"
(rlhf_engine.kernels.gae), "cpp"/"cuda" (rlhf_engine._C), or "auto" (Triton on CUDA tensors,
the C++ op on CPU tensors when it is built, else the reference).
"""
from __future__ import annotations

import torch

from ._checks import check_1d, check_choice, check_same, masked, real_value, valid, valid_mask

MASK_MODES = ("zero", "carry")


def _check_gae_args(rewards, values, mask, last_value, gamma, lam, mask_mode):
    B, T = check_same({"rewards": rewards, "values": values, "mask": mask})
    if not rewards.is_floating_point():
        raise TypeError(f"rewards: expected a floating-point tensor, got {rewards.dtype}")
    if last_value is not None:
        check_1d("last_value", last_value, B)
    for name, x in (("gamma", gamma), ("lam", lam)) if not torch.compiler.is_compiling() else ():
        v = real_value(x)
        if v is None:
            raise TypeError(f"{name}: expected a number in [0, 1], got {x!r}")
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}: expected a value in [0, 1], got {v}")
    check_choice("mask_mode", mask_mode, MASK_MODES)
    return B, T


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position where ``mask`` is 1, or -1 for an empty row."""
    B, T = mask.shape
    if T == 0:
        return torch.full((B,), -1, dtype=torch.long, device=mask.device)
    idx = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(valid(mask), idx, torch.full_like(idx, -1)).amax(dim=1)


def gae_reference(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
                  lam: float = 0.95, mask_mode: str = "zero",
                  last_value: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop-style GAE over reversed time, vectorized over the batch: the oracle for the kernels.

    Differentiable with autograd (used to check the kernels' backward).
    Args and returns as :func:`gae`.
    """
    B, T = rewards.shape
    if T == 0:
        return torch.zeros_like(rewards), torch.zeros_like(rewards)
    m = valid_mask(mask, rewards.dtype)
    lv = torch.zeros(B, dtype=rewards.dtype, device=rewards.device) if last_value is None \
        else last_value.to(rewards.dtype)
    adv = [None] * T
    last_adv = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    if mask_mode == "zero":
        r, v = masked(rewards, mask), masked(values, mask)  # a NaN at a masked position stays out
        is_last = torch.arange(T, device=mask.device)[None, :] == last_valid_index(mask)[:, None]  # (B, T)
        for t in reversed(range(T)):
            next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(lv)
            next_v = torch.where(is_last[:, t], next_v + lv, next_v)
            delta = r[:, t] + gamma * next_v - v[:, t]
            last_adv = delta + gamma * lam * last_adv
            adv[t] = last_adv
    else:  # carry
        next_v = lv
        for t in reversed(range(T)):
            valid = m[:, t] > 0
            delta = rewards[:, t] + gamma * next_v - values[:, t]
            last_adv = torch.where(valid, delta + gamma * lam * last_adv, last_adv)
            next_v = torch.where(valid, values[:, t], next_v)
            adv[t] = last_adv
    advantages = masked(torch.stack(adv, dim=1), mask)
    returns = masked(advantages + values, mask)
    return advantages, returns


def _resolve_backend(backend: str, x: torch.Tensor, *others: torch.Tensor | None) -> str:
    """"auto" -> Triton on CUDA; the C++ op on the CPU for fp32/fp64 inputs of one dtype; else the reference.
    The same under torch.compile: the Triton kernels and the native ops are all custom ops (kernels/native_ops.py)."""
    check_choice("backend", backend, ("auto", "torch", "triton", "cpp", "cuda"))
    if backend != "auto":
        return backend
    same_dtype = all(o is None or o.dtype == x.dtype for o in others)
    if x.is_cuda:
        if x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            return "triton"
        try:  # fp64 on a GPU: the CUDA op when it is built, else the reference
            from rlhf_engine.kernels import native
        except ImportError:
            return "torch"
        return "cuda" if x.dtype == torch.float64 and same_dtype and native.cuda_available() else "torch"
    if x.dtype not in (torch.float32, torch.float64) or not same_dtype:
        return "torch"
    try:
        from rlhf_engine.kernels import native
    except ImportError:  # the wrapper itself failed to import: use the reference
        return "torch"
    return "cpp" if native.available() else "torch"


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95, mask_mode: str = "zero", last_value: torch.Tensor | None = None,
        backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by GAE.

    Args:
        rewards: (B, T) float per-token rewards (KL penalty and the final score already placed).
        values: (B, T) float critic values V_t (same dtype as rewards).
        mask: (B, T) 0/1 response mask.
        gamma, lam: discount and GAE lambda, in [0, 1].
        mask_mode: "zero" or "carry" (see the module docstring).
        last_value: optional (B,) bootstrap value after each row's last valid token (0 if None).
        backend: "auto" | "torch" | "triton" | "cpp" | "cuda".
    Returns:
        advantages (B, T) and returns (B, T) = advantages + values, both zero outside the mask.
    """
    _check_gae_args(rewards, values, mask, last_value, gamma, lam, mask_mode)
    backend = _resolve_backend(backend, rewards, values, last_value)
    if backend == "torch":
        return gae_reference(rewards, values, mask, gamma=gamma, lam=lam, mask_mode=mask_mode,
                             last_value=last_value)
    if backend == "triton":
        from rlhf_engine.kernels.gae import gae_triton

        return gae_triton(rewards, values, mask, last_value, gamma=gamma, lam=lam, carry=mask_mode == "carry")
    from rlhf_engine.kernels import native

    return native.gae(rewards, values, mask, last_value, gamma=gamma, lam=lam, carry=mask_mode == "carry")


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """Reward-to-go G_t = sum_{s >= t} gamma^(s-t) r_s over valid tokens (carrying across masked ones).

    Args: rewards (B, T) float, mask (B, T) 0/1. Returns (B, T), zero outside the mask.
    This is GAE with V = 0 and lam = 1 in the "carry" convention.
    """
    check_same({"rewards": rewards, "mask": mask})
    adv, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0, mask_mode="carry")
    return adv
