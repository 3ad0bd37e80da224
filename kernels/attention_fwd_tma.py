"""The attention forward with its Q, K, V and O tiles moved by TMA (tensor descriptors): an opt-in variant of
``attention_fwd`` for Hopper, to be measured against it (``bench_attention.py``, "ours (TMA loads)").

The math, the online softmax, the three key loops (masked head, unmasked middle, masked tail), the autotuned
tiles and the outputs are those of ``attention_fwd._attn_fwd_kernel``. What changes is how tiles move: each
(batch, head) tile of the (B, T, H, D) tensors is a box [1, BLOCK, D] of a 3-D descriptor over (B, T, H * D),
so the copy engine fetches it asynchronously into shared memory, with hardware bounds checks instead of
per-element predicates (rows past T read as zeros; an O tile's rows past T are not written). On an H100 this
frees registers and issue slots from address arithmetic, which is what the Triton FlashAttention tutorials
gain on Hopper; whether it pays here is for ``bench_attention.py`` to show, so it stays off by default
(``RLHF_ENGINE_ATTN_TMA=1`` turns it on).

Keys outside a sequence's [kv_start, kv_end) range inside a boundary tile are loaded (the box cannot skip
them): their scores are masked to -inf as before, and their V rows are zeroed, so that a key slot holding NaN
(an unwritten cache) cannot reach the output through p = 0 times NaN. Eligible inputs: head dim 64 or 128
(the box must be a power of two wide and cover exactly one head), heads packed (stride(2) = D, unit stride on
D), 16-byte aligned base and strides, no overlapping or broadcast (stride 0) rows, and on a GPU an sm_90 or
newer one (older ones would lower the descriptors to plain loads); anything else runs the pointer kernel.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._launch import cdiv, parallel_autotune
from .attention_fwd import (_FWD_CONFIGS, _FWD_DEFAULT, _FWD_FP32, LOG2E, autotune_enabled,
                            dot_precision, fixed_config, flat_grid, forward_buffers, key_block_ranges,
                            load_kv_range, online_softmax_update, prune_configs, t_bucket, tile_and_row,
                            tile_grid)

TMA_HEAD_DIMS = (64, 128)
_DTYPE_KEYS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def tma_requested() -> bool:
    """``RLHF_ENGINE_ATTN_TMA=1``: the attention forward uses this variant where it is eligible."""
    return os.environ.get("RLHF_ENGINE_ATTN_TMA", "0") == "1"


def tma_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q (B, Tq, Hq, D) and k, v (B, Tk, Hkv, D) can be read through (B, T, H * D) descriptors."""
    D = q.shape[-1]
    if D not in TMA_HEAD_DIMS or (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 9):
        return False
    for t in (q, k, v):
        B, T, H, _ = t.shape
        es = t.element_size()
        if (0 in t.shape or t.stride(3) != 1 or t.stride(2) != D or t.data_ptr() % 16
                or t.stride(1) < H * D or t.stride(0) < T * t.stride(1)  # rows of a box never overlap
                or (t.stride(0) * es) % 16 or (t.stride(1) * es) % 16):
            return False
    return True


@triton.jit
def _attn_fwd_tma_inner(
    acc, l_i, m_i, q, k_desc, v_desc, b, kv_col,
    offs_m, offs_n, lo, hi, kv_lo, kv_hi, causal_shift, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        k = k_desc.load([b, start_n, kv_col]).reshape(BLOCK_N, HEAD_DIM)
        v = v_desc.load([b, start_n, kv_col]).reshape(BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N) fp32
        cols = start_n + offs_n
        kv_ok = (cols >= kv_lo) & (cols < kv_hi)
        valid = kv_ok[None, :]
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None] + causal_shift)
        if MASKED:
            v = tl.where(kv_ok[:, None], v, 0.0)  # keys the box read but the range excludes: never NaN * 0
        acc, l_i, m_i = online_softmax_update(acc, l_i, m_i, qk, v, valid, qk_scale, MASKED, PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_tma_kernel(
    q_desc, k_desc, v_desc, o_desc, LSE, KV_START, KV_END,
    Hq, Tq, Tk, group, qk_scale,
    T_BUCKET, DTYPE_KEY,  # autotune keys only (descriptor arguments carry no dtype for the tuner's key)
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KV_RANGE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FLAT_GRID: tl.constexpr = False,
):
    start_m, bh = tile_and_row(Tq, BLOCK_M, True, FLAT_GRID)  # heavy (last) causal blocks first
    b = bh // Hq
    h = bh % Hq
    hk = h // group  # GQA: query head h reads KV head h // (Hq / Hkv)

    kv_lo, kv_hi = load_kv_range(KV_START, KV_END, b, Tk, HAS_KV_RANGE)
    causal_shift = Tk - Tq  # bottom-right alignment

    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q = q_desc.load([b, m0, h * HEAD_DIM]).reshape(BLOCK_M, HEAD_DIM)  # rows past Tq read as zeros
    kv_col = hk * HEAD_DIM

    n_lo, n_a, n_b, n_hi = key_block_ranges(kv_lo, kv_hi, m0, causal_shift, BLOCK_M, BLOCK_N, IS_CAUSAL)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _attn_fwd_tma_inner(
        acc, l_i, m_i, q, k_desc, v_desc, b, kv_col, offs_m, offs_n,
        n_lo, tl.minimum(n_a, n_hi), kv_lo, kv_hi, causal_shift, qk_scale,
        HEAD_DIM, BLOCK_N, IS_CAUSAL, True, PRECISION)
    acc, l_i, m_i = _attn_fwd_tma_inner(
        acc, l_i, m_i, q, k_desc, v_desc, b, kv_col, offs_m, offs_n,
        n_a, n_b, kv_lo, kv_hi, causal_shift, qk_scale,
        HEAD_DIM, BLOCK_N, IS_CAUSAL, False, PRECISION)
    acc, l_i, m_i = _attn_fwd_tma_inner(
        acc, l_i, m_i, q, k_desc, v_desc, b, kv_col, offs_m, offs_n,
        n_b, n_hi, kv_lo, kv_hi, causal_shift, qk_scale,
        HEAD_DIM, BLOCK_N, IS_CAUSAL, True, PRECISION)

    empty = l_i == 0.0  # no valid key: o = 0, lse = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_desc.store([b, m0, h * HEAD_DIM], o.to(q.dtype).reshape(1, BLOCK_M, HEAD_DIM))  # rows past Tq dropped
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)


