"""RMSNorm, optionally fused with the residual add before it, in one Triton kernel, with its backward.

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

Backward (n = s_f32 · rstd, g = dout · weight, both fp32; ``ds_out`` the gradient arriving at the s output):
    ds = rstd · (g − n · mean(g · n)) + ds_out       (the gradient of x, and of the residual: the same tensor)
    dw = Σ_rows dout · y                              (y rounded to dt, as the forward multiplied it)
It saves only s (the residual stream, which the model keeps anyway; x without a residual) and recomputes rstd
from the row it reads: the eager ops save an fp32 copy of s, the normalized y and rstd (6 bytes an element in
bf16 against 2). Each of a fixed number of programs (eight per SM) walks a contiguous block of rows and keeps
its dw partial sum in registers; the (programs, H) fp32 partials are then summed by one reduction, so dw is
deterministic. Everything is fp32 until the one rounding of each output.

The model uses it on the triton backend: the generation paths (no autograd) and the training forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._fastlaunch import launch
from ._launch import cdiv, next_pow2, sm_count
from .reference.norm import rms_norm_reference

_BACKENDS = ("auto", "triton", "torch")
# One row per program, held in registers: the backward's ~6 fp32 values a column spill past 8192 columns on sm_90
# (16384 over 32 warps: 64 registers a thread, the whole file). Wider models (Llama-3-405B) take the eager norms.
MAX_HIDDEN = 8192


@triton.jit
def rms_normalize(sf, rstd, w, DT: tl.constexpr, OUT_T: tl.constexpr):
    """w * (s * rstd).to(DT), rounded to OUT_T: transformers' roundings, from fp32 s, rstd and w (broadcastable;
    also the prologue of ``norm_linear``'s GEMM)."""
    y = (sf * rstd).to(DT)  # back to the input dtype before the weight, as transformers
    return (w * y.to(tl.float32)).to(OUT_T)


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
    w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + offs, rms_normalize(xf, rstd, w, X.dtype.element_ty, Y.dtype.element_ty), mask=m)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch ``_rms_norm_kernel`` on x (N, H) with unit stride on H; inputs validated by ``rms_norm``."""
    N, H = x.shape
    y = torch.empty((N, H), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    s = torch.empty_like(x) if residual is not None else None
    if N == 0:
        return y, s
    block = next_pow2(H)
    launch(_rms_norm_kernel, (N,),
        x, residual if residual is not None else x, weight, y, s if s is not None else y,
        x.stride(0), residual.stride(0) if residual is not None else 0, H, H if s is not None else 0, H, eps,
        HAS_RES=residual is not None, BLOCK_H=block, num_warps=4 if block <= 2048 else 8,
    )
    return y, s


@triton.jit
def _rms_norm_bwd_kernel(
    DY, DSO, S, W, DS, DWP,
    stride_dy, stride_dso, stride_s, stride_ds,
    N, H, eps, rows_per_program,
    HAS_DSO: tl.constexpr, HAS_DW: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_H)
    m = offs < H
    w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program  # int64 rows: N * stride may pass 2^31
    for row in range(first, tl.minimum(first + rows_per_program, N)):
        sf = tl.load(S + row * stride_s + offs, mask=m, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / H + eps)  # as the forward computed it
        n = sf * rstd
        dy = tl.load(DY + row * stride_dy + offs, mask=m, other=0.0).to(tl.float32)
        g = dy * w
        ds = rstd * (g - n * (tl.sum(g * n, axis=0) / H))
        if HAS_DSO:
            ds += tl.load(DSO + row * stride_dso + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(DS + row * stride_ds + offs, ds.to(DS.dtype.element_ty), mask=m)
        if HAS_DW:
            dw += dy * n.to(S.dtype.element_ty).to(tl.float32)  # y as the forward rounded it
    if HAS_DW:
        tl.store(DWP + pid * H + offs, dw, mask=m)


@triton.jit
def _col_sum_kernel(P, OUT, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # OUT[c] = sum_r P[r, c] of a contiguous fp32 (n_rows, n_cols), accumulated in fp32 in a fixed order and written
    # in OUT's dtype: the weight gradient from the backward's per-program partials in one launch, where
    # partial.sum(0).to(weight.dtype) takes two for a 16-bit weight.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < n_cols
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        x = tl.load(P + rows[:, None] * n_cols + cols[None, :], mask=(rows[:, None] < n_rows) & cm[None, :],
                    other=0.0)
        acc += tl.sum(x, axis=0)
    tl.store(OUT + cols, acc.to(OUT.dtype.element_ty), mask=cm)


def _col_sum(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(P, H) fp32 partials -> (H,) of ``dtype``: one launch (a 16-bit weight's cast included)."""
    if dtype == torch.float32:
        return partial.sum(0)  # one kernel already
    n_rows, n_cols = partial.shape
    # the interpreter (CPU) truncates fp32 -> 16-bit stores instead of rounding to nearest: round with torch there
    cast_in_kernel = partial.is_cuda
    out = torch.empty(n_cols, dtype=dtype if cast_in_kernel else torch.float32, device=partial.device)
    launch(_col_sum_kernel, (cdiv(n_cols, 64),), partial, out, n_rows, n_cols, BLOCK_R=32, BLOCK_C=64,
           num_warps=4)
    return out if cast_in_kernel else out.to(dtype)


