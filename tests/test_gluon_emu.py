"""``tests/gluon_emu`` catches the bugs it is there for: each test plants one in a copy of a real kernel's source
(or writes a small kernel with it) and expects the emulator to report it, as a deadlock, a hazard, an out-of-bounds
access, an int32 overflow or wrong numbers. Without these, a green run of ``test_attention_ws_emu.py`` would say
little."""
import importlib.util
import itertools

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from gluon_emu import GluonDeadlock, GluonHazard, emulate
from rlhf_engine.kernels import attention_bwd_ws, attention_fwd_ws
from rlhf_engine.kernels.reference.attention import attention_reference
from tiny import key_ranges
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

_count = itertools.count()


def _mutant(module, old: str, new: str, tmp_path):
    """A copy of ``module`` with ``old`` (found exactly once) replaced by ``new``, imported in its package."""
    with open(module.__file__) as f:
        src = f.read()
    assert src.count(old) == 1, f"the text to mutate is not found once in {module.__file__}"
    path = tmp_path / f"mutant_{next(_count)}.py"
    path.write_text(src.replace(old, new))
    spec = importlib.util.spec_from_file_location(f"{module.__package__}.{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _forward(mod, monkeypatch):
    monkeypatch.setattr(mod, "_attn_fwd_ws_kernel", emulate(mod._attn_fwd_ws_kernel))
    torch.manual_seed(0)
    B, T, D = 2, 700, 64
    q, k, v = (torch.randn(B, T, h, D, dtype=torch.bfloat16) for h in (2, 1, 1))
    ks, ke = key_ranges("left", B, T, "cpu")
    o, _ = mod.attention_forward_ws(q, k, v, causal=True, kv_start=ks, kv_end=ke, softmax_scale=D ** -0.5)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True, kv_start=ks, kv_end=ke,
                              softmax_scale=D ** -0.5)
    return (o.double() - ref).abs().max().item()


def _backward(mod, monkeypatch, atomic_dq=False, seed=0):
    with monkeypatch.context() as mp:
        mp.setattr(mod, "_dkdv_ws_kernel", emulate(mod._dkdv_ws_kernel, seed))
        mp.setattr(mod, "_dq_ws_kernel", emulate(mod._dq_ws_kernel))
        return _run_backward(mod, atomic_dq)


