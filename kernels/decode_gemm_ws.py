"""The decode step's GEMMs for Hopper in Gluon: y = x Wᵀ (+ b), or silu(x W_gateᵀ) · (x W_upᵀ), for the few rows
of a decode step (M <= 256 tokens), fed by TMA and computed "swap-AB" with wgmma. An opt-in replacement of cuBLAS in
the triton decode step (``RLHF_ENGINE_DECODE_GEMM_WS=1``, ``model/attention.decode_gemm_ws_enabled``).

Why: a decode step at batch 64 is the latency of small GEMMs (RESULTS.md, "Generation": on the H200 the four cuBLAS
GEMMs of a Qwen2-0.5B layer take 4.2-7.9 us each for 1.6-17 MB of weights, 0.4-2.3 TB/s where the card reads 4.3;
583 of the step's 1,002 us of kernel time). The split-K Triton GEMM (``norm_linear``) lost to cuBLAS: with the 64
tokens as the MMA's M, its N tiles were 16-64 weight rows, and each of its 200-600 programs re-read all of x (up to
69 MB of L2 reads for 17 MB of weights), its loads pipelined by the compiler.

How:
- **Swap-AB.** The weight rows are wgmma's M (64 a warpgroup) and the tokens its N (16, 32 or 64): a program owns 64
  output features of up to 64 tokens, so x is read once per 64 weight rows, and a weight tile is never re-read.
  With ``swiglu`` (W = [W_gate; W_up], 2N rows) a program owns 64 gate rows and the 64 up rows N below them, and
  writes silu(gate) · up with the eager pair's roundings: the SwiGLU kernel after the GEMM goes.
- **TMA ring.** The weight and x tiles of each K block (64 columns) are copied by TMA into a ring of ``STAGES``
  slots, each with its "ready" mbarrier; the products run asynchronously, one in flight while the next block's
  copies are awaited, and a slot is refilled as soon as the product that read it retired. A program keeps
  STAGES - 1 blocks in flight: 16-24 KB each.
- **Split-K where N is small** (o, down: 14 tiles of 64 rows at Qwen2-0.5B's 896): ``splits`` programs share a
  tile's K range; each stores its fp32 partial tile and takes a ticket from a per-tile counter (a CTA barrier, then
  one acq_rel atomic, as the Triton GEMM does); the last sums the partials in split order (the same bits whichever
  program is last), zeroes the counter for the next launch and runs the epilogue. CUDA-graph safe.
- **Epilogue.** The bias (fp32, before the one rounding, as cuBLAS's), silu · up, the store (16-byte vectors along
  the features).

Outside the kernel, the same math as ``F.linear`` in fp32 (another summation order, so the last bit may differ
from cuBLAS's). Inputs (``eligible``): an sm_90 GPU, bf16 or fp16, x (M, K) rows 16-byte aligned with unit stride,
W (N, K) likewise, K a multiple of 8 (TMA's 16-byte rule), M <= 256. Inference only (no autograd).

Checked on the CPU by ``tests/gluon_emu`` (``tests/test_decode_gemm_ws.py``: the kernel's own code against fp64,
every epilogue, split-K), compiled for sm_90 by ``tests/test_triton_compile.py``; timed against cuBLAS by
``benchmarks/bench_decode_gemm.py`` on a GPU.
"""
from __future__ import annotations

import os

import torch

from ._launch import cdiv, next_pow2, sm_count, tile_counters, use_pdl

try:  # Gluon ships with Triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .lm_head_sample import sample_tile
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - an older Triton
    HAVE_GLUON = False

BLOCK_N = 64  # weight rows a program (wgmma's M for one warpgroup)
BLOCK_K = 64  # K columns a block: 128 bytes of a 16-bit row, one 128-byte swizzle atom
MAX_ROWS = 256


def _rows_ok(t: torch.Tensor) -> bool:
    """A 2-D 16-bit tensor whose rows TMA can read: unit stride on the last dim, 16-byte aligned base and rows."""
    return (t.dim() == 2 and t.dtype in (torch.bfloat16, torch.float16) and t.shape[1] % 8 == 0 and t.stride(1) == 1
            and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0)


