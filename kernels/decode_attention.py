"""Split-KV flash-decoding over a static KV cache, for a few new query tokens, with GQA, in Triton.

q: (B, Tn, Hq, D) holds Tn (1..~8) new tokens that are already written at the end of each sequence's cache:
query t of sequence b sits at cache position ``cache_lens[b] - Tn + t`` and sees the positions j with
``cache_start[b] <= j <= cache_lens[b] - Tn + t`` (causal among the new tokens; cache_start > 0 skips the left
padding of a prompt). k_cache, v_cache: (B, L, Hkv, D).

Decoding reads the whole KV cache to produce a handful of rows: it is bound by memory bandwidth. Two kernels:
1. ``_decode_split_kernel``, grid (B, Hkv, num_splits): each program owns one chunk of one sequence's valid
   positions for one KV head and loads every K/V block of it exactly once for all ``group = Hq / Hkv`` query heads
   and all Tn new tokens: the query tile is (group * Tn, D) (padded to >= 16 rows for tl.dot), so one tl.dot per
   block serves the whole group. It runs the online softmax of ``attention_fwd.py`` over its chunk and writes the
   normalized partial output and its log-sum-exp.
2. ``_decode_reduce_kernel``, one program per (b, h, t): combines the splits,
       o = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M),  M = max_s lse_s,
   and writes zeros for rows with no valid position. With one split the first kernel writes o directly, and with
   up to ``FUSED_REDUCE_MAX_SPLITS`` it combines them itself: each program stores its partials and takes a ticket
   per (sequence, KV head) (a CTA barrier, then an acq_rel atomic); the last one combines the splits of its rows
   with the same formula and zeroes the ticket for the next launch (one launch a step, CUDA-graph safe).
Splitting the sequence gives the card enough programs when B * Hkv is small (64 * 2 = 128 programs for 132 SMs).
With ``pdl=True`` on Hopper (``_launch.use_pdl``) the split kernel is a programmatic dependent launch: it signals
its dependents at once, prefetches to L2 the first ``PREFETCH_ROWS`` rows of its chunk of K and V (as the lengths
read then place it: a prefetch changes no value), and only then waits for the kernel before it (in the model, the
split-K q/k/v GEMM) to complete; everything it computes with, the lengths included, is read after the wait.
Optionally (``q_cos``/``q_sin``) the split kernel applies RoPE to the query tile as it loads it, so that a decode
step needs no separate kernel for it (the keys are rotated by the cache write, ``kv_cache.write_kv_cache``).
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._fastlaunch import launch
from ._launch import parallel_autotune, sm_count, tile_counters, use_pdl
from .attention import check_qkv
from .attention_fwd import LOG2E, autotune_enabled, dot_precision, next_pow2
from .kv_cache import _check_table, apply_rope, write_kv_cache
from .reference.attention import decode_attention_reference

_BACKENDS = ("auto", "triton", "torch")


@triton.jit
def _chunk(CACHE_LENS, CACHE_START, b, split, L, num_splits, HAS_START: tl.constexpr, BLOCK_N: tl.constexpr):
    """(cache_len, n_start, n_end, lo, hi): sequence b's length, its valid positions [n_start, n_end) with
    n_end = min(len, L), and split ``split``'s chunk [lo, hi) of them, the chunk length rounded up to whole blocks
    (so a short sequence leaves the last splits empty)."""
    cache_len = tl.load(CACHE_LENS + b)
    n_end = tl.minimum(cache_len, L)
    n_start = tl.maximum(tl.load(CACHE_START + b), 0) if HAS_START else 0
    span = tl.maximum(n_end - n_start, 0)
    chunk = ((span + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = n_start + split * chunk
    return cache_len, n_start, n_end, lo, tl.minimum(lo + chunk, n_end)


@triton.jit
def _prefetch_l2(ptrs):
    """``prefetch.global.L2`` of each address (a hint: no value changes, no register written)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs], dtype=tl.int32, is_pure=False,
                              pack=1)


