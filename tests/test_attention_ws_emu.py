"""The warp-specialized Gluon attention kernels (``kernels/attention_fwd_ws.py``, ``attention_bwd_ws.py``) run on the
CPU by ``tests/gluon_emu``: their own code, with TMA copies landing in random order, the partitions as threads
and every barrier wait checked (a hang raises ``GluonDeadlock``, a slot refilled under a product ``GluonHazard``).

Against the fp64 reference, under the issue's rule: within 2x of PyTorch's own error in the same 16-bit dtype
(``F.scaled_dot_product_attention`` on the CPU, rows it cannot compute aside); the log-sum-exp against fp64's, empty
rows included. The GPU tests (``tests/test_attention_ws.py``) check the compiled kernels on an sm_90 GPU; the
sm_90 compiles themselves are in ``tests/test_triton_compile.py``."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton.experimental.gluon")

from gluon_emu import emulate
from rlhf_engine.kernels import attention_bwd_ws, attention_fwd_ws
from rlhf_engine.kernels.reference.attention import (
    attention_mask_bshd,
    attention_reference,
)
from tiny import key_ranges


def _sdpa(q, k, v, causal, ks, ke, scale):
    """PyTorch's own attention in q's dtype (its error is the yardstick); NaN on rows without a valid key."""
    mask = attention_mask_bshd(q.shape[0], q.shape[1], k.shape[1], causal=causal, kv_start=ks, kv_end=ke,
                               device=q.device)[:, None]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       scale=scale, enable_gqa=True)
    return o.transpose(1, 2)


def _check(name, got, ref, pt):
    """got within 2x of PyTorch's error pt (both against fp64 ref), no NaN."""
    assert not torch.isnan(got).any(), name
    err = (got.double() - ref).abs().max().item()
    fin = torch.isfinite(pt)
    err_pt = (pt.double() - ref)[fin].abs().max().item() if fin.any() else 0.0
    assert err <= 2 * err_pt + 1e-6, f"{name}: max error {err:.3g} against PyTorch's {err_pt:.3g}"


# (B, Tq, Tk, Hq, Hkv, D, causal, padding, dtype, PIPELINE, STAGES or 0 for the default): odd lengths, one row, a
# pair of tiles cut short, Tq < Tk and Tq > Tk (bottom-right causal), GQA groups 3, 7, 2 and 1, a sequence with no
# valid key (B = 3 with padding), and the ring at 2, 3 and 4 slots. PIPELINE "pp": pipelined with the ping-pong
# turns (RLHF_ENGINE_ATTN_WS_PINGPONG=1); Tk - Tq = 64 and Tq > Tk give the two tiles of a program different block
# counts (one tile passes the other's extra turns)
FWD_CASES = [
    (2, 97, 97, 9, 3, 64, True, "none", torch.bfloat16, "1", 0),
    (3, 200, 200, 14, 2, 64, True, "left", torch.bfloat16, "1", 0),
    (3, 200, 200, 4, 2, 64, True, "left", torch.bfloat16, "0", 0),
    (2, 333, 333, 4, 4, 128, False, "right", torch.float16, "1", 0),
    (3, 150, 150, 2, 1, 128, True, "right", torch.bfloat16, "0", 0),
    (2, 1, 1, 4, 4, 128, True, "none", torch.bfloat16, "1", 0),
    (2, 70, 300, 4, 2, 64, True, "none", torch.bfloat16, "1", 0),
    (1, 300, 300, 2, 1, 64, True, "none", torch.float16, "1", 2),
    (1, 300, 300, 2, 1, 64, False, "none", torch.bfloat16, "0", 4),
    (2, 260, 260, 2, 1, 64, True, "left", torch.bfloat16, "1", 4),
    (2, 300, 70, 4, 2, 64, True, "none", torch.bfloat16, "1", 0),
    (2, 97, 97, 9, 3, 64, True, "none", torch.bfloat16, "pp", 0),
    (3, 200, 200, 14, 2, 64, True, "left", torch.bfloat16, "pp", 2),
    (2, 333, 333, 4, 4, 128, False, "right", torch.float16, "pp", 0),
    (2, 1, 1, 4, 4, 128, True, "none", torch.bfloat16, "pp", 0),
    (2, 200, 264, 4, 2, 64, True, "none", torch.bfloat16, "pp", 0),
    (1, 200, 264, 2, 1, 64, True, "none", torch.float16, "pp", 2),
    (2, 300, 70, 4, 2, 128, True, "none", torch.bfloat16, "pp", 0),
    (3, 260, 324, 2, 1, 64, True, "right", torch.float16, "pp", 4),
]


