"""``torch.library`` custom ops of the native GAE and fused PPO loss, so that ``torch.compile`` traces a model or loss
that calls :func:`kernels.native.gae` or :func:`kernels.native.ppo_loss` (the eager calls keep their
``autograd.Function``, whose dispatch costs less host time).

    rlhf_engine::native_gae(rewards, values, mask_u8, last_value?, gamma, lam, carry) -> (advantages, returns)
    rlhf_engine::native_gae_backward(mask_u8, grad_adv?, grad_ret?, gamma, lam, carry, dtype, with_last_value)
        -> (d rewards, d values, d last_value: (B,), or (0,) without last_value)
    rlhf_engine::native_ppo_loss(logp, old_logp, advantages, mask_u8, values?, old_values?, returns?, ref_logp?,
        entropy?, num_tokens?, num_seqs?, <normalizer modes and values>, <hyperparameters>, need_logp,
        need_values, need_entropy)
        -> (loss, metrics, g_logp, g_values, g_entropy, row_scale); an unneeded gradient is a (0,) tensor
    rlhf_engine::native_ppo_loss_backward(g_logp, g_values, g_entropy, row_scale, grad_loss) -> 3 gradients

Each has a fake implementation (shapes and dtypes only) and its backward registered through
``register_autograd``, which calls the backward op, so that a compiled backward traces it too. The math is the
eager path's: the same launch functions of ``kernels/native.py``, bit for bit (tests/test_native_compile.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import native as N
from ._metrics import METRIC_KEYS

_EMPTY = (0,)  # the stand-in for an absent optional output (a custom op returns tensors only)


def _or_none(x: torch.Tensor) -> Optional[torch.Tensor]:
    return None if x.numel() == 0 and x.dim() == 1 else x


# ----------------------------------------------------------------------------- GAE
@torch.library.custom_op("rlhf_engine::native_gae", mutates_args=())
def native_gae(rewards: torch.Tensor, values: torch.Tensor, mask_u8: torch.Tensor, last_value: Optional[torch.Tensor],
               gamma: float, lam: float, carry: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) of checked inputs (``native.gae`` checks them; made contiguous here too, since the
    native code reads raw pointers and a compiled graph may hand the op other layouts)."""
    return N.gae_forward(rewards.contiguous(), values.contiguous(), mask_u8.contiguous(),
                         None if last_value is None else last_value.contiguous(), gamma=gamma, lam=lam, carry=carry)


@native_gae.register_fake
def _(rewards, values, mask_u8, last_value, gamma, lam, carry):
    return torch.empty_like(rewards), torch.empty_like(rewards)