def _run_backward(mod, atomic_dq):
    torch.manual_seed(1)
    B, T, Hq, Hkv, D = 2, 200, 4, 2, 64
    q, k, v = (torch.randn(B, T, h, D, dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    do = torch.randn(B, T, Hq, D, dtype=torch.bfloat16)
    ks, ke = key_ranges("left", B, T, "cpu")  # the second sequence's first key is 100: both consumers skip a block
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, lse = attention_reference(q64, k64, v64, causal=True, kv_start=ks, kv_end=ke, softmax_scale=D ** -0.5,
                                   return_lse=True)
    delta = (do.float() * ref.detach().to(torch.bfloat16).float()).sum(-1).transpose(1, 2).contiguous()
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    if atomic_dq:
        dq = torch.zeros(q.shape, dtype=torch.float32)
    mod.ws_backward(do, q, k, v, lse.detach().float(), delta, dq, dk, dv, causal=True, kv_start=ks, kv_end=ke,
                    softmax_scale=D ** -0.5, atomic_dq=atomic_dq)
    refs = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    return max((g.double() - r).abs().max().item() for g, r in zip((dq, dk, dv), refs))


def test_unmutated_kernels_pass(monkeypatch):
    assert _forward(attention_fwd_ws, monkeypatch) < 0.02
    assert _backward(attention_bwd_ws, monkeypatch) < 0.05
    assert _backward(attention_bwd_ws, monkeypatch, atomic_dq=True) < 0.05
    monkeypatch.setattr(attention_bwd_ws, "BWD_STAGES", 3)
    assert _backward(attention_bwd_ws, monkeypatch, atomic_dq=True) < 0.05


FWD_MUTANTS = {
    # the loader waits for a slot's release on the wrong parity: nobody ever releases the first round
    "empty barrier parity": ("mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)",
                             "mbarrier.wait(empty.index(s), ((i // STAGES) & 1))", GluonDeadlock),
    # the pipelined consumer releases V's slot before the P V product that reads it has retired
    "slot released under a product": (
        ("                    acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[acc, p_op])\n"
         "                    mbarrier.arrive(kv_empty.index(sp), count=1)"),
        ("                    mbarrier.arrive(kv_empty.index(sp), count=1)\n"
         "                    acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[acc, p_op])"), GluonHazard),
    # S is used before the product is waited for
    "wgmma result not waited for": ("qk = warpgroup_mma_wait(num_outstanding=1, deps=[qk])", "pass", GluonHazard),
    # K's ready barrier waited on the next round's parity
    "ready barrier phase": ("mbarrier.wait(k_ready.index(s), (j // STAGES) & 1)\n                    if PINGPONG:",
                            "mbarrier.wait(k_ready.index(s), ((j // STAGES) + 1) & 1)\n                    if PINGPONG:",
                            (GluonDeadlock, GluonHazard)),
}


@pytest.mark.parametrize("name", list(FWD_MUTANTS))
def test_forward_mutants_are_reported(name, tmp_path, monkeypatch):
    old, new, error = FWD_MUTANTS[name]
    mod = _mutant(attention_fwd_ws, old, new, tmp_path)
    with pytest.raises(error):
        _forward(mod, monkeypatch)


def _forward_pingpong(mod, monkeypatch, Tq, Tk):
    """The pipelined forward with ping-pong turns, causal, Tq != Tk (whose tiles may own different block counts)."""
    monkeypatch.setenv("RLHF_ENGINE_ATTN_WS_PIPELINE", "1")
    monkeypatch.setenv("RLHF_ENGINE_ATTN_WS_PINGPONG", "1")
    monkeypatch.delenv("RLHF_ENGINE_ATTN_WS_PINGPONG_BROKEN", raising=False)
    monkeypatch.setattr(mod, "_attn_fwd_ws_kernel", emulate(mod._attn_fwd_ws_kernel))
    torch.manual_seed(2)
    D = 64
    q = torch.randn(1, Tq, 2, D, dtype=torch.bfloat16)
    k, v = (torch.randn(1, Tk, 1, D, dtype=torch.bfloat16) for _ in range(2))
    o, _ = mod.attention_forward_ws(q, k, v, causal=True, kv_start=None, kv_end=None, softmax_scale=D ** -0.5)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True, softmax_scale=D ** -0.5)
    return (o.double() - ref).nan_to_num().abs().max().item()


PINGPONG_MUTANTS = {
    # the tile with fewer blocks does not pass the other's extra turns: the other waits for a turn forever
    "extra turns not passed": ("                    _turn_skip(turns, e, TILE)", "                    pass",
                               GluonDeadlock),
    # the last P V issue keeps the turn
    "last turn kept": ("acc = warpgroup_mma(p_op, v_smem.index(sl), acc, is_async=True)\n"
                       "                if PINGPONG:\n                    _turn_pass(turns, TILE)",
                       "acc = warpgroup_mma(p_op, v_smem.index(sl), acc, is_async=True)", GluonDeadlock),
    # both tiles wait for the same count of passes: neither goes first
    "no first turn": ("mbarrier.wait(turns.index(TILE), (e + TILE + 1) & 1)",
                      "mbarrier.wait(turns.index(TILE), (e + 2) & 1)", GluonDeadlock),
}


@pytest.mark.parametrize("Tq,Tk", [(200, 264), (300, 70), (333, 333)])
def test_pingpong_forward_passes(Tq, Tk, monkeypatch):
    # (200, 264): a program's first tile owns one block fewer; (300, 70): a tile owns none, the other one block
    assert _forward_pingpong(attention_fwd_ws, monkeypatch, Tq, Tk) < 0.02


@pytest.mark.parametrize("name", list(PINGPONG_MUTANTS))
def test_pingpong_mutants_are_reported(name, tmp_path, monkeypatch):
    old, new, error = PINGPONG_MUTANTS[name]
    mod = _mutant(attention_fwd_ws, old, new, tmp_path)
    with pytest.raises(error):
        _forward_pingpong(mod, monkeypatch, 200, 264)


BWD_PINGPONG_MUTANTS = {
    # dK/dV: a block this tile skips (the causal edge, padding) takes no turns: the other consumer waits forever
    "dK/dV skipped block's turns not passed": (
        "copy landed too, never with a TMA in flight\n                    if PINGPONG:",
        "copy landed too, never with a TMA in flight\n                    if False:", GluonDeadlock),
    # dQ: the dQ product's issue keeps the turn
    "dQ issue keeps the turn": ("dq = warpgroup_mma(ds_op, k_s, dq, is_async=True)\n                if PINGPONG:\n"
                                "                    _turn_pass(turns, TILE)",
                                "dq = warpgroup_mma(ds_op, k_s, dq, is_async=True)", GluonDeadlock),
}


@pytest.mark.parametrize("atomic_dq", [False, True], ids=["split", "atomic_dq"])
def test_backward_pingpong_passes(atomic_dq, monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_ATTN_WS_PINGPONG", "1")
    monkeypatch.delenv("RLHF_ENGINE_ATTN_WS_PINGPONG_BROKEN", raising=False)
    assert _backward(attention_bwd_ws, monkeypatch, atomic_dq=atomic_dq) < 0.05


@pytest.mark.parametrize("name", list(BWD_PINGPONG_MUTANTS))
def test_backward_pingpong_mutants_are_reported(name, tmp_path, monkeypatch):
    old, new, error = BWD_PINGPONG_MUTANTS[name]
    monkeypatch.setenv("RLHF_ENGINE_ATTN_WS_PINGPONG", "1")
    monkeypatch.delenv("RLHF_ENGINE_ATTN_WS_PINGPONG_BROKEN", raising=False)
    mod = _mutant(attention_bwd_ws, old, new, tmp_path)
    with pytest.raises(error):
        _backward(mod, monkeypatch)


def test_forward_wrong_mask_gives_wrong_numbers(tmp_path, monkeypatch):
    mod = _mutant(attention_fwd_ws, "valid = valid & (cols[None, :] <= offs_m[:, None] + causal_shift)",
                  "valid = valid & (cols[None, :] < offs_m[:, None] + causal_shift)", tmp_path)
    assert _forward(mod, monkeypatch) > 0.1


def test_backward_early_release_is_reported(tmp_path, monkeypatch):
    """The bug fixed in 28fb86f: a dK/dV consumer that skips a block released its slot without waiting for the dO
    copy, which could still be in flight when the loader refilled the slot."""
    mod = _mutant(attention_bwd_ws,
                  "                    mbarrier.wait(do_ready.index(s), phase)  # copy landed too, never with a TMA",
                  "                    pass  # copy landed too, never with a TMA", tmp_path)
    with pytest.raises(GluonHazard):
        _backward(mod, monkeypatch)


def test_backward_read_before_copy_lands_gives_nan(tmp_path, monkeypatch):
    """The dQ kernel's dP product issued without waiting for V's copy reads a slot still in flight (NaN here)."""
    mod = _mutant(attention_bwd_ws,
                  "                mbarrier.wait(v_ready.index(s), phase)\n                dp = warpgroup_mma(",
                  "                dp = warpgroup_mma(", tmp_path)
    with pytest.raises((GluonHazard, AssertionError)):
        err = _backward(mod, monkeypatch)
        assert not err < 1.0, err  # NaN (or a large error) expected


ATOMIC_DQ_MUTANTS = {
    # one consumer takes every block's dQ products instead of the two in turn: the other one, which then never
    # waits for it, may rewrite a dS^T buffer that the products still read
    "dQ products not taken in turn": ("                        if buf == TILE:  # this consumer's turn",
                                      "                        if TILE == 0:  # this consumer's turn",
                                      (GluonHazard, AssertionError)),
    # the release of the dS^T slots before every warp has stored its part
    "dS released before the warps' stores": (
        "                        gl.thread_barrier()  # ... from all four warps, before the release",
        "                        pass", GluonHazard),
    # the consumer whose turn it is reads the other tile's dS^T without waiting for it
    "dS read before the other consumer stored it": (
        "                            mbarrier.wait(ds_full.index(buf), (u // 2) & 1)\n",
        "", (GluonDeadlock, GluonHazard, AssertionError)),
    # the "full" barrier waited on the next round's parity
    "dS full barrier parity": ("mbarrier.wait(ds_full.index(buf), (u // 2) & 1)",
                               "mbarrier.wait(ds_full.index(buf), ((u // 2) & 1) ^ 1)", (GluonDeadlock, GluonHazard,
                                                                                           AssertionError)),
    # a tile that does not see a block leaves its slot unwritten (stale dS^T from two blocks back, or NaN)
    "skipped tile's dS left stale": ("                            ds_slot.store(s_zero.to(dtype))\n",
                                     "                            pass\n", AssertionError),
}


@pytest.mark.parametrize("name", list(ATOMIC_DQ_MUTANTS))
def test_backward_atomic_dq_mutants_are_reported(name, tmp_path, monkeypatch):
    """The atomic-dQ dK/dV kernel's hand-off of dS^T between its two consumers (``_dq_share``): each broken step
    is reported as a hazard or deadlock, or gives wrong numbers (under one of two seeds)."""
    old, new, error = ATOMIC_DQ_MUTANTS[name]
    mod = _mutant(attention_bwd_ws, old, new, tmp_path)
    # (a 2-slot ring keeps a consumer within two blocks of the other, which hides the turn mutant's race; 3 slots,
    # which would fit at D = 64, let it run ahead)
    mod.BWD_STAGES = 3
    with pytest.raises(error):
        for seed in (0, 1):
            err = _backward(mod, monkeypatch, atomic_dq=True, seed=seed)
            assert err < 0.05, err  # (an AssertionError: the numbers are wrong)
    # (a mutant that passes both seeds falls through here: pytest.raises fails the test)


def test_decode_gemm_slot_refilled_under_a_product(tmp_path, monkeypatch):
    """The decode GEMM refilling a slot while the product that reads it may still run (two left in flight)."""
    from rlhf_engine.kernels import decode_gemm_ws

    mod = _mutant(decode_gemm_ws, "acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])",
                  "acc = warpgroup_mma_wait(num_outstanding=2, deps=[acc])", tmp_path)
    monkeypatch.setattr(mod, "_decode_gemm_kernel", emulate(mod._decode_gemm_kernel))
    monkeypatch.setenv("RLHF_ENGINE_DECODE_GEMM_WS_STAGES", "2")
    x, w = torch.randn(16, 512, dtype=torch.bfloat16), torch.randn(64, 512, dtype=torch.bfloat16)
    with pytest.raises(GluonHazard):
        mod.decode_gemm_ws(x, w, splits=1)


@pytest.mark.parametrize("line", ["fence_async_shared()\n        gl.thread_barrier()",
                                  "gl.thread_barrier()\n\n"])
def test_decode_gemm_norm_without_fence_or_barrier(line, tmp_path, monkeypatch):
    """The decode GEMM's norm prologue stores the normalized block to shared memory from registers: without the
    async-proxy fence, or without the warpgroup barrier after it, wgmma may read stale or partial data."""
    from rlhf_engine.kernels import decode_gemm_ws

    mod = _mutant(decode_gemm_ws, line, "pass" + ("\n\n" if line.endswith("\n\n") else ""), tmp_path)
    monkeypatch.setattr(mod, "_decode_gemm_kernel", emulate(mod._decode_gemm_kernel))
    x, w = torch.randn(16, 128, dtype=torch.bfloat16), torch.randn(64, 128, dtype=torch.bfloat16)
    with pytest.raises(GluonHazard, match="fence_async_shared|thread_barrier"):
        mod.decode_gemm_ws(x, w, norm_weight=torch.ones(128, dtype=torch.bfloat16),
                           row_sumsq=x.float().pow(2).sum(-1)[None], splits=1)


def test_decode_gemm_pdl_reading_x_before_the_wait(tmp_path, monkeypatch):
    """A programmatic dependent launch that copies x (the previous kernel's output) before griddepcontrol.wait."""
    from rlhf_engine.kernels import decode_gemm_ws

    mod = _mutant(decode_gemm_ws, """            _gdc_wait()  # from here on the previous kernel is complete: x, the sums, the residual, any write
            for i in range(0, gl.minimum(nk, STAGES)):
                _load_x(x_desc, x_smem, ready.index(i), i, t0, (kb_lo + i) * BLOCK_K)""",
                  """            for i in range(0, gl.minimum(nk, STAGES)):
                _load_x(x_desc, x_smem, ready.index(i), i, t0, (kb_lo + i) * BLOCK_K)
            _gdc_wait()""", tmp_path)
    monkeypatch.setattr(mod, "use_pdl", lambda device: True)
    monkeypatch.setattr(mod, "_decode_gemm_kernel", emulate(mod._decode_gemm_kernel, pdl_early=("w_desc",)))
    x, w = torch.randn(16, 128, dtype=torch.bfloat16), torch.randn(64, 128, dtype=torch.bfloat16)
    with pytest.raises(GluonHazard, match="griddepcontrol.wait"):
        mod.decode_gemm_ws(x, w, splits=1, pdl=True)


@gluon.jit
def _scatter_kernel(X, Y, n, scale, N: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    offs = gl.program_id(0) * N + gl.arange(0, N, layout=layout)
    gl.store(Y + offs * scale, gl.load(X + offs, mask=offs < n, other=0.0), mask=offs < n)


def test_bounds_and_int32_overflow():
    x = torch.arange(100, dtype=torch.float32)
    y = torch.zeros(100)
    emulate(_scatter_kernel)[(1,)](x, y, 100, 1, N=128)
    assert torch.equal(x, y)
    with pytest.raises(IndexError, match="out of the bounds"):
        emulate(_scatter_kernel)[(1,)](x, torch.zeros(100), 100, 2, N=128)  # stores up to element 198
    with pytest.raises(OverflowError, match="int32"):
        emulate(_scatter_kernel)[(1,)](x, y, 100, 2**30, N=128)  # offs * scale past int32


_PLAIN_GLOBAL = 128


@gluon.jit
def _global_reader_kernel(Y):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    gl.store(Y + gl.arange(0, _PLAIN_GLOBAL, layout=layout), 1.0)


def test_plain_globals_are_refused():
    """Triton refuses a jit function that reads a module-level int (the decode GEMM's first compile failed so, where
    the emulator had run it): the emulator refuses it too."""
    with pytest.raises(NameError, match="_PLAIN_GLOBAL"):
        emulate(_global_reader_kernel)[(1,)](torch.zeros(128))
