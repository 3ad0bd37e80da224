"""The opt-in warp-specialized Gluon kernels for Hopper (``kernels/attention_fwd_ws.py``, ``attention_bwd_ws.py``).

On the CPU: their eligibility rules, the dispatch of ``attention_forward`` / ``attention_backward`` to them (with
stand-ins for the kernels), and the GPU probe's exit on a machine without sm_90. On an sm_90 GPU: the forward (both
variants) and the backward against the fp64 reference and the Triton kernels. No interpreter runs Gluon; the sm_90
compiles are checked on the CPU by ``tests/test_triton_compile.py``."""
import os
import subprocess
import sys

import pytest
import torch

from rlhf_engine.kernels import attention_bwd, attention_bwd_ws, attention_fwd, attention_fwd_ws
from rlhf_engine.kernels.attention import flash_attention
from rlhf_engine.kernels.attention_fwd import attention_forward
from rlhf_engine.kernels.attention_fwd_ws import attention_forward_ws, ws_eligible, ws_layout_ok
from rlhf_engine.kernels.reference.attention import attention_reference
from tiny import key_ranges


@pytest.fixture(autouse=True)
def _triton_defaults(monkeypatch):
    """The Triton kernels are the comparison: none of the opt-in switches may be on around them."""
    for var in ("RLHF_ENGINE_ATTN_WS", "RLHF_ENGINE_ATTN_TMA", "RLHF_ENGINE_ATTN_DQ", "RLHF_ENGINE_ATTN_WS_PIPELINE",
                "RLHF_ENGINE_ATTN_WS_PINGPONG"):
        monkeypatch.delenv(var, raising=False)


def test_layout_rules():
    bf = torch.bfloat16
    q = torch.randn(2, 8, 4, 64, dtype=bf)
    assert ws_layout_ok(q, q[:, :, :2], q[:, :, 2:])  # head slices of one tensor: rows of a (B * T, H * D) view
    qkv = torch.randn(2, 8, (4 + 2 * 2) * 128, dtype=bf).view(2, 8, 8, 128)  # a packed q/k/v projection
    assert ws_layout_ok(qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:])
    assert not ws_layout_ok(q.float(), q[:, :, :2].float(), q[:, :, 2:].float())  # fp32: the Triton kernel's
    assert not ws_layout_ok(q, q[:, :, :2].half(), q[:, :, 2:])  # mixed dtypes
    x = torch.randn(2, 8, 4, 80, dtype=bf)
    assert not ws_layout_ok(x, x, x)  # D = 80: not a wgmma tile of this kernel
    bhtd = torch.randn(2, 4, 8, 64, dtype=bf).transpose(1, 2)  # (B, T, H, D) over (B, H, T, D): heads not packed
    assert not ws_layout_ok(bhtd, q[:, :, :2], q[:, :, :2])
    kv = torch.randn(1, 8, 2, 64, dtype=bf).expand(2, 8, 2, 64)
    assert not ws_layout_ok(q, kv, kv)  # a broadcast batch: not (B * T) rows of one stride
    assert not ws_layout_ok(q[:, :0], q[:, :0, :2], q[:, :0, 2:])  # empty
    mis = torch.randn(2 * 8 * 4 * 64 + 4, dtype=bf)[4:].view(2, 8, 4, 64)  # a base 8 bytes off 16-byte alignment
    assert not ws_layout_ok(mis, mis[:, :, :2], mis[:, :, 2:])  # TMA needs 16-byte aligned bases
    wide = torch.empty(1, 1, 65536, 64, dtype=bf)  # 65536 (batch, head) rows: past the grid's second dimension
    assert not ws_layout_ok(wide, wide[:, :, :1], wide[:, :, :1])
    assert not ws_eligible(q, q[:, :, :2], q[:, :, 2:])  # on the CPU: never