def layout_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The kernel's rules on dtypes and strides (the device aside): x (M, K), weight (N, K), one 16-bit dtype, unit
    stride on K, K a multiple of 8, 16-byte aligned bases and row strides, 1 <= M <= 256."""
    return (_rows_ok(x) and _rows_ok(weight) and weight.dtype == x.dtype and weight.shape[1] == x.shape[1] > 0
            and 1 <= x.shape[0] <= MAX_ROWS and weight.shape[0] > 0)


def on_hopper(device: torch.device) -> bool:
    """Whether the kernel can run on ``device``: an sm_90 GPU (Hopper's wgmma), and Gluon; never after
    ``benchmarks/ws_probe.py --gemm`` saw it hang or disagree (``RLHF_ENGINE_DECODE_GEMM_WS_BROKEN=1``), or
    ``gpu_check.sh`` had no time left to run that probe (``=notrun``)."""
    if os.environ.get("RLHF_ENGINE_DECODE_GEMM_WS_BROKEN") in ("1", "notrun"):
        return False
    return HAVE_GLUON and device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def weight_ok(weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether a projection's weight (and bias) can be this kernel's: ``on_hopper``, TMA-readable 16-bit rows, a bias
    of the weight's dtype with unit stride (the decode step checks its layers once with this)."""
    return (on_hopper(weight.device) and _rows_ok(weight)
            and (bias is None or (bias.dtype == weight.dtype and bias.dim() == 1 and bias.stride(0) == 1)))


def eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x, weight can run this kernel: ``on_hopper`` and ``layout_ok``."""
    return on_hopper(x.device) and layout_ok(x, weight)


def tiles(M: int, N: int, K: int, swiglu: bool, sms: int) -> tuple[int, int, int]:
    """(BLOCK_T tokens a program, splits of K, STAGES ring slots) for an (M, N, K) product: one K split while the N
    tiles alone occupy half of the ``sms`` SMs, else enough splits to reach about one program an SM; slots for
    ~96-144 KB of shared memory. ``RLHF_ENGINE_DECODE_GEMM_WS_SPLITS`` / ``_STAGES`` override (GPU tuning)."""
    block_t = 16 if M <= 16 else 32 if M <= 32 else 64
    n_tiles = cdiv(N, BLOCK_N) * cdiv(M, block_t)
    n_kb = cdiv(K, BLOCK_K)
    want = int(os.environ.get("RLHF_ENGINE_DECODE_GEMM_WS_SPLITS", "0")) or (
        1 if 2 * n_tiles >= sms else cdiv(sms, n_tiles))
    splits = cdiv(n_kb, cdiv(n_kb, min(max(want, 1), n_kb)))  # no empty split
    stage_bytes = ((2 if swiglu else 1) * BLOCK_N + block_t) * BLOCK_K * 2
    stages = int(os.environ.get("RLHF_ENGINE_DECODE_GEMM_WS_STAGES", "0")) or max(2, min(6, 144 * 1024 // stage_bytes))
    return block_t, splits, max(2, min(stages, 192 * 1024 // stage_bytes))  # the ring within ~192 KB of the 227


if HAVE_GLUON:
    @gluon.jit
    def _load_weights(w_desc, x_desc, w_smem, u_smem, bar, slot, n0, up_row, k, SWIGLU: gl.constexpr):
        """The weight copies of one K block into ring slot ``slot`` (the weight tile, and the up tile), after the
        barrier's expect of the whole block (x's bytes included: ``_load_x`` completes it)."""
        nbytes: gl.constexpr = w_desc.block_type.nbytes * (2 if SWIGLU else 1) + x_desc.block_type.nbytes
        mbarrier.expect(bar, nbytes)
        tma.async_copy_global_to_shared(w_desc, [n0, k], bar, w_smem.index(slot))
        if SWIGLU:
            tma.async_copy_global_to_shared(w_desc, [up_row, k], bar, u_smem.index(slot))

    @gluon.jit
    def _load_x(x_desc, x_smem, bar, slot, t0, k):
        tma.async_copy_global_to_shared(x_desc, [t0, k], bar, x_smem.index(slot))

    @gluon.jit
    def _load_block(w_desc, x_desc, w_smem, u_smem, x_smem, bar, slot, n0, up_row, t0, k,
                    SWIGLU: gl.constexpr):
        """TMA copies of one K block into ring slot ``slot``: the weight tile (and the up tile), then x's."""
        _load_weights(w_desc, x_desc, w_smem, u_smem, bar, slot, n0, up_row, k, SWIGLU)
        _load_x(x_desc, x_smem, bar, slot, t0, k)

    @gluon.jit
    def _gdc_launch_dependents():
        """Programmatic dependent launch: the next kernel on the stream may start now (PTX griddepcontrol)."""
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _gdc_wait():
        """Wait until the kernels this one depends on completed and their writes are visible."""
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)

    @gluon.jit
    def _store_out(acc, acc_u, Y, BIAS, RO, SQO, pid_n, t0, M, N, stride_ym, stride_rom, HAS_BIAS: gl.constexpr,
                   SWIGLU: gl.constexpr, HAS_ORES: gl.constexpr, HAS_SQO: gl.constexpr, BLOCK_N: gl.constexpr,
                   BLOCK_T: gl.constexpr, dtype: gl.constexpr):
        """y[t, n] of the (features, tokens) tile: + bias, silu(gate) · up with the eager roundings, one rounding
        to dtype, + the residual ro (the eager add's rounding); stored along the features, 8 elements (16 bytes) a
        thread; with HAS_SQO this tile's share of each row's sum of squares, SQO[pid_n, t]."""
        out_l: gl.constexpr = gl.BlockedLayout(size_per_thread=[8, 1], threads_per_warp=[8, 4], warps_per_cta=[1, 4],
                                               order=[0, 1])
        acc = gl.convert_layout(acc, out_l)
        rn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out_l))
        rt = t0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, out_l))
        n_ok = rn < N
        ok = n_ok[:, None] & (rt < M)[None, :]
        if HAS_BIAS:
            acc = acc + gl.load(BIAS + rn, mask=n_ok, other=0.0).to(gl.float32)[:, None]
        if SWIGLU:  # the GEMM outputs rounded, silu(gate) rounded, the product rounded: the eager pair's
            g = acc.to(dtype).to(gl.float32)
            u = gl.convert_layout(acc_u, out_l).to(dtype).to(gl.float32)
            act = (g / (1.0 + gl.exp(-g))).to(dtype)
            out = (act.to(gl.float32) * u).to(dtype)
        else:
            out = acc.to(dtype)
        if HAS_ORES:  # the residual add after the projection, rounded as the eager add
            ro = gl.load(RO + rt.to(gl.int64)[None, :] * stride_rom + rn[:, None], mask=ok, other=0.0)
            out = (ro.to(gl.float32) + out.to(gl.float32)).to(dtype)
        gl.store(Y + rt.to(gl.int64)[None, :] * stride_ym + rn[:, None], out, mask=ok)
        if HAS_SQO:  # for the next GEMM's norm: the sum over this tile's features, per row
            of = gl.where(ok, out.to(gl.float32), 0.0)
            gl.store(SQO + pid_n * M + rt, gl.sum(of * of, axis=0), mask=rt < M)

    @gluon.jit
    def _row_rstd(SQ, P, M, K, eps, t0, SQ_P2: gl.constexpr, BLOCK_T: gl.constexpr, x_l: gl.constexpr):
        """1 / sqrt(mean of squares + eps) of rows [t0, t0 + BLOCK_T), from the (P, M) partial sums of squares the
        previous GEMM left (``HAS_SQO``)."""
        sq_l: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[1, 32], warps_per_cta=[4, 1],
                                              order=[1, 0])
        offs_p = gl.arange(0, SQ_P2, layout=gl.SliceLayout(1, sq_l))
        rows = t0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, sq_l))
        sq = gl.load(SQ + offs_p[:, None] * M + rows[None, :], mask=(offs_p[:, None] < P) & (rows[None, :] < M),
                     other=0.0)
        rstd = 1.0 / gl.sqrt(gl.sum(sq, axis=0) / K + eps)
        return gl.convert_layout(rstd, gl.SliceLayout(1, x_l))

    @gluon.jit
    def _normalize_block(xs, G, k0, K, rstd, x_l: gl.constexpr, BLOCK_K: gl.constexpr, dtype: gl.constexpr):
        """The x tile in shared memory, normalized in place as the norm kernel rounds it: g * (x * rstd).to(dtype),
        then made visible to wgmma (the async proxy) and to the whole warpgroup."""
        offs_k = k0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_l))
        g = gl.load(G + offs_k, mask=offs_k < K, other=0.0).to(gl.float32)
        y = (xs.load(x_l).to(gl.float32) * rstd[:, None]).to(dtype)
        xs.store((g[None, :] * y.to(gl.float32)).to(dtype))
        fence_async_shared()
        gl.thread_barrier()

    @gluon.jit
    def _decode_gemm_kernel(w_desc, x_desc, Y, BIAS, G, SQ, RO, SQO, WS, CNT, SEED, PART, PIDX, M, N, K, P,
                            stride_ym, stride_rom, kb_per, eps, inv_t, VQ,
                            HAS_BIAS: gl.constexpr, SWIGLU: gl.constexpr, NORM: gl.constexpr, SQ_P2: gl.constexpr,
                            HAS_ORES: gl.constexpr, HAS_SQO: gl.constexpr, SPLITS: gl.constexpr,
                            BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_T: gl.constexpr,
                            STAGES: gl.constexpr, PDL: gl.constexpr = False, SAMPLE: gl.constexpr = False,
                            GREEDY: gl.constexpr = False):
        pid_n = gl.program_id(0)
        pid_s = gl.program_id(1)
        pid_t = gl.program_id(2)
        n0 = pid_n * BLOCK_N
        t0 = pid_t * BLOCK_T
        kb_lo = pid_s * kb_per
        nk = gl.minimum((K + BLOCK_K - 1) // BLOCK_K - kb_lo, kb_per)  # this split's K blocks (>= 1: the host's)
        dtype: gl.constexpr = w_desc.dtype
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_T, 16])

        w_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        u_smem = w_smem
        if SWIGLU:
            u_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        x_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_T, BLOCK_K], x_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
        fence_async_shared()

        up_row = n0 + N  # the up rows sit N rows below the gate rows in the packed weight
        if PDL:  # the next kernel may start; this one's first weight blocks go out before waiting for the last one
            _gdc_launch_dependents()
            for i in range(0, gl.minimum(nk, STAGES)):
                _load_weights(w_desc, x_desc, w_smem, u_smem, ready.index(i), i, n0, up_row, (kb_lo + i) * BLOCK_K,
                              SWIGLU)
            _gdc_wait()  # from here on the previous kernel is complete: x, the sums, the residual, any write
            for i in range(0, gl.minimum(nk, STAGES)):
                _load_x(x_desc, x_smem, ready.index(i), i, t0, (kb_lo + i) * BLOCK_K)
        else:
            for i in range(0, gl.minimum(nk, STAGES)):
                _load_block(w_desc, x_desc, w_smem, u_smem, x_smem, ready.index(i), i, n0, up_row, t0,
                            (kb_lo + i) * BLOCK_K, SWIGLU)

        x_l: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1],
                                             order=[1, 0])
        rstd = gl.zeros([BLOCK_T], gl.float32, layout=gl.SliceLayout(1, x_l))  # (unused without a norm)
        if NORM:
            rstd = _row_rstd(SQ, P, M, K, eps, t0, SQ_P2, BLOCK_T, x_l)
        acc = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, layout=acc_l)
        acc_u = acc
        for i in range(0, nk):
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            if NORM:  # RMSNorm of this block of the rows, in place: the projection reads the normalized rows
                _normalize_block(x_smem.index(s), G, (kb_lo + i) * BLOCK_K, K, rstd, x_l, BLOCK_K, dtype)
            xt = x_smem.index(s).permute((1, 0))  # (BLOCK_K, tokens): x's rows are K-major
            acc = warpgroup_mma(w_smem.index(s), xt, acc, is_async=True)
            if SWIGLU:
                acc_u = warpgroup_mma(u_smem.index(s), xt, acc_u, is_async=True)
                acc, acc_u = warpgroup_mma_wait(num_outstanding=2, deps=[acc, acc_u])  # block i - 1's retired
            else:
                acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
            j = i - 1 + STAGES  # block i - 1's slot is free: block j goes there
            if (i > 0) & (j < nk):
                sp = (i - 1) % STAGES
                _load_block(w_desc, x_desc, w_smem, u_smem, x_smem, ready.index(sp), sp, n0, up_row, t0,
                            (kb_lo + j) * BLOCK_K, SWIGLU)
        if SWIGLU:
            acc, acc_u = warpgroup_mma_wait(num_outstanding=0, deps=[acc, acc_u])
        else:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        for i in gl.static_range(STAGES):  # every copy landed and was waited for: the barriers' memory may be reused
            mbarrier.invalidate(ready.index(i))

        if SPLITS > 1:
            n_acc: gl.constexpr = 2 if SWIGLU else 1
            elems: gl.constexpr = BLOCK_N * BLOCK_T
            tile = pid_t * gl.num_programs(0) + pid_n
            offs = (gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_l))[:, None] * BLOCK_T
                    + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, acc_l))[None, :])
            base = WS + tile.to(gl.int64) * (SPLITS * n_acc * elems)
            gl.store(base + pid_s * (n_acc * elems) + offs, acc)
            if SWIGLU:
                gl.store(base + pid_s * (n_acc * elems) + elems + offs, acc_u)
            gl.thread_barrier()  # every thread's partial stored before the ticket's release
            ticket = gl.atomic_add(CNT + tile, 1, sem="acq_rel", scope="gpu")
            if ticket == SPLITS - 1:  # the last program of the tile: the partials in split order, then the epilogue
                acc = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, layout=acc_l)
                acc_u = acc
                for p in gl.static_range(SPLITS):
                    acc += gl.load(base + p * (n_acc * elems) + offs, cache_modifier=".cg")
                    if SWIGLU:
                        acc_u += gl.load(base + p * (n_acc * elems) + elems + offs, cache_modifier=".cg")
                gl.atomic_xchg(CNT + tile, 0, sem="relaxed", scope="gpu")  # zero for the next launch
                _store_out(acc, acc_u, Y, BIAS, RO, SQO, pid_n, t0, M, N, stride_ym, stride_rom, HAS_BIAS, SWIGLU,
                           HAS_ORES, HAS_SQO, BLOCK_N, BLOCK_T, dtype)
        elif SAMPLE:  # the LM head: the sampler's partials of this vocabulary tile, no logits written
            sample_tile(acc, SEED, PART, PIDX, pid_n, t0, M, N, VQ, inv_t, GREEDY, BLOCK_N, BLOCK_T, dtype)
        else:
            _store_out(acc, acc_u, Y, BIAS, RO, SQO, pid_n, t0, M, N, stride_ym, stride_rom, HAS_BIAS, SWIGLU,
                       HAS_ORES, HAS_SQO, BLOCK_N, BLOCK_T, dtype)


