"""The fused PPO loss: autograd Function, ``torch.library`` custom op and the public functions.

The math, the kernels and their launch functions are in ``kernels/ppo_loss_kernels.py``. Layers:
``_ppo_loss_fwd_kernel`` + ``_ppo_loss_finalize_kernel`` -> ``ppo_loss_forward`` / ``ppo_loss_backward`` ->
``PPOLossFunction`` and the custom op ``rlhf_engine::ppo_loss`` -> ``ppo_loss_triton`` (eager: the Function,
which is cheaper to call than the custom op; under ``torch.compile``: the custom op; with nothing requiring
grad: the launch function alone, without gradient buffers). ``ppo_loss_with_grads``: the loss and the final
gradients in two launches, with no autograd node (kernel 1, then ``_ppo_loss_finalize_grads_kernel``).
"""
from typing import Optional

import torch

from ._args import ConfigCache, check_counts, grad_scale_value, ppo_hyperparameters
from ._metrics import PPOMetrics, metric_keys
from .ppo_loss_kernels import (  # noqa: F401 - the launch layer is re-exported with the API
    AGG_MODES,
    KL_KINDS,
    METRIC_KEYS,
    PPOLossConfig,
    _FLOAT_DTYPES,
    ppo_loss_backward,
    ppo_loss_forward,
    ppo_loss_launch_grads,
)

# ----------------------------------------------------------------------------- autograd
class PPOLossFunction(torch.autograd.Function):
    """Thin autograd wrapper: the eager path of :func:`ppo_loss_triton` (under ``torch.compile``
    the custom op ``rlhf_engine::ppo_loss`` is used). Returns (loss, metrics); metrics is detached."""

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, values, old_values, returns, ref_logp, entropy,
                num_tokens, num_seqs, cfg):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[4], ctx.needs_input_grad[8])
        loss, metrics, u_logp, u_v, u_ent, inv_n = ppo_loss_forward(
            logp, old_logp, advantages, mask, values=values, old_values=old_values, returns=returns,
            ref_logp=ref_logp, entropy=entropy, cfg=cfg, num_tokens=num_tokens, num_seqs=num_seqs, need_grads=need)
        ctx.save_for_backward(u_logp, u_v, u_ent, inv_n)
        ctx.need = need
        ctx.dtypes = (logp.dtype, values.dtype if values is not None else None,
                      entropy.dtype if entropy is not None else None)
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics):
        u_logp, u_v, u_ent, inv_n = ctx.saved_tensors
        us = tuple(u if need else None for u, need in zip((u_logp, u_v, u_ent), ctx.need))
        d_logp, d_v, d_ent = ppo_loss_backward(grad_loss, inv_n, us, ctx.dtypes)
        return d_logp, None, None, None, d_v, None, None, None, d_ent, None, None, None


