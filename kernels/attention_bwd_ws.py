"""The attention backward's two main kernels, warp-specialized in Gluon for Hopper: the opt-in companions of
``attention_fwd_ws`` (``RLHF_ENGINE_ATTN_WS=1`` runs both), with the same math, outputs and "split" scheme as
``attention_bwd`` (whose delta kernel they reuse):
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dK = c * dS^T Q,  dQ = c * dS K.

Both kernels have ``attention_fwd_ws``'s shape: a one-warp TMA load partition fills a ring of shared-memory slots
(ready barriers per operand, an "empty" barrier that two consumers release), and two 4-warp consumer warpgroups
run the products with wgmma on 64-row tiles, their elementwise work overlapping each other's products (left to the
warp schedulers, or forced by the forward's ping-pong turns with ``RLHF_ENGINE_ATTN_WS_PINGPONG=1``).
- ``_dkdv_ws_kernel``: a program owns 2 x 64 keys of one (batch, KV head), K and V loaded once; its ring carries
  the Q and dO tiles of every query block of the ``group`` query heads that read this KV head (GQA summed inside,
  K/V never expanded). Consumer t holds dK and dV of its 64 keys in registers: S^T = K Q^T, P^T from the saved
  log-sum-exp, dV += P^T dO (P^T from registers), dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
- ``_dq_ws_kernel``: a program owns 2 x 64 query rows of one (batch, query head), Q and dO loaded once; its ring
  carries K and V of each key block: S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K (4 products where
  FlashAttention's fused backward has 3 for dQ; 7 in all instead of 5, the price of no atomics).
- ``atomic_dq`` (``dq_mode="atomic"``): FlashAttention-2's scheme, 5 products. The dK/dV kernel's consumers also
  store dS^T to shared memory, and for each query block one of them (the two in turn) computes c dS K over the
  program's 128 keys (``_dq_share``) and adds it into a zeroed fp32 dQ with atomics; ``_dq_ws_kernel`` is not run.

Tiles are boxes of 2-D descriptors over (B * T, H * D), as in the forward: a box past a sequence's end reads the
next sequence's rows, whose probabilities are masked to exactly 0 (so dS = 0 x finite = 0: the inputs must be
finite there, as for the forward); rows and keys are stored only inside [0, T). Inputs must satisfy
``attention_fwd_ws.ws_layout_ok`` (do too; it is copied otherwise). Not run by any interpreter: sm_90 compiles
in ``tests/test_triton_compile.py``, GPU tests in ``tests/test_attention_ws.py``.
"""
from __future__ import annotations

import os

import torch

from ._launch import cdiv
from .attention_fwd import LOG2E
from .attention_fwd_ws import HAVE_GLUON, _desc, ws_layout_ok, ws_pingpong

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)

    from .attention_fwd_ws import (_turn_pass, _turn_skip, _turn_take, key_range, load_kv_ring, mma_layout,
                                   ring_barriers, store_rows, turn_barriers)

BWD_BLOCK = 64  # rows of a consumer's tile, in both kernels (keys in dK/dV, queries in dQ)
BWD_STAGES = 2  # ring slots: 82 / 148 KB of shared memory for dK/dV (115 / 180 KB with atomic dQ's dS^T buffers),
# 115 / 148 KB for dQ at D = 64 / 128


def dq_block_n(head_dim: int) -> int:
    """Keys a block in the dQ kernel: 128 at D = 64; 64 at D = 128, where S and dP (BLOCK x BLOCK_N fp32 each) and
    the dQ accumulator must share a consumer's registers."""
    return 128 if head_dim == 64 else 64


