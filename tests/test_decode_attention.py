"""decode_attention (split-KV flash-decoding), write_kv_cache and apply_rope against the PyTorch references."""
import pytest
import torch

from rlhf_engine.kernels.attention import flash_attention
from rlhf_engine.kernels.decode_attention import decode_attention, decode_attention_op, default_num_splits
from rlhf_engine.kernels.kv_cache import apply_rope, apply_rope_qk, write_kv_cache
from rlhf_engine.kernels.reference.attention import (
    apply_rope_reference,
    decode_attention_reference,
    rotate_half,
    write_kv_cache_reference,
)
from tiny import nan_padded_cache, reversed_programs


# (B, L, Hq, Hkv, D, Tn, num_splits)
CASES = [
    (3, 100, 14, 2, 64, 1, None),
    (3, 100, 14, 2, 64, 3, 4),
    (2, 77, 9, 3, 80, 1, 1),
    (2, 77, 9, 3, 80, 3, 3),
    (4, 64, 4, 4, 64, 1, 2),
    (2, 130, 8, 2, 96, 2, 7),
    (2, 300, 8, 2, 64, 2, 12),  # more splits than the kernel combines itself: the reduce kernel
]


@pytest.mark.parametrize("B,L,Hq,Hkv,D,Tn,num_splits", CASES)
@pytest.mark.parametrize("with_start", [False, True])
def test_decode_matches_reference(B, L, Hq, Hkv, D, Tn, num_splits, with_start, device):
    """Against fp64 at one split (the kernel writes o), 2-8 (its last program per (sequence, KV head) combines
    them, and leaves the tickets at zero; under the interpreter also with the programs in reverse order, where the
    first split is the last to arrive) and 12 (the reduce kernel)."""
    from rlhf_engine.kernels import _launch

    lens = torch.tensor([L - 5 * b for b in range(B)], dtype=torch.int32, device=device)
    lens[-1] = max(Tn, 3)  # a short sequence: most splits are empty
    start = torch.tensor([(7 * b) % 11 for b in range(B)], dtype=torch.int32, device=device) if with_start else None
    k, v = nan_padded_cache(B, L, Hkv, D, torch.float32, device, lens, start)
    q = torch.randn(B, Tn, Hq, D, device=device)
    o = decode_attention(q, k, v, lens, cache_start=start, num_splits=num_splits, backend="triton")
    ref = decode_attention_reference(q.double(), k.double(), v.double(), lens, cache_start=start)
    assert not torch.isnan(o).any()
    torch.testing.assert_close(o.double(), ref, atol=2e-5, rtol=1e-4)
    assert all(int(c.abs().sum()) == 0 for c in _launch._COUNTERS.values())
    with reversed_programs():
        o_rev = decode_attention(q, k, v, lens, cache_start=start, num_splits=num_splits, backend="triton")
    torch.testing.assert_close(o_rev.double(), ref, atol=2e-5, rtol=1e-4)
    assert all(int(c.abs().sum()) == 0 for c in _launch._COUNTERS.values())


def test_decode_empty_rows_and_fp16(device):
    """A sequence whose start is past the queries: zeros, not NaN; fp16 through the interpreter."""
    B, L, Hq, Hkv, D, Tn = 2, 50, 6, 2, 64, 3
    lens = torch.tensor([50, 20], dtype=torch.int32, device=device)
    start = torch.tensor([49, 0], dtype=torch.int32, device=device)  # seq 0: only query 2 (pos 49) sees a key
    k, v = nan_padded_cache(B, L, Hkv, D, torch.float16, device, lens, start)
    q = torch.randn(B, Tn, Hq, D, device=device, dtype=torch.float16)
    for splits in (1, 3):
        o = decode_attention(q, k, v, lens, cache_start=start, num_splits=splits, backend="triton")
        assert not torch.isnan(o).any()
        assert (o[0, :2] == 0).all()
        ref = decode_attention_reference(q.double(), k.double(), v.double(), lens, cache_start=start)
        torch.testing.assert_close(o.double(), ref, atol=2e-3, rtol=2e-3)


