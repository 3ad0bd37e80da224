"""A warp-specialized attention forward for Hopper, written in Gluon (Triton's explicit-layout language): an opt-in
variant of ``attention_fwd`` (``RLHF_ENGINE_ATTN_WS=1``), built to close the gap to cuDNN's attention that the
Triton kernels cannot (``benchmarks/RESULTS.md``, "GQA attention": Triton 3.6 emits no warp specialization for
them on sm_90, and the default SDPA is 1.3-1.9x faster).

The structure is FlashAttention-3's (Shah et al., 2024, section 3.1), expressed with Gluon's ``warp_specialize``:
- **One program, two query tiles of one (batch, head)**: rows [m0, m0 + BLOCK_M) and [m0 + BLOCK_M, m0 + 2 BLOCK_M).
- **A load warp** (a worker partition of one warp) issues the TMA copies: the two Q tiles once, then each key block's
  K and V tiles into a ring of ``STAGES`` shared-memory slots, each with its own "ready" barriers (K's and V's, so
  the first product can start before V lands) and an "empty" barrier that both consumers arrive on.
- **Two consumer warpgroups** (the default partition and a 4-warp worker), one per query tile, each running the
  online softmax on its own rows with ``wgmma`` (S = Q Kᵀ with Q and K from shared memory; O += P V with P from
  registers, as FA3's "RS" product). Both read the same K and V slots, so a key block is fetched once for 2 x
  BLOCK_M query rows. The two warpgroups are independent instruction streams: while one runs its softmax
  (exponentials, reductions) the other's products can keep the tensor cores busy. By default that overlap is left
  to the warp schedulers; two warpgroups doing the same work tend to run in step, though (both issue their products,
  both wait, both run their exponentials while the tensor cores idle), which is why FA3 forces **ping-pong**: with
  ``RLHF_ENGINE_ATTN_WS_PINGPONG=1`` (on the pipelined schedule) the consumers issue their products in turn, each
  passing the turn right after its issue, so one's softmax runs under the other's products (``_turn_take``).

The math is ``attention_fwd``'s, bit for bit in intent (base-2 softmax, the scale folded into exp2's argument,
the same -inf guards): keys in [kv_start, kv_end), causal bottom-right aligned (key j <= row i + Tk - Tq), a row
without a valid key writes o = 0 and lse = -inf. Key blocks are walked over the union of the two tiles' ranges;
a tile skips the blocks past its own causal edge, releasing each once its copies landed. Blocks that cross
kv_start, kv_end or the diagonal are masked; the others are not.

Tiles are boxes of 2-D descriptors over (B * T, H * D): a box that crosses the end of a sequence reads the next
sequence's rows (the last one reads zeros past the tensor). Those keys are masked (score -inf, p = 0), and query
rows past Tq are never stored. So the variant needs **finite K and V rows everywhere in the tensors**, which holds
for the training forward and prefill (every row is a computed activation), not for an unwritten cache slot (0 x NaN
is NaN in the P V product); ``ws_eligible`` leaves it to those callers (``attention_forward`` and
``attention_backward`` only dispatch here). Eligible inputs:
an sm_90 GPU (Hopper; not Blackwell, whose MMA is another instruction), bf16 or fp16, head dim 64 or 128, heads
packed (stride(2) = D, unit stride on D), 16-byte aligned base and row strides.

No interpreter runs Gluon: this kernel is checked by compiling it for sm_90 on the CPU (``tests/test_triton_compile
.py``) and on a GPU against the fp64 reference and the Triton kernel (``tests/test_attention_ws.py``, ``gpu``).
"""
from __future__ import annotations

import os

import torch

try:  # Gluon ships with Triton >= 3.5; the CPU interpreter does not run it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - an older Triton
    HAVE_GLUON = False

from ._launch import cdiv
from .attention_fwd import LOG2E, forward_buffers

WS_HEAD_DIMS = (64, 128)