@torch.library.custom_op("rlhf_engine::ppo_loss", mutates_args=())
def _ppo_loss_op(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    values: Optional[torch.Tensor], old_values: Optional[torch.Tensor], returns: Optional[torch.Tensor],
    ref_logp: Optional[torch.Tensor], entropy: Optional[torch.Tensor],
    num_tokens: Optional[torch.Tensor], num_seqs: Optional[torch.Tensor],
    num_tokens_value: Optional[float], num_seqs_value: Optional[float],
    clip_low: float, clip_high: float, dual_clip: Optional[float], value_clip: Optional[float],
    vf_coef: float, ent_coef: float, kl_coef: float, kl_kind: str, agg: str, max_len: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, metrics, u_logp, u_values, u_entropy, inv_n); see :func:`ppo_loss_forward`.
    A normalizer is given either as a tensor or as a value (``*_value``), or neither (from the mask)."""
    cfg = PPOLossConfig(clip_low, clip_high, dual_clip, value_clip, vf_coef, ent_coef, kl_coef, kl_kind, agg, max_len)
    return ppo_loss_forward(
        logp, old_logp, advantages, mask, values=values, old_values=old_values, returns=returns, ref_logp=ref_logp,
        entropy=entropy, cfg=cfg, num_tokens=num_tokens if num_tokens is not None else num_tokens_value,
        num_seqs=num_seqs if num_seqs is not None else num_seqs_value)


@_ppo_loss_op.register_fake
def _(logp, old_logp, advantages, mask, values, old_values, returns, ref_logp, entropy, num_tokens, num_seqs,
      num_tokens_value, num_seqs_value, clip_low, clip_high, dual_clip, value_clip, vf_coef, ent_coef, kl_coef,
      kl_kind, agg, max_len):
    B, T = logp.shape
    f32 = lambda *s: logp.new_empty(s, dtype=torch.float32)  # noqa: E731
    return (logp.new_empty(()), logp.new_empty((len(METRIC_KEYS),)), f32(B, T),
            f32(B, T) if values is not None else f32(0), f32(B, T) if entropy is not None else f32(0), f32())


def _setup_context(ctx, inputs, output):
    u_logp, u_v, u_ent, inv_n = output[2:]
    ctx.save_for_backward(u_logp, u_v, u_ent, inv_n)
    logp, values, entropy = inputs[0], inputs[4], inputs[8]
    ctx.dtypes = (logp.dtype, values.dtype if values is not None else None,
                  entropy.dtype if entropy is not None else None)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *_):
    u_logp, u_v, u_ent, inv_n = ctx.saved_tensors
    us = tuple(u if dt is not None else None for u, dt in zip((u_logp, u_v, u_ent), ctx.dtypes))
    d_logp, d_v, d_ent = ppo_loss_backward(grad_loss, inv_n, us, ctx.dtypes)
    return (d_logp, None, None, None, d_v, None, None, None, d_ent) + (None,) * 14


_ppo_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def _check_tensors(tensors: dict) -> None:
    ref = tensors["logp"]
    for name, x in tensors.items():
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name}: expected a (B, T) tensor, got shape {tuple(x.shape)}")
        if x.shape != ref.shape:
            raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (as logp), got {tuple(x.shape)}")
        if x.device != ref.device:
            raise ValueError(f"{name}: expected device {ref.device} (as logp), got {x.device}")
        if name != "mask" and x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: expected float32, float16 or bfloat16, got {x.dtype}")
    critic = [tensors[n] is None for n in ("values", "old_values", "returns")]
    if any(critic) and not all(critic):
        raise ValueError("values, old_values, returns: expected all three or none")


def _check_required(cfg: PPOLossConfig, ref_logp, entropy) -> None:
    if cfg.kl_coef != 0.0 and ref_logp is None:
        raise ValueError("ref_logp: required when kl_coef != 0")
    if cfg.ent_coef != 0.0 and entropy is None:
        raise ValueError("entropy: required when ent_coef != 0")


# The normalized hyperparameters (clip_high filled in, floats), checked once per configuration of plain values.
_scalar_config = ConfigCache(lambda *key: PPOLossConfig(*ppo_hyperparameters(*key)))


def _checked_config(tensors: dict, clip_low, clip_high, dual_clip, value_clip, vf_coef, ent_coef, kl_coef, kl_kind,
                    agg, max_len) -> PPOLossConfig:
    """The normalized hyperparameters (clip_high defaults to clip_low), after checking them and the tensors."""
    _check_tensors(tensors)
    cfg = _scalar_config(clip_low, clip_high, dual_clip, value_clip, vf_coef, ent_coef, kl_coef, kl_kind, agg,
                         max_len)
    _check_required(cfg, tensors["ref_logp"], tensors["entropy"])
    return cfg


def _metrics_dict(metrics: torch.Tensor, values, entropy, ref_logp) -> dict[str, torch.Tensor]:
    """The (7,) metrics tensor as a dict of () views (one unbind op), with the keys the given inputs define."""
    by_name = dict(zip(METRIC_KEYS, metrics.unbind()))
    return {k: by_name[k] for k in metric_keys(values is not None, entropy is not None, ref_logp is not None)}


def _call_op(logp, old_logp, advantages, mask, values, old_values, returns, ref_logp, entropy, cfg: PPOLossConfig,
             num_tokens, num_seqs):
    """The custom op ``rlhf_engine::ppo_loss`` (the path ``torch.compile`` traces); a normalizer goes in as a
    tensor or as a number, by what the caller passed."""
    n_t = num_tokens if isinstance(num_tokens, torch.Tensor) else None
    n_s = num_seqs if isinstance(num_seqs, torch.Tensor) else None
    return _ppo_loss_op(logp, old_logp, advantages, mask, values, old_values, returns, ref_logp, entropy, n_t, n_s,
                        None if num_tokens is None or n_t is not None else float(num_tokens),
                        None if num_seqs is None or n_s is not None else float(num_seqs), *cfg)


def ppo_loss_triton(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                    values: Optional[torch.Tensor] = None, old_values: Optional[torch.Tensor] = None,
                    returns: Optional[torch.Tensor] = None, ref_logp: Optional[torch.Tensor] = None,
                    entropy: Optional[torch.Tensor] = None, clip_low: float = 0.2, clip_high: Optional[float] = None,
                    dual_clip: Optional[float] = None, value_clip: Optional[float] = 0.2, vf_coef: float = 0.5,
                    ent_coef: float = 0.0, kl_coef: float = 0.0, kl_kind: str = "k3", agg: str = "token-mean",
                    num_tokens=None, num_seqs=None, max_len: Optional[int] = None,
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO objective with fused Triton kernels (two launches forward, one elementwise op per input backward).

    Same semantics, arguments and metric keys as ``rlhf_engine.algo.ppo_loss_reference``:

        loss = agg(pg) + vf_coef * agg(vf) - ent_coef * agg(H) + kl_coef * agg(k(logp, ref_logp))

    Args:
        logp: (B, T) fp32/fp16/bf16 log-probs under the current policy (differentiable).
        old_logp, advantages: (B, T) floats (treated as constants).
        mask: (B, T) bool/int/float response mask (nonzero = valid token).
        values: optional (B, T) critic values (differentiable); old_values, returns: (B, T) (constants);
            all three or none.
        ref_logp: optional (B, T) reference log-probs (constant) for the KL term.
        entropy: optional (B, T) per-token entropy (differentiable).
        clip_low, clip_high, dual_clip, value_clip, vf_coef, ent_coef, kl_coef, kl_kind: as the reference
            (kl_estimate with its default clamp 10).
        agg: one of :data:`AGG_MODES`. num_tokens, num_seqs: global normalizers (Python numbers or 0-dim
            tensors), or None to count them from ``mask`` on the device. max_len: T_max of "-norm" (default T).
    Returns:
        loss: () in logp.dtype (computed in fp32); metrics: dict of detached () tensors in logp.dtype:
        pg_loss, clip_frac, approx_kl, plus vf_loss, vf_clip_frac with values, entropy with entropy,
        kl with ref_logp. Gradients flow to logp, values and entropy only.
    """
    check_counts(num_tokens, num_seqs)
    cfg = _checked_config(dict(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, values=values,
                               old_values=old_values, returns=returns, ref_logp=ref_logp, entropy=entropy),
                          clip_low, clip_high, dual_clip, value_clip, vf_coef, ent_coef, kl_coef, kl_kind, agg, max_len)
    if torch.compiler.is_compiling():
        loss, metrics, *_ = _call_op(logp, old_logp, advantages, mask, values, old_values, returns, ref_logp,
                                     entropy, cfg, num_tokens, num_seqs)
        metrics = metrics.detach()
    elif torch.is_grad_enabled() and (logp.requires_grad or (values is not None and values.requires_grad)
                                      or (entropy is not None and entropy.requires_grad)):
        loss, metrics = PPOLossFunction.apply(logp, old_logp, advantages, mask, values, old_values, returns,
                                              ref_logp, entropy, num_tokens, num_seqs, cfg)
    else:  # evaluation: no gradient buffers, no autograd node
        loss, metrics, *_ = ppo_loss_forward(
            logp, old_logp, advantages, mask, values=values, old_values=old_values, returns=returns,
            ref_logp=ref_logp, entropy=entropy, cfg=cfg, num_tokens=num_tokens, num_seqs=num_seqs,
            need_grads=(False, False, False))
    return loss, _metrics_dict(metrics, values, entropy, ref_logp)


