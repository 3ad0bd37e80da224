"""Python wrappers of the native extension ``rlhf_engine._C``: GAE and the fused PPO loss.

The extension does not link libtorch: these wrappers check every argument (dtype, device,
shape), make the inputs contiguous, allocate the outputs with torch and hand the C++/CUDA ops
raw data pointers, sizes, scalars and, on CUDA, the current stream. CPU tensors run the C++ ops
(OpenMP over rows), CUDA tensors the CUDA ops (when the extension was built with nvcc).

Conventions:
  * dtypes: float32 or float64 on both devices (every floating-point input of a call has the
    same dtype; ``last_value`` and 0-dim normalizers are cast to it).
  * masks: any dtype; converted to uint8 ``mask != 0`` (nonzero = valid token). For the 0/1
    masks of the reference this is the same as ``mask.to(dtype)``.
  * tokens outside the mask are never read by the math (the reference multiplies them by 0, so
    a NaN/inf there would poison its result; here it is ignored).

Public API: :func:`available`, :func:`cuda_available`, :func:`gae`, :func:`ppo_loss`, :func:`ppo_loss_with_grads`.
The semantics are exactly those of ``rlhf_engine.algo.gae.gae_reference`` and
``rlhf_engine.algo.losses.ppo_loss_reference``; tests/test_native.py checks them against each other.
"""
from __future__ import annotations

import numbers

import torch
from torch.autograd.function import once_differentiable

from ._args import AGG_MODES, KL_KINDS, ConfigCache, check_counts, grad_scale_value, ppo_hyperparameters
from ._metrics import METRIC_KEYS, PPOMetrics, metric_keys  # METRIC_KEYS: the csrc order of the metrics too

try:
    from rlhf_engine import _C
    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # not built: the Python references still work
    _C = None
    _IMPORT_ERROR = exc

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_NORM_FROM_MASK, _NORM_VALUE, _NORM_POINTER = 0, 1, 2  # csrc/ppo_math.h NormMode


def available() -> bool:
    """True when the extension ``rlhf_engine._C`` imports (the C++ CPU ops are there)."""
    return _C is not None


def cuda_available() -> bool:
    """True when the extension was compiled with its CUDA ops (``_C.with_cuda``)."""
    return _C is not None and bool(_C.with_cuda)


# ----------------------------------------------------------------------------- argument checks

def _require() -> None:
    if _C is None:
        raise RuntimeError(f"rlhf_engine._C is not built ({_IMPORT_ERROR}); "
                           "run `pip install -e . --no-build-isolation`")


def _dtype_name(name: str, x: torch.Tensor) -> str:
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {x.dtype}")
    return _DTYPES[x.dtype]


def _check_tensor(name: str, x, ref: torch.Tensor | None = None, ref_name: str = "", *,
                  same_dtype: bool = True) -> None:
    """``x`` must be a (B, T) tensor; with ``ref``: same shape, device (and dtype)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a (B, T) tensor, got shape {tuple(x.shape)}")
    if ref is None:
        return
    if x.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (as {ref_name}), got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {x.device}")
    if same_dtype and x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (as {ref_name}), got {x.dtype}")


def _device_kind(name: str, x: torch.Tensor) -> str:
    """"cpu" or "cuda" for the op to run; raises when the extension cannot serve the device."""
    _require()
    if x.device.type == "cpu":
        return "cpu"
    if x.device.type == "cuda":
        if not cuda_available():
            raise RuntimeError(f"{name}: got a CUDA tensor but rlhf_engine._C was built without CUDA "
                               "(rebuild with nvcc on the PATH and without RLHF_ENGINE_CPU_ONLY)")
        return "cuda"
    raise ValueError(f"{name}: expected a cpu or cuda tensor, got device {x.device}")


def _mask_u8(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) uint8 contiguous copy/view of a 0/1 mask of any dtype (nonzero = valid)."""
    if mask.dtype == torch.bool:
        return mask.contiguous().view(torch.uint8)
    if mask.dtype == torch.uint8:
        return mask.contiguous()
    return (mask != 0).to(torch.uint8).contiguous()  # .to keeps a transposed input's strides


