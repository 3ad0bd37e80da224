"""FlashAttention-2 style forward kernel for GQA attention, layout (B, T, H, D), with per-sequence key ranges.

Math (one query row i of head h, KV head hk = h // group, scale c = softmax_scale):
    s_j = c * q_i . k_j                        for valid keys j (kv_start <= j < kv_end, causal: j <= i + Tk - Tq)
    o_i = sum_j exp(s_j - lse_i) v_j,  lse_i = log sum_j exp(s_j)
computed block by block over keys with the online softmax: keep the running max m, the running sum l and the
unnormalized accumulator acc; for a new key block with scores s:
    m' = max(m, max_j s_j);  p_j = exp(s_j - m');  l' = l * exp(m - m') + sum_j p_j;  acc' = acc * exp(m - m') + p @ V
Everything runs in the base-2 domain: exp(x) = exp2(x * log2(e)), so the scores are scaled once by
c * log2(e) (1.4426950408889634 = 1 / ln 2) and exp2 maps to the fast hardware ex2 instruction. The saved
log-sum-exp is converted back to natural log: lse = (m + log2(l)) * ln 2 (0.6931471805599453 = ln 2).

Each program owns BLOCK_M query rows of one (batch, query head) and walks the key blocks in up to three loops:
a masked head block (the one holding kv_start), an unmasked middle (blocks every row of the tile may fully see:
no mask is built and loads need no predicates), and a masked tail (the causal diagonal and the kv_end edge).
A row that has no valid key keeps m = -inf and l = 0: it writes o = 0 and lse = -inf, never NaN.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._fastlaunch import launch
from ._launch import cdiv, next_pow2, parallel_autotune

LOG2E = 1.4426950408889634  # log2(e) = 1 / ln 2


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots ("ieee"), not TF32; 16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def autotune_enabled(dtype: torch.dtype) -> bool:
    """Whether a CUDA launch autotunes its tile. Not for fp32 (exact FMA dots, a test-only path: ptxas takes a
    minute or more per large fp32 tile), and not under ``RLHF_ENGINE_AUTOTUNE=0``, which uses each kernel's
    default tile instead of compiling and timing every config on the first call of each shape class (the GPU
    tests run this way; the benchmarks autotune)."""
    return dtype != torch.float32 and os.environ.get("RLHF_ENGINE_AUTOTUNE", "1") != "0"


def fixed_config(configs, prune, named_args: dict, block_d: int, default: dict, fp32: triton.Config):
    """The tile a launch uses without autotuning: ``fp32`` for fp32 inputs, else ``default[BLOCK_D]`` when the
    prune keeps it (it fits shared memory), else the first config the prune keeps."""
    q = named_args.get("Q")
    if getattr(q, "dtype", None) == torch.float32:
        return fp32
    kept = prune(configs, named_args, BLOCK_D=block_d)
    want = default.get(block_d)
    for c in kept:
        if want is not None and (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == want:
            return c
    return kept[0]


def t_bucket(t: int) -> int:
    """Autotune key: sequence lengths rounded up to a power of two (64 .. 16384)."""
    return min(max(next_pow2(t), 64), 16384)


@triton.jit
def load_kv_range(KV_START, KV_END, b, Tk, HAS_KV_RANGE: tl.constexpr):
    """[kv_lo, kv_hi): the valid keys of sequence ``b`` (all Tk without per-sequence ranges), clamped to [0, Tk]."""
    if HAS_KV_RANGE:
        kv_lo = tl.maximum(tl.load(KV_START + b), 0)
        kv_hi = tl.minimum(tl.load(KV_END + b), Tk)
    else:
        kv_lo = 0
        kv_hi = Tk
    return kv_lo, kv_hi


@triton.jit
def load_kv_tile(k_base, v_base, cols, offs_d, stride_kt, stride_vt, kv_ok, dmask,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """K and V rows ``cols`` (BLOCK_N,) of one head: (BLOCK_N, BLOCK_D) each, zero-padded past HEAD_DIM.
    With MASKED, keys where ``kv_ok`` is False are never read: they may be garbage (NaN in an
    unwritten cache)."""
    k_ptrs = k_base + cols[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=kv_ok[:, None] & dmask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_ok[:, None] & dmask, other=0.0)
    elif HEAD_DIM == BLOCK_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=dmask, other=0.0)
        v = tl.load(v_ptrs, mask=dmask, other=0.0)
    return k, v


@triton.jit
def key_block_ranges(kv_lo, kv_hi, m0, causal_shift, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     IS_CAUSAL: tl.constexpr):
    """The key loops of a query tile starting at row m0, in BLOCK_N steps: [n_lo, min(n_a, n_hi)) the masked
    head block (the one holding kv_lo), [n_a, n_b) the unmasked middle (keys every row of the tile sees in
    full), [n_b, n_hi) the masked tail (the causal diagonal and the kv_hi edge)."""
    if IS_CAUSAL:
        n_hi = tl.minimum(kv_hi, m0 + BLOCK_M + causal_shift)  # one past the last row's last key
        n_full = tl.minimum(kv_hi, m0 + causal_shift + 1)  # every row of the tile sees all keys < n_full
    else:
        n_hi = kv_hi
        n_full = kv_hi
    n_full = tl.maximum(n_full, 0)
    n_lo = (kv_lo // BLOCK_N) * BLOCK_N
    n_a = ((kv_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    n_b = tl.maximum((n_full // BLOCK_N) * BLOCK_N, n_a)
    return n_lo, n_a, n_b, n_hi


@triton.jit
def online_softmax_update(acc, l_i, m_i, qk, v, valid, qk_scale, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax: qk (BLOCK_M, BLOCK_N) raw scores, v (BLOCK_N, BLOCK_D), valid the
    (BLOCK_M, BLOCK_N) mask (read only when MASKED). Returns (acc, l, m) after the block.

    The scale (> 0) is applied to the row max, and to qk only inside exp2's argument: qk * c - m is one FMA a
    score instead of a multiply and a subtract (the softmax's elementwise work, not the dots, bounds this loop
    on an H100)."""
    if MASKED:
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        # A row that has seen no valid key yet keeps m = -inf; subtract 0 instead so exp2(-inf - -inf)
        # never produces NaN (its p and alpha are then exactly 0).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = m_new
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])  # exp(s - m') in base 2
    alpha = tl.math.exp2(m_i - m_use)  # rescale of the old sum and accumulator
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    k_base, v_base, stride_kt, stride_vt,
    offs_m, offs_n, offs_d,
    lo, hi, kv_lo, kv_hi, causal_shift, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    dmask = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,) key positions
        kv_ok = (cols >= kv_lo) & (cols < kv_hi)  # (BLOCK_N,) used only when MASKED
        k, v = load_kv_tile(k_base, v_base, cols, offs_d, stride_kt, stride_vt, kv_ok, dmask,
                            HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N) fp32, q . k
        valid = kv_ok[None, :]
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None] + causal_shift)
        acc, l_i, m_i = online_softmax_update(acc, l_i, m_i, qk, v, valid, qk_scale, MASKED, PRECISION)
    return acc, l_i, m_i


