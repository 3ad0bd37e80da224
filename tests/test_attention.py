"""flash_attention (Triton, forward + backward) against the fp64 PyTorch reference.

CPU runs use the Triton interpreter with small shapes and fp32/fp16; bf16 and big shapes are ``gpu`` tests.
"""
import math

import pytest
import torch

from rlhf_engine.kernels.attention import (
    FlashAttentionFunction,
    flash_attention,
    flash_attention_op,
    kv_range_from_lengths,
)
from rlhf_engine.kernels.attention_bwd import attention_backward
from rlhf_engine.kernels.attention_fwd import attention_forward
from rlhf_engine.kernels.reference.attention import attention_reference


def _inputs(B, Tq, Tk, Hq, Hkv, D, dtype, device, requires_grad=True):
    q = torch.randn(B, Tq, Hq, D, device=device, dtype=dtype)
    k = torch.randn(B, Tk, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(B, Tk, Hkv, D, device=device, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _ranges(kind, B, T, device):
    """(kv_start, kv_end) for 'none', 'right', 'left' (with one fully padded sequence when B > 2)."""
    if kind == "none":
        return None, None
    lens = torch.tensor([max(T - 3 * i - 1, 1) if i % 2 == 0 else max(T // 2, 1) for i in range(B)])
    if B > 2:
        lens[-1] = 0  # a sequence with no valid token at all
    return [t.to(device) for t in kv_range_from_lengths(lens, T, padding_side=kind)]


def _check(q, k, v, *, causal, kv_start, kv_end, atol, rtol, scale=None, **fa_kwargs):
    """Compare o and dq/dk/dv against the fp64 reference with a random grad_output."""
    o = flash_attention(q, k, v, causal=causal, kv_start=kv_start, kv_end=kv_end, softmax_scale=scale,
                        backend="triton", **fa_kwargs)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=causal, kv_start=kv_start, kv_end=kv_end, softmax_scale=scale)
    g = torch.randn_like(ref)
    assert not torch.isnan(o).any()
    torch.testing.assert_close(o.double(), ref, atol=atol, rtol=rtol)
    grads = torch.autograd.grad(o, (q, k, v), g.to(o.dtype))
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert not torch.isnan(a).any(), f"d{name} has NaN"
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=lambda m: f"d{name}: {m}")
    return o, grads


# (B, T, Hq, Hkv, D, causal, padding)
CASES = [
    (2, 97, 9, 3, 64, True, "none"),
    (2, 97, 4, 4, 80, True, "right"),
    (2, 97, 14, 2, 96, True, "left"),
    (3, 40, 4, 2, 64, True, "left"),  # third sequence fully padded
    (2, 50, 9, 3, 80, False, "right"),
    (3, 61, 4, 2, 64, False, "left"),
    (2, 1, 14, 2, 64, True, "none"),
    (3, 1, 4, 2, 96, True, "left"),
    (2, 33, 32, 8, 16, True, "right"),  # Llama's 32/8 grouping (small D for the interpreter)
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,causal,padding", CASES)
def test_flash_attention_fp32_matches_reference(B, T, Hq, Hkv, D, causal, padding, device):
    q, k, v = _inputs(B, T, T, Hq, Hkv, D, torch.float32, device)
    ks, ke = _ranges(padding, B, T, device)
    _check(q, k, v, causal=causal, kv_start=ks, kv_end=ke, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("dq_mode", ["split", "atomic"])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (64, 32), (16, 64)])
def test_flash_attention_tiles(block_m, block_n, dq_mode, device):
    """Odd tile shapes: partial blocks, diagonal blocks smaller/larger than the key tiles."""
    B, T, Hq, Hkv, D = 3, 75, 4, 2, 48
    q, k, v = _inputs(B, T, T, Hq, Hkv, D, torch.float32, device, requires_grad=False)
    ks, ke = torch.tensor([0, 7, 20], device=device, dtype=torch.int32), torch.tensor([60, 75, 41], device=device,
                                                                                       dtype=torch.int32)
    scale = 0.3
    o, lse = attention_forward(q, k, v, causal=True, kv_start=ks, kv_end=ke, softmax_scale=scale,
                               block_m=block_m, block_n=block_n)
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), causal=True, kv_start=ks, kv_end=ke,
                                       softmax_scale=scale, return_lse=True)
    torch.testing.assert_close(o.double(), ref, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-4, rtol=1e-4)  # -inf rows compare equal
    do = torch.randn_like(o)
    dq, dk, dv = attention_backward(do, q, k, v, o, lse, causal=True, kv_start=ks, kv_end=ke, softmax_scale=scale,
                                    block_m=block_m, block_n=block_n, dq_mode=dq_mode)
    assert dq.dtype == q.dtype
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    r = attention_reference(q64, k64, v64, causal=True, kv_start=ks, kv_end=ke, softmax_scale=scale)
    rq, rk, rv = torch.autograd.grad(r, (q64, k64, v64), do.double())
    for a, b in ((dq, rq), (dk, rk), (dv, rv)):
        torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("Tq,Tk", [(5, 40), (33, 70), (40, 20)])
def test_flash_attention_bottom_right_alignment(Tq, Tk, device):
    """Tq != Tk: query i sits at key position i + Tk - Tq (rows before the first key output zeros)."""
    q, k, v = _inputs(2, Tq, Tk, 4, 2, 64, torch.float32, device)
    ks = torch.tensor([3, 0], dtype=torch.int32, device=device)
    ke = torch.tensor([Tk, Tk - 2], dtype=torch.int32, device=device)
    _check(q, k, v, causal=True, kv_start=ks, kv_end=ke, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("B,T,Hq,Hkv,D,causal,padding", [CASES[2], CASES[3], CASES[5], CASES[7]])
def test_atomic_dq_matches_reference(B, T, Hq, Hkv, D, causal, padding, device, monkeypatch):
    """dq_mode="atomic" (dQ added into an fp32 buffer by the dK/dV kernel) through the autograd path: GQA, padding,
    a fully padded sequence, T = 1."""
    monkeypatch.setenv("RLHF_ENGINE_ATTN_DQ", "atomic")
    q, k, v = _inputs(B, T, T, Hq, Hkv, D, torch.float32, device)
    ks, ke = _ranges(padding, B, T, device)
    _check(q, k, v, causal=causal, kv_start=ks, kv_end=ke, atol=2e-4, rtol=1e-4)


def test_atomic_dq_fp16(device):
    q, k, v = _inputs(2, 70, 70, 6, 2, 64, torch.float16, device)
    ks, ke = _ranges("left", 2, 70, device)
    o, lse = attention_forward(q.detach(), k.detach(), v.detach(), causal=True, kv_start=ks, kv_end=ke,
                               softmax_scale=0.125)
    do = torch.randn_like(o)
    split = attention_backward(do, q.detach(), k.detach(), v.detach(), o, lse, causal=True, kv_start=ks, kv_end=ke,
                               softmax_scale=0.125, dq_mode="split")
    atomic = attention_backward(do, q.detach(), k.detach(), v.detach(), o, lse, causal=True, kv_start=ks, kv_end=ke,
                                softmax_scale=0.125, dq_mode="atomic")
    for name, a, b in zip("qkv", atomic, split):
        assert a.dtype == torch.float16 and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2, msg=lambda m: f"d{name}: {m}")


def test_dq_mode_resolution(monkeypatch):
    from rlhf_engine.kernels.attention_bwd import resolve_dq_mode

    monkeypatch.delenv("RLHF_ENGINE_ATTN_DQ", raising=False)
    assert resolve_dq_mode() == "split" and resolve_dq_mode("atomic") == "atomic"
    monkeypatch.setenv("RLHF_ENGINE_ATTN_DQ", "atomic")
    assert resolve_dq_mode() == "atomic" and resolve_dq_mode("split") == "split"
    with pytest.raises(ValueError, match="dq_mode"):
        resolve_dq_mode("fused")
    monkeypatch.setenv("RLHF_ENGINE_ATTN_DQ", "nope")
    with pytest.raises(ValueError, match="RLHF_ENGINE_ATTN_DQ"):
        resolve_dq_mode()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert resolve_dq_mode("atomic") == "split"  # atomics add in no fixed order
    finally:
        torch.use_deterministic_algorithms(was)


def test_flash_attention_fp16(device):
    q, k, v = _inputs(2, 70, 70, 6, 2, 64, torch.float16, device)
    ks, ke = _ranges("left", 2, 70, device)
    _check(q, k, v, causal=True, kv_start=ks, kv_end=ke, atol=1e-2, rtol=1e-2)


def test_padding_rows_are_zero_not_nan(device):
    """Left-padding rows and a fully padded sequence: o = 0, lse = -inf, every gradient finite and zero there."""
    B, T, Hq, Hkv, D = 3, 40, 4, 2, 64
    q, k, v = _inputs(B, T, T, Hq, Hkv, D, torch.float32, device)
    with torch.no_grad():  # garbage in the padding must not leak (0 * NaN = NaN)
        k[0, :10] = float("nan")
        v[0, :10] = float("nan")
    ks = torch.tensor([10, 0, T], dtype=torch.int32, device=device)
    ke = torch.tensor([T, T, T], dtype=torch.int32, device=device)
    o = flash_attention(q, k, v, kv_start=ks, kv_end=ke, backend="triton")
    assert not torch.isnan(o).any()
    assert (o[0, :10] == 0).all() and (o[2] == 0).all()
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert (dq[0, :10] == 0).all() and (dq[2] == 0).all()
    assert (dk[0, :10] == 0).all() and (dv[2] == 0).all()
    _, lse = attention_forward(q.detach(), k.detach(), v.detach(), causal=True, kv_start=ks, kv_end=ke,
                               softmax_scale=1 / 8)
    assert torch.isneginf(lse[0, :, :10]).all() and torch.isneginf(lse[2]).all()


def test_no_grad_call_skips_the_function_with_the_same_output(device, monkeypatch):
    """Without autograd (prefill, scoring, a checkpointed layer's first pass) the launch runs without the
    autograd.Function; the output is the Function's, bit for bit (kv ranges given as int64 too)."""
    import rlhf_engine.kernels.attention as A

    q, k, v = _inputs(2, 21, 21, 4, 2, 16, torch.float32, device)
    ks, ke = _ranges("left", 2, 21, device)
    with_grad = flash_attention(q, k, v, kv_start=ks.long(), kv_end=ke, backend="triton")
    calls = []
    monkeypatch.setattr(A.FlashAttentionFunction, "apply", lambda *a: calls.append(1))
    with torch.no_grad():
        o = flash_attention(q, k, v, kv_start=ks.long(), kv_end=ke, backend="triton")
    assert calls == [] and not o.requires_grad
    assert torch.equal(o, with_grad.detach())


def test_custom_op_matches_autograd_function(device):
    B, T, Hq, Hkv, D = 2, 33, 4, 2, 80
    q, k, v = _inputs(B, T, T, Hq, Hkv, D, torch.float32, device)
    ks, ke = _ranges("right", B, T, device)
    scale = 1 / math.sqrt(D)
    o1 = FlashAttentionFunction.apply(q, k, v, ks, ke, True, scale)
    o2, lse = flash_attention_op(q, k, v, ks, ke, True, scale)
    assert lse.shape == (B, Hq, T) and lse.dtype == torch.float32
    torch.testing.assert_close(o1, o2, atol=0, rtol=0)
    g = torch.randn_like(o1)
    g1 = torch.autograd.grad(o1, (q, k, v), g)
    g2 = torch.autograd.grad(o2, (q, k, v), g)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_custom_op_fake_tensor():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 9, 6, 80)
        k = torch.empty(2, 9, 2, 80)
        o, lse = torch.ops.rlhf_engine.flash_attention(q, k, k, None, None, True, 0.1)
        assert o.shape == q.shape and lse.shape == (2, 6, 9) and lse.dtype == torch.float32
        dq, dk, dv = torch.ops.rlhf_engine.flash_attention_backward(o, q, k, k, o, lse, None, None, True, 0.1)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape


def test_strided_inputs(device):
    """q/k/v as transposed views of (B, H, T, D) tensors (what HF passes) give the same result."""
    B, T, Hq, Hkv, D = 2, 29, 4, 2, 64
    q = torch.randn(B, Hq, T, D, device=device).transpose(1, 2)
    k = torch.randn(B, Hkv, T, D, device=device).transpose(1, 2)
    v = torch.randn(B, Hkv, T, D, device=device).transpose(1, 2)
    o = flash_attention(q, k, v, backend="triton")
    torch.testing.assert_close(o, flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), backend="triton"))
    torch.testing.assert_close(o.double(), attention_reference(q.double(), k.double(), v.double()), atol=2e-4,
                               rtol=1e-4)


def test_tiny_head_long_sequence_backward(device):
    """T = 1025, forward and the three gradients against fp64, left padding, grad_output random (D = 16 keeps it
    affordable under the interpreter)."""
    q, k, v = _inputs(2, 1025, 1025, 2, 1, 16, torch.float32, device)
    ks, ke = _ranges("left", 2, 1025, device)
    _check(q, k, v, causal=True, kv_start=ks, kv_end=ke, atol=2e-4, rtol=1e-4)


def test_tiny_head_long_sequence(device):
    """T = 1025 crosses many tiles: D = 16 keeps it fast under the interpreter."""
    B, T, Hq, Hkv, D = 1, 1025, 2, 1, 16
    q, k, v = _inputs(B, T, T, Hq, Hkv, D, torch.float32, device, requires_grad=False)
    o, _ = attention_forward(q, k, v, causal=True, kv_start=None, kv_end=None, softmax_scale=0.25,
                             block_m=128, block_n=128)
    ref = attention_reference(q.double(), k.double(), v.double(), softmax_scale=0.25)
    torch.testing.assert_close(o.double(), ref, atol=2e-4, rtol=1e-4)