def _bwd_warps(block: int) -> int:
    """4 warps up to 2048 columns, 8 up to 4096, then 16 (MAX_HIDDEN = 8192): the backward keeps ~6 fp32 values
    a column live (s, n, dy, g, ds, the dweight sum); on sm_90, 8192 columns over 8 warps take 255 registers a
    thread, over 16 warps 116 (tests/test_triton_compile.py)."""
    return 4 if block <= 2048 else 8 if block <= 4096 else 16


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm_backward(dy: torch.Tensor, ds_out: Optional[torch.Tensor], s: torch.Tensor, weight: torch.Tensor,
                      eps: float, need_dw: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch ``_rms_norm_bwd_kernel``: dy (N, H) (the gradient of out), ds_out (N, H) or None (of s), s (N, H)
    the normalized input. Returns (ds in s's dtype, dw in weight's dtype or None)."""
    N, H = s.shape
    ds = torch.empty((N, H), dtype=s.dtype, device=s.device)
    if N == 0:
        return ds, (torch.zeros_like(weight) if need_dw else None)
    dy = _unit_rows(dy)
    ds_out = _unit_rows(ds_out) if ds_out is not None else None
    programs = min(N, 8 * sm_count(s.device))  # 8 programs of 4 warps an SM: rows in flight to hide latency
    rows = cdiv(N, programs)
    programs = cdiv(N, rows)
    partial = torch.empty((programs, H), dtype=torch.float32, device=s.device) if need_dw else ds
    block = next_pow2(H)
    launch(_rms_norm_bwd_kernel, (programs,),
        dy, ds_out if ds_out is not None else dy, s, weight, ds, partial,
        dy.stride(0), ds_out.stride(0) if ds_out is not None else 0, s.stride(0), H, N, H, eps, rows,
        HAS_DSO=ds_out is not None, HAS_DW=need_dw, BLOCK_H=block, num_warps=_bwd_warps(block),
    )
    return ds, (_col_sum(partial, weight.dtype) if need_dw else None)


class RMSNormFunction(torch.autograd.Function):
    """Eager autograd for ``rms_norm``: (x, weight, eps, residual or None, copy_grad) -> out, or (out, s) with a
    residual. x and the residual get the same gradient: one tensor for both, or (``copy_grad``, when one of them
    is a leaf whose ``.grad`` could keep it) a copy for the residual, so that two ``.grad`` never share memory."""

    @staticmethod
    def forward(ctx, x, weight, eps, residual, copy_grad):
        y, s = rms_norm_forward(x, weight, eps, residual)
        ctx.set_materialize_grads(False)  # an unused output (the last norm's s) brings no zero tensor
        ctx.save_for_backward(x if s is None else s, weight)
        ctx.eps, ctx.has_residual, ctx.copy_grad = eps, residual is not None, copy_grad
        return y if s is None else (y, s)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, ds_out=None):
        s, weight = ctx.saved_tensors
        need_x, need_w, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        if dy is None:  # only s was used: its gradient goes straight through the add; out's weight got none
            if ds_out is None:
                return None, None, None, None, None
            ds, dw = ds_out, (torch.zeros_like(weight) if need_w else None)
        else:
            ds, dw = rms_norm_backward(dy, ds_out, s, weight, ctx.eps, need_w)
        dr = None
        if ctx.has_residual and need_r:
            dr = ds.clone() if (ctx.copy_grad and need_x) else ds
        return ds if need_x else None, dw, None, dr, None


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


@torch.library.custom_op("rlhf_engine::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(dy: torch.Tensor, ds_out: Optional[torch.Tensor], s: torch.Tensor, weight: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ds, dw) of ``rms_norm`` (see ``rms_norm_backward``), for torch.compile."""
    return rms_norm_backward(dy, ds_out, s, weight, eps, True)


@rms_norm_backward_op.register_fake
def _rms_norm_backward_fake(dy, ds_out, s, weight, eps):
    return torch.empty_like(s), torch.empty_like(weight)


def _norm_setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _norm_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    ds, dw = rms_norm_backward_op(dy, None, x, weight, ctx.eps)
    return ds, dw, None


def _add_norm_setup_context(ctx, inputs, output):
    weight, eps = inputs[2], inputs[3]
    ctx.save_for_backward(output[1], weight)
    ctx.eps = eps


def _add_norm_backward(ctx, dy, ds_out):
    s, weight = ctx.saved_tensors
    ds, dw = rms_norm_backward_op(dy, ds_out, s, weight, ctx.eps)
    return ds, ds, dw, None


rms_norm_op.register_autograd(_norm_backward, setup_context=_norm_setup_context)
add_rms_norm_op.register_autograd(_add_norm_backward, setup_context=_add_norm_setup_context)


def _describe(x) -> str:
    return f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: Optional[torch.Tensor] = None,
             backend: str = "auto"):
    """RMSNorm over the last dim, optionally after a residual add; differentiable in x, weight and residual.

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
        ValueError/TypeError: on shapes, dtypes or devices that do not match.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.dtype.is_floating_point:
        raise TypeError(f"x: expected a floating-point tensor (..., H), got {_describe(x)}")
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
    if not 1 <= H <= MAX_HIDDEN:
        raise ValueError(f"x: expected a hidden size in [1, {MAX_HIDDEN}] (one row per program), got {H}")
    lead = x.shape[:-1]
    x2 = _unit_rows(x.reshape(-1, H))
    weight = weight.contiguous()
    r2 = None if residual is None else _unit_rows(residual.reshape(-1, H))
    if torch.compiler.is_compiling():
        if r2 is None:
            return rms_norm_op(x2, weight, float(eps)).view(*lead, H)
        y, s = add_rms_norm_op(x2, r2, weight, float(eps))
        return y.view(*lead, H), s.view(*lead, H)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, residual)):
        # a leaf's .grad may be accumulated into later: it must not be the other input's gradient too. Not so for
        # the detached inputs of a recomputed layer (model/checkpointing.py), whose .grad is read once: no copy
        copy_grad = r2 is not None and any(t.is_leaf and not getattr(t, "_grad_read_once", False)
                                           for t in (x, residual))
        out = RMSNormFunction.apply(x2, weight, float(eps), r2, copy_grad)
    else:
        out = rms_norm_forward(x2, weight, float(eps), r2)
        out = out[0] if r2 is None else out
    if r2 is None:
        return out.view(*lead, H)
    return out[0].view(*lead, H), out[1].view(*lead, H)