@pytest.mark.parametrize("causal", [True, False])
def test_dispatch_routes_only_when_asked_and_eligible(monkeypatch, causal):
    """With RLHF_ENGINE_ATTN_WS=1 and eligible inputs (stand-ins for sm_90 and the kernels here), attention_forward
    and attention_backward's "split" mode call the Gluon entry points with the caller's arguments; explicit tiles,
    atomic dQ, ineligible inputs or the switch off never do, and then the Triton kernels still match the reference."""
    calls = []

    def fake_forward(q, k, v, **kw):
        calls.append(("fwd", kw["causal"], kw["softmax_scale"]))
        return torch.zeros_like(q), torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    def fake_backward(do, q, k, v, lse, delta, dq, dk, dv, **kw):
        calls.append(("bwd", kw["causal"], kw["softmax_scale"]) + (("atomic",) if kw.get("atomic_dq") else ()))
        if kw.get("atomic_dq"):
            assert dq.dtype == torch.float32 and (dq == 0).all()  # a zeroed fp32 buffer to add into

    monkeypatch.setattr(attention_fwd_ws, "attention_forward_ws", fake_forward)
    monkeypatch.setattr(attention_bwd_ws, "ws_backward", fake_backward)
    eligible = [True]
    monkeypatch.setattr(attention_fwd_ws, "ws_eligible", lambda q, k, v: eligible[0])
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 13, h, 16) for h in (4, 2, 2))
    do = torch.randn_like(q)
    kw = dict(causal=causal, kv_start=None, kv_end=None, softmax_scale=0.25)

    def both(**extra):
        o, lse = attention_fwd.attention_forward(q, k, v, **kw, **extra)
        attention_bwd.attention_backward(do, q, k, v, o, lse, **kw, **extra)
        return o

    both(block_m=16, block_n=16)  # the switch off
    monkeypatch.setenv("RLHF_ENGINE_ATTN_WS", "1")
    both(block_m=16, block_n=16)  # explicit tiles: the Triton kernels' request
    assert calls == []
    both()
    assert calls == [("fwd", causal, 0.25), ("bwd", causal, 0.25)]
    calls.clear()
    o, lse = attention_fwd.attention_forward(q, k, v, **kw, block_m=16, block_n=16)
    dq, _, _ = attention_bwd.attention_backward(do, q, k, v, o, lse, **kw, dq_mode="atomic")
    assert calls == [("bwd", causal, 0.25, "atomic")] and dq.dtype == q.dtype  # the 5-product form, cast back
    calls.clear()
    monkeypatch.setenv("RLHF_ENGINE_ATTN_WS_ATOMIC_BROKEN", "1")  # ws_probe.py --atomic saw it fail
    attention_bwd.attention_backward(do, q, k, v, o, lse, **kw, dq_mode="atomic")
    eligible[0] = False
    o = both()
    assert calls == []  # a broken atomic form and ineligible inputs stay on the Triton kernels
    ref = attention_reference(q.double(), k.double(), v.double(), causal=causal, softmax_scale=0.25)
    torch.testing.assert_close(o.double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["--simple", "--pipelined", "--pingpong", "--atomic", "--gemm", "--lm-head"])