@pytest.mark.parametrize("B,Tq,Tk,Hq,Hkv,D,causal,padding,dtype,pipeline,stages", FWD_CASES)
def test_ws_forward_emulated(B, Tq, Tk, Hq, Hkv, D, causal, padding, dtype, pipeline, stages, monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_ATTN_WS_PIPELINE", "0" if pipeline == "0" else "1")
    monkeypatch.setenv("RLHF_ENGINE_ATTN_WS_PINGPONG", "1" if pipeline == "pp" else "0")
    monkeypatch.delenv("RLHF_ENGINE_ATTN_WS_PINGPONG_BROKEN", raising=False)
    assert attention_fwd_ws.ws_pingpong() == (pipeline == "pp")
    monkeypatch.setenv("RLHF_ENGINE_ATTN_WS_STAGES", str(stages))
    seed = FWD_CASES.index((B, Tq, Tk, Hq, Hkv, D, causal, padding, dtype, pipeline, stages))
    monkeypatch.setattr(attention_fwd_ws, "_attn_fwd_ws_kernel", emulate(attention_fwd_ws._attn_fwd_ws_kernel, seed))
    torch.manual_seed(seed)
    q = torch.randn(B, Tq, Hq, D, dtype=dtype)
    k, v = (torch.randn(B, Tk, Hkv, D, dtype=dtype) for _ in range(2))
    ks, ke = key_ranges(padding, B, Tk, "cpu")
    assert attention_fwd_ws.ws_layout_ok(q, k, v)
    scale = D ** -0.5
    o, lse = attention_fwd_ws.attention_forward_ws(q, k, v, causal=causal, kv_start=ks, kv_end=ke,
                                                   softmax_scale=scale)
    ref, lse_ref = attention_reference(q.double(), k.double(), v.double(), causal=causal, kv_start=ks, kv_end=ke,
                                       softmax_scale=scale, return_lse=True)
    _check("o", o, ref, _sdpa(q, k, v, causal, ks, ke, scale))
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))  # the same empty rows, -inf there
    finite = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[finite].double(), lse_ref[finite], atol=1e-4, rtol=1e-5)
    if ks is not None and B > 2:
        assert (o[-1] == 0).all()  # the sequence without a valid key: zeros, not NaN


# (B, T, Hq, Hkv, D, causal, padding): both kernels' specializations (head dim, causal, key ranges), T = 1, GQA
# groups 3, 2 and 1, a sequence with no valid key, and left padding whose first key (100) makes both dK/dV consumers
# of a program skip a block (the case of the bug fixed in 28fb86f)
BWD_CASES = [
    (2, 97, 6, 2, 64, True, "none"),
    (3, 200, 4, 2, 64, True, "left"),
    (2, 200, 4, 2, 128, True, "left"),
    (2, 150, 2, 2, 128, False, "right"),
    (2, 130, 2, 1, 64, False, "none"),
    (2, 1, 4, 4, 128, True, "none"),
]


def _pingpong(monkeypatch, on: bool):
    monkeypatch.setenv("RLHF_ENGINE_ATTN_WS_PINGPONG", "1" if on else "0")
    monkeypatch.delenv("RLHF_ENGINE_ATTN_WS_PINGPONG_BROKEN", raising=False)
    assert attention_fwd_ws.ws_pingpong(forward=False) == on


@pytest.mark.parametrize("pingpong", [False, True], ids=["", "pingpong"])
@pytest.mark.parametrize("atomic", [False, True], ids=["split", "atomic_dq"])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,causal,padding", BWD_CASES)
def test_ws_backward_emulated(B, T, Hq, Hkv, D, causal, padding, atomic, pingpong, monkeypatch):
    """Both dQ schemes: the dQ kernel of its own, and the dK/dV kernel's atomic adds of c dS K into a zeroed fp32
    buffer (the dQ kernel then never launched: it is replaced by one that fails); with and without the ping-pong
    turns between each kernel's two consumers."""
    _pingpong(monkeypatch, pingpong)
    seed = BWD_CASES.index((B, T, Hq, Hkv, D, causal, padding))
    monkeypatch.setattr(attention_bwd_ws, "_dkdv_ws_kernel", emulate(attention_bwd_ws._dkdv_ws_kernel, seed))
    monkeypatch.setattr(attention_bwd_ws, "_dq_ws_kernel", emulate(attention_bwd_ws._dq_ws_kernel, seed))
    torch.manual_seed(seed)
    dt = torch.bfloat16
    q, k, v = (torch.randn(B, T, h, D, dtype=dt) for h in (Hq, Hkv, Hkv))
    do = torch.randn(B, T, Hq, D, dtype=dt)  # not all ones
    ks, ke = key_ranges(padding, B, T, "cpu")
    scale = D ** -0.5
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, lse = attention_reference(q64, k64, v64, causal=causal, kv_start=ks, kv_end=ke, softmax_scale=scale,
                                   return_lse=True)
    o = ref.detach().to(dt)
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # (B, Hq, T), the preprocess kernel's
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))  # every element must be written
    if atomic:
        dq = torch.zeros(q.shape, dtype=torch.float32)
        monkeypatch.setattr(attention_bwd_ws, "_dq_ws_kernel", None)  # (not subscriptable: a launch fails)
    attention_bwd_ws.ws_backward(do, q, k, v, lse.detach().float(), delta, dq, dk, dv, causal=causal,
                                 kv_start=ks, kv_end=ke, softmax_scale=scale, atomic_dq=atomic)
    dq = dq.to(dt)  # (the atomic buffer is fp32; attention_backward casts it so)
    refs = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    q16, k16, v16 = (t.clone().requires_grad_() for t in (q, k, v))
    pts = torch.autograd.grad(_sdpa(q16, k16, v16, causal, ks, ke, scale), (q16, k16, v16), do)
    for name, g, r, pt in zip(("dq", "dk", "dv"), (dq, dk, dv), refs, pts):
        _check(name, g, r, pt)


