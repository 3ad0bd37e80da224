"""The GEMMs of a decode step (M <= 256 rows), split over K, with the layer's norms, SwiGLU and residual adds fused
in: a decode layer in 5 kernels (norm+q/k/v, attention, o+add, norm+gate/up+SwiGLU, down+add) where the cuBLAS path
runs 8.

For x (M, K) in a dtype ``dt``, the projection W (N, K) and bias b, ``decode_linear`` computes
    s   = x + r                                        (prologue residual r, rounded to dt as the eager add)
    y   = g * (s_f32 * rsqrt(mean(s_f32²) + eps)).to(dt)  (with a norm weight g: transformers' roundings; else y = s)
    out = y Wᵀ + b                                     (fp32 accumulation, rounded once to dt)
    out = silu(gate).to(dt) * up                       (``swiglu``: W = [W_gate; W_up], 2N rows, each half rounded)
    out = (ro + out).to(dt)                            (epilogue residual ro, the eager add)
and optionally the per-row sums of squares of ``out`` in fp32, as (cdiv(N, BLOCK_N), M) partial sums over each
N tile: the next GEMM's norm takes its rstd from them (``row_sumsq``) instead of reading its rows twice.

Why: a decode step at batch 64 is bound by latency, not bytes. The H200 profile of one Qwen2-0.5B step (RESULTS.md,
"Generation"): the four cuBLAS GEMMs of a layer take 4.2-7.6 us each for 1.6-17 MB of weights (0.4-2.3 TB/s, where
the card reads 4.3), 583 of the step's 1,002 us of kernel time, and the norms and silu * up another 111 us in 73
launches, each with a ~1 us gap after it. The first version of this kernel (one program per N tile, the norm
computed by every program over full rows) left most SMs idle at q/k/v (36 programs) and lost to cuBLAS.

How: programs tile (N, K splits, M) as (BLOCK_N, SPLITS, BLOCK_M): SPLITS programs share each output tile, so a
1-2 MB projection still spreads over ~100-300 programs whose loads are all in flight at once. Each walks its K
range, the rows normalized chunk by chunk on the way into ``tl.dot``. With SPLITS > 1 each program stores its fp32
partial tile to a workspace and takes a ticket from a per-tile counter (an acq_rel atomic after a CTA barrier: the
release covers the whole CTA's stores, as CUTLASS's semaphore); the program that draws the last ticket sums the
partials in split order (for a given tile, the same bits whichever program finishes last; the autotuner may pick
another tile in another process), resets the counter for the next launch and runs the epilogue. No second kernel, no
zero-fill, CUDA-graph safe (the counters live per device, zero between launches; one launch at a time per device).
With ``pdl=True`` on Hopper the launch is a programmatic dependent launch (``_launch.use_pdl``): each program reads
its first K block of weights, then waits for the previous kernel before reading anything else or writing (so the
weights must not be written by the kernels just before it: the model's parameters are not). The rstd of a norm
comes from the previous GEMM's ``row_sumsq`` partials (one small load) or, without them, from a walk over the full
rows. The sums of squares are taken in another order than the norm kernel's (per N tile, then over tiles), so rstd
may differ by an fp32 ulp and y by a ``dt`` ulp; the GEMM accumulates in another order than cuBLAS. Inference only
(no autograd).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._fastlaunch import launch
from ._launch import cdiv, next_pow2, parallel_autotune, sm_count, tile_counters, use_pdl
from .attention_fwd import autotune_enabled, dot_precision
from .reference.norm import rms_norm_reference
from .rmsnorm import rms_normalize
from .swiglu import silu_mul_rounded

_BACKENDS = ("auto", "triton", "torch", "gluon")


@triton.jit
def _epilogue(acc, acc_up, BIAS, RO, Y, SQO, rows, offs_n, m_ok, n_ok, pid_n, M, stride_rom, stride_ym,
              HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, HAS_ORES: tl.constexpr, HAS_SQO: tl.constexpr):
    out_t = Y.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:  # the GEMM outputs' rounding, then silu * up as the SwiGLU kernel
        out = silu_mul_rounded(acc.to(out_t).to(tl.float32), acc_up.to(out_t).to(tl.float32), out_t)
    else:
        out = acc.to(out_t)
    mn = m_ok[:, None] & n_ok[None, :]
    if HAS_ORES:  # the residual add after the projection, rounded as the eager add
        ro = tl.load(RO + rows[:, None] * stride_rom + offs_n[None, :], mask=mn, other=0.0)
        out = (ro.to(tl.float32) + out.to(tl.float32)).to(out_t)
    tl.store(Y + rows[:, None] * stride_ym + offs_n[None, :], out, mask=mn)
    if HAS_SQO:  # this tile's share of each row's sum of squares, for the next GEMM's norm
        of = tl.where(mn, out.to(tl.float32), 0.0)
        tl.store(SQO + pid_n * M + rows, tl.sum(of * of, axis=1), mask=m_ok)


@triton.jit
def _rows_in(X, R, rows, m_ok, k0, K, stride_xm, stride_rm, dt: tl.constexpr, HAS_RES: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """(s, mask) for K block k0 of the input rows: s = x, or x + r rounded to dt as the eager add."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mk = m_ok[:, None] & (offs_k[None, :] < K)
    s = tl.load(X + rows[:, None] * stride_xm + offs_k[None, :], mask=mk, other=0.0)
    if HAS_RES:
        r = tl.load(R + rows[:, None] * stride_rm + offs_k[None, :], mask=mk, other=0.0)
        s = (s.to(tl.float32) + r.to(tl.float32)).to(dt)
    return s, mk