def _set_block_shapes(nargs: dict) -> None:
    """Autotuner pre-hook: a config's tile sizes are the descriptors' box shapes."""
    d, bm, bn = nargs["HEAD_DIM"], nargs["BLOCK_M"], nargs["BLOCK_N"]
    nargs["q_desc"].block_shape = [1, bm, d]
    nargs["o_desc"].block_shape = [1, bm, d]
    nargs["k_desc"].block_shape = [1, bn, d]
    nargs["v_desc"].block_shape = [1, bn, d]


def _tma_prune(configs, t_bucket_: int, elem_size: int, head_dim: int) -> list:
    """``attention_fwd``'s prune, with the O tile's staging buffer for the TMA store in the shared-memory count:
    Q tile + O tile + num_stages (K, V) tiles, x1.1 for the compiler's scratch."""
    def smem(c) -> int:
        return int(1.1 * elem_size * head_dim * (2 * c.kwargs["BLOCK_M"] + 2 * c.num_stages * c.kwargs["BLOCK_N"]))
    return prune_configs(configs, t_bucket_, smem)


def _prune_tma(configs, named_args, **kwargs):
    return _tma_prune(configs, named_args["T_BUCKET"], named_args["q_desc"].base.element_size(), kwargs["HEAD_DIM"])


_TMA_CONFIGS = [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages,
                              pre_hook=_set_block_shapes) for c in _FWD_CONFIGS]
_attn_fwd_tma_kernel_tuned = parallel_autotune(triton.autotune(
    configs=_TMA_CONFIGS, key=["HEAD_DIM", "T_BUCKET", "DTYPE_KEY", "IS_CAUSAL", "HAS_KV_RANGE"],
    prune_configs_by={"early_config_prune": _prune_tma},
)(_attn_fwd_tma_kernel))


def _desc(t: torch.Tensor, rows: int) -> "TensorDescriptor":  # noqa: F821 - imported lazily
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, T, H, D = t.shape
    return TensorDescriptor(t, shape=[B, T, H * D], strides=[t.stride(0), t.stride(1), 1], block_shape=[1, rows, D])


def attention_forward_tma(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, kv_start: torch.Tensor | None,
    kv_end: torch.Tensor | None, softmax_scale: float, block_m: int | None = None, block_n: int | None = None,
    num_warps: int = 4, num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_fwd.attention_forward`` with TMA tile moves; inputs must be ``tma_eligible``. Same outputs:
    o (B, Tq, Hq, D) in q.dtype and lse (B, Hq, Tq) fp32."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    o, lse, ks, ke = forward_buffers(q, kv_start, kv_end)
    if B * Hq * Tq == 0:
        return o, lse
    has_range = kv_start is not None
    tb = t_bucket(max(Tq, Tk))
    meta = dict(HEAD_DIM=D, IS_CAUSAL=causal, HAS_KV_RANGE=has_range, PRECISION=dot_precision(q.dtype),
                FLAT_GRID=flat_grid(B * Hq))
    tail = (Hq, Tq, Tk, Hq // Hkv, softmax_scale * LOG2E, tb, _DTYPE_KEYS.get(q.dtype, 0))
    if q.is_cuda and block_m is None and block_n is None and autotune_enabled(q.dtype):
        descs = (_desc(q, 64), _desc(k, 64), _desc(v, 64), _desc(o, 64))  # box rows set per config (pre-hook)
        grid = lambda META: tile_grid(cdiv(Tq, META["BLOCK_M"]), B * Hq)  # noqa: E731
        _attn_fwd_tma_kernel_tuned[grid](*descs, lse, ks, ke, *tail, **meta)
        return o, lse
    if q.is_cuda and block_m is None and block_n is None:
        def prune(cfgs, named, BLOCK_D):
            return _tma_prune(cfgs, named["T_BUCKET"], q.element_size(), BLOCK_D)

        c = fixed_config(_FWD_CONFIGS, prune, {"Q": q, "T_BUCKET": tb}, D, _FWD_DEFAULT, _FWD_FP32)
        bm, bn, num_warps, num_stages = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
    else:
        from .attention_fwd import INTERPRETER_BLOCK_M, INTERPRETER_BLOCK_N

        bm, bn = block_m or INTERPRETER_BLOCK_M, block_n or INTERPRETER_BLOCK_N
    descs = (_desc(q, bm), _desc(k, bn), _desc(v, bn), _desc(o, bm))
    _attn_fwd_tma_kernel[tile_grid(cdiv(Tq, bm), B * Hq)](
        *descs, lse, ks, ke, *tail, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=num_warps, num_stages=num_stages)
    return o, lse