@torch.library.custom_op("rlhf_engine::native_gae_backward", mutates_args=())
def native_gae_backward(mask_u8: torch.Tensor, grad_adv: Optional[torch.Tensor], grad_ret: Optional[torch.Tensor],
                        gamma: float, lam: float, carry: bool, dtype: torch.dtype,
                        with_last_value: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d_r, d_v, d_lv = N.gae_backward(mask_u8.contiguous(), grad_adv, grad_ret, gamma=gamma, lam=lam, carry=carry,
                                    dtype=dtype, with_last_value=with_last_value)  # (grads made contiguous there)
    return d_r, d_v, d_lv if d_lv is not None else d_r.new_empty(_EMPTY)


@native_gae_backward.register_fake
def _(mask_u8, grad_adv, grad_ret, gamma, lam, carry, dtype, with_last_value):
    B, T = mask_u8.shape
    d = mask_u8.new_empty((B, T), dtype=dtype)
    return d, torch.empty_like(d), d.new_empty((B,) if with_last_value else _EMPTY)


def _gae_setup(ctx, inputs, output):
    rewards, _, mask_u8, last_value, gamma, lam, carry = inputs
    ctx.save_for_backward(mask_u8)
    ctx.cfg = (gamma, lam, carry, rewards.dtype, last_value is not None)


def _gae_backward(ctx, grad_adv, grad_ret):
    (mask_u8,) = ctx.saved_tensors
    gamma, lam, carry, dtype, has_lv = ctx.cfg
    d_r, d_v, d_lv = native_gae_backward(mask_u8, grad_adv, grad_ret, gamma, lam, carry, dtype,
                                         has_lv and ctx.needs_input_grad[3])
    return d_r, d_v, None, _or_none(d_lv) if has_lv else None, None, None, None


native_gae.register_autograd(_gae_backward, setup_context=_gae_setup)


# ----------------------------------------------------------------------------- PPO loss
@torch.library.custom_op("rlhf_engine::native_ppo_loss", mutates_args=())
def native_ppo_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask_u8: torch.Tensor,
    values: Optional[torch.Tensor], old_values: Optional[torch.Tensor], returns: Optional[torch.Tensor],
    ref_logp: Optional[torch.Tensor], entropy: Optional[torch.Tensor],
    num_tokens: Optional[torch.Tensor], num_seqs: Optional[torch.Tensor],
    ntok_mode: int, ntok_value: float, nseq_mode: int, nseq_value: float,
    clip_low: float, clip_high: float, dual_clip: float, value_clip: float, vf_coef: float, ent_coef: float,
    kl_coef: float, kl_kind: int, agg: int, max_len: float,
    need_logp: bool, need_values: bool, need_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused forward of contiguous, checked inputs (``native.ppo_loss`` checks them and packs the
    hyperparameters: ``dual_clip`` / ``value_clip`` 0 for none, ``kl_kind`` and ``agg`` as csrc indices)."""
    c = lambda x: None if x is None else x.contiguous()  # noqa: E731 - the native code reads raw pointers
    logp, old_logp, advantages, mask_u8, values, old_values, returns, ref_logp, entropy, num_tokens, num_seqs = (
        c(x) for x in (logp, old_logp, advantages, mask_u8, values, old_values, returns, ref_logp, entropy,
                       num_tokens, num_seqs))
    cfg = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, value_clip=value_clip, vf_coef=vf_coef,
               ent_coef=ent_coef, kl_coef=kl_coef, kl_kind=kl_kind, agg=agg, max_len=max_len)
    norms = {"ntok": (ntok_mode, ntok_value, num_tokens), "nseq": (nseq_mode, nseq_value, num_seqs)}
    call = N._PPOCall(old_logp, advantages, mask_u8, old_values, returns, ref_logp, cfg, norms)
    loss, metrics, grads, row_scale = call.run(logp, values, entropy, (need_logp, need_values, need_entropy))
    g_lp, g_v, g_h = (g if g is not None else logp.new_empty(_EMPTY) for g in grads)
    return loss, metrics, g_lp, g_v, g_h, row_scale


@native_ppo_loss.register_fake
def _(logp, old_logp, advantages, mask_u8, values, old_values, returns, ref_logp, entropy, num_tokens, num_seqs,
      ntok_mode, ntok_value, nseq_mode, nseq_value, clip_low, clip_high, dual_clip, value_clip, vf_coef, ent_coef,
      kl_coef, kl_kind, agg, max_len, need_logp, need_values, need_entropy):
    B = logp.shape[0]
    grad = lambda need, x: torch.empty_like(logp) if need and x is not None else logp.new_empty(_EMPTY)  # noqa: E731
    return (logp.new_empty(()), logp.new_empty((len(METRIC_KEYS),)), grad(need_logp, logp),
            grad(need_values, values), grad(need_entropy, entropy),
            logp.new_empty((torch.sym_max(B, 1),), dtype=torch.float64))  # run() keeps one row scale at B = 0


@torch.library.custom_op("rlhf_engine::native_ppo_loss_backward", mutates_args=())
def native_ppo_loss_backward(g_logp: torch.Tensor, g_values: torch.Tensor, g_entropy: torch.Tensor,
                             row_scale: torch.Tensor, grad_loss: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The saved gradients (``(0,)`` for absent ones) times row_scale[b] * grad_loss."""
    grads = tuple(_or_none(g.contiguous()) for g in (g_logp, g_values, g_entropy))
    outs = N.ppo_loss_backward(grads, row_scale.contiguous(), grad_loss)
    return tuple(o if o is not None else g.new_empty(_EMPTY) for o, g in zip(outs, (g_logp, g_values, g_entropy)))


@native_ppo_loss_backward.register_fake
def _(g_logp, g_values, g_entropy, row_scale, grad_loss):
    return torch.empty_like(g_logp), torch.empty_like(g_values), torch.empty_like(g_entropy)


def _ppo_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[2:])
    ctx.mark_non_differentiable(*output[1:])  # metrics, the saved gradients and row scales: no zero-filled grads


def _ppo_backward(ctx, grad_loss, *_):
    g_lp, g_v, g_h, row_scale = ctx.saved_tensors
    if all(g.numel() == 0 and g.dim() == 1 for g in (g_lp, g_v, g_h)):
        d_lp = d_v = d_h = None
    else:
        d_lp, d_v, d_h = (_or_none(d) for d in native_ppo_loss_backward(g_lp, g_v, g_h, row_scale, grad_loss))
    return (d_lp, None, None, None, d_v, None, None, None, d_h) + (None,) * 19


native_ppo_loss.register_autograd(_ppo_backward, setup_context=_ppo_setup)