def ws_layout_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The kernel's rules on dtypes, head dim and strides (the device aside): q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D)
    bf16 or fp16, D 64 or 128, each tensor rows of one stride over (B * T) with its heads packed, 16-byte aligned."""
    D = q.shape[-1]
    if D not in WS_HEAD_DIMS or q.dtype not in (torch.bfloat16, torch.float16) or not (k.dtype == v.dtype == q.dtype):
        return False
    if q.shape[0] * q.shape[2] > 65535:  # (batch, head) rows on the grid's second dimension
        return False
    for t in (q, k, v):
        B, T, H, _ = t.shape
        es = t.element_size()
        if (0 in t.shape or t.stride(3) != 1 or t.stride(2) != D or t.data_ptr() % 16
                or (t.stride(1) * es) % 16 or t.stride(1) < H * D
                or (B > 1 and t.stride(0) != T * t.stride(1))):  # (B * T) rows of one stride
            return False
    return True


def ws_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q, k, v can run the warp-specialized forward: an sm_90 GPU with Gluon, and ``ws_layout_ok``."""
    if not HAVE_GLUON or not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if os.environ.get("RLHF_ENGINE_ATTN_WS_BROKEN") in ("1", "notrun"):  # ws_probe.py: a hang, a mismatch, or not
        # probed in gpu_check.sh's budget
        return False
    return ws_layout_ok(q, k, v)


def ws_pipeline() -> bool:
    """FA3's intra-warpgroup overlap in the forward's consumers (``_ws_consume``): on unless
    ``RLHF_ENGINE_ATTN_WS_PIPELINE=0``."""
    if os.environ.get("RLHF_ENGINE_ATTN_WS_PIPELINE_BROKEN") in ("1", "notrun"):  # ws_probe.py saw it fail
        return False
    return os.environ.get("RLHF_ENGINE_ATTN_WS_PIPELINE", "1") != "0"


def ws_pingpong(forward: bool = True) -> bool:
    """FA3's ping-pong between the two consumers (``_turn_take``) of the forward and of both backward kernels
    (``attention_bwd_ws``, ``forward=False``): opt-in with ``RLHF_ENGINE_ATTN_WS_PINGPONG=1``; in the forward on
    the pipelined schedule only (``ws_pipeline``), the backward having one schedule."""
    if os.environ.get("RLHF_ENGINE_ATTN_WS_PINGPONG_BROKEN") in ("1", "notrun"):  # ws_probe.py saw it fail
        return False
    return os.environ.get("RLHF_ENGINE_ATTN_WS_PINGPONG", "0") == "1" and (ws_pipeline() or not forward)