def test_torch_backend_and_validation(device):
    q, k, v = _inputs(2, 9, 9, 4, 2, 16, torch.float32, device, requires_grad=False)
    torch.testing.assert_close(flash_attention(q, k, v, backend="torch"), attention_reference(q, k, v))
    with pytest.raises(ValueError, match="backend"):
        flash_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="KV heads"):
        flash_attention(q, k[:, :, :1].expand(2, 9, 3, 16).contiguous(), v[:, :, :1].expand(2, 9, 3, 16).contiguous())
    with pytest.raises(ValueError, match="k: expected shape"):
        flash_attention(q, k[..., :8], v[..., :8])
    with pytest.raises(TypeError, match="dtype"):
        flash_attention(q, k.half(), v.half())
    with pytest.raises(ValueError, match="kv_start"):
        flash_attention(q, k, v, kv_start=torch.zeros(3, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="kv_end"):
        flash_attention(q, k, v, kv_end=torch.zeros(2, device=device))
    ks, ke = kv_range_from_lengths(torch.tensor([3, 5]), 8, padding_side="left")
    assert ks.tolist() == [5, 3] and ke.tolist() == [8, 8] and ks.dtype == torch.int32


# ----------------------------------------------------------------------------- GPU
def _bf16_rule(B, T, Hq, Hkv, D, padding, device, record=None):
    """bf16: our error vs fp64 <= 2x PyTorch's own bf16 error (SDPA with expanded KV), forward and grads."""
    q, k, v = _inputs(B, T, T, Hq, Hkv, D, torch.bfloat16, device)
    ks, ke = _ranges(padding, B, T, device)
    o = flash_attention(q, k, v, kv_start=ks, kv_end=ke)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, kv_start=ks, kv_end=ke)
    g = torch.randn_like(ref)
    ours = (o, *torch.autograd.grad(o, (q, k, v), g.bfloat16()))
    refs = (ref, *torch.autograd.grad(ref, (q64, k64, v64), g))
    # PyTorch bf16: the same math through SDPA (math on bf16 tensors) with the same mask.
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    from rlhf_engine.kernels.reference.attention import attention_mask_bshd

    mask = attention_mask_bshd(B, T, T, causal=True, kv_start=ks, kv_end=ke, device=device)  # (B, T, T)
    valid = mask.any(-1)  # (B, T) rows with a valid key; SDPA would give NaN on the others
    mask[..., 0] |= ~valid  # let empty rows see key 0, then zero them (their dO is 0: no gradient leaks)
    pt = torch.nn.functional.scaled_dot_product_attention(
        qt.transpose(1, 2), kt.transpose(1, 2).repeat_interleave(Hq // Hkv, 1),
        vt.transpose(1, 2).repeat_interleave(Hq // Hkv, 1), attn_mask=mask[:, None]).transpose(1, 2)
    pt = torch.where(valid[..., None, None], pt, torch.zeros_like(pt))
    theirs = (pt, *torch.autograd.grad(pt, (qt, kt, vt), g.bfloat16()))
    for name, a, b, r in zip(["o", "dq", "dk", "dv"], ours, theirs, refs):
        assert torch.isfinite(a).all(), name
        err_ours = (a.double() - r).abs().max().item()
        err_torch = (b.double() - r).abs().max().item()
        if record is not None:
            record(f"bf16 {name}: max err ours / PyTorch's", err_ours / max(err_torch, 1e-30))
        assert err_ours <= 2 * err_torch + 1e-6, f"{name}: ours {err_ours:.3e} vs torch bf16 {err_torch:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,Hq,Hkv,D,padding", [
    (2, 1025, 32, 8, 128, "none"), (4, 1025, 14, 2, 64, "left"), (3, 777, 9, 3, 96, "right"),
    (2, 513, 12, 4, 80, "left"),
])
def test_flash_attention_bf16_gpu(B, T, Hq, Hkv, D, padding, device, record_value):
    _bf16_rule(B, T, Hq, Hkv, D, padding, device, record_value)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,Hq,Hkv,D,padding", [(2, 1025, 32, 8, 128, "none"), (4, 1025, 14, 2, 64, "left")])
def test_atomic_dq_bf16_gpu(B, T, Hq, Hkv, D, padding, device, record_value, monkeypatch):
    """The atomic-dQ backward (bf16 dots, fp32 atomics on the GPU) under the same 2x-PyTorch-error rule."""
    monkeypatch.setenv("RLHF_ENGINE_ATTN_DQ", "atomic")
    _bf16_rule(B, T, Hq, Hkv, D, padding, device, record_value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_flash_attention_gpu_dtypes(dtype, device):
    q, k, v = _inputs(2, 1025, 1025, 8, 2, 128, dtype, device)
    ks, ke = _ranges("right", 2, 1025, device)
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    _check(q, k, v, causal=True, kv_start=ks, kv_end=ke, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_flash_attention_compile_gpu(device):
    q, k, v = _inputs(2, 256, 256, 8, 2, 64, torch.bfloat16, device)

    @torch.compile(fullgraph=True)
    def f(q, k, v):
        return flash_attention(q, k, v).float().square().sum()

    loss = f(q, k, v)
    loss.backward()
    ref = flash_attention(q.detach(), k.detach(), v.detach()).float().square().sum()
    torch.testing.assert_close(loss, ref, atol=1e-2, rtol=1e-3)
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_fixed_tiles_without_autotune(monkeypatch):
    """RLHF_ENGINE_AUTOTUNE=0 (and fp32 always) launch one fixed tile per kernel: the per-head-dim default when it
    fits in shared memory, a small tile for fp32; every choice is one of the autotune configs or the fp32 tile."""
    from rlhf_engine.kernels import attention_bwd as ab
    from rlhf_engine.kernels import attention_fwd as af

    monkeypatch.setenv("RLHF_ENGINE_AUTOTUNE", "0")
    assert not af.autotune_enabled(torch.bfloat16) and not af.autotune_enabled(torch.float32)
    monkeypatch.setenv("RLHF_ENGINE_AUTOTUNE", "1")
    assert af.autotune_enabled(torch.bfloat16) and not af.autotune_enabled(torch.float32)
    tile = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
    q16, q32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1, dtype=torch.float32)
    kernels = [(af._FWD_CONFIGS, af._prune_fwd, af._FWD_DEFAULT, af._FWD_FP32),
               (ab._DKDV_CONFIGS, ab._prune_dkdv, ab._DKDV_DEFAULT, ab._DKDV_FP32),
               (ab._DKDV_CONFIGS, ab._prune_dkdv_atomic, ab._DKDV_ATOMIC_DEFAULT, ab._DKDV_FP32),  # dq_mode="atomic"
               (ab._DQ_CONFIGS, ab._prune_dq, ab._DQ_DEFAULT, ab._DQ_FP32)]
    for configs, prune, default, fp32 in kernels:
        for bd in (64, 128):
            c = af.fixed_config(configs, prune, {"Q": q16, "T_BUCKET": 4096}, bd, default, fp32)
            assert tile(c) == default[bd] and c in configs
        c = af.fixed_config(configs, prune, {"Q": q16, "T_BUCKET": 4096}, 256, default, fp32)
        assert c in prune(configs, {"Q": q16, "T_BUCKET": 4096}, BLOCK_D=256)   # D = 256: a tile that fits
        assert af.fixed_config(configs, prune, {"Q": q32, "T_BUCKET": 4096}, 128, default, fp32) is fp32


@pytest.mark.parametrize("dq_mode", ["split", "atomic"])
def test_launch_grids_are_one_dimensional_past_65535_heads(monkeypatch, dq_mode):
    """B * H in a grid's second dimension stops at 65535 (a 1024-sequence prefill with 64 heads): past it, an
    attention launch is a 1-D grid of tiles x (batch, head) rows. Host side: the kernels are stand-ins recording
    their grids, on meta tensors; the kernels' FLAT_GRID path is checked against the reference below."""
    from rlhf_engine.kernels import attention_bwd, attention_fwd

    grids = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            grids[self.name] = grid
            return lambda *args, **kwargs: None

    for mod, name in ((attention_fwd, "_attn_fwd_kernel"), (attention_bwd, "_bwd_preprocess_kernel"),
                      (attention_bwd, "_bwd_dkdv_kernel"), (attention_bwd, "_bwd_dq_kernel")):
        monkeypatch.setattr(mod, name, Recorder(name))
    def run(B, T=40, Hq=14, Hkv=2, D=16):
        grids.clear()
        q = torch.empty(B, T, Hq, D, device="meta")
        k = torch.empty(B, T, Hkv, D, device="meta")
        o, lse = attention_forward(q, k, k, causal=True, kv_start=None, kv_end=None, softmax_scale=0.25,
                                   block_m=16, block_n=16)
        attention_backward(o, q, k, k, o, lse, causal=True, kv_start=None, kv_end=None, softmax_scale=0.25,
                           block_m=16, block_n=16, dq_mode=dq_mode)
        assert ("_bwd_dq_kernel" in grids) == (dq_mode == "split")
        return dict(grids)

    B = 5000  # B * Hq = 70000 (batch, head) rows, B * Hkv = 10000
    g = run(B)
    assert g["_attn_fwd_kernel"] == (3 * B * 14,)  # 3 tiles of 16 query rows, one dimension
    assert g["_bwd_preprocess_kernel"] == (1 * B * 14,)  # 64-row tiles
    assert g["_bwd_dkdv_kernel"] == (3, B * 2)  # 10000 KV rows fit the second dimension
    if dq_mode == "split":
        assert g["_bwd_dq_kernel"] == (3 * B * 14,)
    g = run(8)  # the usual case: (tiles, rows), no index arithmetic in the kernels
    assert g["_attn_fwd_kernel"] == (3, 8 * 14) and g["_bwd_dkdv_kernel"] == (3, 8 * 2)


@pytest.mark.parametrize("dq_mode", ["split", "atomic"])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,causal,padding", [CASES[2], CASES[3]])
def test_flat_grid_kernels_match_reference(B, T, Hq, Hkv, D, causal, padding, dq_mode, device, monkeypatch):
    """The kernels' FLAT_GRID path (1-D launches, taken past 65535 (batch, head) rows) on small shapes: the limit
    lowered to 1 row, forward and every gradient against fp64, with GQA, padding and a fully padded sequence."""
    from rlhf_engine.kernels import attention_fwd

    monkeypatch.setattr(attention_fwd, "MAX_GRID_ROWS", 1)  # flat_grid and tile_grid read it, every launch site
    monkeypatch.setenv("RLHF_ENGINE_ATTN_DQ", dq_mode)
    q, k, v = _inputs(B, T, T, Hq, Hkv, D, torch.float32, device)
    ks, ke = _ranges(padding, B, T, device)
    assert attention_fwd.tile_grid(4, B * Hq) == (4 * B * Hq,)
    _check(q, k, v, causal=causal, kv_start=ks, kv_end=ke, atol=2e-4, rtol=1e-4)