def _desc(t: torch.Tensor, rows: int) -> "TensorDescriptor":
    gl_dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([rows, BLOCK_K], gl_dtype)
    return TensorDescriptor(t, shape=list(t.shape), strides=[t.stride(0), 1], block_shape=[rows, BLOCK_K],
                            layout=layout)


def decode_gemm_ws(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, swiglu: bool = False,
                   norm_weight: torch.Tensor | None = None, eps: float = 1e-6, row_sumsq: torch.Tensor | None = None,
                   out_residual: torch.Tensor | None = None, return_sumsq: bool = False, splits: int | None = None,
                   pdl: bool = False, sample: tuple | None = None):
    """x (M, K) @ weight (N, K)ᵀ (+ bias (N,)) -> (M, N) in x's dtype; with ``swiglu`` weight is [W_gate; W_up]
    (2 N rows, no bias) and the result silu(x W_gateᵀ) · (x W_upᵀ) (M, N).

    The decode layer's fusions, with ``norm_linear.decode_linear``'s math and roundings: ``norm_weight`` (K,) with
    ``row_sumsq`` (P, M) fp32 (the partial sums of squares of x's rows a previous call returned): x is RMSNormed
    first (the rstd from the partials); ``out_residual`` (M, N): out = out_residual + out, rounded as the eager add;
    ``return_sumsq``: also return the fp32 partial sums of squares of out's rows, (cdiv(N, 64), M): returns
    (out, sumsq). Inputs must be ``eligible`` (or ``layout_ok`` on the CPU emulator of the tests); ``splits`` forces
    the K splits (tests).

    ``pdl``: a programmatic dependent launch where ``_launch.use_pdl`` allows it (Hopper): the kernel lets the next
    one start at once, issues its first weight copies, and only then waits for the kernel before it (x, the
    partial sums and the residual are read after the wait, everything is written after it). Only for a weight that
    the kernels just before it do not write (the model's parameters); off by default.

    ``sample``: (seed, part, idx, 1 / temperature, ceil(N / 4), greedy) from ``lm_head_sample``: the epilogue writes
    the sampler's partials of each 64-row tile into part (4, M, cdiv(N, 64)) and idx instead of the product (one K
    split, no fusion); returns None."""
    M, K = x.shape
    N = weight.shape[0] // 2 if swiglu else weight.shape[0]
    if swiglu and (bias is not None or weight.shape[0] % 2):
        raise ValueError("decode_gemm_ws: swiglu takes a packed [W_gate; W_up] weight of even rows and no bias")
    if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype or bias.stride(0) != 1):
        raise ValueError(f"decode_gemm_ws: bias must be ({N},) {x.dtype} with unit stride, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    if (norm_weight is None) != (row_sumsq is None):
        raise ValueError("decode_gemm_ws: norm_weight and row_sumsq go together (the rstd comes from the partials)")
    if norm_weight is not None and (norm_weight.shape != (K,) or norm_weight.dtype != x.dtype
                                    or row_sumsq.dtype != torch.float32 or row_sumsq.dim() != 2
                                    or row_sumsq.shape[1] != M):
        raise ValueError(f"decode_gemm_ws: norm_weight ({K},) {x.dtype} and row_sumsq (P, {M}) fp32 expected")
    if out_residual is not None and (out_residual.shape != (M, N) or out_residual.dtype != x.dtype
                                     or out_residual.stride(1) != 1):
        raise ValueError(f"decode_gemm_ws: out_residual must be ({M}, {N}) {x.dtype} with unit column stride")
    if sample is not None and (swiglu or bias is not None or norm_weight is not None or out_residual is not None
                               or return_sumsq):
        raise ValueError("decode_gemm_ws: sample takes the plain product (no bias, SwiGLU, norm or residual)")
    y = torch.empty(M, N if sample is None else 1, device=x.device, dtype=x.dtype)
    sqo = torch.empty(cdiv(N, BLOCK_N), M, device=x.device, dtype=torch.float32) if return_sumsq else None
    block_t, auto_splits, stages = tiles(M, N, K, swiglu, sm_count(x.device))
    n_kb = cdiv(K, BLOCK_K)
    splits = auto_splits if splits is None else splits
    if sample is not None:  # the epilogue needs the whole product; 2 programs an SM (~96 KB of shared memory each)
        splits, stages = 1, min(stages, 6)
    kb_per = cdiv(n_kb, splits)
    splits = cdiv(n_kb, kb_per)
    grid = (cdiv(N, BLOCK_N), splits, cdiv(M, block_t))
    n_tiles = grid[0] * grid[2]
    if splits > 1:
        ws = torch.empty(n_tiles * splits * (2 if swiglu else 1) * BLOCK_N * block_t, device=x.device,
                         dtype=torch.float32)
        cnt = tile_counters(x.device, n_tiles, "decode_gemm_ws")
    else:
        ws = cnt = y  # (not read)
    P = 0 if row_sumsq is None else row_sumsq.shape[0]
    seed, part, idx, inv_t, vq, greedy = sample if sample is not None else (ws, ws, cnt, 1.0, 0, False)
    _decode_gemm_kernel[grid](
        _desc(weight, BLOCK_N), _desc(x, block_t), y, bias if bias is not None else y,
        norm_weight.contiguous() if norm_weight is not None else y,
        row_sumsq.contiguous() if row_sumsq is not None else ws,
        out_residual if out_residual is not None else y, sqo if sqo is not None else ws, ws, cnt, seed, part, idx,
        M, N, K, P, y.stride(0), out_residual.stride(0) if out_residual is not None else 0, kb_per, float(eps),
        float(inv_t), vq,
        HAS_BIAS=bias is not None, SWIGLU=swiglu, NORM=norm_weight is not None, SQ_P2=max(2, next_pow2(P)),
        HAS_ORES=out_residual is not None, HAS_SQO=return_sumsq, SPLITS=splits, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        BLOCK_T=block_t, STAGES=stages, num_warps=4,
        **({"SAMPLE": True, "GREEDY": bool(greedy)} if sample is not None else {}),
        **({"PDL": True, "launch_pdl": True} if pdl and use_pdl(x.device) else {}))
    if sample is not None:
        return None
    return (y, sqo) if return_sumsq else y


def decode_gemm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                          swiglu: bool = False) -> torch.Tensor:
    """What ``decode_gemm_ws`` computes, in plain PyTorch: the product in fp32 (fp64 for fp64 inputs), one rounding
    to x's dtype; with ``swiglu``, silu(gate) · up with the eager pair's roundings."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.nn.functional.linear(x.to(ct), weight.to(ct), None if bias is None else bias.to(ct)).to(x.dtype)
    if not swiglu:
        return y
    g, u = y.chunk(2, dim=-1)
    return (torch.nn.functional.silu(g.to(ct)).to(x.dtype).to(ct) * u.to(ct)).to(x.dtype)