# The current stream's cudaStream_t as an int in one call (what torch.compile's generated code uses), where the
# torch build has it; torch.cuda.current_stream(...).cuda_stream builds a Stream object first (a few us).
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(device: torch.device) -> int:
    if _RAW_STREAM is not None and device.index is not None:
        return _RAW_STREAM(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def _ptr(x: torch.Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


class _on_device:
    """Makes ``device`` current for the launch (the CUDA ops launch on the current device)."""

    def __init__(self, device: torch.device):
        self.guard = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.guard is not None:
            self.guard.__enter__()

    def __exit__(self, *exc):
        if self.guard is not None:
            self.guard.__exit__(*exc)


# ----------------------------------------------------------------------------- GAE

def gae_forward(rewards: torch.Tensor, values: torch.Tensor, mask_u8: torch.Tensor, last_value: torch.Tensor | None,
                *, gamma: float, lam: float, carry: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the GAE forward op on contiguous, checked inputs (see :func:`gae`)."""
    B, T = rewards.shape
    adv, ret = torch.empty_like(rewards), torch.empty_like(rewards)
    args = (rewards.data_ptr(), values.data_ptr(), mask_u8.data_ptr(), _ptr(last_value), adv.data_ptr(),
            ret.data_ptr(), B, T, float(gamma), float(lam), bool(carry), _DTYPES[rewards.dtype])
    if rewards.is_cuda:
        with _on_device(rewards.device):
            _C.gae_forward_cuda(*args, _stream(rewards.device))
    else:
        _C.gae_forward_cpu(*args)
    return adv, ret


def gae_backward(mask_u8: torch.Tensor, grad_adv: torch.Tensor | None, grad_ret: torch.Tensor | None, *,
                 gamma: float, lam: float, carry: bool, dtype: torch.dtype, with_last_value: bool):
    """Launch the GAE backward op: (d rewards, d values, d last_value or None) from d adv, d returns."""
    B, T = mask_u8.shape
    grad_adv = None if grad_adv is None else grad_adv.to(dtype).contiguous()
    grad_ret = None if grad_ret is None else grad_ret.to(dtype).contiguous()
    d_r = torch.empty(B, T, dtype=dtype, device=mask_u8.device)
    d_v = torch.empty_like(d_r)
    d_lv = torch.empty(B, dtype=dtype, device=mask_u8.device) if with_last_value else None
    args = (mask_u8.data_ptr(), _ptr(grad_adv), _ptr(grad_ret), d_r.data_ptr(), d_v.data_ptr(), _ptr(d_lv), B, T,
            float(gamma), float(lam), bool(carry), _DTYPES[dtype])
    if mask_u8.is_cuda:
        with _on_device(mask_u8.device):
            _C.gae_backward_cuda(*args, _stream(mask_u8.device))
    else:
        _C.gae_backward_cpu(*args)
    return d_r, d_v, d_lv


class _GAEFunction(torch.autograd.Function):
    """GAE with its analytic (linear) backward: d rewards, d values, d last_value."""

    @staticmethod
    def forward(ctx, rewards, values, last_value, mask_u8, gamma, lam, carry):
        adv, ret = gae_forward(rewards, values, mask_u8, last_value, gamma=gamma, lam=lam, carry=carry)
        ctx.save_for_backward(mask_u8)
        ctx.cfg = dict(gamma=gamma, lam=lam, carry=carry, dtype=rewards.dtype)
        return adv, ret

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_adv, grad_ret):
        (mask_u8,) = ctx.saved_tensors
        d_r, d_v, d_lv = gae_backward(mask_u8, grad_adv, grad_ret, with_last_value=ctx.needs_input_grad[2],
                                      **ctx.cfg)
        return d_r, d_v, d_lv, None, None, None, None


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, last_value: torch.Tensor | None = None, *,
        gamma: float = 1.0, lam: float = 0.95, carry: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns with the native ops (C++ on CPU tensors, CUDA on CUDA tensors).

    Semantics of ``rlhf_engine.algo.gae.gae_reference`` (``carry=True`` is mask_mode="carry").
    Differentiable w.r.t. rewards, values and last_value (analytic backward, once differentiable).

    Args:
        rewards: (B, T) float32/float64 per-token rewards.
        values: (B, T) critic values, same dtype and device as rewards.
        mask: (B, T) 0/1 response mask, any dtype (nonzero = valid).
        last_value: optional (B,) bootstrap value after each row's last valid token (cast to the dtype).
        gamma, lam: discount and GAE lambda, in [0, 1].
        carry: "carry" mask mode (skip masked tokens) instead of "zero".
    Returns:
        advantages (B, T), returns (B, T) = advantages + values, both zero outside the mask.
    """
    _check_tensor("rewards", rewards)
    _dtype_name("rewards", rewards)
    _check_tensor("values", values, rewards, "rewards")
    _check_tensor("mask", mask, rewards, "rewards", same_dtype=False)
    B = rewards.shape[0]
    if last_value is not None:
        if not isinstance(last_value, torch.Tensor):
            raise TypeError(f"last_value: expected a torch.Tensor or None, got {type(last_value).__name__}")
        if last_value.dim() != 1 or last_value.shape[0] != B:
            raise ValueError(f"last_value: expected shape ({B},), got {tuple(last_value.shape)}")
        if last_value.device != rewards.device:
            raise ValueError(f"last_value: expected device {rewards.device} (as rewards), got {last_value.device}")
        if not last_value.is_floating_point():
            raise TypeError(f"last_value: expected a floating-point tensor, got {last_value.dtype}")
        last_value = last_value.to(rewards.dtype).contiguous()
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma: expected a value in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam: expected a value in [0, 1], got {lam}")
    _device_kind("rewards", rewards)
    if torch.compiler.is_compiling():  # the custom op (kernels/native_ops.py): dynamo does not trace the Function
        return native_ops.native_gae(rewards.contiguous(), values.contiguous(), _mask_u8(mask), last_value,
                                     float(gamma), float(lam), bool(carry))
    return _GAEFunction.apply(rewards.contiguous(), values.contiguous(), last_value, _mask_u8(mask),
                              float(gamma), float(lam), bool(carry))


# ----------------------------------------------------------------------------- PPO loss

def _check_ppo_tensors(logp, others: tuple, mask) -> None:
    """The tensor checks of the PPO losses, each with its error message: logp a (B, T) float32/float64 tensor;
    others (old_logp, advantages, values, old_values, returns, ref_logp, entropy; None = absent) and mask of its
    shape and device, the others in its dtype."""
    _check_tensor("logp", logp)
    _dtype_name("logp", logp)
    for name, x in zip(("old_logp", "advantages", "values", "old_values", "returns", "ref_logp", "entropy"), others):
        if x is not None:
            _check_tensor(name, x, logp, "logp")
    _check_tensor("mask", mask, logp, "logp", same_dtype=False)


def _normalizer(name: str, x, dtype: torch.dtype, device: torch.device):
    """(mode, value, tensor) for num_tokens / num_seqs: from the mask, a number, or a device scalar.

    A tensor on the inputs' CUDA device is read by the kernel (no host sync); a CPU tensor is read
    on the host (no device sync either).
    """
    if x is None:
        return _NORM_FROM_MASK, 0.0, None
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name}: expected a number or a 1-element tensor, got shape {tuple(x.shape)}")
        if x.device.type == "cpu":
            return _NORM_VALUE, float(x.reshape(()).to(dtype).item()), None
        if x.device != device:
            raise ValueError(f"{name}: expected a CPU tensor or one on {device} (as logp), got {x.device}")
        return _NORM_POINTER, 0.0, x.reshape(()).to(dtype).contiguous()
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return _NORM_VALUE, float(x), None
    raise TypeError(f"{name}: expected None, a number or a tensor, got {type(x).__name__}")


class _PPOCall:
    """One PPO loss call: the constant tensors (no gradient flows to them) and the hyperparameters."""

    def __init__(self, old_logp, advantages, mask_u8, old_values, returns, ref_logp, cfg: dict, norms: dict):
        self.old_logp, self.advantages, self.mask_u8 = old_logp, advantages, mask_u8
        self.old_values, self.returns, self.ref_logp = old_values, returns, ref_logp
        self.cfg, self.norms = cfg, norms

    def run(self, logp, values, entropy, needs_grad):
        """Loss (), metrics (7,), unnormalized grads (logp, values, entropy or None), row_scale (B,)."""
        B, T = logp.shape
        dev, dtype = logp.device, logp.dtype
        grads = [torch.empty_like(x) if x is not None and need else None
                 for x, need in zip((logp, values, entropy), needs_grad)]
        # One float64 workspace: the row scales c_b (B,) first (the custom op returns them), then the row partial
        # sums (B, P).
        nb, P = max(B, 1), _C.ppo_num_partials
        work = torch.empty(nb * (P + 1), dtype=torch.float64, device=dev)
        row_scale, partials = work[:nb], work[nb:]
        loss = torch.empty((), dtype=dtype, device=dev)
        metrics = torch.empty(len(METRIC_KEYS), dtype=dtype, device=dev)
        a = _C.PpoLossArgs()
        a.logp, a.old_logp, a.advantages, a.mask = logp.data_ptr(), self.old_logp.data_ptr(), \
            self.advantages.data_ptr(), self.mask_u8.data_ptr()
        a.values, a.old_values, a.returns = _ptr(values), _ptr(self.old_values), _ptr(self.returns)
        a.ref_logp, a.entropy = _ptr(self.ref_logp), _ptr(entropy)
        a.grad_logp, a.grad_values, a.grad_entropy = (_ptr(g) for g in grads)
        a.row_partials, a.row_scale, a.loss, a.metrics = (partials.data_ptr(), row_scale.data_ptr(), loss.data_ptr(),
                                                          metrics.data_ptr())
        a.B, a.T, a.dtype = B, T, _DTYPES[dtype]
        for key, value in self.cfg.items():
            setattr(a, key, value)
        for key, (mode, value, tensor) in self.norms.items():
            setattr(a, f"{key}_mode", mode)
            setattr(a, f"{key}_value", value)
            setattr(a, f"{key}_ptr", _ptr(tensor))
        if logp.is_cuda:
            with _on_device(dev):
                a.stream = _stream(dev)
                _C.ppo_loss_forward_cuda(a)
        else:
            _C.ppo_loss_forward_cpu(a)
        return loss, metrics, grads, row_scale


def ppo_loss_backward(grads, row_scale: torch.Tensor, grad_output: torch.Tensor):
    """d loss / d (logp, values, entropy) = saved grads * row_scale[b] * grad_output (None stays None)."""
    g_lp, g_v, g_h = grads
    ref = next(g for g in grads if g is not None)
    B, T = ref.shape
    go = grad_output if grad_output.dtype == ref.dtype else grad_output.to(ref.dtype)
    go = go.reshape(()).contiguous()
    outs = [None if g is None else torch.empty_like(g) for g in grads]
    args = (row_scale.data_ptr(), go.data_ptr(), _ptr(g_lp), _ptr(outs[0]), _ptr(g_v), _ptr(outs[1]), _ptr(g_h),
            _ptr(outs[2]), B, T, _DTYPES[ref.dtype])
    if ref.is_cuda:
        with _on_device(ref.device):
            _C.ppo_loss_backward_cuda(*args, _stream(ref.device))
    else:
        _C.ppo_loss_backward_cpu(*args)
    return outs


class _PPOLossFunction(torch.autograd.Function):
    """Fused PPO loss: the forward computes the gradients too; the backward only rescales them."""

    @staticmethod
    def forward(ctx, logp, values, entropy, call: _PPOCall):
        loss, metrics, grads, row_scale = call.run(logp, values, entropy, ctx.needs_input_grad[:3])
        ctx.save_for_backward(*grads, row_scale)
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_metrics):  # noqa: ARG004 - metrics are not differentiable
        *grads, row_scale = ctx.saved_tensors
        if all(g is None for g in grads):
            return None, None, None, None
        return (*ppo_loss_backward(grads, row_scale, grad_loss), None)


def _check_required(kl_coef: float, ent_coef: float, ref_logp, entropy) -> None:
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError("ref_logp: required when kl_coef != 0")
    if ent_coef != 0.0 and entropy is None:
        raise ValueError("entropy: required when ent_coef != 0")


def _args_config(dtype_name: str, *hyper) -> "_C.PpoLossArgs":
    """The checked hyperparameters (``ppo_hyperparameters``'s arguments) packed into a ``_C.PpoLossArgs`` for
    ``dtype_name`` (its pointer fields unused; max_len 0 stands for T)."""
    lo, hi, dual, vclip, vf, ent, kl, kl_kind, agg, max_len = ppo_hyperparameters(*hyper)
    a = _C.PpoLossArgs()
    a.clip_low, a.clip_high = lo, hi
    a.dual_clip = 0.0 if dual is None else dual
    a.value_clip = 0.0 if vclip is None else vclip
    a.vf_coef, a.ent_coef, a.kl_coef = vf, ent, kl
    a.kl_kind, a.agg = KL_KINDS.index(kl_kind) + 1, AGG_MODES.index(agg)
    a.max_len = 0.0 if max_len is None else float(max_len)
    a.dtype = dtype_name
    return a


# ppo_loss_with_grads: the packed configuration, built once per (dtype, hyperparameters) of plain values
_ppo_grads_config = ConfigCache(_args_config)


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
             values: torch.Tensor | None = None, old_values: torch.Tensor | None = None,
             returns: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
             entropy: torch.Tensor | None = None, clip_low: float = 0.2, clip_high: float | None = None,
             dual_clip: float | None = None, value_clip: float | None = 0.2, vf_coef: float = 0.5,
             ent_coef: float = 0.0, kl_coef: float = 0.0, kl_kind: str = "k3", agg: str = "token-mean",
             num_tokens=None, num_seqs=None, max_len: int | None = None) -> tuple[torch.Tensor, dict]:
    """The PPO objective, fused: one pass computes the loss, the metrics and the gradients.

        loss = agg(pg) + vf_coef * agg(vf) - ent_coef * agg(H) + kl_coef * agg(k(logp, ref_logp))

    Semantics, arguments and metrics exactly as ``rlhf_engine.algo.losses.ppo_loss_reference``.
    Gradients flow to ``logp``, ``values`` and ``entropy`` only; old_logp, advantages, old_values,
    returns and ref_logp are treated as constants (as in PPO, where they are detached).

    Args:
        logp: (B, T) float32/float64 log-probs of the taken tokens under the current policy.
        old_logp, advantages: (B, T), same dtype and device as logp.
        mask: (B, T) 0/1 response mask, any dtype (nonzero = valid).
        values, old_values, returns: optional (B, T), all three or none (clipped value loss).
        ref_logp: optional (B, T) reference log-probs (KL term, ``kl_coef``, estimator ``kl_kind``).
        entropy: optional (B, T) per-token entropy (bonus ``ent_coef``).
        clip_low, clip_high, dual_clip, value_clip, vf_coef, ent_coef, kl_coef, kl_kind: as the reference.
        agg: one of :data:`AGG_MODES`.
        num_tokens, num_seqs: global normalizers: None (count from the mask), a number, or a 0-dim
            tensor (on the inputs' device it is read by the kernel: no host sync).
        max_len: T_max of "seq-mean-token-sum-norm" (default T).
    Returns:
        loss (0-dim, differentiable), metrics: dict of detached 0-dim tensors: pg_loss, clip_frac,
        approx_kl, and vf_loss, vf_clip_frac / entropy / kl when their inputs are given.
    """
    check_counts(num_tokens, num_seqs)
    _check_ppo_tensors(logp, (old_logp, advantages, values, old_values, returns, ref_logp, entropy), mask)
    critic = [values is None, old_values is None, returns is None]
    if any(critic) and not all(critic):
        raise ValueError("values, old_values, returns: expected all three or none")
    lo, hi, dual, vclip, vf, ent, kl, kl_kind, agg, max_len = ppo_hyperparameters(
        clip_low, clip_high, dual_clip, value_clip, vf_coef, ent_coef, kl_coef, kl_kind, agg, max_len)
    _check_required(kl, ent, ref_logp, entropy)
    _device_kind("logp", logp)
    dtype, dev, T = logp.dtype, logp.device, logp.shape[1]
    cfg = dict(clip_low=lo, clip_high=hi, dual_clip=0.0 if dual is None else dual,
               value_clip=0.0 if vclip is None else vclip, vf_coef=vf, ent_coef=ent, kl_coef=kl,
               kl_kind=KL_KINDS.index(kl_kind) + 1, agg=AGG_MODES.index(agg),
               max_len=float(T if max_len is None else max_len))
    norms = {"ntok": _normalizer("num_tokens", num_tokens, dtype, dev),
             "nseq": _normalizer("num_seqs", num_seqs, dtype, dev)}
    c = lambda x: None if x is None else x.detach().contiguous()  # noqa: E731
    if torch.compiler.is_compiling():  # the custom op (kernels/native_ops.py): dynamo does not trace the Function
        d = lambda x: None if x is None else x.contiguous()  # noqa: E731
        # a tensor normalizer is read by the op through its pointer (a CPU tensor's .item() would break the graph)
        (ntm, ntv, ntt), (nsm, nsv, nst) = (
            (_NORM_POINTER, 0.0, x.reshape(()).to(device=dev, dtype=dtype).contiguous())
            if isinstance(x, torch.Tensor) else norms[key] for key, x in (("ntok", num_tokens), ("nseq", num_seqs)))
        need = [x is not None and x.requires_grad and torch.is_grad_enabled() for x in (logp, values, entropy)]
        loss, metrics_buf, *_ = native_ops.native_ppo_loss(
            d(logp), c(old_logp), c(advantages), _mask_u8(mask), d(values), c(old_values), c(returns), c(ref_logp),
            d(entropy), ntt, nst, ntm, ntv, nsm, nsv, *cfg.values(), *need)
    else:
        call = _PPOCall(c(old_logp), c(advantages), _mask_u8(mask), c(old_values), c(returns), c(ref_logp), cfg,
                        norms)
        loss, metrics_buf = _PPOLossFunction.apply(logp.contiguous(),
                                                   None if values is None else values.contiguous(),
                                                   None if entropy is None else entropy.contiguous(), call)
    by_name = dict(zip(METRIC_KEYS, metrics_buf.unbind(0)))
    return loss, {k: by_name[k] for k in metric_keys(values is not None, entropy is not None, ref_logp is not None)}