MAX_GRID_ROWS = 65535  # CUDA's limit on a grid's second dimension


def flat_grid(rows: int) -> bool:
    """Whether ``rows`` (batch, head) rows need a 1-D launch (``tile_grid``); the kernels' ``FLAT_GRID``."""
    return rows > MAX_GRID_ROWS


def tile_grid(n_tiles: int, rows: int) -> tuple[int, ...]:
    """The launch grid of ``n_tiles`` tiles for each of ``rows`` (batch, head) rows: (tiles, rows), or one
    dimension of tiles x rows when ``rows`` passes CUDA's 65535 limit on the second one (B * H reaches it at,
    e.g., a 1024-sequence prefill with 64 heads). The kernel gets ``FLAT_GRID=flat_grid(rows)``."""
    return (n_tiles * rows,) if flat_grid(rows) else (n_tiles, rows)


@triton.jit
def tile_and_row(T, BLOCK: tl.constexpr, HEAVY_LAST: tl.constexpr, FLAT: tl.constexpr):
    """(tile, row) of this program in a ``tile_grid`` launch over ``cdiv(T, BLOCK)`` tiles; the tiles of one row
    are consecutive either way. HEAVY_LAST: tile order reversed, so that the last (heaviest causal) query tiles
    of a row start first. The 2-D form costs no index arithmetic (the 1-D one a division: a few registers)."""
    if FLAT:
        n_tiles = tl.cdiv(T, BLOCK)
        pid = tl.program_id(0)
        tile = pid % n_tiles
        row = pid // n_tiles
        if HEAVY_LAST:
            tile = n_tiles - 1 - tile
    else:
        tile = tl.program_id(0)
        row = tl.program_id(1)
        if HEAVY_LAST:
            tile = tl.num_programs(0) - 1 - tile
    return tile, row


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KV_START, KV_END,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    Hq, Tq, Tk, group, qk_scale,
    T_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KV_RANGE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FLAT_GRID: tl.constexpr = False,
):
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    start_m, bh = tile_and_row(Tq, BLOCK_M, True, FLAT_GRID)
    b = bh // Hq
    h = bh % Hq
    hk = h // group  # GQA: query head h reads KV head h // (Hq / Hkv)
    b64 = b.to(tl.int64)

    kv_lo, kv_hi = load_kv_range(KV_START, KV_END, b, Tk, HAS_KV_RANGE)
    causal_shift = Tk - Tq  # bottom-right alignment: query i sits at key position i + Tk - Tq

    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh

    n_lo, n_a, n_b, n_hi = key_block_ranges(kv_lo, kv_hi, m0, causal_shift, BLOCK_M, BLOCK_N, IS_CAUSAL)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
        n_lo, tl.minimum(n_a, n_hi), kv_lo, kv_hi, causal_shift, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, True, PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
        n_a, n_b, kv_lo, kv_hi, causal_shift, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, False, PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d,
        n_b, n_hi, kv_lo, kv_hi, causal_shift, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, True, PRECISION)

    empty = l_i == 0.0  # no valid key: o = 0, lse = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # * ln 2
    o_ptrs = O + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)