# cache rows a program prefetches to L2 before its PDL wait (K and V; 128 programs: <= 32 MB at D = 128, bf16)
PREFETCH_ROWS = tl.constexpr(512)


@triton.jit
def _decode_split_kernel(
    Q, K, V, O, O_PART, LSE_PART, CACHE_LENS, CACHE_START, COS, SIN,
    KN, VN, WPOS,  # WRITE_KV: the new tokens' (B, Tn, Hkv, D) K and V, and the (B,) first cache slot they go to
    CNT,  # FUSED_REDUCE: int32 tickets, one per (sequence, KV head), zero between launches
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_cb, stride_ct, stride_sb, stride_st,
    stride_knb, stride_knt, stride_knh, stride_vnb, stride_vnt, stride_vnh,
    Hq, Tn, L, group, qk_scale, num_splits,
    L_BUCKET, S_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_START: tl.constexpr, SINGLE_SPLIT: tl.constexpr, HAS_ROPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, WRITE_KV: tl.constexpr = False, PDL_TRIGGER: tl.constexpr = False,
    FUSED_REDUCE: tl.constexpr = False, BLOCK_S: tl.constexpr = 2, PDL_WAIT: tl.constexpr = False,
):
    if PDL_TRIGGER:  # a kernel after this one launched with PDL (the split-K o GEMM) may start loading its weights
        gdc_launch_dependents()
    b = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    b64 = b.to(tl.int64)

    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh
    if PDL_WAIT:
        # Launched with PDL: the kernel before (in the model, the q/k/v GEMM) may still run, and nothing it writes
        # is safe to read before the wait. What is read here only steers L2 prefetches of the chunk's first
        # PREFETCH_ROWS cache rows (a prefetch changes no value; rows outside [0, L) are never named): the lengths
        # as they are now (in the model written by ordinary launches well before), then the wait, and everything
        # below (the lengths again included) is read after it.
        _, _, _, lo0, hi0 = _chunk(CACHE_LENS, CACHE_START, b, split, L, num_splits, HAS_START, BLOCK_N)
        p_end = tl.minimum(hi0, lo0 + PREFETCH_ROWS)
        line: tl.constexpr = 1024 // K.dtype.element_ty.primitive_bitwidth  # elements in a 128-byte line
        for r0 in range(lo0, p_end, 128):
            rr = r0 + tl.arange(0, 128)
            rr = tl.where(rr < p_end, rr, lo0).to(tl.int64)  # past the end: the first row again (a no-op)
            for d0 in tl.static_range(0, HEAD_DIM, line):
                _prefetch_l2(k_base + rr * stride_kt + d0)
                _prefetch_l2(v_base + rr * stride_vt + d0)
        gdc_wait()

    cache_len, n_start, n_end, lo, hi = _chunk(CACHE_LENS, CACHE_START, b, split, L, num_splits, HAS_START, BLOCK_N)

    if WRITE_KV:
        # The cache write, fused. Token t's K (rotated with the query's RoPE tables at its position, fp32, rounded
        # once: the arithmetic of kernels/kv_cache.py's _write_kv_kernel) and V go to slot WPOS[b] + t; slots
        # outside [0, L) are dropped. A slot is written by the program whose chunk [lo, hi) holds it, the only one
        # that reads it (slots outside [n_start, n_end), which no program reads, by split 0); the barrier makes
        # the stores visible to the whole program before its loads below.
        HALF_W: tl.constexpr = HEAD_DIM // 2
        offs_w = tl.arange(0, BLOCK_D)
        wmask = offs_w < HEAD_DIM
        offs_hw = tl.arange(0, BLOCK_D // 2)
        hwmask = offs_hw < HALF_W
        w0 = tl.load(WPOS + b)
        for tw in range(0, Tn):
            slot = w0 + tw
            mine = ((slot >= lo) & (slot < hi)) | ((split == 0) & ((slot < n_start) | (slot >= n_end)))
            ok = (slot >= 0) & (slot < L) & mine
            k_dst = K + b64 * stride_kb + slot.to(tl.int64) * stride_kt + hk * stride_kh
            v_dst = V + b64 * stride_vb + slot.to(tl.int64) * stride_vt + hk * stride_vh
            k_src = KN + b64 * stride_knb + tw * stride_knt + hk * stride_knh
            vn = tl.load(VN + b64 * stride_vnb + tw * stride_vnt + hk * stride_vnh + offs_w, mask=wmask & ok)
            tl.store(v_dst + offs_w, vn.to(V.dtype.element_ty), mask=wmask & ok)
            if HAS_ROPE:
                c = tl.load(COS + b64 * stride_cb + tw * stride_ct + offs_hw, mask=hwmask & ok, other=1.0)
                s = tl.load(SIN + b64 * stride_sb + tw * stride_st + offs_hw, mask=hwmask & ok, other=0.0)
                c, s = c.to(tl.float32), s.to(tl.float32)
                x1 = tl.load(k_src + offs_hw, mask=hwmask & ok, other=0.0).to(tl.float32)
                x2 = tl.load(k_src + HALF_W + offs_hw, mask=hwmask & ok, other=0.0).to(tl.float32)
                tl.store(k_dst + offs_hw, (x1 * c - x2 * s).to(K.dtype.element_ty), mask=hwmask & ok)
                tl.store(k_dst + HALF_W + offs_hw, (x2 * c + x1 * s).to(K.dtype.element_ty), mask=hwmask & ok)
            else:
                kn = tl.load(k_src + offs_w, mask=wmask & ok)
                tl.store(k_dst + offs_w, kn.to(K.dtype.element_ty), mask=wmask & ok)
        tl.debug_barrier()

    # Query rows r = g * Tn + t: head h = hk * group + g, new token t.
    rows = tl.arange(0, BLOCK_R)
    g = rows // Tn
    t = rows % Tn
    row_ok = rows < group * Tn
    h = hk * group + g
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < HEAD_DIM
    q_rows = Q + b64 * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh
    q = tl.load(q_rows + offs_d[None, :], mask=row_ok[:, None] & dmask, other=0.0)
    if HAS_ROPE:
        # RoPE on the query (rotate-half): y_d = x_d c_j - x_{d+D/2} s_j for d < D/2, x_d c_j + x_{d-D/2} s_j
        # above, j = d mod D/2; fp32 math rounded once to q's dtype (as kernels/kv_cache.py's rope kernel).
        HALF: tl.constexpr = HEAD_DIM // 2
        j = offs_d % HALF
        qm = row_ok[:, None] & dmask
        c = tl.load(COS + b64 * stride_cb + t[:, None] * stride_ct + j[None, :], mask=qm, other=1.0)
        sn = tl.load(SIN + b64 * stride_sb + t[:, None] * stride_st + j[None, :], mask=qm, other=0.0)
        partner = tl.load(q_rows + ((offs_d + HALF) % HEAD_DIM)[None, :], mask=qm, other=0.0).to(tl.float32)
        rot = tl.where((offs_d < HALF)[None, :], -partner, partner)
        q = (q.to(tl.float32) * c.to(tl.float32) + rot * sn.to(tl.float32)).to(Q.dtype.element_ty)

    pos = cache_len - Tn + t  # (BLOCK_R,) cache position of each query row
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = cols < hi  # cols >= lo >= n_start by construction; never read unwritten positions
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_ok[:, None] & dmask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_ok[:, None] & dmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_R, BLOCK_N)
        valid = kv_ok[None, :] & (cols[None, :] <= pos[:, None])
        s = tl.where(valid, s * qk_scale, float("-inf"))  # base-2 scores: c * log2(e) * q.k
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: avoid -inf - -inf
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    if SINGLE_SPLIT:
        o_ptrs = O + b64 * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & dmask)
    else:
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))  # base-2 lse of this chunk
        # Workspace: O_PART (B, Hq, Tn, S, D) fp32, LSE_PART (B, Hq, Tn, S) fp32.
        part = ((b64 * Hq + h) * Tn + t) * num_splits + split  # (BLOCK_R,)
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=row_ok[:, None] & dmask)
        tl.store(LSE_PART + part, lse, mask=row_ok)
        if FUSED_REDUCE:
            # The combine in this kernel: the last program of (b, hk) to take its ticket (after a CTA barrier:
            # every thread's partials stored before the acq_rel release) combines the splits of its rows as
            # _decode_reduce_kernel does, and zeroes the ticket for the next launch.
            tl.debug_barrier()
            cnt = CNT + b * tl.num_programs(1) + hk
            ticket = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
            if ticket == num_splits - 1:
                first = part - split  # (BLOCK_R,) the rows' split-0 entries
                offs_s = tl.arange(0, BLOCK_S)
                s_ok = row_ok[:, None] & (offs_s[None, :] < num_splits)
                lse_all = tl.load(LSE_PART + first[:, None] + offs_s[None, :], mask=s_ok, other=float("-inf"),
                                  cache_modifier=".cg")  # (BLOCK_R, BLOCK_S)
                m = tl.max(lse_all, 1)
                m_use = tl.where(m == float("-inf"), 0.0, m)
                w = tl.math.exp2(lse_all - m_use[:, None])  # 0 for empty splits
                denom = tl.sum(w, 1)
                o = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
                for sp in tl.static_range(BLOCK_S):
                    w_s = tl.sum(tl.where(offs_s[None, :] == sp, w, 0.0), 1)  # (BLOCK_R,) column sp of w
                    o_s = tl.load(O_PART + (first + sp)[:, None] * HEAD_DIM + offs_d[None, :],
                                  mask=row_ok[:, None] & dmask & (sp < num_splits), other=0.0, cache_modifier=".cg")
                    o += w_s[:, None] * o_s
                o = o / tl.where(denom == 0.0, 1.0, denom)[:, None]
                tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")
                o_ptrs = O + b64 * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :]
                tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & dmask)


