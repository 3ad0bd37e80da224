"""RMSNorm, optionally fused with the residual add before it, in one Triton kernel (inference: no backward).

The transformers (Llama, Qwen2) definition, with its rounding steps, for x (N, H) in a dtype ``dt``:
    s   = x + residual                               (rounded to dt, as the eager add; with ``residual``)
    y   = (s_f32 * rsqrt(mean(s_f32²) + eps)).to(dt)  (statistics in fp32; cast before the weight multiply)
    out = weight * y                                 (in the promoted dtype of weight and dt)
One program per row reads x (and the residual) once and writes out (and s) once. The residual sum is the eager
add bit for bit; out may differ from eager by one unit in the last place of ``dt`` (the sum of squares in
another order, and the GPU's approximate sqrt / divide where eager uses rsqrtf). The eager path is 4 to 6
kernels a norm (cast, square/mean/rsqrt/mul or one fused rms_norm, cast, weight multiply) plus the add: in a
decode step of a 0.5B model at batch 64 each of them is a few microseconds of launch and tail for ~100 KB of
data, and there are two norms per layer.

The model uses it on the generation paths (prefill and decode) only: the training forward keeps the eager
ops, which autograd differentiates, and a no-grad forward of the same kind gives bit-identical log-probs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import next_pow2
from .reference.norm import rms_norm_reference

_BACKENDS = ("auto", "triton", "torch")
MAX_HIDDEN = 16384  # one row per program, held in registers (16K fp32 over 8 warps: 64 a thread)


@triton.jit
def _rms_norm_kernel(
    X, R, W, Y, S,
    stride_x, stride_r, stride_y, stride_s,
    H, eps,
    HAS_RES: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    m = offs < H
    x = tl.load(X + row * stride_x + offs, mask=m, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * stride_r + offs, mask=m, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)  # the eager add's rounding
        tl.store(S + row * stride_s + offs, s, mask=m)
        xf = s.to(tl.float32)
    else:
        xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
    y = (xf * rstd).to(X.dtype.element_ty)  # back to the input dtype before the weight, as transformers
    w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + offs, (w * y.to(tl.float32)).to(Y.dtype.element_ty), mask=m)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch ``_rms_norm_kernel`` on x (N, H) with unit stride on H; inputs validated by ``rms_norm``."""
    N, H = x.shape
    y = torch.empty((N, H), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    s = torch.empty_like(x) if residual is not None else None
    if N == 0:
        return y, s
    block = next_pow2(H)
    _rms_norm_kernel[(N,)](
        x, residual if residual is not None else x, weight, y, s if s is not None else y,
        x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        s.stride(0) if s is not None else 0, H, eps,
        HAS_RES=residual is not None, BLOCK_H=block, num_warps=4 if block <= 2048 else 8,
    )
    return y, s


@torch.library.custom_op("rlhf_engine::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm`` without a residual, for torch.compile."""
    return rms_norm_forward(x, weight, eps, None)[0]


@rms_norm_op.register_fake
def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


@torch.library.custom_op("rlhf_engine::add_rms_norm", mutates_args=())
def add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm`` with a residual, for torch.compile: (out, x + residual)."""
    y, s = rms_norm_forward(x, weight, eps, residual)
    return y, s


@add_rms_norm_op.register_fake
def _add_rms_norm_fake(x, residual, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype)), torch.empty_like(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: Optional[torch.Tensor] = None,
             backend: str = "auto"):
    """RMSNorm over the last dim, optionally after a residual add; no gradient.

    Args:
        x: (..., H) float tensor.
        weight: (H,) float tensor (the norm's scale).
        eps: added to the mean square, > 0 or 0.
        residual: optional tensor of x's shape and dtype; the norm then runs on s = x + residual.
        backend: "triton" (a CUDA tensor, or the Triton interpreter), "torch" (the eager reference) or
            "auto" (triton on CUDA).
    Returns:
        out (..., H) in the promoted dtype of weight and x; with ``residual``, (out, s) where s = x + residual
        in x's dtype (the next residual stream).
    Raises:
        ValueError/TypeError: on shapes, dtypes or devices that do not match; RuntimeError when autograd
        would need a gradient (use the eager ops in a training forward).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.dtype.is_floating_point:
        raise TypeError(f"x: expected a floating-point tensor (..., H), got {x!r:.80}")
    H = x.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.shape != (H,) or not weight.dtype.is_floating_point:
        raise ValueError(f"weight: expected a floating-point ({H},) tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if not eps >= 0:  # NaN fails too
        raise ValueError(f"eps: expected >= 0, got {eps}")
    if residual is not None and (not isinstance(residual, torch.Tensor) or residual.shape != x.shape
                                 or residual.dtype != x.dtype):
        got = (residual.dtype, tuple(residual.shape)) if isinstance(residual, torch.Tensor) else residual
        raise ValueError(f"residual: expected a {x.dtype} tensor of shape {tuple(x.shape)}, got {got}")
    devs = {t.device for t in (x, weight, residual) if t is not None}
    if len(devs) != 1:
        raise ValueError(f"x, weight, residual: expected one device, got {devs}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return rms_norm_reference(x, weight, eps, residual)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, residual)):
        raise RuntimeError("rms_norm (triton): inference only, it has no backward; call it under torch.no_grad()")
    if H > MAX_HIDDEN:
        raise ValueError(f"x: hidden size {H} exceeds {MAX_HIDDEN} (one row per program)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, H)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    weight = weight.contiguous()
    if residual is None:
        if torch.compiler.is_compiling():
            return rms_norm_op(x2, weight, float(eps)).view(*lead, H)
        return rms_norm_forward(x2, weight, float(eps), None)[0].view(*lead, H)
    r2 = residual.reshape(-1, H)
    r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    if torch.compiler.is_compiling():
        y, s = add_rms_norm_op(x2, r2, weight, float(eps))
    else:
        y, s = rms_norm_forward(x2, weight, float(eps), r2)
    return y.view(*lead, H), s.view(*lead, H)