@pytest.mark.parametrize("eager", [0.3, 0.9])
def test_ws_kernels_with_copies_landing_early(eager, monkeypatch):
    """The same kernels with TMA copies landing at random points after issue (``emulate(eager=p)``), not only as late
    as possible: other interleavings of the barriers, the same results."""
    B, T, Hq, Hkv, D = 3, 200, 4, 2, 64
    monkeypatch.setattr(attention_fwd_ws, "_attn_fwd_ws_kernel",
                        emulate(attention_fwd_ws._attn_fwd_ws_kernel, 7, eager=eager))
    monkeypatch.setattr(attention_bwd_ws, "_dkdv_ws_kernel", emulate(attention_bwd_ws._dkdv_ws_kernel, 7, eager=eager))
    monkeypatch.setattr(attention_bwd_ws, "_dq_ws_kernel", emulate(attention_bwd_ws._dq_ws_kernel, 7, eager=eager))
    torch.manual_seed(3)
    q, k, v = (torch.randn(B, T, h, D, dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    do = torch.randn(B, T, Hq, D, dtype=torch.bfloat16)
    ks, ke = key_ranges("left", B, T, "cpu")
    scale = D ** -0.5
    o, lse = attention_fwd_ws.attention_forward_ws(q, k, v, causal=True, kv_start=ks, kv_end=ke, softmax_scale=scale)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=True, kv_start=ks, kv_end=ke, softmax_scale=scale)
    _check("o", o, ref.detach(), _sdpa(q, k, v, True, ks, ke, scale))
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    attention_bwd_ws.ws_backward(do, q, k, v, lse, delta, dq, dk, dv, causal=True, kv_start=ks, kv_end=ke,
                                 softmax_scale=scale)
    refs = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    q16, k16, v16 = (t.clone().requires_grad_() for t in (q, k, v))
    pts = torch.autograd.grad(_sdpa(q16, k16, v16, True, ks, ke, scale), (q16, k16, v16), do)
    for name, g, r, pt in zip(("dq", "dk", "dv"), (dq, dk, dv), refs, pts):
        _check(name, g, r, pt)


@pytest.mark.parametrize("pingpong", [False, True], ids=["", "pingpong"])
@pytest.mark.parametrize("atomic", [False, True], ids=["split", "atomic_dq"])
@pytest.mark.parametrize("Tq,Tk", [(70, 200), (200, 70)])
def test_ws_backward_cross_lengths_emulated(Tq, Tk, atomic, pingpong, monkeypatch):
    """Tq != Tk (bottom-right causal: key j <= row i + Tk - Tq), GQA 4/2 with left padding: the causal shift that
    places the dK/dV kernel's first query block (m_lo) and each tile's seen blocks; with Tq > Tk the first rows see
    no key (zero gradients there, not NaN)."""
    _pingpong(monkeypatch, pingpong)
    monkeypatch.setattr(attention_bwd_ws, "_dkdv_ws_kernel", emulate(attention_bwd_ws._dkdv_ws_kernel, Tq))
    monkeypatch.setattr(attention_bwd_ws, "_dq_ws_kernel", emulate(attention_bwd_ws._dq_ws_kernel, Tq))
    torch.manual_seed(Tq)
    B, Hq, Hkv, D, dt = 2, 4, 2, 64, torch.bfloat16
    q, do = (torch.randn(B, Tq, Hq, D, dtype=dt) for _ in range(2))
    k, v = (torch.randn(B, Tk, Hkv, D, dtype=dt) for _ in range(2))
    ks, ke = key_ranges("left", B, Tk, "cpu")
    scale = D ** -0.5
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, lse = attention_reference(q64, k64, v64, causal=True, kv_start=ks, kv_end=ke, softmax_scale=scale,
                                   return_lse=True)
    delta = (do.float() * ref.detach().to(dt).float()).sum(-1).transpose(1, 2).contiguous()
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    if atomic:
        dq = torch.zeros(q.shape, dtype=torch.float32)
    attention_bwd_ws.ws_backward(do, q, k, v, lse.detach().float(), delta, dq, dk, dv, causal=True, kv_start=ks,
                                 kv_end=ke, softmax_scale=scale, atomic_dq=atomic)
    refs = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    q16, k16, v16 = (t.clone().requires_grad_() for t in (q, k, v))
    pts = torch.autograd.grad(_sdpa(q16, k16, v16, True, ks, ke, scale), (q16, k16, v16), do, allow_unused=True)
    for name, g, r, pt in zip(("dq", "dk", "dv"), (dq.to(dt), dk, dv), refs, pts):
        _check(name, g, r, torch.nan_to_num(pt, nan=float("inf")) if pt is not None else r)
