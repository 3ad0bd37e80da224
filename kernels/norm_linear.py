"""RMSNorm (after the residual add) fused into the GEMM that reads it, optionally with SwiGLU in the epilogue: one
kernel where a decode layer runs two or three.

For x (M, K) in a dtype ``dt``, the residual r, the norm weight g (K,), the projection W (N, K) and bias b:
    s   = x + r                                        (rounded to dt, as the eager add; without r: s = x)
    y   = g * (s_f32 * rsqrt(mean(s_f32²) + eps)).to(dt)  (the norm, with transformers' roundings)
    out = y Wᵀ + b                                     (fp32 accumulation, rounded once to dt)
and with ``swiglu`` (W = [W_gate; W_up], 2N rows, the packed gate/up weight):
    out = silu(gate).to(dt) * up, gate = (y W_gateᵀ).to(dt), up = (y W_upᵀ).to(dt)   (the SwiGLU pair's roundings)
Returns out and s (the next residual stream; None without r).

Why: a decode step at batch 64 is bound by per-kernel latency, not bytes (the first H100 run: ~5-6 us a kernel on
average for 255-280 kernels a step, the step at 3.6-4.1x the floor where the issue asks 3x). Per decoder layer the
generation path runs add + RMSNorm, the packed q/k/v GEMM, ..., add + RMSNorm, the packed gate/up GEMM, silu * up,
the down GEMM; with this kernel the two norms ride in the GEMMs after them and silu * up in the gate/up GEMM's
epilogue: 3 kernels fewer a layer (72 a Qwen2-0.5B step). Opt-in (``RLHF_ENGINE_DECODE_NORM_GEMM=1``, read by
``model.attention.decode_norm_gemm_enabled``) until a GPU run compares it with the cuBLAS GEMMs plus the separate
kernels.

How: programs tile (N, M) as (BLOCK_N, BLOCK_M); each walks K twice over its BLOCK_M rows: once for the sum of
squares (the program of the first N tile also writes s), once to build the normalized rows chunk by chunk as the
norm kernel rounds them and feed them to ``tl.dot`` with its BLOCK_N weight rows (and the matching up rows with
``swiglu``). Every program reads its rows of x (and r) twice, from L2 after the first touch (M · K · 2 B, ~115 KB at
Qwen2-0.5B's batch 64, per program and walk: with 36-152 programs ~8-70 MB of L2 reads a GEMM, next to 2-17 MB of
weights from HBM), instead of a round trip of the normalized rows through HBM and a second launch. The weights are
read once per M tile (once at M <= 64). The sum of squares is
taken in BLOCK_K chunks, so rstd may differ from the norm kernel's by an fp32 ulp and y by a ``dt`` ulp; the GEMM
accumulates in another order than cuBLAS. Inference only (no autograd).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._fastlaunch import launch
from ._launch import cdiv, next_pow2, parallel_autotune
from .attention_fwd import autotune_enabled, dot_precision
from .reference.norm import rms_norm_reference
from .rmsnorm import rms_normalize
from .swiglu import silu_mul_rounded

_BACKENDS = ("auto", "triton", "torch")


@triton.jit
def _norm_linear_kernel(
    X, R, G, W, BIAS, Y, S,
    M, N, K,
    stride_xm, stride_rm, stride_wn, stride_ym, stride_sm,
    eps, M_BUCKET,  # M_BUCKET: autotune key only
    HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows = offs_m.to(tl.int64)
    dt = X.dtype.element_ty

    # walk 1: the sum of squares of s = x + r (rounded to dt as the eager add), s written by the first N tile
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = m_ok[:, None] & (offs_k[None, :] < K)
        s = tl.load(X + rows[:, None] * stride_xm + offs_k[None, :], mask=mk, other=0.0)
        if HAS_RES:
            r = tl.load(R + rows[:, None] * stride_rm + offs_k[None, :], mask=mk, other=0.0)
            s = (s.to(tl.float32) + r.to(tl.float32)).to(dt)
            tl.store(S + rows[:, None] * stride_sm + offs_k[None, :], s, mask=mk & (pid_n == 0))
        sf = s.to(tl.float32)
        sumsq += tl.sum(sf * sf, axis=1)
    rstd = 1.0 / tl.sqrt(sumsq / K + eps)

    # walk 2: y = g * (s * rstd).to(dt) chunk by chunk, into the dot with this tile's weight rows
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SWIGLU:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_rows = offs_n.to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        mk = m_ok[:, None] & k_ok[None, :]
        s = tl.load(X + rows[:, None] * stride_xm + offs_k[None, :], mask=mk, other=0.0)
        if HAS_RES:
            r = tl.load(R + rows[:, None] * stride_rm + offs_k[None, :], mask=mk, other=0.0)
            s = (s.to(tl.float32) + r.to(tl.float32)).to(dt)
        g = tl.load(G + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        y = rms_normalize(s.to(tl.float32), rstd[:, None], g[None, :], dt, W.dtype.element_ty)  # the norm kernel's
        nk = n_ok[:, None] & k_ok[None, :]
        w = tl.load(W + w_rows[:, None] * stride_wn + offs_k[None, :], mask=nk, other=0.0)
        acc = tl.dot(y, tl.trans(w), acc, input_precision=PRECISION)
        if SWIGLU:  # the up rows sit N rows below the gate rows in the packed weight
            wu = tl.load(W + (w_rows + N)[:, None] * stride_wn + offs_k[None, :], mask=nk, other=0.0)
            acc_up = tl.dot(y, tl.trans(wu), acc_up, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_t = Y.dtype.element_ty
    if SWIGLU:  # the GEMM outputs' rounding, then silu * up as the SwiGLU kernel
        out = silu_mul_rounded(acc.to(out_t).to(tl.float32), acc_up.to(out_t).to(tl.float32), out_t)
    else:
        out = acc.to(out_t)
    tl.store(Y + rows[:, None] * stride_ym + offs_n[None, :], out, mask=m_ok[:, None] & n_ok[None, :])


# (BLOCK_N, BLOCK_K, num_warps, num_stages). At batch 64 a decode GEMM is a few MB of weights spread over
# cdiv(N, BLOCK_N) programs: 36 (BLOCK_N 32) to 9 at Qwen2-0.5B's q/k/v (N = 1152), 152 to 38 at its gate/up
# (N = 4864 a half); small BLOCK_N spreads the weights over more SMs, BLOCK_K sets the bytes in flight per step.
_NL_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(32, 64, 4, 4), (64, 64, 4, 4), (32, 128, 8, 3), (64, 128, 8, 3), (16, 128, 8, 3),
                         (128, 64, 8, 3), (16, 64, 4, 4)]
]
_norm_linear_kernel_tuned = parallel_autotune(triton.autotune(
    configs=_NL_CONFIGS, key=["N", "K", "M_BUCKET", "HAS_RES", "HAS_BIAS", "SWIGLU"],
)(_norm_linear_kernel))
_NL_DEFAULT = triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4)  # no autotune (CUDA)
# fp32 on CUDA (tests): exact FMA dots, whose compile time grows with the tile: a small one
_NL_FP32 = triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=2)
_NL_INTERPRETER = {"BLOCK_N": 16, "BLOCK_K": 32}
MAX_ROWS = 256  # a GEMM of more rows (prefill, training) is cuBLAS's job: this kernel re-reads its rows per N tile


def norm_linear_forward(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                        weight: torch.Tensor, bias: Optional[torch.Tensor],
                        swiglu: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch ``_norm_linear_kernel`` on x (M, K) with unit column stride; inputs validated by ``rms_norm_linear``."""
    M, K = x.shape
    N = weight.shape[0] // 2 if swiglu else weight.shape[0]
    y = torch.empty((M, N), dtype=weight.dtype, device=x.device)
    s = torch.empty_like(x) if residual is not None else None
    if M == 0 or N == 0:
        return y, s
    block_m = max(16, min(64, next_pow2(M)))
    args = (x, residual if residual is not None else x, norm_weight, weight, bias if bias is not None else weight, y,
            s if s is not None else x, M, N, K,
            x.stride(0), residual.stride(0) if residual is not None else 0, weight.stride(0), y.stride(0),
            s.stride(0) if s is not None else 0, eps, block_m)
    meta = dict(HAS_RES=residual is not None, HAS_BIAS=bias is not None, SWIGLU=swiglu,
                PRECISION=dot_precision(x.dtype), BLOCK_M=block_m)
    if x.is_cuda and autotune_enabled(x.dtype):
        grid = lambda c: (cdiv(N, c["BLOCK_N"]), cdiv(M, block_m))  # noqa: E731
        _norm_linear_kernel_tuned[grid](*args, **meta)
    else:
        c = ((_NL_FP32 if x.dtype == torch.float32 else _NL_DEFAULT) if x.is_cuda
             else triton.Config(_NL_INTERPRETER, num_warps=4, num_stages=2))
        grid = (cdiv(N, c.kwargs["BLOCK_N"]), cdiv(M, block_m))
        launch(_norm_linear_kernel, grid, *args, **meta, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    return y, s


def norm_linear_reference(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, *, residual: Optional[torch.Tensor] = None,
                          swiglu: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The unfused ops, eager: ``rms_norm_reference`` (with the residual), ``F.linear``, and for ``swiglu`` the
    packed output's halves through ``F.silu(gate) * up``."""
    if residual is None:
        h, s = rms_norm_reference(x, norm_weight, eps), None
    else:
        h, s = rms_norm_reference(x, norm_weight, eps, residual)
    out = F.linear(h, weight, bias)
    if swiglu:
        gate, up = out.chunk(2, dim=-1)
        out = F.silu(gate) * up
    return out, s


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, *, residual: Optional[torch.Tensor] = None,
                    swiglu: bool = False, backend: str = "auto") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``F.linear(rms_norm(x + residual), weight, bias)`` in one kernel, and with ``swiglu`` the MLP's activation
    ``silu(gate) * up`` of the packed gate/up projection too (see the module docstring). Inference only.

    Args:
        x: (..., K) bf16, fp16 or fp32; at most ``MAX_ROWS`` rows (a decode step's batch).
        norm_weight: (K,) the RMSNorm weight, in x's dtype.
        eps: the norm's epsilon, >= 0.
        weight: (N, K), or (2 N, K) with ``swiglu`` (gate rows, then up rows), in x's dtype, unit column stride.
        bias: optional (N,) (not with ``swiglu``).
        residual: optional, x's shape and dtype: the norm runs on s = x + residual.
        swiglu: return silu(gate) * up (N columns) instead of the (2 N) projection.
        backend: "triton" (CUDA or the interpreter), "torch" (``norm_linear_reference``) or "auto".
    Returns:
        (out (..., N) in weight's dtype, s (..., K) or None without ``residual``).
    Raises:
        ValueError / TypeError: shapes, dtypes, devices or options that do not fit.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in (torch.bfloat16, torch.float16,
                                                                          torch.float32):
        raise TypeError(f"x: expected a bf16/fp16/fp32 tensor (..., K), got {x!r:.80}")
    K = x.shape[-1]
    for name, t, shape in (("norm_weight", norm_weight, (K,)), ("weight", weight, None)):
        if not isinstance(t, torch.Tensor) or t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name}: expected a {x.dtype} tensor on {x.device}, got "
                            f"{(t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if weight.dim() != 2 or weight.shape[1] != K or (swiglu and weight.shape[0] % 2):
        raise ValueError(f"weight: expected ({'2 N' if swiglu else 'N'}, {K}), got {tuple(weight.shape)}")
    n_out = weight.shape[0] // 2 if swiglu else weight.shape[0]
    if bias is not None:
        if swiglu:
            raise ValueError("bias: not supported with swiglu (the MLP's gate/up projections have none)")
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n_out,) or bias.dtype != x.dtype \
                or bias.device != x.device:
            raise ValueError(f"bias: expected a ({n_out},) {x.dtype} tensor on {x.device}, got "
                             f"{(tuple(bias.shape), bias.dtype) if isinstance(bias, torch.Tensor) else bias}")
    if residual is not None and (not isinstance(residual, torch.Tensor) or residual.shape != x.shape
                                 or residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(f"residual: expected a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}")
    if not eps >= 0:
        raise ValueError(f"eps: expected >= 0, got {eps}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return norm_linear_reference(x, norm_weight, eps, weight, bias, residual=residual, swiglu=swiglu)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.shape[0] > MAX_ROWS:
        raise ValueError(f"x: {x2.shape[0]} rows, at most {MAX_ROWS} (a decode step's batch; larger GEMMs: cuBLAS)")
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    r2 = None
    if residual is not None:
        r2 = residual.reshape(-1, K)
        r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    y, s = norm_linear_forward(x2, r2, norm_weight.contiguous(), float(eps), w,
                               None if bias is None else bias.contiguous(), swiglu)
    return y.view(*lead, n_out), (None if s is None else s.view(*lead, K))