def test_decode_strided_hf_cache(device):
    """HF caches are (B, Hkv, L, D): a transposed view works without a copy."""
    B, L, Hq, Hkv, D = 2, 40, 4, 2, 64
    kh = torch.randn(B, Hkv, L, D, device=device)
    vh = torch.randn(B, Hkv, L, D, device=device)
    q = torch.randn(B, Hq, 1, D, device=device).transpose(1, 2)
    lens = torch.tensor([40, 33], dtype=torch.int32, device=device)
    o = decode_attention(q, kh.transpose(1, 2), vh.transpose(1, 2), lens, num_splits=2, backend="triton")
    ref = decode_attention_reference(q, kh.transpose(1, 2), vh.transpose(1, 2), lens)
    torch.testing.assert_close(o, ref, atol=2e-5, rtol=1e-4)


def test_decode_matches_flash_attention_on_full_sequence(device):
    """Prefill with flash_attention and decode the last Tn tokens over the cache: same rows."""
    B, T, Hq, Hkv, D, Tn = 2, 45, 6, 3, 64, 3
    q = torch.randn(B, T, Hq, D, device=device)
    k = torch.randn(B, T, Hkv, D, device=device)
    v = torch.randn(B, T, Hkv, D, device=device)
    ks = torch.tensor([0, 9], dtype=torch.int32, device=device)  # left padding of sequence 1
    full = flash_attention(q, k, v, kv_start=ks, backend="triton")
    lens = torch.full((B,), T, dtype=torch.int32, device=device)
    o = decode_attention(q[:, -Tn:], k, v, lens, cache_start=ks, num_splits=2, backend="triton")
    torch.testing.assert_close(o, full[:, -Tn:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("B,L,Hq,Hkv,D,Tn,num_splits", [CASES[1], CASES[3], CASES[5]])
@pytest.mark.parametrize("half_tables", [False, True])
def test_decode_rotates_q_inside_the_kernel(B, L, Hq, Hkv, D, Tn, num_splits, half_tables, device):
    """q_cos/q_sin: q is rotated in the kernel; equals RoPE first (fp64 reference), for D = 64, 80 (the partner
    column of the rotate-half wraps inside a padded 128-wide tile) and 96, split or not, with left padding."""
    lens = torch.tensor([L - 3 * b for b in range(B)], dtype=torch.int32, device=device)
    start = torch.tensor([(5 * b) % 7 for b in range(B)], dtype=torch.int32, device=device)
    k, v = nan_padded_cache(B, L, Hkv, D, torch.float32, device, lens, start)
    q = torch.randn(B, Tn, Hq, D, device=device)
    pos = (lens[:, None] - Tn + torch.arange(Tn, device=device)[None] - start[:, None]).long()  # (B, Tn)
    cos_t, sin_t = _tables(L, D, device)
    cos, sin = cos_t[pos], sin_t[pos]  # (B, Tn, D)
    if half_tables:
        cos, sin = cos[..., :D // 2], sin[..., :D // 2]
    o = decode_attention(q, k, v, lens, cache_start=start, num_splits=num_splits, q_cos=cos, q_sin=sin,
                         backend="triton")
    q_rot = apply_rope_reference(q.double(), cos_t[pos][:, :, None].double(), sin_t[pos][:, :, None].double())
    ref = decode_attention_reference(q_rot, k.double(), v.double(), lens, cache_start=start)
    assert not torch.isnan(o).any()
    torch.testing.assert_close(o.double(), ref, atol=2e-5, rtol=1e-4)
    # the torch backend takes the same arguments
    o_t = decode_attention(q, k, v, lens, cache_start=start, q_cos=cos, q_sin=sin, backend="torch")
    torch.testing.assert_close(o_t.double(), ref, atol=2e-5, rtol=1e-4)
    # fp16: the rotated q is rounded once to fp16, as the separate RoPE kernel does
    qh, kh, vh = q.half(), torch.nan_to_num(k).half(), torch.nan_to_num(v).half()
    o_h = decode_attention(qh, kh, vh, lens, cache_start=start, num_splits=num_splits, q_cos=cos, q_sin=sin,
                           backend="triton")
    q_sep = apply_rope(qh, cos_t[pos], sin_t[pos], backend="triton")
    o_sep = decode_attention(q_sep, kh, vh, lens, cache_start=start, num_splits=num_splits, backend="triton")
    torch.testing.assert_close(o_h, o_sep, atol=2e-3, rtol=2e-3)


def test_decode_rope_validation(device):
    q = torch.randn(2, 1, 4, 16, device=device)
    kc = torch.randn(2, 8, 2, 16, device=device)
    lens = torch.tensor([8, 5], device=device)
    c = torch.randn(2, 1, 16, device=device)
    with pytest.raises(ValueError, match="both or neither"):
        decode_attention(q, kc, kc, lens, q_cos=c)
    with pytest.raises(ValueError, match="q_sin"):
        decode_attention(q, kc, kc, lens, q_cos=c, q_sin=torch.randn(2, 2, 16, device=device))
    with pytest.raises(ValueError, match="q_cos"):
        decode_attention(q, kc, kc, lens, q_cos=torch.randn(2, 1, 5, device=device), q_sin=c)


def test_decode_op_fake_validation_and_splits(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(4, 1, 14, 64)
        kc = torch.empty(4, 128, 2, 64)
        assert decode_attention_op(q, kc, kc, torch.empty(4, dtype=torch.int32), None, 0.125, 3).shape == q.shape
    q = torch.randn(2, 1, 4, 16, device=device)
    kc = torch.randn(2, 8, 2, 16, device=device)
    lens = torch.tensor([8, 5], device=device)
    torch.testing.assert_close(decode_attention(q, kc, kc, lens, backend="torch"),
                               decode_attention_reference(q, kc, kc, lens))
    with pytest.raises(ValueError, match="cache_lens"):
        decode_attention(q, kc, kc, lens[:1])
    with pytest.raises(ValueError, match="KV heads"):
        decode_attention(q, kc[:, :, :1].expand(2, 8, 3, 16), kc[:, :, :1].expand(2, 8, 3, 16), lens)
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(q, kc, kc, lens, num_splits=0)
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(q, kc, kc, lens, num_splits=65)
    assert default_num_splits(64, 2, 2048, torch.device("cpu")) >= 1
    assert default_num_splits(64, 8, 64, torch.device("cpu")) == 1


def test_default_num_splits_on_h100_sm_count(monkeypatch):
    """One wave of programs: one split once B * Hkv alone fills ~90% of the 132 SMs (what the first H100 run
    measured faster), more below, never under 128 cache positions a split nor over MAX_SPLITS."""
    from rlhf_engine.kernels import decode_attention as da

    monkeypatch.setattr(da, "sm_count", lambda device, default=4: 132)
    dev = torch.device("cuda")
    assert da.default_num_splits(64, 2, 2048, dev) == 1    # 128 programs (Qwen2-0.5B, B=64)
    assert da.default_num_splits(64, 8, 2048, dev) == 1    # 512 programs
    assert da.default_num_splits(60, 2, 2048, dev) == 1    # 120 programs: >= 90% of the SMs
    assert da.default_num_splits(50, 2, 2048, dev) == 2    # 100 programs: a second split fills the wave
    assert da.default_num_splits(32, 2, 2048, dev) == 3
    assert da.default_num_splits(8, 2, 4096, dev) == 9
    assert da.default_num_splits(1, 2, 2048, dev) == 16    # 66 wanted, 2048 / 128 positions allowed
    assert da.default_num_splits(1, 1, 100_000, dev) == da.MAX_SPLITS
    assert da.default_num_splits(4, 2, 100, dev) == 1


# ----------------------------------------------------------------------------- cache write and RoPE
def _tables(P, D, device, dtype=torch.float32):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    ang = torch.arange(P, device=device, dtype=torch.float32)[:, None] * inv[None]
    ang = torch.cat((ang, ang), -1)  # HF: duplicated halves
    return ang.cos().to(dtype), ang.sin().to(dtype)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("D", [64, 80])
def test_write_kv_cache(rope, D, device):
    B, L, Hkv, Tn = 3, 20, 3, 4
    kc, vc = torch.randn(B, L, Hkv, D, device=device), torch.randn(B, L, Hkv, D, device=device)
    kn, vn = torch.randn(B, Tn, Hkv, D, device=device), torch.randn(B, Tn, Hkv, D, device=device)
    pos = torch.tensor([0, 9, 18], device=device)  # the last one runs past L: those rows are dropped
    kw = {}
    if rope:
        cos, sin = _tables(64, D, device)
        kw = dict(cos=cos, sin=sin, rope_positions=pos + 2)
    a = (kc.clone(), vc.clone())
    b = (kc.clone(), vc.clone())
    write_kv_cache(*a, kn, vn, pos, backend="triton", **kw)
    write_kv_cache_reference(*b, kn, vn, pos, **kw)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a[1], b[1], atol=0, rtol=0)
    torch.testing.assert_close(a[1][2, 18:], vn[2, :2])
    if rope:  # the reference itself against HF's formula
        c, s = cos[pos[1] + 2: pos[1] + 2 + Tn, None], sin[pos[1] + 2: pos[1] + 2 + Tn, None]
        torch.testing.assert_close(b[0][1, 9:13], kn[1] * c + rotate_half(kn[1]) * s)


def test_write_kv_cache_half_tables_and_bf16_cache(device):
    """Tables of width D/2 and a cast to the cache dtype (fp16 cache, fp32 new rows)."""
    B, L, Hkv, D, Tn = 2, 12, 2, 64, 1
    cos, sin = _tables(16, D, device)
    kc = torch.zeros(B, L, Hkv, D, device=device, dtype=torch.float16)
    vc = torch.zeros_like(kc)
    kn, vn = torch.randn(B, Tn, Hkv, D, device=device), torch.randn(B, Tn, Hkv, D, device=device)
    pos = torch.tensor([3, 11], device=device)
    write_kv_cache(kc, vc, kn, vn, pos, cos=cos[:, : D // 2], sin=sin[:, : D // 2], backend="triton")
    rk, rv = torch.zeros_like(kc), torch.zeros_like(vc)
    write_kv_cache_reference(rk, rv, kn, vn, pos, cos=cos, sin=sin)
    torch.testing.assert_close(kc, rk, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(vc, rv)
    with pytest.raises(ValueError, match="positions"):
        write_kv_cache(kc, vc, kn, vn, pos[:1])
    with pytest.raises(ValueError, match="cos, sin"):
        write_kv_cache(kc, vc, kn, vn, pos, cos=cos)


def test_apply_rope_forward_backward(device):
    B, T, H, D = 2, 7, 3, 80
    x = torch.randn(B, T, H, D, device=device, dtype=torch.float64)
    cos, sin = _tables(T, D, device, torch.float64)
    cos_b, sin_b = cos[None].expand(B, T, D), sin[None].expand(B, T, D)
    xf = x.float().requires_grad_()
    y = apply_rope(xf, cos_b.float(), sin_b.float(), backend="triton")
    x64 = x.clone().requires_grad_()
    ref = apply_rope_reference(x64, cos_b[:, :, None], sin_b[:, :, None])
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(y, xf, g.float())
    (gr,) = torch.autograd.grad(ref, x64, g)
    torch.testing.assert_close(gx.double(), gr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_rope(x, cos, sin, backend="torch"), ref.detach())  # (T, D) tables


@pytest.mark.parametrize("used", ["both", "k only"])
def test_apply_rope_qk_equals_two_rotations(used, device):
    """q and k rotated together from the packed q|k columns (the model's packed path): outputs and the gradient of
    the packed tensor equal rotating q and k alone, bit for bit (odd widths: Hq/Hkv 9/3, D 80; a gradient for k
    only leaves q's rows zero); fp64 reference for the values."""
    B, T, Hq, Hkv, D = 2, 5, 9, 3, 80
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, device=device, requires_grad=True)
    cos, sin = _tables(T, D, device, torch.float32)
    cos, sin = cos[None].expand(B, T, D), sin[None].expand(B, T, D)
    qk, _ = qkv.split([(Hq + Hkv) * D, Hkv * D], -1)
    q, k = apply_rope_qk(qk.view(B, T, Hq + Hkv, D), cos, sin, Hq)
    q2, k2, _ = qkv.split([Hq * D, Hkv * D, Hkv * D], -1)
    q2, k2 = (apply_rope(t.view(B, T, -1, D), cos, sin, backend="triton") for t in (q2, k2))
    # Bit for bit under the interpreter. On a GPU the compiler contracts x1 * c - x2 * s into an FMA as it sees fit
    # for each specialization (the H200 run of 1f4b6a6 found k a rounding apart): there, equal to fp32 rounding.
    same = torch.equal if device.type == "cpu" else (lambda a, b: torch.allclose(a, b, rtol=2e-6, atol=1e-6))
    assert same(q, q2) and same(k, k2) and q.shape == (B, T, Hq, D) and k.shape == (B, T, Hkv, D)
    ref = apply_rope_reference(qk.detach().double().view(B, T, Hq + Hkv, D), cos.double()[:, :, None],
                               sin.double()[:, :, None])
    torch.testing.assert_close(torch.cat([q, k], 2).double(), ref, atol=1e-5, rtol=1e-5)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    outs = ((k, k2), (gk,)) if used == "k only" else ((q, k, q2, k2), (gq, gk))
    n = len(outs[1])
    (g,) = torch.autograd.grad(outs[0][:n], qkv, outs[1])
    (g2,) = torch.autograd.grad(outs[0][n:], qkv, outs[1])
    assert same(g, g2)
    if used == "k only":
        assert not g[..., :Hq * D].any() and g[..., Hq * D:(Hq + Hkv) * D].any()
    with pytest.raises(ValueError, match="n_q"):
        apply_rope_qk(qk.view(B, T, Hq + Hkv, D), cos, sin, Hq + Hkv)


def test_apply_rope_eager_function_and_custom_op_agree(device):
    """Eager calls run an autograd.Function (the custom op's dispatch costs host time), torch.compile the custom op:
    the same outputs and gradients, a gradient that is not contiguous included; opcheck on the op."""
    from rlhf_engine.kernels.kv_cache import apply_rope_op

    B, T, H, D = 2, 5, 3, 16
    cos, sin = _tables(T, D, device, torch.float32)
    cos_b, sin_b = cos[None].expand(B, T, D), sin[None].expand(B, T, D)
    x = torch.randn(B, T, H, D, device=device)
    g = torch.randn(B, T, D, H, device=device).transpose(-1, -2)  # not contiguous in the last dim
    torch.library.opcheck(apply_rope_op, (x.requires_grad_(), cos_b, sin_b),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

    def fn(x):
        return apply_rope(x, cos_b, sin_b, backend="triton")

    results = []
    for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        xl = x.detach().clone().requires_grad_()
        y = f(xl)
        (gx,) = torch.autograd.grad(y, xl, g)
        results.append((y.detach(), gx))
    x64 = x.detach().double().requires_grad_()
    ref = apply_rope_reference(x64, cos_b.double()[:, :, None], sin_b.double()[:, :, None])
    (gr,) = torch.autograd.grad(ref, x64, g.double())
    for y, gx in results:
        torch.testing.assert_close(y.double(), ref.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx.double(), gr, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no autograd: the launch alone, same values
        torch.testing.assert_close(fn(x), results[0][0])


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("Tn", [1, 4])
@pytest.mark.parametrize("B,L,Hq,Hkv,D", [(64, 2048, 14, 2, 64), (8, 4096, 32, 8, 128), (5, 1000, 9, 3, 80)])
def test_decode_bf16_gpu(B, L, Hq, Hkv, D, Tn, device):
    """bf16: our error vs fp64 <= 2x the error of the same math in PyTorch bf16."""
    lens = torch.randint(L // 2, L + 1, (B,), device=device, dtype=torch.int32)
    start = torch.randint(0, 50, (B,), device=device, dtype=torch.int32)
    k, v = nan_padded_cache(B, L, Hkv, D, torch.bfloat16, device, lens, start)
    q = torch.randn(B, Tn, Hq, D, device=device, dtype=torch.bfloat16)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), lens, cache_start=start)
    k0, v0 = k.nan_to_num(0.0), v.nan_to_num(0.0)
    pos = lens.long()[:, None] - Tn + torch.arange(Tn, device=device)[None]
    j = torch.arange(L, device=device)
    mask = (j[None, None] <= pos[..., None]) & (j[None, None] >= start.long()[:, None, None])  # (B, Tn, L)
    theirs = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k0.transpose(1, 2).repeat_interleave(Hq // Hkv, 1),
        v0.transpose(1, 2).repeat_interleave(Hq // Hkv, 1), attn_mask=mask[:, None]).transpose(1, 2)
    for splits in (None, 1, 8):
        o = decode_attention(q, k, v, lens, cache_start=start, num_splits=splits)
        assert torch.isfinite(o).all()
        err = (o.double() - ref).abs().max().item()
        err_torch = (theirs.double() - ref).abs().max().item()
        assert err <= 2 * err_torch + 1e-6, f"splits={splits}: ours {err:.3e} vs torch {err_torch:.3e}"


@pytest.mark.gpu
def test_decode_cuda_graph_gpu(device):
    B, L, Hq, Hkv, D = 16, 512, 14, 2, 64
    k = torch.randn(B, L, Hkv, D, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(B, 1, Hq, D, device=device, dtype=torch.bfloat16)
    lens = torch.full((B,), 100, device=device, dtype=torch.int32)
    decode_attention(q, k, v, lens)  # autotune outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = decode_attention(q, k, v, lens)
    lens.fill_(400)
    g.replay()
    torch.testing.assert_close(out, decode_attention(q, k, v, lens), atol=0, rtol=0)


@pytest.mark.gpu
def test_write_kv_cache_bf16_gpu(device):
    B, L, Hkv, D, Tn = 8, 64, 2, 128, 3
    cos, sin = _tables(128, D, device)
    kc = torch.zeros(B, L, Hkv, D, device=device, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    kn = torch.randn(B, Tn, Hkv, D, device=device, dtype=torch.bfloat16)
    vn = torch.randn_like(kn)
    pos = torch.randint(0, L - Tn, (B,), device=device)
    write_kv_cache(kc, vc, kn, vn, pos, cos=cos, sin=sin)
    rk, rv = torch.zeros_like(kc), torch.zeros_like(vc)
    write_kv_cache_reference(rk, rv, kn, vn, pos, cos=cos, sin=sin)
    torch.testing.assert_close(kc.float(), rk.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(vc, rv, atol=0, rtol=0)


def test_decode_fixed_config_without_autotune():
    """RLHF_ENGINE_AUTOTUNE=0: the first H100 run's winners by (head dim, single split); fp32 a 32-key tile; other
    head dims the first config."""
    from rlhf_engine.kernels import decode_attention as da

    tile = lambda c: (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
    assert tile(da._decode_fixed_config(64, True, torch.bfloat16)) == (128, 4, 3)
    assert tile(da._decode_fixed_config(128, True, torch.float16)) == (32, 4, 4)
    assert tile(da._decode_fixed_config(128, False, torch.bfloat16)) == (64, 4, 3)
    assert tile(da._decode_fixed_config(64, True, torch.float32)) == (32, 4, 4)
    assert tile(da._decode_fixed_config(96, True, torch.bfloat16)) == tile(da._DECODE_CONFIGS[0])
    for c in da._DECODE_DEFAULT.values():  # every default is one of the autotuned configs
        assert c in {tile(k) for k in da._DECODE_CONFIGS}


def test_decode_autotune_prune_fits_shared_memory():
    """The prune keeps every tile whose K/V pipeline fits an H100's shared memory and drops the rest: all tiles at
    D = 64, no 256-key tile at D = 128 (the tiles of 128 keys or fewer, which the first run compiled and timed
    there, stay); never an empty list."""
    from rlhf_engine.kernels import decode_attention as da

    tile = lambda c: (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
    q = torch.empty(1, 1, 1, 1, dtype=torch.bfloat16)
    kept64 = {tile(c) for c in da._prune_decode(da._DECODE_CONFIGS, {"Q": q}, BLOCK_D=64)}
    kept128 = {tile(c) for c in da._prune_decode(da._DECODE_CONFIGS, {"Q": q}, BLOCK_D=128)}
    assert kept64 == {tile(c) for c in da._DECODE_CONFIGS}
    assert kept128 == {tile(c) for c in da._DECODE_CONFIGS if c.kwargs["BLOCK_N"] <= 128}
    assert all(da.decode_smem_bytes(da.triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s), 128)
               <= da._DECODE_SMEM_BUDGET for bn, w, s in kept128)
    assert da._prune_decode(da._DECODE_CONFIGS, {"Q": q}, BLOCK_D=1024)  # nothing fits: the smallest tile


@pytest.mark.gpu
def test_split_combine_counters_not_made_in_a_capture_gpu(monkeypatch):
    """The in-kernel combine's tickets are made outside a CUDA graph capture only (a capture would record their zero
    fill without running it): a first call inside a capture raises; after one eager call a captured graph replays
    the eager result."""
    from rlhf_engine.kernels import _launch

    dev = torch.device("cuda")
    B, L, Hq, Hkv, D = 4, 256, 14, 2, 64
    k, v = (torch.randn(B, L, Hkv, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    q = torch.randn(B, 1, Hq, D, device=dev, dtype=torch.bfloat16)
    lens = torch.tensor([256, 100, 17, 200], dtype=torch.int32, device=dev)
    monkeypatch.setattr(_launch, "_COUNTERS", {})
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capture"):
        with torch.cuda.graph(g):
            decode_attention(q, k, v, lens, num_splits=4)
    want = decode_attention(q, k, v, lens, num_splits=4)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = decode_attention(q, k, v, lens, num_splits=4)
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