if HAVE_GLUON:
    # ------------------------------------------------------------------------------------------------ dK, dV
    @gluon.jit
    def _dkdv_load(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, do_ready,
                   empty, q_row0, k_row, kv_col, hq0, m_lo, n_m,
                   group, BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
        """K and V of both key tiles once, then Q and dO of each (query head, query block) into the ring."""
        mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [k_row, kv_col], kv_bar, k_smem.index(0))
        tma.async_copy_global_to_shared(k_desc, [k_row + BLOCK, kv_col], kv_bar, k_smem.index(1))
        tma.async_copy_global_to_shared(v_desc, [k_row, kv_col], kv_bar, v_smem.index(0))
        tma.async_copy_global_to_shared(v_desc, [k_row + BLOCK, kv_col], kv_bar, v_smem.index(1))
        i = 0
        for g in range(0, group):
            col = (hq0 + g) * HEAD_DIM
            for j in range(0, n_m):
                s = i % STAGES
                mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
                row = q_row0 + m_lo + j * BLOCK
                mbarrier.expect(q_ready.index(s), q_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(q_desc, [row, col], q_ready.index(s), q_smem.index(s))
                mbarrier.expect(do_ready.index(s), do_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(do_desc, [row, col], do_ready.index(s), do_smem.index(s))
                i += 1

    @gluon.jit
    def _sees(m, nt, kv_lo, kv_hi, causal_shift, IS_CAUSAL: gl.constexpr, BLOCK: gl.constexpr):
        """Whether query block [m, m + BLOCK) sees a key of tile [nt, nt + BLOCK): some key in [kv_lo, kv_hi), and
        with a causal mask the block's last row at or past the tile's first key."""
        hit = (nt < kv_hi) & (nt + BLOCK > kv_lo)
        if IS_CAUSAL:
            hit = hit & (m + BLOCK - 1 >= nt - causal_shift)
        return hit

    @gluon.constexpr_function
    def ds_layout(dtype):
        """The shared layout of a (64, 64) 16-bit dS^T tile: 128-byte rows, 128-byte swizzle (wgmma's)."""
        return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=dtype.primitive_bitwidth, rank=2)

    @gluon.jit
    def _dq_share(ds_smem, buf, k_smem, dq_ptr, m, Tq, stride_dqt, sm_scale,
                  HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr):
        """FlashAttention-2's dQ share of one query block over the program's 2 x BLOCK keys, c dS K = c (dS_0 K_0 +
        dS_1 K_1), added into the fp32 dQ buffer with relaxed atomics, 64 columns of D at a time (32 accumulator
        registers a thread beside dK and dV's). dS_t is read from the tiles' dS^T slots, transposed."""
        c_layout: gl.constexpr = mma_layout(64)
        rows = m + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, c_layout))
        cols = gl.arange(0, 64, layout=gl.SliceLayout(0, c_layout))
        zero = gl.zeros([BLOCK, 64], gl.float32, layout=c_layout)
        ds0 = ds_smem.index(buf * 2).permute((1, 0))  # (query rows, keys)
        ds1 = ds_smem.index(buf * 2 + 1).permute((1, 0))
        offs = rows[:, None] * stride_dqt + cols[None, :]  # int32: the host keeps Tq x the row stride below 2^31
        ok = (rows < Tq)[:, None]
        for c in gl.static_range(HEAD_DIM // 64):
            k0 = k_smem.index(0).slice(c * 64, 64, dim=1)
            k1 = k_smem.index(1).slice(c * 64, 64, dim=1)
            acc = warpgroup_mma(ds0, k0, zero, use_acc=False, is_async=True)
            acc = warpgroup_mma(ds1, k1, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
            gl.atomic_add(dq_ptr + c * 64 + offs, acc * sm_scale, mask=ok, sem="relaxed")

    @gluon.jit
    def _dkdv_consume(q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, do_ready, empty, LSE, DELTA,
                      stride_dkt, stride_dvt, dk_base, dv_base, bhq0, Tq, Tk, n0, m_lo, n_m, kv_lo, kv_hi,
                      causal_shift, qk_scale, sm_scale, group, ds_smem, ds_full, dq_base, stride_dqt,
                      stride_dqh, turns,
                      TILE: gl.constexpr, IS_CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr,
                      STAGES: gl.constexpr, ATOMIC_DQ: gl.constexpr, PINGPONG: gl.constexpr):
        """Consumer ``TILE``: dK and dV of keys [n0 + TILE * BLOCK, + BLOCK) over the ring's query blocks; with
        ``ATOMIC_DQ`` also its dS^T to shared memory for ``_dq_share``, run by the two consumers in turn.
        PINGPONG (the forward's): both consumers walk the same blocks, two issues a block (S^T with dP^T, then dV
        with dK), turns 2i and 2i + 1 of block i, taken and passed empty on a block the tile skips."""
        s_layout: gl.constexpr = mma_layout(BLOCK)  # S^T, dP^T: (keys, query rows)
        o_layout: gl.constexpr = mma_layout(HEAD_DIM)  # dK, dV: (keys, D)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        key_l: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_l: gl.constexpr = gl.SliceLayout(0, s_layout)
        dtype: gl.constexpr = q_smem.dtype

        nt = n0 + TILE * BLOCK
        keys = nt + gl.arange(0, BLOCK, layout=key_l)
        key_ok = (keys >= kv_lo) & (keys < kv_hi)
        edge = (nt < kv_lo) | (nt + BLOCK > kv_hi)  # a padding edge inside the tile: every block masked
        if IS_CAUSAL:
            full = nt + BLOCK - 1 - causal_shift  # rows >= full see every key of the tile
        else:
            full = -Tk
        dk = gl.zeros([BLOCK, HEAD_DIM], gl.float32, layout=o_layout)
        dv = gl.zeros([BLOCK, HEAD_DIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK, BLOCK], gl.float32, layout=s_layout)
        offs_r = gl.arange(0, BLOCK, layout=row_l)

        mbarrier.wait(kv_bar, 0)
        k_t = k_smem.index(TILE)
        v_t = v_smem.index(TILE)
        i = 0
        u = 0  # ATOMIC_DQ: query blocks seen by either tile so far (both consumers count the same ones)
        for g in range(0, group):
            bhq = (bhq0 + g).to(gl.int64)
            for j in range(0, n_m):
                s = i % STAGES
                phase = (i // STAGES) & 1
                m = m_lo + j * BLOCK
                mbarrier.wait(q_ready.index(s), phase)
                sees = _sees(m, nt, kv_lo, kv_hi, causal_shift, IS_CAUSAL, BLOCK)
                if ATOMIC_DQ:
                    other = n0 + (1 - TILE) * BLOCK
                    joint = sees | _sees(m, other, kv_lo, kv_hi, causal_shift, IS_CAUSAL, BLOCK)
                    buf = u % 2
                    ds_slot = ds_smem.index(buf * 2 + TILE)
                if sees:  # the block sees the tile
                    rows = m + offs_r
                    row_ok = rows < Tq
                    lse = gl.load(LSE + bhq * Tq + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
                    lse = gl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: P = 0
                    delta = gl.load(DELTA + bhq * Tq + rows, mask=row_ok, other=0.0)
                    q_t = q_smem.index(s)
                    if PINGPONG:  # both operands landed before the turn is taken
                        mbarrier.wait(do_ready.index(s), phase)
                        _turn_take(turns, 2 * i, TILE)
                    st = warpgroup_mma(k_t, q_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                    if not PINGPONG:
                        mbarrier.wait(do_ready.index(s), phase)
                    do_t = do_smem.index(s)
                    dpt = warpgroup_mma(v_t, do_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                    if PINGPONG:
                        _turn_pass(turns, TILE)
                    st = warpgroup_mma_wait(num_outstanding=1, deps=[st])  # S^T done; dP^T runs on
                    pt = gl.exp2(st * qk_scale - lse[None, :])
                    masked = edge | (m < full) | (m + BLOCK > Tq)
                    if masked:
                        valid = key_ok[:, None] & row_ok[None, :]
                        if IS_CAUSAL:
                            valid = valid & (keys[:, None] <= rows[None, :] + causal_shift)
                        pt = gl.where(valid, pt, 0.0)
                    dpt = warpgroup_mma_wait(num_outstanding=0, deps=[dpt])
                    dst = pt * (dpt - delta[None, :])  # masked: 0 x finite (the kernels' input contract) = 0
                    pt_op = gl.convert_layout(pt.to(dtype), a_layout)
                    dst16 = dst.to(dtype)
                    dst_op = gl.convert_layout(dst16, a_layout)
                    if PINGPONG:
                        _turn_take(turns, 2 * i + 1, TILE)
                    dv = warpgroup_mma(pt_op, do_t, dv, is_async=True)
                    dk = warpgroup_mma(dst_op, q_t, dk, is_async=True)
                    if PINGPONG:
                        _turn_pass(turns, TILE)
                    if ATOMIC_DQ:  # dS^T for the dQ product (the slot is free: see _dkdv_ws_kernel)
                        ds_slot.store(dst16)
                    # (the register operands ride in deps: kept alive until their products are done)
                    dv, dk, pt_op, dst_op = warpgroup_mma_wait(num_outstanding=0, deps=[dv, dk, pt_op, dst_op])
                else:  # both consumers may skip a block (padding, the causal edge): release it only once its dO
                    mbarrier.wait(do_ready.index(s), phase)  # copy landed too, never with a TMA in flight
                    if PINGPONG:  # the block's two turns, passed empty
                        _turn_skip(turns, 2 * i, TILE)
                        _turn_skip(turns, 2 * i + 1, TILE)
                    if ATOMIC_DQ:
                        if joint:  # the other tile sees it: this tile's share of dQ is zero
                            ds_slot.store(s_zero.to(dtype))
                if ATOMIC_DQ:
                    if joint:
                        fence_async_shared()  # the stores, visible to wgmma (the async proxy) ...
                        gl.thread_barrier()  # ... from all four warps, before the release
                        mbarrier.arrive(ds_full.index(buf), count=1)
                        if buf == TILE:  # this consumer's turn: dQ of the block over both tiles' keys
                            mbarrier.wait(ds_full.index(buf), (u // 2) & 1)
                            _dq_share(ds_smem, buf, k_smem, dq_base + g * stride_dqh, m, Tq, stride_dqt, sm_scale,
                                      HEAD_DIM, BLOCK)
                        u += 1
                mbarrier.arrive(empty.index(s), count=1)  # this consumer is done with the slot
                i += 1
        store_rows(dk_base, (dk * sm_scale).to(dtype), nt, Tk, stride_dkt, BLOCK, HEAD_DIM)
        store_rows(dv_base, dv.to(dtype), nt, Tk, stride_dvt, BLOCK, HEAD_DIM)

    @gluon.jit
    def _dkdv_ws_kernel(q_desc, do_desc, k_desc, v_desc, LSE, DELTA, DK, DV, KV_START, KV_END,
                        stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
                        DQ, stride_dqb, stride_dqt, stride_dqh, Hq, Hkv, Tq, Tk, group, qk_scale, sm_scale,
                        HEAD_DIM: gl.constexpr, IS_CAUSAL: gl.constexpr, HAS_KV_RANGE: gl.constexpr,
                        BLOCK: gl.constexpr, STAGES: gl.constexpr, ATOMIC_DQ: gl.constexpr,
                        PINGPONG: gl.constexpr = False):
        pair = gl.program_id(0)  # causal: the first key tiles are read by the most query blocks, and start first
        bh = gl.program_id(1)
        b = bh // Hkv
        hk = bh % Hkv
        kv_lo, kv_hi = key_range(KV_START, KV_END, b, Tk, HAS_KV_RANGE)
        causal_shift = Tk - Tq
        n0 = pair * (2 * BLOCK)
        if IS_CAUSAL:  # the query blocks that see the pair's first key (tile 0's; tile 1 skips the first ones)
            m_lo = (gl.maximum(n0 - causal_shift, 0) // BLOCK) * BLOCK
        else:
            m_lo = gl.to_tensor(0)
        n_m = gl.maximum(Tq - m_lo + BLOCK - 1, 0) // BLOCK
        none = (n0 >= kv_hi) | (n0 + 2 * BLOCK <= kv_lo)
        n_m = gl.where(none, 0, n_m)  # no valid key in the pair: nothing to load, dK = dV = 0

        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], do_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK, HEAD_DIM], v_desc.layout)
        kv_bar, q_ready, do_ready, empty = ring_barriers(STAGES)
        # ATOMIC_DQ: two buffers of both tiles' dS^T (32 KB), each "full" once both consumers stored theirs. The
        # consumers take the dQ products of the blocks seen in turn, consumer t those of buffer t, so a buffer
        # needs no "empty" barrier: before either consumer rewrites buffer t (two seen blocks on), consumer t has
        # finished its products on it (its own next block comes after them; the other consumer must first pass
        # the block in between, whose products are its own turn and wait for consumer t's arrival, made after).
        ds_smem = gl.allocate_shared_memory(dtype, [4 if ATOMIC_DQ else 1, BLOCK, BLOCK], ds_layout(dtype))
        ds_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        if ATOMIC_DQ:
            for t in gl.static_range(2):
                mbarrier.init(ds_full.index(t), count=2)
            fence_async_shared()
        turns = turn_barriers(PINGPONG)

        b64 = b.to(gl.int64)
        dk_base = DK + b64 * stride_dkb + hk * stride_dkh
        dv_base = DV + b64 * stride_dvb + hk * stride_dvh
        dq_base = DQ + b64 * stride_dqb + (hk * group) * stride_dqh
        bhq0 = b * Hq + hk * group
        # (tuples spelled out: concatenating them would unwrap the constexprs, which a partition cannot take)
        gl.warp_specialize([
            (_dkdv_consume, (q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, do_ready, empty, LSE, DELTA,
                             stride_dkt, stride_dvt, dk_base, dv_base, bhq0, Tq, Tk, n0, m_lo, n_m, kv_lo, kv_hi,
                             causal_shift, qk_scale, sm_scale, group, ds_smem, ds_full, dq_base,
                             stride_dqt, stride_dqh, turns, 0, IS_CAUSAL, HEAD_DIM, BLOCK, STAGES, ATOMIC_DQ,
                             PINGPONG)),
            (_dkdv_consume, (q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, do_ready, empty, LSE, DELTA,
                             stride_dkt, stride_dvt, dk_base, dv_base, bhq0, Tq, Tk, n0, m_lo, n_m, kv_lo, kv_hi,
                             causal_shift, qk_scale, sm_scale, group, ds_smem, ds_full, dq_base,
                             stride_dqt, stride_dqh, turns, 1, IS_CAUSAL, HEAD_DIM, BLOCK, STAGES, ATOMIC_DQ,
                             PINGPONG)),
            (_dkdv_load, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready,
                          do_ready, empty, b * Tq, b * Tk + n0, hk * HEAD_DIM, hk * group, m_lo, n_m, group,
                          BLOCK, HEAD_DIM, STAGES)),
        ], [4, 1], [240, 24])

    # ------------------------------------------------------------------------------------------------ dQ
    @gluon.jit
    def _dq_load(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, qdo_bar, k_ready, v_ready,
                 empty, q_row, q_col, k_row, kv_col, n_lo, n_hi,
                 BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """Q and dO of both query tiles once, then K and V of each key block into the ring."""
        mbarrier.expect(qdo_bar, 2 * q_desc.block_type.nbytes + 2 * do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row, q_col], qdo_bar, q_smem.index(0))
        tma.async_copy_global_to_shared(q_desc, [q_row + BLOCK, q_col], qdo_bar, q_smem.index(1))
        tma.async_copy_global_to_shared(do_desc, [q_row, q_col], qdo_bar, do_smem.index(0))
        tma.async_copy_global_to_shared(do_desc, [q_row + BLOCK, q_col], qdo_bar, do_smem.index(1))
        load_kv_ring(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, empty, k_row, kv_col, n_lo, n_hi,
                     BLOCK_N, STAGES)

    @gluon.jit
    def _dq_consume(q_smem, do_smem, k_smem, v_smem, qdo_bar, k_ready, v_ready, empty, LSE, DELTA, dq_base,
                    stride_dqt, bh, Tq, m0, n_lo, n_hi, kv_lo, kv_hi, causal_shift, qk_scale, sm_scale, turns,
                    TILE: gl.constexpr, IS_CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr,
                    BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr):
        """Consumer ``TILE``: dQ of query rows [m0 + TILE * BLOCK, + BLOCK) over the ring's key blocks.
        PINGPONG: as in ``_dkdv_consume``, two turns a block (S with dP, then dQ), passed empty past the tile's
        causal edge (both consumers walk every block of the ring)."""
        s_layout: gl.constexpr = mma_layout(BLOCK_N)  # S, dP: (query rows, keys)
        o_layout: gl.constexpr = mma_layout(HEAD_DIM)  # dQ: (query rows, D)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_l: gl.constexpr = gl.SliceLayout(0, s_layout)
        dtype: gl.constexpr = q_smem.dtype

        mt = m0 + TILE * BLOCK
        rows = mt + gl.arange(0, BLOCK, layout=row_l)
        row_ok = rows < Tq
        offs_n = gl.arange(0, BLOCK_N, layout=col_l)
        if IS_CAUSAL:
            my_hi = gl.minimum(kv_hi, mt + BLOCK + causal_shift)
            full_hi = gl.minimum(kv_hi, mt + causal_shift + 1)
        else:
            my_hi = kv_hi
            full_hi = kv_hi
        lse = gl.load(LSE + bh.to(gl.int64) * Tq + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
        lse = gl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: P = 0
        delta = gl.load(DELTA + bh.to(gl.int64) * Tq + rows, mask=row_ok, other=0.0)
        dq = gl.zeros([BLOCK, HEAD_DIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK, BLOCK_N], gl.float32, layout=s_layout)

        mbarrier.wait(qdo_bar, 0)
        q_t = q_smem.index(TILE)
        do_t = do_smem.index(TILE)
        i = 0
        for start_n in range(n_lo, n_hi, BLOCK_N):
            s = i % STAGES
            phase = (i // STAGES) & 1
            mbarrier.wait(k_ready.index(s), phase)
            if start_n < my_hi:
                k_s = k_smem.index(s)
                if PINGPONG:  # both operands landed before the turn is taken
                    mbarrier.wait(v_ready.index(s), phase)
                    _turn_take(turns, 2 * i, TILE)
                sc = warpgroup_mma(q_t, k_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
                if not PINGPONG:
                    mbarrier.wait(v_ready.index(s), phase)
                dp = warpgroup_mma(do_t, v_smem.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                if PINGPONG:
                    _turn_pass(turns, TILE)
                sc = warpgroup_mma_wait(num_outstanding=1, deps=[sc])
                p = gl.exp2(sc * qk_scale - lse[:, None])
                masked = (start_n < kv_lo) | (start_n + BLOCK_N > full_hi)
                if masked:
                    cols = start_n + offs_n
                    valid = ((cols >= kv_lo) & (cols < kv_hi))[None, :]
                    if IS_CAUSAL:
                        valid = valid & (cols[None, :] <= rows[:, None] + causal_shift)
                    p = gl.where(valid, p, 0.0)
                dp = warpgroup_mma_wait(num_outstanding=0, deps=[dp])
                ds = p * (dp - delta[:, None])  # masked: 0 x finite (the kernels' input contract) = 0
                ds_op = gl.convert_layout(ds.to(dtype), a_layout)
                if PINGPONG:
                    _turn_take(turns, 2 * i + 1, TILE)
                dq = warpgroup_mma(ds_op, k_s, dq, is_async=True)
                if PINGPONG:
                    _turn_pass(turns, TILE)
                dq, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=[dq, ds_op])
            else:  # released only once its V copy landed too (no TMA left in flight)
                mbarrier.wait(v_ready.index(s), phase)
                if PINGPONG:  # the block's two turns, passed empty
                    _turn_skip(turns, 2 * i, TILE)
                    _turn_skip(turns, 2 * i + 1, TILE)
            mbarrier.arrive(empty.index(s), count=1)
            i += 1
        store_rows(dq_base, (dq * sm_scale).to(dtype), mt, Tq, stride_dqt, BLOCK, HEAD_DIM)

    @gluon.jit
    def _dq_ws_kernel(q_desc, do_desc, k_desc, v_desc, LSE, DELTA, DQ, KV_START, KV_END,
                      stride_dqb, stride_dqt, stride_dqh, Hq, Tq, Tk, group, qk_scale, sm_scale,
                      HEAD_DIM: gl.constexpr, IS_CAUSAL: gl.constexpr, HAS_KV_RANGE: gl.constexpr,
                      BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      PINGPONG: gl.constexpr = False):
        pair = gl.num_programs(0) - 1 - gl.program_id(0)  # the heaviest (last) causal tiles start first
        bh = gl.program_id(1)
        b = bh // Hq
        h = bh % Hq
        hk = h // group
        kv_lo, kv_hi = key_range(KV_START, KV_END, b, Tk, HAS_KV_RANGE)
        causal_shift = Tk - Tq
        m0 = pair * (2 * BLOCK)
        n_lo = (kv_lo // BLOCK_N) * BLOCK_N
        if IS_CAUSAL:
            n_hi = gl.minimum(kv_hi, m0 + 2 * BLOCK + causal_shift)
        else:
            n_hi = kv_hi

        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK, HEAD_DIM], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [2, BLOCK, HEAD_DIM], do_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        qdo_bar, k_ready, v_ready, empty = ring_barriers(STAGES)
        turns = turn_barriers(PINGPONG)

        dq_base = DQ + b.to(gl.int64) * stride_dqb + h * stride_dqh
        gl.warp_specialize([
            (_dq_consume, (q_smem, do_smem, k_smem, v_smem, qdo_bar, k_ready, v_ready, empty, LSE, DELTA, dq_base,
                           stride_dqt, bh, Tq, m0, n_lo, n_hi, kv_lo, kv_hi, causal_shift, qk_scale, sm_scale,
                           turns, 0, IS_CAUSAL, HEAD_DIM, BLOCK, BLOCK_N, STAGES, PINGPONG)),
            (_dq_consume, (q_smem, do_smem, k_smem, v_smem, qdo_bar, k_ready, v_ready, empty, LSE, DELTA, dq_base,
                           stride_dqt, bh, Tq, m0, n_lo, n_hi, kv_lo, kv_hi, causal_shift, qk_scale, sm_scale,
                           turns, 1, IS_CAUSAL, HEAD_DIM, BLOCK, BLOCK_N, STAGES, PINGPONG)),
            (_dq_load, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, qdo_bar, k_ready, v_ready,
                        empty, b * Tq + m0, h * HEAD_DIM, b * Tk, hk * HEAD_DIM, n_lo, n_hi, BLOCK, BLOCK_N, STAGES)),
        ], [4, 1], [240, 24])


def ws_atomic_dq_ok(dq: torch.Tensor) -> bool:
    """Whether ``ws_backward(..., atomic_dq=True)`` can add into dq: an fp32 (B, Tq, Hq, D) buffer whose offsets
    within a sequence stay below 2^31 (the kernel's atomics index a sequence's rows in int32), unless
    ``benchmarks/ws_probe.py --atomic`` saw the form fail or was not run (``RLHF_ENGINE_ATTN_WS_ATOMIC_BROKEN``)."""
    if os.environ.get("RLHF_ENGINE_ATTN_WS_ATOMIC_BROKEN") in ("1", "notrun"):
        return False
    B, Tq, Hq, D = dq.shape
    return dq.dtype == torch.float32 and dq.stride(3) == 1 and (Tq + BWD_BLOCK) * dq.stride(1) < 2 ** 31


def ws_backward(do, q, k, v, lse, delta, dq, dk, dv, *, causal: bool, kv_start, kv_end, softmax_scale: float,
                atomic_dq: bool = False) -> None:
    """dK/dV and dQ on the warp-specialized kernels, written into dq (B, Tq, Hq, D), dk and dv (B, Tk, Hkv, D)
    (unit stride on D, heads D apart); delta (B, Hq, Tq) from ``attention_bwd``'s preprocess kernel. q, k, v
    must be ``ws_layout_ok``; do is made contiguous if it is not.

    atomic_dq: FlashAttention-2's scheme, 5 products a tile instead of 7: the dK/dV kernel also adds c dS K of each
    query block and key pair into dq, which must then be a zeroed fp32 buffer (``ws_atomic_dq_ok``), and the dQ
    kernel is not launched. The fp32 additions come in no fixed order: dq may differ in its last bits run to run."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if atomic_dq and not ws_atomic_dq_ok(dq):
        raise ValueError(f"ws_backward: atomic_dq needs dq an fp32 buffer with unit stride on D and Tq x its row "
                         f"stride below 2^31 (got {dq.dtype} of stride {tuple(dq.stride())}), and the form not turned "
                         f"off by RLHF_ENGINE_ATTN_WS_ATOMIC_BROKEN (set: "
                         f"{os.environ.get('RLHF_ENGINE_ATTN_WS_ATOMIC_BROKEN')!r})")
    if not ws_layout_ok(do, k, v):  # e.g. a broadcast gradient: a fresh, aligned copy in q's dtype
        do = do.to(q.dtype).clone(memory_format=torch.contiguous_format)
    has_range = kv_start is not None
    ks = kv_start if has_range else lse
    ke = kv_end if has_range else lse
    group = Hq // Hkv
    qk_scale = softmax_scale * LOG2E
    blk = BWD_BLOCK
    meta = dict(HEAD_DIM=D, IS_CAUSAL=causal, HAS_KV_RANGE=has_range, num_warps=4)
    dq_acc = dq if atomic_dq else dk  # (dk: an unused pointer when dQ has a kernel of its own)
    _dkdv_ws_kernel[(cdiv(Tk, 2 * blk), B * Hkv)](
        _desc(q, blk), _desc(do, blk), _desc(k, blk), _desc(v, blk), lse, delta, dk, dv, ks, ke,
        *dk.stride()[:3], *dv.stride()[:3], dq_acc, *dq_acc.stride()[:3], Hq, Hkv, Tq, Tk, group, qk_scale,
        softmax_scale, BLOCK=blk, STAGES=BWD_STAGES, ATOMIC_DQ=atomic_dq, PINGPONG=ws_pingpong(forward=False), **meta)
    if atomic_dq:
        return
    bn = dq_block_n(D)
    _dq_ws_kernel[(cdiv(Tq, 2 * blk), B * Hq)](
        _desc(q, blk), _desc(do, blk), _desc(k, bn), _desc(v, bn), lse, delta, dq, ks, ke,
        *dq.stride()[:3], Hq, Tq, Tk, group, qk_scale, softmax_scale,
        BLOCK=blk, BLOCK_N=bn, STAGES=BWD_STAGES, PINGPONG=ws_pingpong(forward=False), **meta)