# ----------------------------------------------------------------------------- PPO loss and its gradients

_PPO_ROW_DOUBLES = _C.ppo_num_partials + 1 if _C is not None else 0  # per row: the partials, the row scale


def ppo_loss_with_grads(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                        values: torch.Tensor | None = None, old_values: torch.Tensor | None = None,
                        returns: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                        entropy: torch.Tensor | None = None, clip_low: float = 0.2, clip_high: float | None = None,
                        dual_clip: float | None = None, value_clip: float | None = 0.2, vf_coef: float = 0.5,
                        ent_coef: float = 0.0, kl_coef: float = 0.0, kl_kind: str = "k3", agg: str = "token-mean",
                        num_tokens=None, num_seqs=None, max_len: int | None = None, grad_scale: float = 1.0,
                        ) -> tuple[torch.Tensor, PPOMetrics, dict[str, torch.Tensor]]:
    """The PPO objective AND its gradients in one native call (two CUDA launches, or one C++ pass and a scale on
    the CPU), with no autograd node: the native twin of ``kernels.ppo_loss.ppo_loss_with_grads``.

    The first launch writes the per-token gradients and per-row partial sums; the second, up to 264 blocks over
    the rows, reduces the partials (each block the same way: the same N everywhere), scales its rows' gradients in
    place by grad_scale * c_b, and block 0 writes the loss and the metrics. Hand the gradients to the model's
    graph::

        loss, metrics, grads = native.ppo_loss_with_grads(logp.detach(), old_logp, adv, mask, values=v.detach(), ...)
        torch.autograd.backward([logp, v], [grads["logp"], grads["values"]])

    It is the cheapest call of the loss on the host: the hyperparameters are checked and packed once per
    configuration (cached), the tensors checked in one pass (the descriptive checks run only on a failure), one
    allocation per gradient and one for the rest, one pybind11 call that launches both kernels from C++, and
    metric views made when first read.

    Args:
        as :func:`ppo_loss` (float32 or float64, every floating-point tensor in logp's dtype); ``logp``,
        ``values`` and ``entropy`` need not require grad (they are read, never differentiated).
        grad_scale: the gradients are those of ``grad_scale * loss`` (e.g. 1 / accumulation steps).
    Returns:
        loss: () detached; metrics: :class:`~rlhf_engine.kernels._metrics.PPOMetrics`, a read-only mapping with
        :func:`ppo_loss`'s keys; grads: {"logp": (B, T), plus "values" and "entropy" when given}, each
        ``grad_scale`` times d loss / d input (0 on masked tokens).
    """
    check_counts(num_tokens, num_seqs)
    others = (old_logp, advantages, values, old_values, returns, ref_logp, entropy)
    try:  # one pass over the tensors; any doubt runs the descriptive checks, which raise
        shape, dev, dt = logp.shape, logp.device, logp.dtype
        ok = len(shape) == 2 and dt in _DTYPES and mask.shape == shape and mask.device == dev
        for x in others:
            if x is not None and not (x.shape == shape and x.device == dev and x.dtype == dt):
                ok = False
                break
    except AttributeError:
        ok = False
    if not ok or _C is None or (dev.type == "cuda" and not _C.with_cuda) or dev.type not in ("cpu", "cuda"):
        _check_ppo_tensors(logp, others, mask)
        _device_kind("logp", logp)
    if not (values is None) == (old_values is None) == (returns is None):
        raise ValueError("values, old_values, returns: expected all three or none")
    grad_scale = grad_scale_value(grad_scale)
    cfg = _ppo_grads_config(_DTYPES[dt], clip_low, clip_high, dual_clip, value_clip, vf_coef, ent_coef, kl_coef,
                            kl_kind, agg, max_len)
    _check_required(cfg.kl_coef, cfg.ent_coef, ref_logp, entropy)
    ntok_mode, ntok_value, ntok = _normalizer("num_tokens", num_tokens, dt, dev)
    nseq_mode, nseq_value, nseq = _normalizer("num_seqs", num_seqs, dt, dev)

    B, T = shape
    has_v, has_h = values is not None, entropy is not None
    # contiguous copies (if any) stay referenced until the launch: a freed one could back the next copy
    ins = [x if x is None or x.is_contiguous() else x.contiguous() for x in (logp, *others)]
    lp = ins[0]
    g_lp = torch.empty_like(lp)  # lp is contiguous: so are the gradients (the kernels write row-major)
    g_v = torch.empty_like(lp) if has_v else None
    g_h = torch.empty_like(lp) if has_h else None
    # small: loss (1), metrics (7), then B * (partials + 1) doubles (8 fp32 / fp64 elements keep them 8-byte aligned)
    small = lp.new_empty(8 + B * _PPO_ROW_DOUBLES * (8 // lp.element_size()))
    base, es = small.data_ptr(), small.element_size()
    # a contiguous bool mask is read as bytes in place (0/1, what the kernels test for nonzero)
    m = mask if mask.dtype == torch.bool and mask.is_contiguous() else _mask_u8(mask)
    v, ov, ret, rlp, h = ins[3:]
    args = (cfg, lp.data_ptr(), ins[1].data_ptr(), ins[2].data_ptr(), m.data_ptr(),
            0 if v is None else v.data_ptr(), 0 if ov is None else ov.data_ptr(),
            0 if ret is None else ret.data_ptr(), 0 if rlp is None else rlp.data_ptr(),
            0 if h is None else h.data_ptr(), g_lp.data_ptr(), 0 if g_v is None else g_v.data_ptr(),
            0 if g_h is None else g_h.data_ptr(), base + 8 * es, base, base + es, B, T, ntok_mode, ntok_value,
            0 if ntok is None else ntok.data_ptr(), nseq_mode, nseq_value, 0 if nseq is None else nseq.data_ptr(),
            grad_scale, dev.type == "cuda")
    if dev.type != "cuda":
        _C.ppo_loss_grads(*args, 0)
    elif dev.index == torch.cuda.current_device():  # the common case: no device switch (torch's guard costs µs)
        _C.ppo_loss_grads(*args, _stream(dev))
    else:
        with torch.cuda.device(dev):
            _C.ppo_loss_grads(*args, _stream(dev))
    grads = {"logp": g_lp}
    if has_v:
        grads["values"] = g_v
    if has_h:
        grads["entropy"] = g_h
    return small[0], PPOMetrics(small, metric_keys(has_v, has_h, ref_logp is not None), offset=1), grads


from . import native_ops  # noqa: E402 - the custom ops call this module's launch functions