@triton.jit
def _gemm_rows(X, R, G, S, rows, m_ok, k0, K, stride_xm, stride_rm, stride_sm, pid_n, rstd, dt: tl.constexpr,
               w_t: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_K: tl.constexpr):
    """The GEMM's A operand for K block k0: x's rows (+ r, s = x + r written once, by the first N tile's programs),
    normalized with rstd and the norm weight as the norm kernel rounds them."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    a, mk = _rows_in(X, R, rows, m_ok, k0, K, stride_xm, stride_rm, dt, HAS_RES, BLOCK_K)
    if HAS_RES:
        tl.store(S + rows[:, None] * stride_sm + offs_k[None, :], a, mask=mk & (pid_n == 0))
    if NORM:
        g = tl.load(G + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        a = rms_normalize(a.to(tl.float32), rstd[:, None], g[None, :], dt, w_t)
    return a


@triton.jit
def _decode_linear_kernel(
    X, R, G, SQ, W, BIAS, RO, Y, S, SQO, WS, CNT,
    M, N, K, P,
    stride_xm, stride_rm, stride_wn, stride_rom, stride_ym, stride_sm,
    eps, M_BUCKET,  # M_BUCKET: autotune key only
    NORM: tl.constexpr, HAS_RES: tl.constexpr, HAS_SQ: tl.constexpr, SQ_P2: tl.constexpr, HAS_BIAS: tl.constexpr,
    SWIGLU: tl.constexpr, HAS_ORES: tl.constexpr, HAS_SQO: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows = offs_m.to(tl.int64)
    dt = X.dtype.element_ty

    # this program's K range: SPLITS consecutive shares of the K blocks (the last may be short; none is empty)
    kb_per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLITS)
    k_lo = pid_s * kb_per * BLOCK_K
    k_hi = tl.minimum(K, k_lo + kb_per * BLOCK_K)
    w_rows = offs_n.to(tl.int64)
    if PDL:  # programmatic dependent launch: the next kernel may start (and read its weights) once we all got here
        gdc_launch_dependents()
    # the first K block's weights depend on nothing the previous kernel writes: their loads go out before the wait
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    nk = n_ok[:, None] & (offs_k[None, :] < K)
    w = tl.load(W + w_rows[:, None] * stride_wn + offs_k[None, :], mask=nk, other=0.0)
    wu = w
    if SWIGLU:
        wu = tl.load(W + (w_rows + N)[:, None] * stride_wn + offs_k[None, :], mask=nk, other=0.0)
    if PDL:  # from here on the previous kernel is complete and its writes visible: read x, r, sums; write anything
        gdc_wait()

    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)  # (unused without a norm)
    if NORM:  # each row's rstd: from the producer's partial sums of squares, or a walk over the full rows
        if HAS_SQ:
            offs_p = tl.arange(0, SQ_P2)
            sq = tl.load(SQ + offs_p[:, None] * M + rows[None, :], mask=(offs_p[:, None] < P) & m_ok[None, :],
                         other=0.0)
            sumsq = tl.sum(sq, axis=0)
        else:
            sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                s, _ = _rows_in(X, R, rows, m_ok, k0, K, stride_xm, stride_rm, dt, HAS_RES, BLOCK_K)
                sf = s.to(tl.float32)
                sumsq += tl.sum(sf * sf, axis=1)
        rstd = 1.0 / tl.sqrt(sumsq / K + eps)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = acc
    if SWIGLU:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # the first K block (its weights loaded before the wait), then the rest of this program's range
    a = _gemm_rows(X, R, G, S, rows, m_ok, k_lo, K, stride_xm, stride_rm, stride_sm, pid_n, rstd, dt,
                   W.dtype.element_ty, NORM, HAS_RES, BLOCK_K)
    acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    if SWIGLU:
        acc_up = tl.dot(a, tl.trans(wu), acc_up, input_precision=PRECISION)
    for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
        a = _gemm_rows(X, R, G, S, rows, m_ok, k0, K, stride_xm, stride_rm, stride_sm, pid_n, rstd, dt,
                       W.dtype.element_ty, NORM, HAS_RES, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        nk = n_ok[:, None] & (offs_k[None, :] < K)
        w = tl.load(W + w_rows[:, None] * stride_wn + offs_k[None, :], mask=nk, other=0.0)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
        if SWIGLU:  # the up rows sit N rows below the gate rows in the packed weight
            wu = tl.load(W + (w_rows + N)[:, None] * stride_wn + offs_k[None, :], mask=nk, other=0.0)
            acc_up = tl.dot(a, tl.trans(wu), acc_up, input_precision=PRECISION)

    if SPLITS > 1:
        n_acc: tl.constexpr = 2 if SWIGLU else 1
        tile_elems: tl.constexpr = BLOCK_M * BLOCK_N
        tile = pid_m * tl.num_programs(0) + pid_n
        n_splits = tl.num_programs(1)
        offs_t = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        base = WS + tile.to(tl.int64) * (SPLITS * n_acc * tile_elems)
        tl.store(base + pid_s * (n_acc * tile_elems) + offs_t, acc)
        if SWIGLU:
            tl.store(base + pid_s * (n_acc * tile_elems) + tile_elems + offs_t, acc_up)
        tl.debug_barrier()  # every thread's partial stored before the ticket's release
        ticket = tl.atomic_add(CNT + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == n_splits - 1:  # the last program of this tile: the sum in split order, then the epilogue
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_up = acc
            for s in tl.static_range(SPLITS):
                part = base + s * (n_acc * tile_elems) + offs_t
                acc += tl.load(part, mask=s < n_splits, other=0.0, cache_modifier=".cg")
                if SWIGLU:
                    acc_up += tl.load(part + tile_elems, mask=s < n_splits, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(CNT + tile, 0, sem="relaxed", scope="gpu")  # zero for the next launch
            _epilogue(acc, acc_up, BIAS, RO, Y, SQO, rows, offs_n, m_ok, n_ok, pid_n, M, stride_rom, stride_ym,
                      HAS_BIAS, SWIGLU, HAS_ORES, HAS_SQO)
    else:
        _epilogue(acc, acc_up, BIAS, RO, Y, SQO, rows, offs_n, m_ok, n_ok, pid_n, M, stride_rom, stride_ym,
                  HAS_BIAS, SWIGLU, HAS_ORES, HAS_SQO)


def _smem_bytes(c: triton.Config, block_m: int, swiglu: bool) -> int:
    kw = c.kwargs
    return c.num_stages * (block_m + (2 if swiglu else 1) * kw["BLOCK_N"]) * kw["BLOCK_K"] * 2


def _prune(configs, named_args, **kwargs):
    """Tiles whose pipelined x and weight stages fit ~200 KB of shared memory (the H100's 227 KB a block, with room
    for the epilogue's layout conversions), and whose split sum (SPLITS partial tiles, two with SwiGLU, unrolled)
    stays within 512 columns: more spills registers (sm_90 compiles, tests/test_triton_compile.py)."""
    bm, swiglu = kwargs.get("BLOCK_M", 64), kwargs.get("SWIGLU", False)
    kept = [c for c in configs if _smem_bytes(c, bm, swiglu) <= 200 * 1024
            and c.kwargs["BLOCK_N"] * c.kwargs["SPLITS"] * (2 if swiglu else 1) <= 512]
    return kept or configs[:1]


# (BLOCK_N, BLOCK_K, SPLITS, num_warps, num_stages). At batch 64 a decode GEMM is 1.6-17 MB of weights (Qwen2-0.5B):
# cdiv(N, BLOCK_N) * SPLITS programs read them (q/k/v: 18-72 N tiles, down: 14-56, times 1-8 splits). Small BLOCK_N
# spreads the weights over more SMs but re-reads x (M rows of K) from L2 once per N tile (M / BLOCK_N of the weight
# bytes, per weight row group); splits do not re-read x but write and read back M * BLOCK_N fp32 partials each
# (4 M / K of the weight bytes per split, written and read). Which costs less, and how evenly the programs fall on
# the SMs (152 programs on 132 SMs give 20 of them twice the bytes), is for the autotuner to measure.
_DL_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLITS": sp}, num_warps=w, num_stages=st)
    for bn, bk, sp, w, st in [(32, 128, 1, 4, 4), (32, 128, 2, 4, 3), (32, 128, 4, 4, 3), (32, 128, 8, 4, 3),
                              (16, 128, 1, 4, 4), (16, 128, 2, 4, 3), (16, 128, 4, 4, 3), (16, 128, 8, 4, 3),
                              (64, 128, 1, 8, 3), (64, 128, 2, 8, 3), (64, 128, 4, 8, 3), (64, 128, 8, 8, 3),
                              (128, 128, 4, 8, 3), (32, 64, 8, 4, 4), (64, 64, 4, 8, 4)]
]
_decode_linear_kernel_tuned = parallel_autotune(triton.autotune(
    configs=_DL_CONFIGS, key=["N", "K", "M_BUCKET", "NORM", "HAS_RES", "HAS_SQ", "HAS_BIAS", "SWIGLU", "HAS_ORES",
                              "HAS_SQO"],
    prune_configs_by={"early_config_prune": _prune},
)(_decode_linear_kernel))
# fp32 on CUDA (tests): exact FMA dots, whose compile time grows with the tile: a small one
_DL_FP32 = triton.Config({"BLOCK_N": 16, "BLOCK_K": 32, "SPLITS": 2}, num_warps=8, num_stages=2)
_DL_INTERPRETER = {"BLOCK_N": 16, "BLOCK_K": 32}  # SPLITS from default_config
MAX_ROWS = 256  # a GEMM of more rows (prefill, training) is cuBLAS's job: this kernel re-reads its rows per N tile
_MAX_SPLITS = 8


def default_config(M: int, N: int, K: int, swiglu: bool, sms: int) -> triton.Config:
    """The tile a CUDA launch uses without autotuning: BLOCK_N 64 (32 pairs of gate/up rows with ``swiglu``) when
    its N tiles times the possible splits give a program per SM, else 32, then 16; the splits (at most 8, and at
    most one per K block once rounded up to a power of two) doubled until the programs cover the SMs twice."""
    bk = 128 if K >= 128 else max(16, next_pow2(K))
    kb = cdiv(K, bk)
    for bn in ((32, 16) if swiglu else (64, 32, 16)):
        if cdiv(N, bn) * min(_MAX_SPLITS, kb) >= sms:
            break
    splits = 1
    while splits < min(_MAX_SPLITS, kb) and cdiv(N, bn) * splits < 2 * sms:
        splits *= 2
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLITS": splits}, num_warps=8 if bn >= 64 else 4,
                         num_stages=3)


def grid_for(M: int, N: int, K: int, block_m: int, c: dict) -> tuple[int, int, int]:
    """(N tiles, K splits actually used, M tiles) for a config's BLOCK_N, BLOCK_K and SPLITS."""
    kb = cdiv(K, c["BLOCK_K"])
    return cdiv(N, c["BLOCK_N"]), cdiv(kb, cdiv(kb, c["SPLITS"])), cdiv(M, block_m)


class DecodeLinearOut(NamedTuple):
    out: torch.Tensor  # (..., N)
    s: Optional[torch.Tensor]  # (..., K): x + residual (the prologue residual), else None
    sumsq: Optional[torch.Tensor]  # (P, rows) fp32 partial sums of squares of out's rows, with return_sumsq


def decode_linear_forward(x, residual, norm_weight, eps, row_sumsq, weight, bias, out_residual, swiglu,
                          return_sumsq, tile: Optional[dict] = None, pdl: bool = False) -> DecodeLinearOut:
    """Launch ``_decode_linear_kernel`` on 2-D x (M, K) with unit column strides; inputs validated by
    ``decode_linear``."""
    M, K = x.shape
    N = weight.shape[0] // 2 if swiglu else weight.shape[0]
    y = torch.empty((M, N), dtype=weight.dtype, device=x.device)
    s = torch.empty_like(x) if residual is not None else None
    block_m = max(16, min(64, next_pow2(M)))
    tuned = x.is_cuda and autotune_enabled(x.dtype) and tile is None
    if tile is not None:
        cands = [triton.Config(dict(tile), num_warps=4, num_stages=3 if x.is_cuda else 2)]
    elif tuned:
        cands = _prune(_DL_CONFIGS, {}, BLOCK_M=block_m, SWIGLU=swiglu)
    elif x.is_cuda:
        cands = [_DL_FP32 if x.dtype == torch.float32 else default_config(M, N, K, swiglu, sm_count(x.device))]
    else:
        c = default_config(M, N, K, swiglu, sm_count(x.device))
        cands = [triton.Config({**_DL_INTERPRETER, "SPLITS": c.kwargs["SPLITS"]}, num_warps=4, num_stages=2)]
    bn_min = min(c.kwargs["BLOCK_N"] for c in cands)
    sqo = torch.empty((cdiv(N, bn_min), M), dtype=torch.float32, device=x.device) if return_sumsq else None
    if M == 0 or N == 0:
        return DecodeLinearOut(y, s, None if sqo is None else sqo.zero_())
    ws_elems = max((cdiv(N, c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_N"] * c.kwargs["SPLITS"] for c in cands
                    if c.kwargs["SPLITS"] > 1), default=0)
    ws = torch.empty(max(1, ws_elems * cdiv(M, block_m) * block_m * (2 if swiglu else 1)), dtype=torch.float32,
                     device=x.device)
    cnt = tile_counters(x.device, max(cdiv(N, c.kwargs["BLOCK_N"]) for c in cands) * cdiv(M, block_m),
                        "decode_linear")
    p = 0 if row_sumsq is None else row_sumsq.shape[0]
    args = (x, residual if residual is not None else x, norm_weight if norm_weight is not None else x,
            row_sumsq if row_sumsq is not None else ws, weight, bias if bias is not None else weight,
            out_residual if out_residual is not None else y, y, s if s is not None else x,
            sqo if sqo is not None else ws, ws, cnt, M, N, K, p,
            x.stride(0), residual.stride(0) if residual is not None else 0, weight.stride(0),
            out_residual.stride(0) if out_residual is not None else 0, y.stride(0),
            s.stride(0) if s is not None else 0, eps, block_m)
    pdl = pdl and use_pdl(x.device)
    meta = dict(NORM=norm_weight is not None, HAS_RES=residual is not None, HAS_SQ=row_sumsq is not None,
                SQ_P2=max(2, next_pow2(p)), HAS_BIAS=bias is not None, SWIGLU=swiglu,
                HAS_ORES=out_residual is not None, HAS_SQO=return_sumsq, PRECISION=dot_precision(x.dtype),
                BLOCK_M=block_m, **({"PDL": True, "launch_pdl": True} if pdl else {}))
    if tuned:
        _decode_linear_kernel_tuned[lambda c: grid_for(M, N, K, block_m, c)](*args, **meta)
        bn = _decode_linear_kernel_tuned.best_config.kwargs["BLOCK_N"]
    else:
        c = cands[0]
        launch(_decode_linear_kernel, grid_for(M, N, K, block_m, c.kwargs), *args, **meta, **c.kwargs,
               num_warps=c.num_warps, num_stages=c.num_stages)
        bn = c.kwargs["BLOCK_N"]
    return DecodeLinearOut(y, s, None if sqo is None else sqo[:cdiv(N, bn)])


def decode_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                            norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                            residual: Optional[torch.Tensor] = None, row_sumsq: Optional[torch.Tensor] = None,
                            out_residual: Optional[torch.Tensor] = None, swiglu: bool = False,
                            return_sumsq: bool = False) -> DecodeLinearOut:
    """The unfused ops, eager: the add, ``rms_norm_reference``, ``F.linear``, ``F.silu(gate) * up`` over the packed
    output's halves, the residual add; the sums of squares as one (1, rows) partial. ``row_sumsq`` is ignored (the
    norm recomputes its statistics)."""
    s = None if residual is None else x + residual
    h = x if s is None else s
    if norm_weight is not None:
        h = rms_norm_reference(h, norm_weight, eps)
    out = F.linear(h, weight, bias)
    if swiglu:
        gate, up = out.chunk(2, dim=-1)
        out = F.silu(gate) * up
    if out_residual is not None:
        out = out_residual + out
    sq = out.float().pow(2).sum(-1).reshape(1, -1) if return_sumsq else None
    return DecodeLinearOut(out, s, sq)


def _check(name: str, t, dtype: torch.dtype, device: torch.device, shape: Optional[tuple] = None) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.device != device:
        got = (t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name}: expected a {dtype} tensor on {device}, got {got}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                  residual: Optional[torch.Tensor] = None, row_sumsq: Optional[torch.Tensor] = None,
                  out_residual: Optional[torch.Tensor] = None, swiglu: bool = False, return_sumsq: bool = False,
                  backend: str = "auto", tile: Optional[dict] = None, pdl: bool = False) -> DecodeLinearOut:
    """``F.linear`` for a decode step's rows, with the norm before it, SwiGLU and the residual add after it fused in
    (see the module docstring for the exact math and roundings). Inference only.

    Args:
        x: (..., K) bf16, fp16 or fp32; at most ``MAX_ROWS`` rows (a decode step's batch).
        weight: (N, K), or (2 N, K) with ``swiglu`` (gate rows, then up rows), x's dtype and device.
        bias: optional (N,) (not with ``swiglu``).
        norm_weight: (K,): RMSNorm the GEMM's input s first (transformers' roundings); None: no norm.
        eps: the norm's epsilon, >= 0.
        residual: optional, x's shape: the GEMM's input is s = x + residual (returned as ``s``).
        row_sumsq: optional (P, rows) fp32 with a norm: partial sums of squares of s's rows (a previous call's
            ``sumsq``), summed over P for the rstd instead of a walk over the rows (the torch backend recomputes).
        out_residual: optional (..., N): out = out_residual + (the projection), rounded as the eager add.
        swiglu: return silu(gate) * up (N columns) instead of the (2 N) projection.
        return_sumsq: also return the fp32 sums of squares of out's rows as (P, rows) partial sums.
        backend: "triton" (CUDA or the interpreter), "torch" (``decode_linear_reference``), "auto", or "gluon":
            the Gluon decode GEMM for Hopper (``kernels/decode_gemm_ws.py``: swap-AB wgmma fed by TMA) where it
            applies (an sm_90 GPU, TMA-readable rows, no ``residual``, a norm only from ``row_sumsq``; ``tile``
            ignored), else "triton".
        tile: a fixed {"BLOCK_N", "BLOCK_K", "SPLITS"} (powers of two, SPLITS <= 8) instead of the default or
            autotuned one (tests, benchmarks).
        pdl: launch with programmatic dependent launch where ``_launch.use_pdl`` allows it (Hopper): the kernel
            starts while the kernel before it finishes and reads its first block of ``weight`` before waiting for
            it. Only for a weight that the kernels just before it on the stream do not write (the model's decode
            layers: parameters, last written by an optimizer step many launches earlier); off by default.
    Returns:
        ``DecodeLinearOut(out (..., N) in weight's dtype, s (..., K) or None, sumsq (P, rows) or None)``.
    Raises:
        ValueError / TypeError: shapes, dtypes, devices or options that do not fit.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in (torch.bfloat16, torch.float16,
                                                                          torch.float32):
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x: expected a bf16/fp16/fp32 tensor (..., K), got {got}")
    K, lead = x.shape[-1], x.shape[:-1]
    if K == 0:
        raise ValueError("x: expected K >= 1 columns, got 0")
    _check("weight", weight, x.dtype, x.device)
    if weight.dim() != 2 or weight.shape[1] != K or (swiglu and weight.shape[0] % 2):
        raise ValueError(f"weight: expected ({'2 N' if swiglu else 'N'}, {K}), got {tuple(weight.shape)}")
    n_out = weight.shape[0] // 2 if swiglu else weight.shape[0]
    if norm_weight is not None:
        _check("norm_weight", norm_weight, x.dtype, x.device, (K,))
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
    if out_residual is not None and (not isinstance(out_residual, torch.Tensor)
                                     or tuple(out_residual.shape) != (*lead, n_out)
                                     or out_residual.dtype != x.dtype or out_residual.device != x.device):
        raise ValueError(f"out_residual: expected a {x.dtype} tensor of shape {(*lead, n_out)} on {x.device}")
    rows = lead.numel()
    if row_sumsq is not None:
        if norm_weight is None:
            raise ValueError("row_sumsq: only with norm_weight (it feeds the norm's rstd)")
        _check("row_sumsq", row_sumsq, torch.float32, x.device)
        if row_sumsq.dim() != 2 or row_sumsq.shape[1] != rows or row_sumsq.shape[0] < 1:
            raise ValueError(f"row_sumsq: expected (P >= 1, {rows}), got {tuple(row_sumsq.shape)}")
    if not eps >= 0:
        raise ValueError(f"eps: expected >= 0, got {eps}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    if tile is not None and (set(tile) != {"BLOCK_N", "BLOCK_K", "SPLITS"} or any(
            v < 1 or v & (v - 1) for v in tile.values()) or tile["SPLITS"] > _MAX_SPLITS or min(
            tile["BLOCK_N"], tile["BLOCK_K"]) < 16):
        raise ValueError(f"tile: expected powers of two BLOCK_N, BLOCK_K >= 16 and SPLITS <= {_MAX_SPLITS}, "
                         f"got {tile}")
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return decode_linear_reference(x, weight, bias, norm_weight=norm_weight, eps=eps, residual=residual,
                                       out_residual=out_residual, swiglu=swiglu, return_sumsq=return_sumsq)
    if rows > MAX_ROWS:
        raise ValueError(f"x: {rows} rows, at most {MAX_ROWS} (a decode step's batch; larger GEMMs: cuBLAS)")

    def rows2d(t):
        t = t.reshape(-1, t.shape[-1])
        return t if t.stride(-1) == 1 else t.contiguous()

    if backend == "gluon" and residual is None and (norm_weight is None or row_sumsq is not None) and rows:
        from . import decode_gemm_ws as dg

        x2 = rows2d(x)
        if dg.eligible(x2, weight) and (bias is None or bias.stride(0) == 1):
            r = dg.decode_gemm_ws(x2, weight, bias, swiglu=swiglu, norm_weight=norm_weight, eps=float(eps),
                                  row_sumsq=row_sumsq, out_residual=None if out_residual is None
                                  else rows2d(out_residual), return_sumsq=return_sumsq, pdl=pdl)
            out, sq = r if return_sumsq else (r, None)
            return DecodeLinearOut(out.view(*lead, n_out), None, sq)

    r = decode_linear_forward(
        rows2d(x), None if residual is None else rows2d(residual),
        None if norm_weight is None else norm_weight.contiguous(), float(eps),
        None if row_sumsq is None else row_sumsq.contiguous(),
        weight if weight.stride(-1) == 1 else weight.contiguous(),
        None if bias is None else bias.contiguous(), None if out_residual is None else rows2d(out_residual), swiglu,
        return_sumsq, tile, pdl and weight.stride(-1) == 1)  # a copy just made must not be read before the wait
    return DecodeLinearOut(r.out.view(*lead, n_out), None if r.s is None else r.s.view(*lead, K), r.sumsq)


def norm_linear_reference(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, *, residual: Optional[torch.Tensor] = None,
                          swiglu: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``decode_linear_reference`` with a norm: (out, s)."""
    r = decode_linear_reference(x, weight, bias, norm_weight=norm_weight, eps=eps, residual=residual, swiglu=swiglu)
    return r.out, r.s


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, *, residual: Optional[torch.Tensor] = None,
                    swiglu: bool = False, backend: str = "auto") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``F.linear(rms_norm(x + residual), weight, bias)`` in one kernel (with ``swiglu``: ``silu(gate) * up``):
    ``decode_linear`` with a norm, returning (out, s) (s = x + residual, or None without a residual)."""
    if norm_weight is None:
        raise TypeError("norm_weight: expected a tensor, got None")
    r = decode_linear(x, weight, bias, norm_weight=norm_weight, eps=eps, residual=residual, swiglu=swiglu,
                      backend=backend)
    return r.out, r.s