SMEM_BUDGET = 227 * 1024  # bytes a block may use on an H100 (the estimates below carry the compiler's overhead)


def element_size(named_args: dict) -> int:
    """Bytes per element of the Q/K/V tiles (2 for bf16/fp16, 4 for fp32); 2 when unknown."""
    q = named_args.get("Q")
    return q.element_size() if hasattr(q, "element_size") else 2


def prune_configs(configs, tb: int, smem_bytes) -> list:
    """Keep tiles not much longer than the sequence and whose pipelined buffers fit in shared memory, so no
    compile time is spent on configs that cannot win (or cannot run)."""
    kept = [c for c in configs
            if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= max(tb, 64) and smem_bytes(c) <= SMEM_BUDGET]
    return kept or [min(configs, key=smem_bytes)]


def _prune_fwd(configs, named_args, **kwargs):
    bd, es = kwargs["BLOCK_D"], element_size(named_args)
    # resident Q tile + num_stages buffered (K, V) tiles; x1.1 for the compiler's scratch (sm_90 compiles
    # of this kernel used 1.0x this count: tests/test_triton_compile.py)
    smem = lambda c: int(1.1 * es * bd * (c.kwargs["BLOCK_M"] + 2 * c.num_stages * c.kwargs["BLOCK_N"]))  # noqa: E731
    return prune_configs(configs, named_args["T_BUCKET"], smem)


# H100 (228 KB shared memory per SM): the Q tile stays resident, K/V tiles are pipelined num_stages deep.
# sm_90 compiles (tests/test_triton_compile.py, bf16, causal): 128x64 with 4 warps spills at D = 128 (the
# 128x128 fp32 accumulator alone is 128 registers a thread); 8 warps do not.
_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 4), (64, 64, 4, 3),
        (64, 32, 4, 2),  # fits D = 256
    ]
]
_attn_fwd_kernel_tuned = parallel_autotune(triton.autotune(
    configs=_FWD_CONFIGS, key=["HEAD_DIM", "T_BUCKET", "IS_CAUSAL", "HAS_KV_RANGE"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)(_attn_fwd_kernel))

# Without autotuning (fixed_config): (BLOCK_M, BLOCK_N, num_warps, num_stages) by BLOCK_D; fp32 (tests) a small tile.
# The autotune winners of the first H100 run (a235d55, bf16, causal, T 2048 at D = 64 and 4096 at D = 128; the TMA
# forward's winners were the same): 64x64, 4 warps, 3 stages at both head dims (benchmarks/RESULTS.md).
_FWD_DEFAULT = {64: (64, 64, 4, 3), 128: (64, 64, 4, 3)}
_FWD_FP32 = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)