def test_probe_exits_2_without_sm90(mode):
    """benchmarks/ws_probe.py on a machine without an sm_90 GPU: exit 2 (gpu_check.sh reads it as "not run"), after
    importing everything it needs (an import error would otherwise first show on the GPU machine)."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("an sm_90 GPU: the probe runs for real in gpu_check.sh")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "ws_probe.py"), mode], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "not run" in r.stdout


def _hopper():
    """Whether this GPU runs the kernel (sm_90); a test fails at once when benchmarks/ws_probe.py, run by
    gpu_check.sh before the tests, saw the kernel hang or disagree (RLHF_ENGINE_ATTN_WS_BROKEN=1)."""
    flags = (os.environ.get("RLHF_ENGINE_ATTN_WS_BROKEN"), os.environ.get("RLHF_ENGINE_ATTN_WS_PIPELINE_BROKEN"))
    if "notrun" in flags:
        pytest.skip("gpu_check.sh had no time left to probe the warp-specialized kernels: off for this run")
    if os.environ.get("RLHF_ENGINE_ATTN_WS_BROKEN") == "1":
        pytest.fail("benchmarks/ws_probe.py found the warp-specialized kernel broken (hang or mismatch): see "
                    "ws_probe.txt")
    if os.environ.get("RLHF_ENGINE_ATTN_WS_PIPELINE_BROKEN") == "1":
        pytest.fail("benchmarks/ws_probe.py found the pipelined forward broken: see ws_probe.txt")
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


# (B, T, Hq, Hkv, D, causal, padding): odd lengths, one tile, a partial pair, GQA groups 3, 7, 4 and 1
GPU_CASES = [
    (2, 97, 9, 3, 64, True, "none"),
    (3, 1025, 14, 2, 64, True, "left"),
    (2, 1025, 32, 8, 128, True, "right"),
    (2, 1, 4, 4, 128, True, "none"),
    (3, 200, 14, 2, 64, False, "left"),
    (2, 200, 14, 2, 64, True, "left"),  # the 2nd sequence's first key is 100: both dK/dV consumers skip a block
    (2, 333, 4, 4, 128, False, "right"),
    (1, 2048, 14, 2, 64, True, "none"),
]


# The forward: every shape with the default (overlap on, bf16); without the overlap, with ping-pong ("pp") and in
# fp16 on a few.
FWD_CASES = ([(*c, torch.bfloat16, "1") for c in GPU_CASES]
             + [(*GPU_CASES[i], torch.bfloat16, "0") for i in (1, 2, 5)]
             + [(*GPU_CASES[i], torch.bfloat16, "pp") for i in (0, 1, 2, 3, 6)]
             + [(*GPU_CASES[i], torch.float16, "1") for i in (0, 6)])


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,Hq,Hkv,D,causal,padding,dtype,pipeline", FWD_CASES)
def test_ws_forward_gpu(B, T, Hq, Hkv, D, causal, padding, dtype, pipeline, record_value, monkeypatch):
    """Against fp64: within 2x of the Triton kernel's own error (+ a floor for 16-bit rounding), no NaN (empty
    rows give 0), and the same log-sum-exp (what the backward reads); with FA3's intra-warpgroup overlap (the
    default) and without it."""
    if not _hopper():
        pytest.skip("the warp-specialized kernel is for sm_90")
    if pipeline == "pp" and os.environ.get("RLHF_ENGINE_ATTN_WS_PINGPONG_BROKEN") == "notrun":
        pytest.skip("gpu_check.sh did not probe the ping-pong forward: off for this run")
    if pipeline == "pp" and os.environ.get("RLHF_ENGINE_ATTN_WS_PINGPONG_BROKEN") == "1":
        pytest.fail("benchmarks/ws_probe.py --pingpong found the ping-pong forward broken: see ws_probe.txt")
    monkeypatch.setenv("RLHF_ENGINE_ATTN_WS_PIPELINE", "0" if pipeline == "0" else "1")
    monkeypatch.setenv("RLHF_ENGINE_ATTN_WS_PINGPONG", "1" if pipeline == "pp" else "0")
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, h, D, device="cuda", dtype=dtype) for h in (Hq, Hkv, Hkv))
    ks, ke = key_ranges(padding, B, T, "cuda")
    assert ws_eligible(q, k, v)
    o, lse = attention_forward_ws(q, k, v, causal=causal, kv_start=ks, kv_end=ke, softmax_scale=D ** -0.5)
    o_ref_k, lse_ref_k = attention_forward(q, k, v, causal=causal, kv_start=ks, kv_end=ke, softmax_scale=D ** -0.5)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=causal, kv_start=ks, kv_end=ke,
                              softmax_scale=D ** -0.5)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    err, err_k = ((x.double() - ref).abs().max().item() for x in (o, o_ref_k))
    record_value(f"WS forward (pipeline {pipeline}) B={B} T={T} {Hq}/{Hkv} D={D} {'causal' if causal else 'full'} "
                 f"{padding} {dtype}: max err vs fp64 (WS / Triton)", f"{err:.3g} / {err_k:.3g}")
    assert err <= 2 * err_k + 2e-3
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref_k))  # the same empty rows
    finite = torch.isfinite(lse_ref_k)
    torch.testing.assert_close(lse[finite], lse_ref_k[finite], atol=2e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("Tq,Tk,D", [(200, 264, 64), (300, 70, 128)])
def test_ws_pingpong_unequal_tiles_gpu(Tq, Tk, D, record_value, monkeypatch):
    """The ping-pong forward where a program's two tiles own different block counts ((Tk - Tq) mod 128 in 1..64, or
    a tile with no key): tile 0 passes tile 1's extra turns. Against fp64 within 2x of the Triton kernel's error."""
    if not _hopper():
        pytest.skip("the warp-specialized kernel is for sm_90")
    if os.environ.get("RLHF_ENGINE_ATTN_WS_PINGPONG_BROKEN") == "notrun":
        pytest.skip("gpu_check.sh did not probe the ping-pong forward: off for this run")
    if os.environ.get("RLHF_ENGINE_ATTN_WS_PINGPONG_BROKEN") == "1":
        pytest.fail("benchmarks/ws_probe.py --pingpong found the ping-pong forward broken: see ws_probe.txt")
    monkeypatch.setenv("RLHF_ENGINE_ATTN_WS_PIPELINE", "1")
    monkeypatch.setenv("RLHF_ENGINE_ATTN_WS_PINGPONG", "1")
    torch.manual_seed(3)
    q = torch.randn(2, Tq, 4, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, Tk, 2, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    o, lse = attention_forward_ws(q, k, v, causal=True, kv_start=None, kv_end=None, softmax_scale=D ** -0.5)
    o_k, lse_k = attention_forward(q, k, v, causal=True, kv_start=None, kv_end=None, softmax_scale=D ** -0.5)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True, softmax_scale=D ** -0.5)
    assert not torch.isnan(o).any()
    err, err_k = ((x.double() - ref).abs().max().item() for x in (o, o_k))
    record_value(f"WS forward (ping-pong) Tq={Tq} Tk={Tk} D={D}: max err vs fp64 (WS / Triton)",
                 f"{err:.3g} / {err_k:.3g}")
    assert err <= 2 * err_k + 2e-3
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_k))


# each specialization of the backward kernels (head dim, causal, key ranges), T = 1, and the case where both dK/dV
# consumers skip a block (the Triton comparison compiles three kernels a specialization: fewer cases than the forward)
@pytest.mark.gpu
@pytest.mark.parametrize("atomic", [False, True], ids=["split", "atomic_dq"])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,causal,padding,pingpong",
                         [(*GPU_CASES[i], False) for i in (0, 1, 2, 3, 4, 5)]
                         + [(*GPU_CASES[i], True) for i in (0, 2, 5)])
def test_ws_backward_gpu(B, T, Hq, Hkv, D, causal, padding, atomic, pingpong, record_value, monkeypatch):
    """The Gluon dK/dV and dQ kernels against fp64 (gradients of the reference) and the Triton backward, on the same
    o and lse, with a grad_output that is not all ones: within 2x of the Triton kernels' own error, no NaN. Both dQ
    schemes: the dQ kernel, and the dK/dV kernel's atomic adds (5 products)."""
    if not _hopper():
        pytest.skip("the warp-specialized kernels are for sm_90")
    if atomic and os.environ.get("RLHF_ENGINE_ATTN_WS_ATOMIC_BROKEN") == "notrun":
        pytest.skip("gpu_check.sh had no time left to probe the atomic-dQ form: off for this run")
    if atomic and os.environ.get("RLHF_ENGINE_ATTN_WS_ATOMIC_BROKEN") == "1":
        pytest.fail("benchmarks/ws_probe.py --atomic found the atomic-dQ backward broken: see ws_probe.txt")
    if pingpong and os.environ.get("RLHF_ENGINE_ATTN_WS_PINGPONG_BROKEN") == "notrun":
        pytest.skip("gpu_check.sh did not probe the ping-pong kernels: off for this run")
    if pingpong and os.environ.get("RLHF_ENGINE_ATTN_WS_PINGPONG_BROKEN") == "1":
        pytest.fail("benchmarks/ws_probe.py --pingpong found the ping-pong kernels broken: see ws_probe.txt")
    monkeypatch.setenv("RLHF_ENGINE_ATTN_WS_PINGPONG", "1" if pingpong else "0")
    torch.manual_seed(2)
    dt = torch.bfloat16
    q, k, v = (torch.randn(B, T, h, D, device="cuda", dtype=dt) for h in (Hq, Hkv, Hkv))
    do = torch.randn(B, T, Hq, D, device="cuda", dtype=dt)
    ks, ke = key_ranges(padding, B, T, "cuda")
    scale = D ** -0.5
    o, lse = attention_forward(q, k, v, causal=causal, kv_start=ks, kv_end=ke, softmax_scale=scale)
    grads_t = attention_bwd.attention_backward(do, q, k, v, o, lse, causal=causal, kv_start=ks, kv_end=ke,
                                               softmax_scale=scale, dq_mode="split")
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # (B, Hq, T), the preprocess kernel's
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if atomic:
        dq = torch.zeros(q.shape, device="cuda")
    attention_bwd_ws.ws_backward(do, q, k, v, lse, delta, dq, dk, dv, causal=causal, kv_start=ks, kv_end=ke,
                                 softmax_scale=scale, atomic_dq=atomic)
    dq = dq.to(dt)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=causal, kv_start=ks, kv_end=ke, softmax_scale=scale)
    refs = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    for name, g, g_t, r in zip(("dq", "dk", "dv"), (dq, dk, dv), grads_t, refs):
        assert not torch.isnan(g).any(), name
        err, err_t = ((x.double() - r).abs().max().item() for x in (g, g_t))
        tag = f"WS backward{' (atomic dQ)' if atomic else ''}{' (ping-pong)' if pingpong else ''}"
        record_value(f"{tag} {name} B={B} T={T} {Hq}/{Hkv} D={D} {'causal' if causal else 'full'} {padding}: "
                     "max err vs fp64 (WS / Triton)", f"{err:.3g} / {err_t:.3g}")
        assert err <= 2 * err_t + 2e-3, name