@triton.jit
def _decode_reduce_kernel(
    O, O_PART, LSE_PART,
    stride_ob, stride_ot, stride_oh,
    Hq, Tn, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # o = sum_s w_s o_s / sum_s w_s with w_s = exp2(lse_s - max_s lse_s); all -inf: o = 0.
    row = tl.program_id(0).to(tl.int64)  # ((b * Hq + h) * Tn + t)
    t = row % Tn
    h = (row // Tn) % Hq
    b = row // (Tn * Hq)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lse = tl.load(LSE_PART + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_use)  # 0 for empty splits
    denom = tl.sum(w, 0)
    parts = tl.load(O_PART + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(O + b * stride_ob + t * stride_ot + h * stride_oh + offs_d, o.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


# Memory-bound: deeper pipelines and small warps counts; tiles of 32..256 cache positions. The 256-key tiles
# (ninth session, unmeasured) are for one split at D = 64, the first run's short cell: 128 programs, one per SM,
# each streaming 512 KB at 2.36 TB/s in all where D = 128 reached 2.95 TB/s; twice the keys a step halves the
# per-step work (max, sum, rescale) per byte and doubles the bytes in flight per SM. The prune drops the tiles
# whose pipelined K/V buffers do not fit in shared memory (256 keys at D = 128 and 3 stages).
_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn, w, s in [(64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (256, 4, 3), (256, 8, 3), (256, 8, 2),
                     (32, 4, 4)]
]
_DECODE_FP32 = triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=4)
_DECODE_SMEM_BUDGET = 227 * 1024  # bytes a block may use on an H100


def decode_smem_bytes(config: triton.Config, block_d: int, element_size: int = 2) -> int:
    """Shared memory of a decode tile: num_stages buffered K and V blocks of BLOCK_N x BLOCK_D (x1.1 for the
    compiler's scratch, as attention_fwd's estimate)."""
    return int(1.1 * 2 * config.num_stages * config.kwargs["BLOCK_N"] * block_d * element_size)


def _prune_decode(configs, named_args, **kwargs):
    q = named_args.get("Q")
    es = q.element_size() if hasattr(q, "element_size") else 2
    kept = [c for c in configs if decode_smem_bytes(c, kwargs["BLOCK_D"], es) <= _DECODE_SMEM_BUDGET]
    return kept or [min(configs, key=lambda c: decode_smem_bytes(c, kwargs["BLOCK_D"], es))]


_decode_split_kernel_tuned = parallel_autotune(triton.autotune(
    # Coarse key: a growing dynamic cache must not trigger a new tuning run at every power of two; the split
    # count (rounded to a power of two) is in it, since it sets how many keys each program walks.
    configs=_DECODE_CONFIGS,
    key=["HEAD_DIM", "BLOCK_R", "L_BUCKET", "S_BUCKET", "SINGLE_SPLIT", "HAS_ROPE", "WRITE_KV"],
    prune_configs_by={"early_config_prune": _prune_decode},
)(_decode_split_kernel))
INTERPRETER_BLOCK_N = 32
# Without autotuning: (BLOCK_N, num_warps, num_stages) by (HEAD_DIM, single split), else the first config. The
# autotune winners of the first H100 run (a235d55, bf16, B=64, L=2048): one split 128 keys a step at D = 64 and 32
# (4 stages) at D = 128; with splits 64 keys, 4 warps, 3 stages at both (benchmarks/RESULTS.md).
_DECODE_DEFAULT = {(64, True): (128, 4, 3), (64, False): (64, 4, 3), (128, True): (32, 4, 4), (128, False): (64, 4, 3)}


def _decode_fixed_config(head_dim: int, single: bool, dtype: torch.dtype) -> triton.Config:
    """The tile of a CUDA launch without autotuning; fp32 (tests): 32 keys a step."""
    if dtype == torch.float32:
        return _DECODE_FP32
    c0 = _DECODE_CONFIGS[0]
    bn, w, s = _DECODE_DEFAULT.get((head_dim, single), (c0.kwargs["BLOCK_N"], c0.num_warps, c0.num_stages))
    return triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)


MAX_SPLITS = 64  # the reduce kernel holds a (splits, head dim) fp32 tile: more would spill
FUSED_REDUCE_MAX_SPLITS = 8  # up to this many splits the split kernel combines them itself (no reduce kernel)


def default_num_splits(batch: int, kv_heads: int, cache_len: int, device: torch.device) -> int:
    """Splits per (sequence, KV head) so that the programs about fill the SMs once (132 on an H100), each split
    keeping at least 128 positions; depends only on shapes (never on cache_lens), so it is CUDA-graph safe.

    One split (no combine kernel) once the (sequence, KV head) programs alone fill ~90% of the SMs: on the first
    H100 run (a235d55, bf16, L = 2048, CUDA-graph replays) one split beat the old rule's 5 at B * Hkv = 128
    (28.5 against 31.9 us, D = 64) and its 2 at 512 (182 against 187 us, D = 128). Below that, enough splits for
    one wave (the old rule aimed at four programs per SM; which is better for small batches is not measured).
    Those runs timed splits with the separate combine kernel; since the fifteenth session up to 8 splits combine
    inside the split kernel (no second launch), which ``bench_decode_attention.py``'s 2- and 4-split rows measure
    before this rule changes."""
    sms = sm_count(device)
    programs = max(batch * kv_heads, 1)
    splits = 1 if programs >= 0.9 * sms else math.ceil(sms / programs)
    return int(max(1, min(splits, math.ceil(cache_len / 128), MAX_SPLITS)))


def decode_attention_forward(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    cache_start: Optional[torch.Tensor],
    softmax_scale: float,
    num_splits: int,
    block_n: Optional[int] = None,
    q_cos: Optional[torch.Tensor] = None,
    q_sin: Optional[torch.Tensor] = None,
    kv_write: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    pdl: bool = False,
) -> torch.Tensor:
    """Launch the split and reduce kernels; inputs validated by ``decode_attention``. Returns o (B, Tn, Hq, D).
    ``kv_write`` = (k_new, v_new, write_pos): the split kernel writes them into the cache first, each slot by the
    program that reads it (validated by ``decode_attention``). Up to ``FUSED_REDUCE_MAX_SPLITS`` splits are
    combined by the split kernel's last program per (sequence, KV head); more by ``_decode_reduce_kernel``."""
    B, Tn, Hq, D = q.shape
    L, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    o = torch.empty((B, Tn, Hq, D), dtype=q.dtype, device=q.device)
    if B * Tn * Hq == 0:
        return o
    single = num_splits == 1
    if single:
        o_part = lse_part = o  # unused
    else:
        o_part = torch.empty((B, Hq, Tn, num_splits, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B, Hq, Tn, num_splits), dtype=torch.float32, device=q.device)
    has_start, has_rope = cache_start is not None, q_cos is not None
    cos, sin = (q_cos, q_sin) if has_rope else (q, q)  # unused without RoPE
    k_new, v_new, write_pos = kv_write if kv_write is not None else (q, q, cache_lens)  # unused without it
    fused_reduce = not single and num_splits <= FUSED_REDUCE_MAX_SPLITS
    cnt = tile_counters(q.device, B * Hkv, "decode_attention") if fused_reduce else cache_lens  # (unused without)
    args = (
        q, k_cache, v_cache, o, o_part, lse_part, cache_lens, cache_start if has_start else cache_lens, cos, sin,
        k_new, v_new, write_pos, cnt,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        k_new.stride(0), k_new.stride(1), k_new.stride(2), v_new.stride(0), v_new.stride(1), v_new.stride(2),
        Hq, Tn, L, group, softmax_scale * LOG2E, num_splits, min(max(next_pow2(L), 1024), 16384),
        min(next_pow2(num_splits), 64),  # splits change the work per program: part of the key (rounded)
    )
    meta = dict(HEAD_DIM=D, BLOCK_D=max(16, next_pow2(D)), BLOCK_R=max(16, next_pow2(group * Tn)),
                HAS_START=has_start, SINGLE_SPLIT=single, HAS_ROPE=has_rope, PRECISION=dot_precision(q.dtype),
                WRITE_KV=kv_write is not None,
                **({"PDL_TRIGGER": True, "PDL_WAIT": True, "launch_pdl": True} if pdl and use_pdl(q.device) else {}),
                **({"FUSED_REDUCE": True, "BLOCK_S": max(2, next_pow2(num_splits))} if fused_reduce else {}))
    grid = (B, Hkv, num_splits)
    if q.is_cuda and block_n is None and autotune_enabled(q.dtype):
        _decode_split_kernel_tuned[grid](*args, **meta)
    elif q.is_cuda and block_n is None:
        c = _decode_fixed_config(D, single, q.dtype)
        launch(_decode_split_kernel, grid, *args, **meta, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    else:
        launch(_decode_split_kernel, grid, *args, **meta, BLOCK_N=block_n or INTERPRETER_BLOCK_N, num_warps=4,
               num_stages=2)
    if not single and not fused_reduce:
        launch(_decode_reduce_kernel, (B * Hq * Tn,),
            o, o_part, lse_part, o.stride(0), o.stride(1), o.stride(2), Hq, Tn, num_splits,
            HEAD_DIM=D, BLOCK_D=max(16, next_pow2(D)), BLOCK_S=max(2, next_pow2(num_splits)),
            num_warps=1 if next_pow2(num_splits) * next_pow2(D) <= 1024 else 4)  # 1 warp spills at 64 x 128
    return o


@torch.library.custom_op("rlhf_engine::decode_attention", mutates_args=())
def decode_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
    cache_start: Optional[torch.Tensor], softmax_scale: float, num_splits: int,
    q_cos: Optional[torch.Tensor] = None, q_sin: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """o (B, Tn, Hq, D) = decode_attention_forward(...); inference only (no autograd)."""
    return decode_attention_forward(q, k_cache, v_cache, cache_lens, cache_start, softmax_scale, num_splits,
                                    q_cos=q_cos, q_sin=q_sin)


@decode_attention_op.register_fake
def _decode_attention_fake(q, k_cache, v_cache, cache_lens, cache_start, softmax_scale, num_splits, q_cos=None,
                           q_sin=None):
    return q.new_empty(q.shape)


def _check_lens(name: str, t: Optional[torch.Tensor], batch: int, device: torch.device) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.shape != (batch,):
        raise ValueError(f"{name}: expected a ({batch},) integer tensor, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    return t.to(torch.int32).contiguous()


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    *,
    cache_start: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    num_splits: Optional[int] = None,
    q_cos: Optional[torch.Tensor] = None,
    q_sin: Optional[torch.Tensor] = None,
    kv_write: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    backend: str = "auto",
    pdl: bool = False,
) -> torch.Tensor:
    """Attention of Tn new tokens over a static KV cache (inference only, no autograd).

    Args:
        q: (B, Tn, Hq, D) bf16/fp16/fp32, Tn small (1..~8). Query t sits at position cache_lens[b] - Tn + t.
        k_cache, v_cache: (B, L, Hkv, D), dtype of q, any strides with unit stride on D (a transposed
            (B, Hkv, L, D) HF cache works as a view). Hq % Hkv == 0; head h reads KV head h // (Hq / Hkv).
        cache_lens: (B,) int, valid positions per sequence INCLUDING the Tn new tokens (already written).
        cache_start: optional (B,) int, first valid position (left-padded prompts). Default 0.
        softmax_scale: default 1 / sqrt(D).
        num_splits: chunks per (sequence, KV head); default from B * Hkv vs the SM count (``default_num_splits``).
        q_cos, q_sin: optional (B, Tn, D) or (B, Tn, D/2) RoPE tables at each new token's position (only the
            first D/2 entries are read: the rotate-half convention of Llama / HF, D even). Given, q is taken
            BEFORE RoPE and rotated inside the kernel, in fp32 and rounded once to q.dtype, which saves a decode
            step its separate RoPE kernel for q; the keys in the cache are already rotated.
        kv_write: optional (k_new, v_new, write_pos): the new tokens' K and V, (B, Tn, Hkv, D), and the (B,) int
            cache slot of each sequence's first one, written into the cache BEFORE the attention reads it, as
            ``kernels.kv_cache.write_kv_cache`` would (slots outside [0, L) dropped), K rotated with the query's
            tables when q_cos/q_sin are given (a new token's key and query share its position). On the triton
            backend the attention kernel writes them itself (one launch instead of two, the same values; with
            splits, each slot by the program whose chunk reads it); under torch.compile or on the torch backend
            ``write_kv_cache`` runs first. cache_lens must count the new tokens, as always.
        backend: "auto" | "triton" | "torch" (see ``kernels.attention.flash_attention``).
        pdl: on Hopper (``_launch.use_pdl``), launch the split kernel with programmatic dependent launch: it may
            start while the kernel before it runs (it prefetches its first cache rows to L2, then waits for it)
            and lets the next one start at once. Pays only after a kernel that triggers early (the model's
            split-K q/k/v GEMM); after an ordinary launch it is the wait's cost alone. Off by default: the H200
            run of 926e32e measured no gain on the default decode step (1.194 against 1.201 ms without it).
    Returns:
        o: (B, Tn, Hq, D) in q.dtype; rows without a valid position are zeros.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    B, Tn, Hq, D = check_qkv(q, k_cache, v_cache, "k_cache", "v_cache")
    cache_lens = _check_lens("cache_lens", cache_lens, B, q.device)
    if cache_lens is None:
        raise ValueError("cache_lens: expected a (B,) integer tensor, got None")
    cache_start = _check_lens("cache_start", cache_start, B, q.device)
    if num_splits is not None and (not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits: expected an int in [1, {MAX_SPLITS}] or None, got {num_splits!r}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    if (q_cos is None) != (q_sin is None):
        raise ValueError("q_cos, q_sin: expected both or neither")
    if q_cos is not None:
        for name, t in (("q_cos", q_cos), ("q_sin", q_sin)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or tuple(t.shape[:2]) != (B, Tn) or D % 2:
                raise ValueError(f"{name}: expected a (B, Tn, D) or (B, Tn, D/2) = ({B}, {Tn}, {D} or {D // 2}) "
                                 f"tensor (D even), got {tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
            _check_table(name, t, D, q.device)  # width D or D/2, unit stride, q's device (as the cache write)
    use_triton = backend == "triton" or (backend == "auto" and q.is_cuda)
    if kv_write is not None:
        kv_write = _check_kv_write(kv_write, k_cache, B, Tn)
        if not use_triton:  # the reference path: the write, then the attention below
            _write_first(kv_write, k_cache, v_cache, q_cos, q_sin, backend)
            kv_write = None
    if not use_triton:
        if q_cos is not None:
            q = apply_rope(q, q_cos, q_sin, backend="torch")
        return decode_attention_reference(q, k_cache, v_cache, cache_lens, cache_start=cache_start,
                                          softmax_scale=scale)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q: expected fp16/bf16/fp32 for the Triton backend, got {q.dtype}")
    if num_splits is None:
        num_splits = default_num_splits(B, k_cache.shape[2], k_cache.shape[1], q.device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache, v_cache: expected unit stride on the head dim (copying a cache is never wanted)")
    if kv_write is not None and torch.compiler.is_compiling():
        _write_first(kv_write, k_cache, v_cache, q_cos, q_sin, backend)  # the custom op takes no write
        kv_write = None
    if torch.compiler.is_compiling():
        return decode_attention_op(q, k_cache, v_cache, cache_lens, cache_start, scale, num_splits, q_cos, q_sin)
    return decode_attention_forward(q, k_cache, v_cache, cache_lens, cache_start, scale, num_splits,
                                    q_cos=q_cos, q_sin=q_sin, kv_write=kv_write, pdl=pdl)


def _check_kv_write(kv_write, k_cache: torch.Tensor, B: int, Tn: int) -> tuple[torch.Tensor, ...]:
    """(k_new, v_new, write_pos) checked against the cache and the queries; k_new, v_new with unit stride on D,
    write_pos int32."""
    if not isinstance(kv_write, (tuple, list)) or len(kv_write) != 3:
        raise ValueError(f"kv_write: expected (k_new, v_new, write_pos), got {type(kv_write).__name__}")
    k_new, v_new, write_pos = kv_write
    want = (B, Tn, k_cache.shape[2], k_cache.shape[3])
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            raise ValueError(f"kv_write: {name}: expected shape {want} (B, Tn, Hkv, D), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.dtype.is_floating_point or t.device != k_cache.device:
            raise ValueError(f"kv_write: {name}: expected a float tensor on {k_cache.device}, got {t.dtype} on "
                             f"{t.device}")
    write_pos = _check_lens("kv_write: write_pos", write_pos, B, k_cache.device)
    unit = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    return unit(k_new), unit(v_new), write_pos


def _write_first(kv_write, k_cache, v_cache, q_cos, q_sin, backend: str) -> None:
    """The unfused cache write of ``kv_write`` (``write_kv_cache``, K rotated with the query's tables)."""
    k_new, v_new, write_pos = kv_write
    B, Tn, _, D = k_new.shape
    cos = sin = rows = None
    if q_cos is not None:  # (B, Tn, D or D/2) -> the write's (B * Tn, D/2) table, row b * Tn + t
        cos = q_cos[..., : D // 2].reshape(B * Tn, D // 2)
        sin = q_sin[..., : D // 2].reshape(B * Tn, D // 2)
        rows = torch.arange(0, B * Tn, Tn, device=k_new.device, dtype=torch.int32)
    write_kv_cache(k_cache, v_cache, k_new, v_new, write_pos, cos=cos, sin=sin, rope_positions=rows, backend=backend,
                   check_positions=False)  # rows b * Tn of tables of B * Tn rows