def ws_tiles(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M rows a consumer warpgroup, BLOCK_N keys a block, STAGES K/V slots) for a head dim; shared memory:
    2 Q tiles + STAGES x (K, V) tiles + the output's 16 KB of staging = 128 KB at D = 64, 176 KB at D = 128 (one
    program an SM either way: 12 warps at 168 registers fill the register file). ``RLHF_ENGINE_ATTN_WS_STAGES`` sets
    the slots, 2 to 4 at D = 64 and 2 at D = 128 (the pipelined consumer holds two at once)."""
    stages = int(os.environ.get("RLHF_ENGINE_ATTN_WS_STAGES", "0")) or (3 if head_dim == 64 else 2)
    return 64, 128, min(max(stages, 2), 4 if head_dim == 64 else 2)  # 3 at D = 128 would pass 227 KB


if HAVE_GLUON:
    @gluon.constexpr_function
    def mma_layout(N):
        """The wgmma accumulator layout of a 4-warp consumer for an (64, N) tile."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N, 16])

    @gluon.jit
    def key_range(KV_START, KV_END, b, Tk, HAS_KV_RANGE: gl.constexpr):
        """[kv_lo, kv_hi): the valid keys of sequence b (all Tk without per-sequence ranges), clamped to [0, Tk]."""
        if HAS_KV_RANGE:
            kv_lo = gl.maximum(gl.load(KV_START + b), 0)
            kv_hi = gl.minimum(gl.load(KV_END + b), Tk)
        else:
            kv_lo = gl.to_tensor(0)
            kv_hi = gl.to_tensor(Tk)
        return kv_lo, kv_hi

    @gluon.jit
    def ring_barriers(STAGES: gl.constexpr):
        """The barriers of a two-consumer ring: one for the program's fixed tiles (count 1), per slot two "ready"
        ones (count 1: the loader's expect, then its TMA bytes) and an "empty" one (count 2: both consumers)."""
        fixed = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready_a = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        ready_b = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(fixed, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready_a.index(i), count=1)
            mbarrier.init(ready_b.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        fence_async_shared()
        return fixed, ready_a, ready_b, empty

    @gluon.jit
    def load_kv_ring(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, empty, k_row, kv_col, n_lo, n_hi,
                     BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """The load warp's K and V copies of each key block of [n_lo, n_hi) into the slot ring."""
        i = 0
        for start_n in range(n_lo, n_hi, BLOCK_N):
            s = i % STAGES
            # A slot is free once both consumers released its previous fill; on the first round the wait on
            # the opposite parity of a fresh barrier returns at once.
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [k_row + start_n, kv_col], k_ready.index(s), k_smem.index(s))
            mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [k_row + start_n, kv_col], v_ready.index(s), v_smem.index(s))
            i += 1

    @gluon.jit
    def store_rows(ptr_base, x, rows0, n_rows, stride_t, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Store x (ROWS, HEAD_DIM) at rows [rows0, rows0 + ROWS) of a (T, ..., HEAD_DIM) head view, rows < n_rows,
        from a blocked layout (16 bytes a thread along D)."""
        st_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 * 8 // HEAD_DIM,
                                                   HEAD_DIM // 8], warps_per_cta=[4, 1], order=[1, 0])
        x = gl.convert_layout(x, st_layout)
        rows = rows0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, st_layout))
        dcol = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, st_layout))
        gl.store(ptr_base + rows.to(gl.int64)[:, None] * stride_t + dcol[None, :], x, mask=(rows < n_rows)[:, None])

    @gluon.jit
    def _ws_load(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
                 q_row, q_col, k_row, kv_col, n_lo, n_hi,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """The load warp: both Q tiles, then K and V of each key block of [n_lo, n_hi) into the slot ring."""
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_bar, q_smem.index(0))
        tma.async_copy_global_to_shared(q_desc, [q_row + BLOCK_M, q_col], q_bar, q_smem.index(1))
        load_kv_ring(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, kv_empty, k_row, kv_col, n_lo, n_hi,
                     BLOCK_N, STAGES)

    @gluon.jit
    def turn_barriers(PINGPONG: gl.constexpr):
        """The two turn barriers of the ping-pong schedule (count 1: one arrive a pass), initialized when it is on."""
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        if PINGPONG:
            for i in gl.static_range(2):
                mbarrier.init(turns.index(i), count=1)
            fence_async_shared()
        return turns

    @gluon.jit
    def _turn_take(turns, e, TILE: gl.constexpr):
        """Ping-pong: wait for consumer TILE's turn e (0-based) to issue its products. The turns alternate, tile 0
        first: tile 0's turn e follows tile 1's e passes (barrier 0 has completed e phases), tile 1's follows tile
        0's e + 1. A wait on parity P returns once phase P completed, so n completions are parity (n - 1) & 1 (tile
        0's first wait, parity 1 on a fresh barrier, returns at once). No parity can alias: a consumer passes its
        turn e + 1 only after the other took turn e, so a barrier is never two phases past its waiter."""
        mbarrier.wait(turns.index(TILE), (e + TILE + 1) & 1)

    @gluon.jit
    def _turn_pass(turns, TILE: gl.constexpr):
        """Ping-pong: hand the turn to the other consumer (right after this one's products were issued). One thread
        arrives for the warpgroup, and an issue does not wait for the other warps: the barrier first makes sure all
        four warps are past this turn's wait, or a late one could wait on a parity the other consumer's next pass
        has already flipped back (Triton inserts one here today; it is spelled out so that it stays)."""
        gl.thread_barrier()
        mbarrier.arrive(turns.index(1 - TILE), count=1)

    @gluon.jit
    def _turn_skip(turns, e, TILE: gl.constexpr):
        """Ping-pong: take turn e and pass it at once (an issue this tile does not have: a skipped block's, or the
        other tile's extra one)."""
        _turn_take(turns, e, TILE)
        _turn_pass(turns, TILE)

    @gluon.jit
    def _tile_hi(mt, kv_hi, causal_shift, BLOCK_M: gl.constexpr, IS_CAUSAL: gl.constexpr):
        """One past the last key any row of the query tile starting at mt sees."""
        if IS_CAUSAL:
            return gl.minimum(kv_hi, mt + BLOCK_M + causal_shift)
        else:
            return kv_hi

    @gluon.jit
    def _softmax_block(qk, m_i, l_i, start_n, offs_m, offs_n, kv_lo, kv_hi, full_hi, causal_shift, qk_scale,
                       IS_CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr):
        """The online softmax of one key block's raw scores qk (BLOCK_M, BLOCK_N): (p, alpha, m, l) after it, with
        the mask built only for a block the tile sees in part (kv_start, kv_end or the causal diagonal inside)."""
        if (start_n < kv_lo) | (start_n + BLOCK_N > full_hi):
            cols = start_n + offs_n
            valid = ((cols >= kv_lo) & (cols < kv_hi))[None, :]
            if IS_CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + causal_shift)
            qk = gl.where(valid, qk, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: p = alpha = 0
        else:
            m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
            m_use = m_new
        p = gl.exp2(qk * qk_scale - m_use[:, None])  # the scale rides in exp2's argument: one FMA a score
        alpha = gl.exp2(m_i - m_use)
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    @gluon.jit
    def _ws_epilogue(acc, m_i, l_i, O, LSE, stride_ob, stride_ot, b, h, bh, Tq, mt, offs_m,
                     HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, dtype: gl.constexpr):
        """o = acc / l and lse = (m + log2 l) ln 2 of the tile's rows < Tq; a row without a valid key: 0, -inf."""
        row_o: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
        empty = l_i == 0.0
        l_safe = gl.where(empty, 1.0, l_i)
        lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
        gl.store(LSE + bh.to(gl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)
        o = (acc / gl.convert_layout(l_safe, row_o)[:, None]).to(dtype)
        store_rows(O + b.to(gl.int64) * stride_ob + h * HEAD_DIM, o, mt, Tq, stride_ot, BLOCK_M, HEAD_DIM)

    @gluon.jit
    def _ws_consume(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turns, O, LSE,
                    stride_ob, stride_ot, b, h, bh, Tq, m0, n_lo, n_hi, kv_lo, kv_hi, causal_shift, qk_scale,
                    TILE: gl.constexpr, IS_CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PIPELINE: gl.constexpr,
                    PINGPONG: gl.constexpr):
        """One consumer warpgroup: the online softmax of query tile ``TILE`` (0 or 1) over the key blocks.

        PIPELINE (FA3's intra-warpgroup overlap, its Algorithm 2): block j's S = Q K_j^T is issued, then block
        j-1's O += P V_{j-1}, and block j's softmax runs while that second product is in flight; O is rescaled
        once it lands. Otherwise each block's two products are waited for in turn.
        PINGPONG (with PIPELINE; FA3's inter-warpgroup schedule): each issue of products (S_0; S_j with P V_{j-1};
        the last P V) takes a turn once its operands landed and passes it right after, so the two consumers' issues
        alternate. A tile has n_own + 1 issues (none without a block); the one with fewer (tile 0, by at most one
        block: the tiles are 64 rows apart and a block is 128 keys) passes the other's extra turns, then releases
        its unread block."""
        s_layout: gl.constexpr = mma_layout(BLOCK_N)  # S: (query rows, keys)
        o_layout: gl.constexpr = mma_layout(HEAD_DIM)  # O: (query rows, D)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        dtype: gl.constexpr = q_smem.dtype

        mt = m0 + TILE * BLOCK_M
        offs_m = mt + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        my_hi = _tile_hi(mt, kv_hi, causal_shift, BLOCK_M, IS_CAUSAL)  # one past the tile's last row's last key
        if IS_CAUSAL:
            full_hi = gl.minimum(kv_hi, mt + causal_shift + 1)  # every row of the tile sees all keys < full_hi
        else:
            full_hi = kv_hi
        n_total = gl.maximum(n_hi - n_lo + BLOCK_N - 1, 0) // BLOCK_N  # the ring's blocks (both tiles')
        n_own = gl.maximum(my_hi - n_lo + BLOCK_N - 1, 0) // BLOCK_N  # this tile's: a prefix of them

        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

        mbarrier.wait(q_bar, 0)
        q = q_smem.index(TILE)
        if PIPELINE:
            if n_own > 0:
                mbarrier.wait(k_ready.index(0), 0)
                if PINGPONG:
                    _turn_take(turns, 0, TILE)
                qk = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                if PINGPONG:
                    _turn_pass(turns, TILE)
                qk = warpgroup_mma_wait(num_outstanding=0, deps=[qk])
                p, alpha, m_i, l_i = _softmax_block(qk, m_i, l_i, n_lo, offs_m, offs_n, kv_lo, kv_hi, full_hi,
                                                    causal_shift, qk_scale, IS_CAUSAL, BLOCK_N)
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                for j in range(1, n_own):
                    s = j % STAGES
                    sp = (j - 1) % STAGES
                    mbarrier.wait(k_ready.index(s), (j // STAGES) & 1)
                    if PINGPONG:  # both operands landed before the turn is taken: a turn never waits on a copy
                        mbarrier.wait(v_ready.index(sp), ((j - 1) // STAGES) & 1)
                        _turn_take(turns, j, TILE)
                    qk = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                    if not PINGPONG:
                        mbarrier.wait(v_ready.index(sp), ((j - 1) // STAGES) & 1)
                    acc = warpgroup_mma(p_op, v_smem.index(sp), acc, is_async=True)
                    if PINGPONG:
                        _turn_pass(turns, TILE)
                    qk = warpgroup_mma_wait(num_outstanding=1, deps=[qk])  # S_j landed; P V_{j-1} in flight
                    p, alpha, m_i, l_i = _softmax_block(qk, m_i, l_i, n_lo + j * BLOCK_N, offs_m, offs_n, kv_lo,
                                                        kv_hi, full_hi, causal_shift, qk_scale, IS_CAUSAL, BLOCK_N)
                    acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[acc, p_op])
                    mbarrier.arrive(kv_empty.index(sp), count=1)
                    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                    p_op = gl.convert_layout(p.to(dtype), p_layout)
                sl = (n_own - 1) % STAGES
                mbarrier.wait(v_ready.index(sl), ((n_own - 1) // STAGES) & 1)
                if PINGPONG:
                    _turn_take(turns, n_own, TILE)
                acc = warpgroup_mma(p_op, v_smem.index(sl), acc, is_async=True)
                if PINGPONG:
                    _turn_pass(turns, TILE)
                acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[acc, p_op])
                mbarrier.arrive(kv_empty.index(sl), count=1)
            if PINGPONG:  # the other tile's extra issues (at most one block more: the tiles are 64 rows apart)
                n_other = gl.maximum(_tile_hi(m0 + (1 - TILE) * BLOCK_M, kv_hi, causal_shift, BLOCK_M, IS_CAUSAL)
                                     - n_lo + BLOCK_N - 1, 0) // BLOCK_N
                issues = gl.where(n_own > 0, n_own + 1, 0)
                for e in range(issues, gl.where(n_other > 0, n_other + 1, 0)):
                    _turn_skip(turns, e, TILE)
            for j in range(n_own, n_total):  # past this tile's causal edge: released unread, once both copies landed
                s = j % STAGES
                mbarrier.wait(k_ready.index(s), (j // STAGES) & 1)
                mbarrier.wait(v_ready.index(s), (j // STAGES) & 1)
                mbarrier.arrive(kv_empty.index(s), count=1)
        else:
            for j in range(0, n_total):
                s = j % STAGES
                phase = (j // STAGES) & 1
                mbarrier.wait(k_ready.index(s), phase)
                if j < n_own:
                    qk = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                    qk = warpgroup_mma_wait(num_outstanding=0, deps=[qk])
                    p, alpha, m_i, l_i = _softmax_block(qk, m_i, l_i, n_lo + j * BLOCK_N, offs_m, offs_n, kv_lo,
                                                        kv_hi, full_hi, causal_shift, qk_scale, IS_CAUSAL, BLOCK_N)
                    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                    p_op = gl.convert_layout(p.to(dtype), p_layout)
                    mbarrier.wait(v_ready.index(s), phase)
                    acc = warpgroup_mma(p_op, v_smem.index(s), acc, is_async=True)
                    acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[acc, p_op])  # p_op alive until done
                else:  # a slot is released only once every copy into it landed (no TMA left in flight)
                    mbarrier.wait(v_ready.index(s), phase)
                mbarrier.arrive(kv_empty.index(s), count=1)  # this consumer is done with the slot
        _ws_epilogue(acc, m_i, l_i, O, LSE, stride_ob, stride_ot, b, h, bh, Tq, mt, offs_m, HEAD_DIM, BLOCK_M, dtype)

    @gluon.jit
    def _attn_fwd_ws_kernel(q_desc, k_desc, v_desc, O, LSE, KV_START, KV_END,
                            stride_ob, stride_ot, Hq, Tq, Tk, group, qk_scale,
                            HEAD_DIM: gl.constexpr, IS_CAUSAL: gl.constexpr, HAS_KV_RANGE: gl.constexpr,
                            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                            PIPELINE: gl.constexpr, PINGPONG: gl.constexpr = False):
        pair = gl.num_programs(0) - 1 - gl.program_id(0)  # the heaviest (last) causal tiles start first
        bh = gl.program_id(1)
        b = bh // Hq
        h = bh % Hq
        hk = h // group  # GQA: query head h reads KV head h // (Hq / Hkv)
        kv_lo, kv_hi = key_range(KV_START, KV_END, b, Tk, HAS_KV_RANGE)
        causal_shift = Tk - Tq  # bottom-right alignment
        m0 = pair * (2 * BLOCK_M)
        n_lo = (kv_lo // BLOCK_N) * BLOCK_N
        if IS_CAUSAL:
            n_hi = gl.minimum(kv_hi, m0 + 2 * BLOCK_M + causal_shift)  # the second tile's last row's last key
        else:
            n_hi = kv_hi

        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_bar, k_ready, v_ready, kv_empty = ring_barriers(STAGES)
        turns = turn_barriers(PINGPONG)

        # (tuples spelled out: concatenating them would unwrap the constexprs, which a partition cannot take)
        gl.warp_specialize([
            (_ws_consume, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turns, O, LSE, stride_ob,
                           stride_ot, b, h, bh, Tq, m0, n_lo, n_hi, kv_lo, kv_hi, causal_shift, qk_scale,
                           0, IS_CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, PIPELINE, PINGPONG)),
            (_ws_consume, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turns, O, LSE, stride_ob,
                           stride_ot, b, h, bh, Tq, m0, n_lo, n_hi, kv_lo, kv_hi, causal_shift, qk_scale,
                           1, IS_CAUSAL, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, PIPELINE, PINGPONG)),
            (_ws_load, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
                        b * Tq + m0, h * HEAD_DIM, b * Tk, hk * HEAD_DIM, n_lo, n_hi, BLOCK_M, BLOCK_N, STAGES)),
        ], [4, 1], [240, 24])


def _desc(t: torch.Tensor, rows: int) -> "TensorDescriptor":
    B, T, H, D = t.shape
    gl_dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([rows, D], gl_dtype)
    return TensorDescriptor(t, shape=[B * T, H * D], strides=[t.stride(1), 1], block_shape=[rows, D], layout=layout)


def attention_forward_ws(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, kv_start: torch.Tensor | None,
    kv_end: torch.Tensor | None, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_fwd.attention_forward`` on the warp-specialized kernel; inputs must be ``ws_eligible``. Same
    outputs: o (B, Tq, Hq, D) in q.dtype and lse (B, Hq, Tq) fp32."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    o, lse, ks, ke = forward_buffers(q, kv_start, kv_end)
    if B * Hq * Tq == 0:
        return o, lse
    bm, bn, stages = ws_tiles(D)
    grid = (cdiv(Tq, 2 * bm), B * Hq)
    _attn_fwd_ws_kernel[grid](
        _desc(q, bm), _desc(k, bn), _desc(v, bn), o, lse, ks, ke, o.stride(0), o.stride(1),
        Hq, Tq, Tk, Hq // Hkv, softmax_scale * LOG2E,
        HEAD_DIM=D, IS_CAUSAL=causal, HAS_KV_RANGE=kv_start is not None,
        BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, PIPELINE=ws_pipeline(), PINGPONG=ws_pingpong(), num_warps=4)
    return o, lse
