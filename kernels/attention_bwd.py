"""FlashAttention-2 style backward kernels for GQA attention, layout (B, T, H, D).

With S = c * Q K^T (c = softmax_scale), P = softmax(S) (recomputed from the saved lse: P = exp(S - lse)),
O = P V and dO the incoming gradient:
    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - delta),   delta_i = sum_j P_ij dP_ij = rowsum(dO * O)_i   (preprocess kernel)
    dQ = c * dS K
    dK = c * dS^T Q
As in the forward, exponentials run in base 2: P = exp2(S * log2(e) - lse * log2(e)).

Three kernels:
* ``_bwd_preprocess_kernel``: delta (B, Hq, Tq) fp32.
* ``_bwd_dkdv_kernel``: one program per (key block, batch, KV head). It keeps its K, V tile and the dK, dV
  accumulators on chip and loops over the ``group = Hq / Hkv`` query heads that read this KV head, and over their
  query blocks: GQA gradients are summed inside the kernel, K/V are never expanded in memory.
* ``_bwd_dq_kernel``: one program per (query block, batch, query head), looping over key blocks as the forward.
  With ``dq_mode="atomic"`` it is not launched: the dK/dV kernel computes each tile's dQ share c * dS K as well
  and adds it into a zeroed fp32 buffer with atomics (FlashAttention-2's scheme). That saves the dQ kernel's
  recomputation of Q K^T and dO V^T (5 matmuls per tile instead of 7), at the price of one fp32 atomic add per
  dQ element and key block, and of a fixed summation order: "split" stays the deterministic default.
Rows without a valid key have lse = -inf; it is replaced by +inf so that their P (and so dS, dQ) is exactly 0.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._fastlaunch import launch
from ._launch import cdiv, parallel_autotune
from .attention_fwd import (
    INTERPRETER_BLOCK_M,
    INTERPRETER_BLOCK_N,
    LOG2E,
    autotune_enabled,
    dot_precision,
    element_size,
    fixed_config,
    key_block_ranges,
    load_kv_range,
    load_kv_tile,
    next_pow2,
    prune_configs,
    t_bucket,
    flat_grid,
    tile_and_row,
    tile_grid,
)


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    Hq, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, FLAT_GRID: tl.constexpr = False,
):
    # delta_i = sum_d dO_id * O_id  (fp32)
    pid_m, bh = tile_and_row(Tq, BLOCK_M, False, FLAT_GRID)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v,
    q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot, stride_dqt,
    offs_n, offs_d, lo, hi, lo2, hi2, Tq, kv_lo, kv_hi, causal_shift, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    # Query tiles [lo, hi) then [lo2, hi2) (lo, lo2 multiples of BLOCK_M) in ONE loop: every copy of this loop
    # keeps its own pipeline and live ranges, and ptxas spilled the dK/dV accumulators with three copies.
    dmask = offs_d[None, :] < HEAD_DIM
    n1 = tl.maximum(hi - lo + BLOCK_M - 1, 0) // BLOCK_M
    n2 = tl.maximum(hi2 - lo2 + BLOCK_M - 1, 0) // BLOCK_M
    for it in range(0, n1 + n2):
        start_m = tl.where(it < n1, lo + it * BLOCK_M, lo2 + (it - n1) * BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None] * stride_dot + offs_d[None, :]
        if MASKED:
            row_ok = offs_m < Tq
            q = tl.load(q_ptrs, mask=row_ok[:, None] & dmask, other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None] & dmask, other=0.0)
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            if HEAD_DIM == BLOCK_D:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
            else:
                q = tl.load(q_ptrs, mask=dmask, other=0.0)
                do = tl.load(do_ptrs, mask=dmask, other=0.0)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        lse2 = lse * 1.4426950408889634  # natural -> base-2 log-sum-exp
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # empty rows: P = 0
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M) = (Q K^T)^T
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        if MASKED:
            valid = ((offs_n >= kv_lo) & (offs_n < kv_hi))[:, None] & (offs_m < Tq)[None, :]
            if IS_CAUSAL:
                valid = valid & (offs_n[:, None] <= offs_m[None, :] + causal_shift)
            pT = tl.where(valid, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)  # dV += P^T dO
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (dO V^T)^T
        dsT = pT * (dpT - delta[None, :])  # dS^T = P^T * (dP^T - delta)
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)  # dK += dS^T Q  (scaled by c later)
        if ATOMIC_DQ:
            # dQ += c * dS K for this key block, added into the fp32 dQ buffer: the dQ kernel's recompute of
            # Q K^T and dO V^T is saved at the price of one fp32 atomic add per element and key block.
            dq = tl.dot(tl.trans(dsT).to(k.dtype), k, input_precision=PRECISION) * sm_scale  # (BLOCK_M, BLOCK_D)
            dq_ptrs = dq_base + offs_m[:, None] * stride_dqt + offs_d[None, :]
            if MASKED:
                tl.atomic_add(dq_ptrs, dq, mask=(offs_m < Tq)[:, None] & dmask, sem="relaxed")
            elif HEAD_DIM == BLOCK_D:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, mask=dmask, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, KV_START, KV_END,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_dqb, stride_dqt, stride_dqh,  # DQ: the fp32 dQ buffer (zeroed) with ATOMIC_DQ, else unused
    Hq, Hkv, Tq, Tk, group, qk_scale, sm_scale,
    T_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KV_RANGE: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FLAT_GRID: tl.constexpr = False,
):
    # Causal: early key blocks are read by the most query blocks; tile 0 (launched first) is the heaviest.
    pid_n, bh = tile_and_row(Tk, BLOCK_N, False, FLAT_GRID)
    b = bh // Hkv
    hk = bh % Hkv
    b64 = b.to(tl.int64)
    kv_lo, kv_hi = load_kv_range(KV_START, KV_END, b, Tk, HAS_KV_RANGE)
    causal_shift = Tk - Tq

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = (offs_n >= kv_lo) & (offs_n < kv_hi)
    ld_mask = kv_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b64 * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=ld_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=ld_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query rows reading this key block: causal, row i sees key n iff n <= i + shift.
    if IS_CAUSAL:
        m_lo = (tl.maximum(n0 - causal_shift, 0) // BLOCK_M) * BLOCK_M
        # first tile whose every row sees the whole key block: m >= n0 + BLOCK_N - 1 - shift
        m_mid = ((tl.maximum(n0 + BLOCK_N - 1 - causal_shift, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    else:
        m_lo = 0
        m_mid = 0
    tq_ceil = ((Tq + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    m_mid = tl.minimum(m_mid, tq_ceil)
    m_full = tl.maximum((Tq // BLOCK_M) * BLOCK_M, m_mid)  # tiles below this have no row >= Tq
    # A padding edge inside the key block: every tile is masked, i.e. the masked ranges cover everything and
    # the unmasked one is empty. Loop bounds, not an if/else around the loops: two copies of the loops merging
    # their dK/dV accumulators made ptxas spill (tests/test_triton_compile.py reports the stack).
    edge = (n0 < kv_lo) | (n0 + BLOCK_N > kv_hi)
    m_mid = tl.where(edge, tq_ceil, m_mid)
    m_full = tl.where(edge, tq_ceil, m_full)
    # No valid key in the block (padding): every range empty, dK = dV = 0.
    none = (n0 >= kv_hi) | (n0 + BLOCK_N <= kv_lo)
    m_lo = tl.where(none, tq_ceil, m_lo)
    m_mid = tl.where(none, tq_ceil, m_mid)
    m_full = tl.where(none, tq_ceil, m_full)
    for g in range(0, group):
        h = hk * group + g
        bhq = (b * Hq + h).to(tl.int64)
        q_base = Q + b64 * stride_qb + h * stride_qh
        do_base = DO + b64 * stride_dob + h * stride_doh
        lse_base = LSE + bhq * Tq
        delta_base = DELTA + bhq * Tq
        dq_base = DQ + b64 * stride_dqb + h * stride_dqh
        # masked: the diagonal tiles [m_lo, m_mid) and the partial last tile [m_full, Tq); unmasked: the rest
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot, stride_dqt,
            offs_n, offs_d, m_lo, m_mid, m_full, Tq, Tq, kv_lo, kv_hi, causal_shift, qk_scale, sm_scale,
            HEAD_DIM, BLOCK_D, BLOCK_M, IS_CAUSAL, True, PRECISION, ATOMIC_DQ)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot, stride_dqt,
            offs_n, offs_d, m_mid, m_full, 0, 0, Tq, kv_lo, kv_hi, causal_shift, qk_scale, sm_scale,
            HEAD_DIM, BLOCK_D, BLOCK_M, IS_CAUSAL, False, PRECISION, ATOMIC_DQ)

    dk = dk * sm_scale
    st_mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + b64 * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=st_mask)
    tl.store(DV + b64 * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=st_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta,
    k_base, v_base, stride_kt, stride_vt,
    offs_m, offs_n, offs_d, lo, hi, kv_lo, kv_hi, causal_shift, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    dmask = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = (cols >= kv_lo) & (cols < kv_hi)  # (BLOCK_N,) used only when MASKED
        k, v = load_kv_tile(k_base, v_base, cols, offs_d, stride_kt, stride_vt, kv_ok, dmask,
                            HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            valid = kv_ok[None, :]
            if IS_CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + causal_shift)
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dP = dO V^T
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)  # dQ += dS K  (scaled by c later)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_START, KV_END,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    Hq, Tq, Tk, group, qk_scale, sm_scale,
    T_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KV_RANGE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FLAT_GRID: tl.constexpr = False,
):
    start_m, bh = tile_and_row(Tq, BLOCK_M, True, FLAT_GRID)  # heavy causal blocks first
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    b64 = b.to(tl.int64)
    kv_lo, kv_hi = load_kv_range(KV_START, KV_END, b, Tk, HAS_KV_RANGE)
    causal_shift = Tk - Tq

    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Tq
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * Tq + offs_m, mask=row_ok, other=0.0)
    lse2 = lse * 1.4426950408889634
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # empty rows: P = 0
    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh

    # Same key ranges as the forward: masked head, unmasked middle, masked tail.
    n_lo, n_a, n_b, n_hi = key_block_ranges(kv_lo, kv_hi, m0, causal_shift, BLOCK_M, BLOCK_N, IS_CAUSAL)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                       n_lo, tl.minimum(n_a, n_hi), kv_lo, kv_hi, causal_shift, qk_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, True, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                       n_a, n_b, kv_lo, kv_hi, causal_shift, qk_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, False, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
                       n_b, n_hi, kv_lo, kv_hi, causal_shift, qk_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, True, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask)


def _dkdv_smem(c, es: int, bd: int, atomic: bool) -> int:
    """Shared memory of a dK/dV tile: resident K, V tiles + num_stages buffered (Q, dO) tiles, x1.1 for the
    compiler's scratch (sm_90 compiles used 1.00-1.03x this count since the loops are two, not six;
    tests/test_triton_compile.py). With atomic dQ, plus the (BLOCK_M, BLOCK_D) fp32 dQ tile staged for the atomic
    adds: sm_90 compiles used 4 * BLOCK_M * BLOCK_D bytes more with BLOCK_M >= 64 (the dQ dot on wgmma), and 2.5x
    to 3x that below 64 rows (the dot falls back to mma.sync, with layout conversions)."""
    bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
    dq_tile = (1.0 if bm >= 64 else 3.0) * 4 * bm * bd if atomic else 0
    return int(1.1 * (es * bd * (2 * bn + 2 * c.num_stages * bm) + dq_tile))


def _prune_dkdv(configs, named_args, **kwargs):
    bd, es = kwargs["BLOCK_D"], element_size(named_args)
    return prune_configs(configs, named_args["T_BUCKET"], lambda c: _dkdv_smem(c, es, bd, atomic=False))


def _prune_dkdv_atomic(configs, named_args, **kwargs):
    bd, es = kwargs["BLOCK_D"], element_size(named_args)
    return prune_configs(configs, named_args["T_BUCKET"], lambda c: _dkdv_smem(c, es, bd, atomic=True))


def _prune_dq(configs, named_args, **kwargs):
    bd, es = kwargs["BLOCK_D"], element_size(named_args)
    # resident Q, dO tiles + num_stages buffered (K, V) tiles; x1.25 (sm_90 compiles used up to 1.17x)
    smem = lambda c: int(1.25 * es * bd * (2 * c.kwargs["BLOCK_M"] + 2 * c.num_stages * c.kwargs["BLOCK_N"]))  # noqa: E731
    return prune_configs(configs, named_args["T_BUCKET"], smem)


# dK/dV: a tall key tile (BLOCK_N) stays resident with its fp32 dK, dV accumulators; short query tiles stream by.
# dQ: a tall query tile stays resident, short key tiles stream by (as in the Triton fused-attention tutorial);
# 128x32 with 4 warps spills at D = 128 (sm_90 compile), the 8-warp tiles do not.
# sm_90 compiles (bf16, causal; registers / spilled bytes): at D = 128 the 4-warp tiles with 128 keys spill
# (the two (BLOCK_N, 128) fp32 accumulators alone fill 256 registers a thread); 32x128 with 8 warps does not,
# 64x128 and 64x64 with 8 warps spill ~0.1 KB. At D = 64 all of these are spill-free.
_DKDV_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 3), (16, 64, 4, 2)]
]
_DQ_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 16, 4, 2)]
]
# Without autotuning: (BLOCK_M, BLOCK_N, num_warps, num_stages) by BLOCK_D; fp32 (tests) small tiles.
# The autotune winners of the first H100 run (a235d55, bf16, causal, T 2048 at D = 64 and 4096 at D = 128):
# dK/dV 32x64 with 4 warps at both head dims; dQ 64x64 / 4 warps at D = 64 and 128x32 / 4 warps at D = 128; with
# dQ atomics in the dK/dV kernel, 32x64 / 4 warps at D = 64 and 64x128 / 8 warps at D = 128. At D = 128 the split
# path's two winners spill at sm_90 (dK/dV 368 B, dQ 224 B; tests/test_triton_compile.py) and still beat the
# spill-free tiles (benchmarks/RESULTS.md).
_DKDV_DEFAULT = {64: (32, 64, 4, 3), 128: (32, 64, 4, 3)}
_DKDV_ATOMIC_DEFAULT = {64: (32, 64, 4, 3), 128: (64, 128, 8, 2)}
_DQ_DEFAULT = {64: (64, 64, 4, 3), 128: (128, 32, 4, 3)}
_DKDV_FP32 = triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=2)
_DQ_FP32 = triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=4, num_stages=2)
_TUNE_KEY = ["HEAD_DIM", "T_BUCKET", "IS_CAUSAL", "HAS_KV_RANGE"]
# parallel_autotune: each compiles the configurations it is about to time in a thread pool (kernels/_launch.py)
_bwd_dkdv_kernel_tuned = parallel_autotune(triton.autotune(
    configs=_DKDV_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune_dkdv})(_bwd_dkdv_kernel))
# The atomic-dQ variant accumulates into DQ: every timed config run starts from a zeroed buffer.
_bwd_dkdv_atomic_dq_tuned = parallel_autotune(triton.autotune(
    configs=_DKDV_CONFIGS, key=_TUNE_KEY, reset_to_zero=["DQ"],
    prune_configs_by={"early_config_prune": _prune_dkdv_atomic})(_bwd_dkdv_kernel))
_bwd_dq_kernel_tuned = parallel_autotune(triton.autotune(
    configs=_DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune_dq})(_bwd_dq_kernel))


DQ_MODES = ("split", "atomic")


def resolve_dq_mode(mode: str | None = None) -> str:
    """The backward's dQ strategy: ``mode``, else ``RLHF_ENGINE_ATTN_DQ``, else "split". Under
    ``torch.use_deterministic_algorithms(True)`` "atomic" falls back to "split" (fp32 atomics add in no fixed
    order)."""
    if mode is None:
        mode = os.environ.get("RLHF_ENGINE_ATTN_DQ", "split")
    if mode not in DQ_MODES:
        raise ValueError(f"dq_mode (or RLHF_ENGINE_ATTN_DQ): expected one of {DQ_MODES}, got {mode!r}")
    if mode == "atomic" and torch.are_deterministic_algorithms_enabled():
        return "split"
    return mode


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    kv_start: torch.Tensor | None,
    kv_end: torch.Tensor | None,
    softmax_scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    dq_mode: str | None = None,
    dv_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch preprocess, dK/dV and dQ kernels. Returns dq (B, Tq, Hq, D), dk, dv (B, Tk, Hkv, D) in the input dtypes.

    do/q/o (B, Tq, Hq, D), k/v (B, Tk, Hkv, D), all with unit stride on D; lse (B, Hq, Tq) fp32 from the forward.
    dq_mode: "split" (a dQ kernel of its own: deterministic) or "atomic" (the dK/dV kernel also adds each key block's
    share of dQ into a zeroed fp32 buffer: no recompute, run-to-run order of the fp32 additions varies);
    None: ``resolve_dq_mode``. dv_out: where to write dv (a (B, Tk, Hkv, D) view with unit stride on D, e.g. the v
    columns of a packed q/k/v gradient); returned as dv. ``RLHF_ENGINE_ATTN_WS=1`` runs dK/dV and dQ on the
    warp-specialized Gluon kernels (``attention_bwd_ws``) where they are eligible, in either dQ mode ("atomic":
    their dK/dV kernel adds dQ, 5 products a tile).
    """
    dq_mode = resolve_dq_mode(dq_mode)
    atomic = dq_mode == "atomic"
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    # atomic: an fp32 accumulator (the output itself for fp32 inputs), cast to q's dtype at the end
    dq = torch.zeros((B, Tq, Hq, D), dtype=torch.float32, device=q.device) if atomic else \
        torch.empty((B, Tq, Hq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Tk, Hkv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Tk, Hkv, D), dtype=v.dtype, device=v.device) if dv_out is None else dv_out
    if B * Hq * Tq * Tk == 0:
        return dq.to(q.dtype).zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    BLOCK_D = max(16, next_pow2(D))
    pre_bm = 64
    launch(_bwd_preprocess_kernel, tile_grid(cdiv(Tq, pre_bm), B * Hq),
        o, do, delta, *o.stride()[:3], *do.stride()[:3],
        Hq, Tq, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=pre_bm, FLAT_GRID=flat_grid(B * Hq))

    if os.environ.get("RLHF_ENGINE_ATTN_WS") == "1" and block_m is None and block_n is None:
        from .attention_fwd_ws import ws_eligible  # the warp-specialized Gluon kernels (opt-in, sm_90)

        if ws_eligible(q, k, v):
            from .attention_bwd_ws import ws_atomic_dq_ok, ws_backward

            if not atomic or ws_atomic_dq_ok(dq):
                ws_backward(do, q, k, v, lse, delta, dq, dk, dv, causal=causal, kv_start=kv_start, kv_end=kv_end,
                            softmax_scale=softmax_scale, atomic_dq=atomic)
                return (dq.to(q.dtype) if atomic else dq), dk, dv
    has_range = kv_start is not None
    ks = kv_start if has_range else lse
    ke = kv_end if has_range else lse
    group = Hq // Hkv
    qk_scale = softmax_scale * LOG2E
    tb = t_bucket(max(Tq, Tk))
    meta = dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, IS_CAUSAL=causal, HAS_KV_RANGE=has_range,
                PRECISION=dot_precision(q.dtype))
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])  # one stride() call a tensor
    dq_strides = dq.stride()[:3]
    dkdv_args = (q, k, v, do, lse, delta, dk, dv, dq, ks, ke, *strides,
                 *dk.stride()[:3], *dv.stride()[:3], *dq_strides,
                 Hq, Hkv, Tq, Tk, group, qk_scale, softmax_scale, tb)
    dq_args = (q, k, v, do, lse, delta, dq, ks, ke, *strides, *dq_strides,
               Hq, Tq, Tk, group, qk_scale, softmax_scale, tb)
    kv_grid = lambda bn: tile_grid(cdiv(Tk, bn), B * Hkv)  # noqa: E731
    q_grid = lambda bm: tile_grid(cdiv(Tq, bm), B * Hq)  # noqa: E731
    dkdv_meta = dict(meta, ATOMIC_DQ=atomic, FLAT_GRID=flat_grid(B * Hkv))
    dq_meta = dict(meta, FLAT_GRID=flat_grid(B * Hq))
    if q.is_cuda and block_m is None and block_n is None and autotune_enabled(q.dtype):
        tuned = _bwd_dkdv_atomic_dq_tuned if atomic else _bwd_dkdv_kernel_tuned
        tuned[lambda META: kv_grid(META["BLOCK_N"])](*dkdv_args, **dkdv_meta)
        if not atomic:
            _bwd_dq_kernel_tuned[lambda META: q_grid(META["BLOCK_M"])](*dq_args, **dq_meta)
    elif q.is_cuda and block_m is None and block_n is None:
        named = {"Q": q, "T_BUCKET": tb}
        c = fixed_config(_DKDV_CONFIGS, _prune_dkdv_atomic if atomic else _prune_dkdv, named, BLOCK_D,
                         _DKDV_ATOMIC_DEFAULT if atomic else _DKDV_DEFAULT, _DKDV_FP32)
        launch(_bwd_dkdv_kernel, kv_grid(c.kwargs["BLOCK_N"]),
            *dkdv_args, **dkdv_meta, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        if not atomic:
            c = fixed_config(_DQ_CONFIGS, _prune_dq, named, BLOCK_D, _DQ_DEFAULT, _DQ_FP32)
            launch(_bwd_dq_kernel, q_grid(c.kwargs["BLOCK_M"]),
                *dq_args, **dq_meta, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    else:
        bm = block_m or INTERPRETER_BLOCK_M
        bn = block_n or INTERPRETER_BLOCK_N
        launch(_bwd_dkdv_kernel, kv_grid(bn),
            *dkdv_args, **dkdv_meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=num_warps, num_stages=num_stages)
        if not atomic:
            launch(_bwd_dq_kernel, q_grid(bm),
                *dq_args, **dq_meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=num_warps, num_stages=num_stages)
    if atomic and dq.dtype != q.dtype:
        dq = dq.to(q.dtype)
    return dq, dk, dv