@pytest.mark.gpu
def test_ws_env_switch_and_gradients_gpu(monkeypatch):
    """RLHF_ENGINE_ATTN_WS=1: flash_attention's forward and backward run the Gluon kernels and give the fp64
    reference output and gradients within 2x of the default path's error."""
    if not _hopper():
        pytest.skip("the warp-specialized kernel is for sm_90")
    torch.manual_seed(1)
    B, T, Hq, Hkv, D = 2, 301, 14, 2, 64
    q, k, v = (torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (Hq, Hkv, Hkv))
    ks, ke = key_ranges("left", B, T, "cuda")
    g = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=True, kv_start=ks, kv_end=ke)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())

    def run():
        o = flash_attention(q, k, v, causal=True, kv_start=ks, kv_end=ke, backend="triton")
        return [o, *torch.autograd.grad(o, (q, k, v), g)]

    base = run()
    calls = []
    fwd, bwd = attention_fwd_ws.attention_forward_ws, attention_bwd_ws.ws_backward
    monkeypatch.setattr(attention_fwd_ws, "attention_forward_ws",
                        lambda *a, **kw: (calls.append("fwd"), fwd(*a, **kw))[1])
    monkeypatch.setattr(attention_bwd_ws, "ws_backward", lambda *a, **kw: (calls.append("bwd"), bwd(*a, **kw))[1])
    monkeypatch.setenv("RLHF_ENGINE_ATTN_WS", "1")
    ws = run()
    assert calls == ["fwd", "bwd"]
    for x, y, r in zip(ws, base, [ref, *ref_grads]):
        assert not torch.isnan(x).any()
        assert (x.double() - r).abs().max().item() <= 2 * (y.double() - r).abs().max().item() + 2e-3
