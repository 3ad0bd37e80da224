"""PPO losses: clipped surrogate (asymmetric and dual clip), clipped value loss, entropy bonus,
an in-loss KL term, and the loss aggregation modes.

All per-token inputs are (B, T) with a 0/1 response mask. Aggregation (``agg``):
    "token-mean"               sum(m * l) / N_tokens
    "seq-mean-token-mean"      sum_b [sum_t m l / sum_t m] / N_seqs
    "seq-mean-token-sum"       sum(m * l) / N_seqs
    "seq-mean-token-sum-norm"  sum(m * l) / (N_seqs * T_max)      (Dr. GRPO)
N_tokens / N_seqs count the valid tokens / non-empty rows of the *global* batch: pass them
(``num_tokens``, ``num_seqs``) when a batch is split into micro-batches, so that the summed
micro-batch losses and gradients equal the full-batch ones. When omitted they are taken from
the tensors given. T_max (``max_len``) defaults to T. An empty row contributes nothing.

Metrics are detached 0-dim tensors that add up over micro-batches; nothing here calls ``.item()``.
The loss terms (pg_loss, vf_loss, entropy, kl) are aggregated as the loss aggregates them (``agg``): with the
"seq-mean-token-sum" modes ``entropy`` is a per-sequence sum, not a per-token mean. The fractions and
approx_kl (clip_frac, vf_clip_frac, approx_kl) are token-means over ``num_tokens`` whatever ``agg`` is.
"""
from __future__ import annotations

import torch

from ._checks import check_choice, check_mask_for, check_normalizer, check_same, masked, valid_mask
from .kl import kl_estimate

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def loss_weights(mask: torch.Tensor, agg: str = "token-mean", *, num_tokens=None, num_seqs=None,
                 max_len: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, T) weights w with aggregate(l) = sum(w * l) for every aggregation mode."""
    check_choice("agg", agg, AGG_MODES)
    check_normalizer("num_tokens", num_tokens)
    check_normalizer("num_seqs", num_seqs)
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len: expected an int >= 1 or None, got {max_len!r}")
    m = valid_mask(mask, dtype)
    if agg == "token-mean":
        n = m.sum().clamp(min=1) if num_tokens is None else num_tokens
        return m / n
    row_tokens = m.sum(dim=1, keepdim=True)  # (B, 1)
    n_seq = (row_tokens > 0).sum().clamp(min=1).to(dtype) if num_seqs is None else num_seqs
    if agg == "seq-mean-token-mean":
        return m / (row_tokens.clamp(min=1) * n_seq)
    if agg == "seq-mean-token-sum":
        return m / n_seq
    T = mask.shape[1] if max_len is None else max_len
    return m / (n_seq * T)


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean", *, num_tokens=None,
              num_seqs=None, max_len: int | None = None) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar with one of :data:`AGG_MODES`."""
    check_mask_for("loss_mat", loss_mat, mask)
    w = loss_weights(mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len, dtype=loss_mat.dtype)
    return (masked(loss_mat, mask) * w).sum()


def policy_loss_per_token(logp, old_logp, advantages, *, clip_low=0.2, clip_high=None, dual_clip=None):
    """Per-token clipped surrogate. Returns (loss (B,T), clipped (B,T) bool, ratio (B,T)).

        rho = exp(clamp(logp - old_logp, -20, 20))
        l = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))
        dual clip (A < 0):  l = min(l, -c A)
    """
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if dual_clip is not None:
        lower = -dual_clip * advantages
        dual = (advantages < 0) & (loss > lower)
        loss = torch.where(dual, lower, loss)
        clipped = clipped | dual
    return loss, clipped, ratio