# Small fixed tiles for the CPU interpreter (autotuning there would run every config).
INTERPRETER_BLOCK_M = 32
INTERPRETER_BLOCK_N = 64


def forward_buffers(q: torch.Tensor, kv_start: torch.Tensor | None, kv_end: torch.Tensor | None):
    """The forward's outputs, o (B, Tq, Hq, D) in q.dtype and lse (B, Hq, Tq) fp32, and its key-range pointers
    (lse as a dummy when there are none: the kernel never reads it then)."""
    B, Tq, Hq, D = q.shape
    o = torch.empty((B, Tq, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    return o, lse, (kv_start if kv_start is not None else lse), (kv_end if kv_end is not None else lse)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    kv_start: torch.Tensor | None,
    kv_end: torch.Tensor | None,
    softmax_scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Inputs are assumed validated (see ``kernels.attention``).

    q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D) with unit stride on D; kv_start/kv_end (B,) int32 or None.
    Returns o (B, Tq, Hq, D) in q.dtype (contiguous) and lse (B, Hq, Tq) fp32 (natural log, -inf on empty rows).
    On CUDA with block_m/block_n None the tile is autotuned; otherwise the given (or interpreter) tile is used.
    ``RLHF_ENGINE_ATTN_TMA=1`` runs the TMA variant (``attention_fwd_tma``) on the inputs it takes, and
    ``RLHF_ENGINE_ATTN_WS=1`` the warp-specialized Gluon kernel for Hopper (``attention_fwd_ws``; it needs finite
    K and V rows outside the key ranges, which the training forward and prefill have).
    """
    from .attention_fwd_tma import attention_forward_tma, tma_eligible, tma_requested

    if os.environ.get("RLHF_ENGINE_ATTN_WS") == "1" and block_m is None and block_n is None:  # opt-in, sm_90
        from .attention_fwd_ws import attention_forward_ws, ws_eligible  # (imports Gluon only when asked)

        if ws_eligible(q, k, v):
            return attention_forward_ws(q, k, v, causal=causal, kv_start=kv_start, kv_end=kv_end,
                                        softmax_scale=softmax_scale)
    if tma_requested() and tma_eligible(q, k, v):  # opt-in: the same kernel with TMA tile moves
        return attention_forward_tma(q, k, v, causal=causal, kv_start=kv_start, kv_end=kv_end,
                                     softmax_scale=softmax_scale, block_m=block_m, block_n=block_n,
                                     num_warps=num_warps, num_stages=num_stages)
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    o, lse, ks, ke = forward_buffers(q, kv_start, kv_end)
    if B * Hq * Tq == 0:
        return o, lse
    has_range = kv_start is not None
    args = (
        q, k, v, o, lse, ks, ke,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],  # one stride() call a tensor
        Hq, Tq, Tk, Hq // Hkv, softmax_scale * LOG2E, t_bucket(max(Tq, Tk)),
    )
    meta = dict(HEAD_DIM=D, BLOCK_D=max(16, next_pow2(D)), IS_CAUSAL=causal, HAS_KV_RANGE=has_range,
                PRECISION=dot_precision(q.dtype), FLAT_GRID=flat_grid(B * Hq))
    if q.is_cuda and block_m is None and block_n is None and autotune_enabled(q.dtype):
        grid = lambda META: tile_grid(cdiv(Tq, META["BLOCK_M"]), B * Hq)  # noqa: E731
        _attn_fwd_kernel_tuned[grid](*args, **meta)
    elif q.is_cuda and block_m is None and block_n is None:
        c = fixed_config(_FWD_CONFIGS, _prune_fwd, {"Q": q, "T_BUCKET": args[-1]}, meta["BLOCK_D"], _FWD_DEFAULT,
                         _FWD_FP32)
        launch(_attn_fwd_kernel, tile_grid(cdiv(Tq, c.kwargs["BLOCK_M"]), B * Hq),
            *args, **meta, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    else:
        bm = block_m or INTERPRETER_BLOCK_M
        bn = block_n or INTERPRETER_BLOCK_N
        launch(_attn_fwd_kernel, tile_grid(cdiv(Tq, bm), B * Hq),
            *args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=num_warps, num_stages=num_stages)
    return o, lse