def ppo_loss_with_grads(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                        values: Optional[torch.Tensor] = None, old_values: Optional[torch.Tensor] = None,
                        returns: Optional[torch.Tensor] = None, ref_logp: Optional[torch.Tensor] = None,
                        entropy: Optional[torch.Tensor] = None, clip_low: float = 0.2,
                        clip_high: Optional[float] = None, dual_clip: Optional[float] = None,
                        value_clip: Optional[float] = 0.2, vf_coef: float = 0.5, ent_coef: float = 0.0,
                        kl_coef: float = 0.0, kl_kind: str = "k3", agg: str = "token-mean", num_tokens=None,
                        num_seqs=None, max_len: Optional[int] = None, grad_scale: float = 1.0,
                        ) -> tuple[torch.Tensor, PPOMetrics, dict[str, torch.Tensor]]:
    """The PPO objective AND its gradients, in two launches and no autograd graph.

    Same arguments, semantics and metrics as :func:`ppo_loss_triton`, but nothing is differentiated through:
    the first launch computes per-token gradients and per-row partial sums, the second reduces the partials
    (loss, metrics, the global normalizer N, all on the device) and scales the gradients by ``grad_scale / N``.
    The backward pass of the PPO loss is then no separate step; hand the gradients to the model's graph::

        loss, metrics, grads = ppo_loss_with_grads(logp.detach(), old_logp, adv, mask, values=v.detach(), ...)
        torch.autograd.backward([logp, v], [grads["logp"], grads["values"]])

    (the same parameter gradients as ``(grad_scale * ppo_loss_triton(logp, ...)[0]).backward()``). This is
    the cheapest Triton call of the loss: the hyperparameters checked once per configuration (cached), the
    tensors in one pass, two or three allocations, two kernel launches, metric views made when first read
    (``kernels.native.ppo_loss_with_grads`` is cheaper still: both launches from one C++ call).

    Args:
        as :func:`ppo_loss_triton`; ``logp``, ``values`` and ``entropy`` need not require grad.
        grad_scale: the gradients are those of ``grad_scale * loss`` (e.g. 1 / accumulation steps).
    Returns:
        loss: () in logp.dtype (detached); metrics: a read-only mapping (:class:`PPOMetrics`; a plain dict
        under ``torch.compile``) with the keys and values of :func:`ppo_loss_triton`'s metrics dict;
        grads: {"logp": (B, T), plus "values" when values is given, "entropy" when entropy is given},
        each in its input's dtype (fp32 inputs: written into the kernel's own buffers, no extra copy).
    """
    check_counts(num_tokens, num_seqs)
    grad_scale = grad_scale_value(grad_scale)
    others = (old_logp, advantages, values, old_values, returns, ref_logp, entropy)
    if torch.compiler.is_compiling():  # traceable: the custom op, then u * grad_scale / N as graph ops
        cfg = _checked_config(dict(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, values=values,
                                   old_values=old_values, returns=returns, ref_logp=ref_logp, entropy=entropy),
                              clip_low, clip_high, dual_clip, value_clip, vf_coef, ent_coef, kl_coef, kl_kind, agg,
                              max_len)
        detach = lambda x: None if x is None else x.detach()  # noqa: E731
        loss, metrics, u_logp, u_v, u_ent, inv_n = _call_op(
            detach(logp), old_logp, advantages, mask, detach(values), old_values, returns, ref_logp, detach(entropy),
            cfg, num_tokens, num_seqs)
        scale = inv_n * float(grad_scale)
        g_logp, g_v, g_ent = ((u * scale).to(x.dtype) if x is not None else u
                              for u, x in zip((u_logp, u_v, u_ent), (logp, values, entropy)))
        metrics = _metrics_dict(metrics, values, entropy, ref_logp)
    else:  # the host-lean path: one pass of checks, a cached configuration, the launches, no views
        if not _same_2d(logp, others, mask):
            _check_tensors(dict(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, values=values,
                                old_values=old_values, returns=returns, ref_logp=ref_logp, entropy=entropy))
        if not (values is None) == (old_values is None) == (returns is None):
            raise ValueError("values, old_values, returns: expected all three or none")
        cfg = _scalar_config(clip_low, clip_high, dual_clip, value_clip, vf_coef, ent_coef, kl_coef, kl_kind, agg,
                             max_len)
        _check_required(cfg, ref_logp, entropy)
        small, g_logp, g_v, g_ent = ppo_loss_launch_grads(
            logp, old_logp, advantages, mask, values, old_values, returns, ref_logp, entropy, cfg, num_tokens,
            num_seqs, float(grad_scale))
        keys = metric_keys(values is not None, entropy is not None, ref_logp is not None)
        if logp.dtype == torch.float32:
            loss, metrics = small[0], PPOMetrics(small, keys, offset=1)
        else:  # rounded by torch, as ppo_loss_forward does
            loss, metrics = small[0].to(logp.dtype), PPOMetrics(small[1:8].to(logp.dtype), keys)
    grads = {"logp": g_logp}
    if values is not None:
        grads["values"] = g_v
    if entropy is not None:
        grads["entropy"] = g_ent
    return loss, metrics, grads


def _same_2d(logp, others: tuple, mask) -> bool:
    """Whether logp is a (B, T) float tensor and mask and every given tensor of ``others`` one of its shape and
    device, in floats (the one-pass test of ppo_loss_with_grads; a False runs the descriptive checks)."""
    if not isinstance(logp, torch.Tensor) or logp.dim() != 2 or logp.dtype not in _FLOAT_DTYPES:
        return False
    shape, dev = logp.shape, logp.device
    if not isinstance(mask, torch.Tensor) or mask.shape != shape or mask.device != dev:
        return False
    for x in others:
        if x is not None and not (isinstance(x, torch.Tensor) and x.shape == shape and x.device == dev
                                  and x.dtype in _FLOAT_DTYPES):
            return False
    return True