def value_loss_per_token(values, old_values, returns, *, value_clip=0.2):
    """Per-token clipped value loss. Returns (loss (B,T), clipped (B,T) bool).

        l = 1/2 max((V - G)^2, (V_clip - G)^2),  V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
    V_clip is V itself where |V - V_old| <= eps_v: computed as V_old + (V - V_old) it can round an ulp away from V,
    and that ulp alone would count the token as clipped (it did here, and does in implementations that compare the
    two losses: the clip fraction then counts rounding noise).
    """
    err = (values - returns) ** 2
    if value_clip is None:
        return 0.5 * err, torch.zeros_like(err, dtype=torch.bool)
    d = values - old_values
    v_clipped = torch.where(d.abs() <= value_clip, values, old_values + d.clamp(-value_clip, value_clip))
    err_clipped = (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(err, err_clipped), err_clipped > err


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
             values: torch.Tensor | None = None, old_values: torch.Tensor | None = None,
             returns: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
             entropy: torch.Tensor | None = None, clip_low: float = 0.2, clip_high: float | None = None,
             dual_clip: float | None = None, value_clip: float | None = 0.2, vf_coef: float = 0.5,
             ent_coef: float = 0.0, kl_coef: float = 0.0, kl_kind: str = "k3", agg: str = "token-mean",
             num_tokens=None, num_seqs=None, max_len: int | None = None,
             backend: str = "torch") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full PPO objective for one (micro-)batch:

        loss = agg(pg) + vf_coef * agg(vf) - ent_coef * agg(H) + kl_coef * agg(k(logp, ref_logp))

    Args:
        logp: (B, T) log-probs of the taken tokens under the current policy (requires grad).
        old_logp: (B, T) log-probs at rollout time (detached).
        advantages: (B, T) (whitened) advantages (detached).
        mask: (B, T) 0/1 response mask.
        values, old_values, returns: optional (B, T) critic values (requires grad), their rollout
            values and the value targets; all three or none. Adds the clipped value loss.
        ref_logp: optional (B, T) reference log-probs, for the in-loss KL term (``kl_coef``).
        entropy: optional (B, T) per-token entropy (may require grad), for the bonus (``ent_coef``).
        clip_low, clip_high: eps_low, eps_high of the ratio clip (clip_high=None: symmetric).
        dual_clip: c > 1 for the dual clip on negative advantages, or None.
        value_clip: eps_v, or None for an unclipped value loss.
        agg, num_tokens, num_seqs, max_len: aggregation (module docstring).
        backend: "torch" (this reference) | "triton" | "cpp" | "cuda" | "auto" (fused forward+backward kernels).
    Returns:
        loss (0-dim), metrics: dict of detached 0-dim tensors (pg_loss, clip_frac, approx_kl, and
        vf_loss, vf_clip_frac, entropy, kl when their inputs are given).
    """
    check_same({"logp": logp, "old_logp": old_logp, "advantages": advantages, "mask": mask, "values": values,
                "old_values": old_values, "returns": returns, "ref_logp": ref_logp, "entropy": entropy})
    critic = [values is None, old_values is None, returns is None]
    if any(critic) and not all(critic):
        raise ValueError("values, old_values, returns: expected all three or none")
    if not logp.is_floating_point():  # "auto" would route an integer tensor to the reference, which truncates
        raise TypeError(f"logp: expected a floating-point tensor, got {logp.dtype}")
    # the kernels' own checks, for every backend: clips, finite coefficients, kl_kind, agg, max_len
    from rlhf_engine.kernels._args import ppo_hyperparameters

    if not torch.compiler.is_compiling():  # Python scalars are symbolic there: no branch on their values
        ppo_hyperparameters(clip_low, clip_high, dual_clip, value_clip, vf_coef, ent_coef, kl_coef, kl_kind, agg,
                            max_len)
    check_choice("backend", backend, ("auto", "torch", "triton", "cpp", "cuda"))
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError("ref_logp: required when kl_coef != 0")
    if ent_coef != 0.0 and entropy is None:
        raise ValueError("entropy: required when ent_coef != 0")
    if backend == "auto":
        from .gae import _resolve_backend

        backend = _resolve_backend("auto", logp, old_logp, advantages, values, old_values, returns, ref_logp, entropy)
    kwargs = dict(values=values, old_values=old_values, returns=returns, ref_logp=ref_logp, entropy=entropy,
                  clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, value_clip=value_clip,
                  vf_coef=vf_coef, ent_coef=ent_coef, kl_coef=kl_coef, kl_kind=kl_kind, agg=agg,
                  num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    if backend == "triton":
        from rlhf_engine.kernels.ppo_loss import ppo_loss_triton

        return ppo_loss_triton(logp, old_logp, advantages, mask, **kwargs)
    if backend in ("cpp", "cuda"):
        from rlhf_engine.kernels import native

        return native.ppo_loss(logp, old_logp, advantages, mask, **kwargs)
    return ppo_loss_reference(logp, old_logp, advantages, mask, **kwargs)


def ppo_loss_reference(logp, old_logp, advantages, mask, *, values=None, old_values=None, returns=None,
                       ref_logp=None, entropy=None, clip_low=0.2, clip_high=None, dual_clip=None,
                       value_clip=0.2, vf_coef=0.5, ent_coef=0.0, kl_coef=0.0, kl_kind="k3",
                       agg="token-mean", num_tokens=None, num_seqs=None, max_len=None):
    """Plain PyTorch PPO loss (autograd); the reference for the fused kernels. See :func:`ppo_loss`."""
    dtype = logp.dtype
    w = loss_weights(mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len, dtype=dtype)
    wm = loss_weights(mask, "token-mean", num_tokens=num_tokens, dtype=dtype)  # metric weights
    # every input zeroed at the masked positions first, as the kernels never read them: a NaN or inf there stays
    # out of the loss and of the gradients (masking only the per-token terms would still send 0 * NaN backward);
    # the per-token terms are then finite everywhere, and the weights (0 where masked) do the rest
    logp, old_logp, advantages, values, old_values, returns, ref_logp, entropy = (
        None if t is None else masked(t, mask)
        for t in (logp, old_logp, advantages, values, old_values, returns, ref_logp, entropy))
    pg, clipped, _ = policy_loss_per_token(logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high,
                                           dual_clip=dual_clip)
    pg_loss = (pg * w).sum()
    loss = pg_loss
    delta = (logp - old_logp).detach()
    metrics = {
        "pg_loss": pg_loss.detach(),
        "clip_frac": (clipped.to(dtype) * wm).sum(),
        "approx_kl": (0.5 * delta * delta * wm).sum(),
    }
    if values is not None:
        vf, vclipped = value_loss_per_token(values, old_values, returns, value_clip=value_clip)
        vf_loss = (vf * w).sum()
        loss = loss + vf_coef * vf_loss
        metrics["vf_loss"] = vf_loss.detach()
        metrics["vf_clip_frac"] = (vclipped.to(dtype) * wm).sum()
    if entropy is not None:
        ent = (entropy * w).sum()
        loss = loss - ent_coef * ent
        metrics["entropy"] = ent.detach()
    if ref_logp is not None:
        kl = (kl_estimate(logp, ref_logp, kind=kl_kind) * w).sum()
        loss = loss + kl_coef * kl
        metrics["kl"] = kl.detach()
    return loss, metrics
