"""The fused decoder-layer kernels (residual add + RMSNorm, silu(gate) * up, forward and backward) against their
eager definitions and fp64, and the model's prefill/decode and training forward on them against the unfused ops.
Triton runs under the interpreter on the CPU."""
import copy

import pytest
import torch
import torch.nn.functional as F

from rlhf_engine.kernels.reference.norm import rms_norm_reference
from rlhf_engine.kernels.rmsnorm import rms_norm
from rlhf_engine.kernels.swiglu import silu_mul

# (leading shape, H): odd row counts, a non-power-of-two hidden size, Qwen2-0.5B's 896
NORM_SHAPES = [((97,), 50), ((2, 5), 896), ((1, 1), 64), ((3, 7), 130)]


def _rms64(s: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    s64 = s.double()
    return w.double() * s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("lead,H", NORM_SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp32_matches_fp64(lead, H, with_residual, device):
    x = torch.randn(*lead, H, device=device) * 3
    w = torch.randn(H, device=device)
    r = torch.randn_like(x) if with_residual else None
    out = rms_norm(x, w, 1e-6, residual=r, backend="triton")
    if with_residual:
        out, s = out
        torch.testing.assert_close(s, x + r, atol=0, rtol=0)  # one fp32 add, as eager
    s = x if r is None else x + r
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _rms64(s, w, 1e-6), atol=1e-5, rtol=1e-5)


# The Triton interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even): bf16 rounding is checked on a GPU.
DTYPES_16 = [pytest.param(torch.bfloat16, marks=pytest.mark.gpu, id="bf16"), pytest.param(torch.float16, id="fp16")]


@pytest.mark.parametrize("dtype", DTYPES_16)
def test_rms_norm_16bit_rounds_as_eager(dtype, device):
    """16-bit: the residual sum is the eager add bit for bit; the output is within two rounding steps of the
    eager ops (fp32 statistics in both, summed in another order; approximate sqrt/divide on the GPU: an fp32
    ulp can flip the rounding of y, and the weight multiply rounds again)."""
    x = (torch.randn(33, 96, device=device) * 2).to(dtype)
    r = torch.randn(33, 96, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(96, device=device)).to(dtype)
    out, s = rms_norm(x, w, 1e-5, residual=r, backend="triton")
    ref, ref_s = rms_norm_reference(x, w, 1e-5, residual=r)
    assert out.dtype == dtype and torch.equal(s, ref_s)
    ulp = torch.finfo(dtype).eps * ref.float().abs().clamp(min=1.0)
    assert ((out.float() - ref.float()).abs() <= 2 * ulp).all()
    # and the eager error against fp64 bounds ours (the 2x rule)
    exact = _rms64(ref_s, w, 1e-5)
    err_ours = (out.double() - exact).abs().max()
    err_eager = (ref.double() - exact).abs().max()
    assert err_ours <= 2 * err_eager + 1e-6


def test_rms_norm_promotes_like_eager(device):
    """An fp32 weight with bf16 activations gives fp32 output, as ``weight * y.to(bf16)`` does."""
    x = torch.randn(4, 32, device=device).bfloat16()
    w = torch.randn(32, device=device)
    out = rms_norm(x, w, 1e-6, backend="triton")
    ref = rms_norm_reference(x, w, 1e-6)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)


def test_rms_norm_strided_and_empty(device):
    x = torch.randn(6, 2 * 40, device=device)[:, ::2]  # non-unit stride on H: copied
    w = torch.randn(40, device=device)
    torch.testing.assert_close(rms_norm(x, w, 1e-6, backend="triton"), rms_norm_reference(x, w, 1e-6))
    e = torch.empty(0, 40, device=device)
    out, s = rms_norm(e, w, 1e-6, residual=e, backend="triton")
    assert out.shape == (0, 40) and s.shape == (0, 40)


def test_rms_norm_validation(device):
    x, w = torch.randn(3, 8, device=device), torch.randn(8, device=device)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.randn(9, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, w, 1e-6, residual=torch.randn(3, 9, device=device))
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, w, 1e-6, residual=x.double())
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, w, float("nan"))
    with pytest.raises(TypeError, match="x"):
        rms_norm(torch.ones(3, 8, dtype=torch.long), w, 1e-6)
    with pytest.raises(ValueError, match="backend"):
        rms_norm(x, w, 1e-6, backend="cuda")
    with pytest.raises(ValueError, match="hidden size"):
        rms_norm(torch.randn(1, 8193, device=device), torch.randn(8193, device=device), 1e-6, backend="triton")


@pytest.mark.parametrize("shape", [(97, 130), (2, 3, 4864), (1, 1)])
def test_silu_mul_matches_eager(shape, device):
    g, u = torch.randn(*shape, device=device) * 4, torch.randn(*shape, device=device)
    out = silu_mul(g, u, backend="triton")
    ref = g.double() * torch.sigmoid(g.double()) * u.double()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_silu_mul_reads_strided_halves(device):
    """gate and up as the two halves of one packed (..., 2 I) GEMM output are read in place; a non-unit column
    stride is copied first; a 0-dim pair works too."""
    gu = torch.randn(2, 5, 2 * 130, device=device) * 3
    g, u = gu.chunk(2, dim=-1)
    assert not g.is_contiguous()
    out = silu_mul(g, u, backend="triton")
    assert out.shape == (2, 5, 130) and out.is_contiguous()
    torch.testing.assert_close(out, F.silu(g) * u, atol=1e-6, rtol=1e-5)
    g2, u2 = gu[..., ::2], gu[..., 1::2]  # column stride 2
    torch.testing.assert_close(silu_mul(g2, u2, backend="triton"), F.silu(g2) * u2, atol=1e-6, rtol=1e-5)
    s = torch.tensor(1.5, device=device)
    torch.testing.assert_close(silu_mul(s, s, backend="triton"), F.silu(s) * s)


@pytest.mark.parametrize("dtype", DTYPES_16)
def test_silu_mul_16bit_rounds_as_eager(dtype, device):
    g = (torch.randn(37, 200, device=device) * 4).to(dtype)
    u = torch.randn(37, 200, device=device).to(dtype)
    out, ref = silu_mul(g, u, backend="triton"), F.silu(g) * u
    assert out.dtype == dtype
    ulp = torch.finfo(dtype).eps * ref.float().abs().clamp(min=1e-3)
    # the same rounding steps; the GPU's exp/divide may flip silu's rounding, and the product rounds again
    assert ((out.float() - ref.float()).abs() <= 2 * ulp).all()


def test_silu_mul_validation(device):
    g = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match="up"):
        silu_mul(g, torch.randn(3, 9, device=device))
    with pytest.raises(ValueError, match="up"):
        silu_mul(g, g.double())
    with pytest.raises(TypeError, match="gate"):
        silu_mul(torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.long))
    empty = torch.empty(0, 8, device=device)
    assert silu_mul(empty, empty, backend="triton").shape == (0, 8)


# ----------------------------------------------------------------------------- backward
def _grads(outputs, inputs, grad_outputs):
    return torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)


# (leading shape, H): 97 rows walk several rows a program (8 programs under the interpreter); 1 row; H = 896
BWD_SHAPES = [((97,), 50), ((2, 5), 896), ((1,), 64)]


@pytest.mark.parametrize("lead,H", BWD_SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_backward_matches_fp64(lead, H, with_residual, device):
    """dx, dresidual and dweight against autograd through the fp64 definition, for a grad_output that is not all
    ones on both outputs (out, and s: the residual stream goes on to the next layer)."""
    torch.manual_seed(0)
    x = (torch.randn(*lead, H, device=device) * 3).requires_grad_()
    w = torch.randn(H, device=device).requires_grad_()
    r = torch.randn_like(x).requires_grad_() if with_residual else None
    dy = torch.randn_like(x)
    ds = torch.randn_like(x)
    out = rms_norm(x, w, 1e-6, residual=r, backend="triton")
    leaves = [x, w] + ([r] if with_residual else [])
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    r64 = r.detach().double().requires_grad_() if with_residual else None
    s64 = x64 if r64 is None else x64 + r64
    ref = _rms64(s64, w64, 1e-6)
    leaves64 = [x64, w64] + ([r64] if with_residual else [])
    if with_residual:
        got = _grads(out, leaves, (dy, ds))
        want = _grads((ref, s64), leaves64, (dy.double(), ds.double()))
    else:
        got = _grads(out, leaves, dy)
        want = _grads(ref, leaves64, dy.double())
    for name, a, b in zip(("dx", "dweight", "dresidual"), got, want):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, atol=2e-5 * scale, rtol=1e-4, msg=name)


def test_rms_norm_backward_16bit_activations_fp32_weight(device):
    """fp16 x and residual with an fp32 weight (the output, and so dy, in fp32): dx, dresidual in fp16 and dweight
    in fp32, against fp64 on the same rounded inputs."""
    x = (torch.randn(21, 72, device=device) * 2).half().requires_grad_()
    r = torch.randn(21, 72, device=device).half().requires_grad_()
    w = torch.randn(72, device=device).requires_grad_()
    out, s = rms_norm(x, w, 1e-6, residual=r, backend="triton")
    assert out.dtype == torch.float32 and s.dtype == torch.float16
    dy, ds = torch.randn(21, 72, device=device), torch.randn(21, 72, device=device).half()
    gx, gw, gr = _grads((out, s), (x, w, r), (dy, ds))
    assert gx.dtype == gr.dtype == torch.float16 and gw.dtype == torch.float32
    x64, w64, r64 = (t.detach().double().requires_grad_() for t in (x, w, r))
    s64 = (x64 + r64)
    ex, ew, er = _grads((_rms64(s64, w64, 1e-6), s64), (x64, w64, r64), (dy.double(), ds.double()))
    for a, b in ((gx, ex), (gr, er)):
        torch.testing.assert_close(a.double(), b, atol=2e-3 * b.abs().max().item(), rtol=2e-3)
    torch.testing.assert_close(gw.double(), ew, atol=1e-2 * ew.abs().max().item(), rtol=1e-2)  # s rounded to fp16


def test_rms_norm_leaf_grads_do_not_alias(device):
    """x and the residual as leaves: two .grad tensors of their own, accumulated right over two backward passes
    (one tensor handed to both would be accumulated twice)."""
    x = torch.randn(5, 32, device=device, requires_grad=True)
    r = torch.randn(5, 32, device=device, requires_grad=True)
    w = torch.randn(32, device=device)
    dy = torch.randn(5, 32, device=device)
    for _ in range(2):
        rms_norm(x, w, 1e-6, residual=r, backend="triton")[0].backward(dy)
    (ref,) = _grads(rms_norm_reference(x, w, 1e-6, residual=r)[0], (x,), dy)
    assert x.grad.data_ptr() != r.grad.data_ptr()
    torch.testing.assert_close(x.grad, 2 * ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(r.grad, 2 * ref, atol=1e-5, rtol=1e-4)


def test_double_backward_raises(device):
    """No second-order gradients: create_graph=True fails loudly instead of returning graph-less gradients."""
    x = torch.randn(4, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    for out in (rms_norm(x, w, 1e-6, backend="triton"), silu_mul(x, x * 2, backend="triton")):
        (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        with pytest.raises(RuntimeError):
            g.sum().backward()

def test_rms_norm_backward_partial_use(device):
    """Only s used (its gradient is the identity through the add), only out used, a frozen weight (no dweight
    kernel work), and an empty batch."""
    x = torch.randn(9, 40, device=device, requires_grad=True)
    r = torch.randn(9, 40, device=device, requires_grad=True)
    w = torch.randn(40, device=device)  # frozen
    _, s = rms_norm(x, w, 1e-6, residual=r, backend="triton")
    ds = torch.randn_like(x)
    gx, gr = _grads(s, (x, r), ds)
    assert torch.equal(gx, ds) and torch.equal(gr, ds)
    out, _ = rms_norm(x, w, 1e-6, residual=r, backend="triton")
    dy = torch.randn_like(x)
    gx, gr = _grads(out, (x, r), dy)
    ref_x, ref_r = _grads(rms_norm_reference(x, w, 1e-6, residual=r)[0], (x, r), dy)
    torch.testing.assert_close(gx, ref_x, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gr, gx, atol=0, rtol=0)
    e = torch.empty(0, 40, device=device, requires_grad=True)
    we = torch.randn(40, device=device, requires_grad=True)
    out = rms_norm(e, we, 1e-6, backend="triton")
    ge, gw = _grads(out, (e, we), torch.empty(0, 40, device=device))
    assert ge.shape == (0, 40) and torch.equal(gw, torch.zeros(40, device=device))


def test_rms_norm_backward_deterministic(device):
    """dweight comes from fixed per-program partials summed in a fixed order: two runs are bit-identical."""
    x = torch.randn(61, 96, device=device, requires_grad=True)
    w = torch.randn(96, device=device, requires_grad=True)
    dy = torch.randn(61, 96, device=device)
    a = _grads(rms_norm(x, w, 1e-5, backend="triton"), (x, w), dy)
    b = _grads(rms_norm(x, w, 1e-5, backend="triton"), (x, w), dy)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def _bwd_err_16(dtype, device, fn_ours, fn_eager, fn_64, make_inputs):
    """max |grad - grad_fp64| of ours and of the eager ops run in ``dtype`` (the 2x rule of the issues)."""
    inputs = make_inputs()
    g_out = torch.randn_like(inputs[0])
    leaves16 = [t.to(dtype).requires_grad_() for t in inputs]
    leaves16e = [t.to(dtype).requires_grad_() for t in inputs]
    leaves64 = [t.to(dtype).double().requires_grad_() for t in inputs]  # the same rounded inputs, exact math
    ours = _grads(fn_ours(*leaves16), leaves16, g_out.to(dtype))
    eager = _grads(fn_eager(*leaves16e), leaves16e, g_out.to(dtype))
    exact = _grads(fn_64(*leaves64), leaves64, g_out.to(dtype).double())
    for o, e, x in zip(ours, eager, exact):
        assert o.dtype == dtype and torch.isfinite(o).all()
        err_ours, err_eager = (o.double() - x).abs().max(), (e.double() - x).abs().max()
        assert err_ours <= 2 * err_eager + 1e-6 * x.abs().max(), (err_ours.item(), err_eager.item())


@pytest.mark.parametrize("dtype", DTYPES_16)
def test_rms_norm_backward_16bit_within_2x_eager_error(dtype, device):
    torch.manual_seed(1)
    _bwd_err_16(dtype, device,
                lambda x, r, w: rms_norm(x, w, 1e-5, residual=r, backend="triton")[0],
                lambda x, r, w: rms_norm_reference(x, w, 1e-5, residual=r)[0],
                lambda x, r, w: _rms64(x + r, w, 1e-5),
                lambda: [torch.randn(33, 96, device=device) * 2, torch.randn(33, 96, device=device),
                         1 + 0.1 * torch.randn(96, device=device)])


@pytest.mark.parametrize("shape", [(97, 130), (2, 3, 4864), (1, 1)])
def test_silu_mul_backward_matches_fp64(shape, device):
    torch.manual_seed(0)
    g = (torch.randn(*shape, device=device) * 4).requires_grad_()
    u = torch.randn(*shape, device=device).requires_grad_()
    dout = torch.randn(*shape, device=device)
    got = _grads(silu_mul(g, u, backend="triton"), (g, u), dout)
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    want = _grads(F.silu(g64) * u64, (g64, u64), dout.double())
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_silu_mul_backward_strided_halves(device):
    """gate and up as the halves of one (..., 2 I) tensor that needs a gradient: the gradient lands in both."""
    gu = (torch.randn(2, 5, 2 * 130, device=device) * 3).requires_grad_()
    dout = torch.randn(2, 5, 130, device=device)
    (got,) = _grads(silu_mul(*gu.chunk(2, dim=-1), backend="triton"), (gu,), dout)
    (want,) = _grads(F.silu(gu[..., :130]) * gu[..., 130:], (gu,), dout)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES_16)
def test_silu_mul_backward_16bit_within_2x_eager_error(dtype, device):
    torch.manual_seed(2)
    _bwd_err_16(dtype, device,
                lambda g, u: silu_mul(g, u, backend="triton"),
                lambda g, u: F.silu(g) * u,
                lambda g, u: F.silu(g) * u,
                lambda: [torch.randn(37, 200, device=device) * 4, torch.randn(37, 200, device=device)])


def test_custom_ops_autograd_registration(device):
    """The custom ops that torch.compile traces carry the same backward: opcheck, and a compiled function's
    gradients equal the eager ones."""
    from rlhf_engine.kernels.rmsnorm import add_rms_norm_op, rms_norm_op
    from rlhf_engine.kernels.swiglu import silu_mul_op

    x = torch.randn(7, 48, device=device, requires_grad=True)
    r = torch.randn(7, 48, device=device, requires_grad=True)
    w = torch.randn(48, device=device, requires_grad=True)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(rms_norm_op, (x, w, 1e-6), test_utils=checks)
    torch.library.opcheck(add_rms_norm_op, (x, r, w, 1e-6), test_utils=checks)
    torch.library.opcheck(silu_mul_op, (x, r), test_utils=checks)

    def fn(x, r, w):
        y, s = rms_norm(x, w, 1e-6, residual=r, backend="triton")
        return (silu_mul(y, s, backend="triton") * torch.arange(48, device=x.device)).sum()

    grads = []
    for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, r, w)]
        f(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_custom_ops_fake_tensor():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.empty(5, 64, dtype=torch.bfloat16), torch.empty(64)
        y = torch.ops.rlhf_engine.rms_norm(x, w, 1e-6)
        y2, s = torch.ops.rlhf_engine.add_rms_norm(x, x, w, 1e-6)
        a = torch.ops.rlhf_engine.silu_mul(x, x)
    assert y.dtype == y2.dtype == torch.float32 and s.dtype == a.dtype == torch.bfloat16
    assert y.shape == s.shape == a.shape == (5, 64)


@pytest.mark.parametrize("name,lora", [("tiny-llama", False), ("tiny-qwen2", False), ("tiny-qwen2", True)])
def test_fused_generation_path_matches_unfused_forward(name, lora, device):
    """Prefill + decode on the triton backend (packed q/k/v and gate/up GEMMs, with LoRA adapters on too, fused
    norm / residual / SwiGLU kernels, RoPE inside the cache write) give the logits of the unfused full forward
    (torch backend), fp32."""
    from rlhf_engine.generation import KVCache
    from rlhf_engine.model import CausalLM, preset
    from rlhf_engine.model.packing import packed_weights

    from rlhf_engine.model import apply_lora
    from rlhf_engine.model.packing import packed_lora

    torch.manual_seed(0)
    m = CausalLM(preset(name)).to(device).eval()
    if lora:  # adapters on every projection: the groups run as packed base GEMMs + one A GEMM + B terms
        apply_lora(m, rank=4, alpha=8.0)
    with torch.no_grad():
        for p in m.parameters():  # non-trivial norm weights, biases and adapters
            p.add_(0.05 * torch.randn_like(p))
        a, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
        packed = packed_lora if lora else packed_weights  # the path under test
        assert packed((a.q_proj, a.k_proj, a.v_proj)) is not None
        assert packed((mlp.gate_proj, mlp.up_proj)) is not None
    B, P, N = 3, 6, 3
    ids = torch.randint(3, m.config.vocab_size, (B, P + N), device=device)
    mask = torch.ones(B, P + N, dtype=torch.long, device=device)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    with torch.no_grad():
        full = m(ids, mask, attn_backend="torch").float()  # (B, P + N, V): the eager, unfused definition
        cache = KVCache.allocate(m.config, B, P + N, dtype=torch.float32, device=device)
        logits = [m.prefill(ids[:, :P], mask[:, :P], cache, attn_backend="triton")]
        for t in range(P, P + N - 1):
            logits.append(m.decode_step(ids[:, t:t + 1], cache, attn_backend="triton")[:, 0])
    got = torch.stack(logits, 1)  # logits after positions P-1 .. P+N-2
    torch.testing.assert_close(got, full[:, P - 1:P + N - 1], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- one-pass sampler
def _sampler_check(n, temperature, tol, device):
    from rlhf_engine.kernels.sample import sample_logits

    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.5, 2.0, float("-inf")], device=device)
    g = torch.Generator(device).manual_seed(7)
    tok, lp = sample_logits(logits.expand(n, 7), temperature=temperature, generator=g)
    target = torch.softmax(logits / temperature, -1)
    freq = torch.bincount(tok, minlength=7).float() / n
    assert (freq - target).abs().max() < tol
    assert freq[6] == 0  # a -inf logit is never drawn
    torch.testing.assert_close(lp, torch.log_softmax(logits / temperature, -1)[tok])
    # the stream depends on (seed, row, token) only: the same generator state replays the first rows
    m = min(n, 200)
    tok2, _ = sample_logits(logits.expand(m, 7), temperature=temperature, generator=g.manual_seed(7))
    assert torch.equal(tok[:m], tok2)
    tok3, _ = sample_logits(logits.expand(m, 7), temperature=temperature, generator=g.manual_seed(8))
    assert not torch.equal(tok[:m], tok3)


def test_triton_sampler_distribution_and_logprob(device):
    """kernels/sample.py: draws follow softmax(logits / T); the log-prob is exact; a generator replays.
    The interpreter spends ~20 ms a row in tl.rand: 1000 draws, a 4.5-sigma bound (0.07)."""
    _sampler_check(1000, 0.5, 0.07, device)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.7])
def test_triton_sampler_distribution_gpu(temperature, device):
    _sampler_check(400_000, temperature, 0.005, device)


def test_triton_sampler_greedy_long_vocab(device):
    """Vocab over several blocks, not a power of two; ties go to the first index, as torch.argmax."""
    from rlhf_engine.kernels.sample import sample_logits

    logits = torch.randn(5, 50257, device=device) * 3
    logits[2, 7] = logits[2, 40000] = 100.0  # a tie across blocks
    tok, lp = sample_logits(logits, temperature=0.8, greedy=True)
    assert torch.equal(tok, logits.argmax(-1)) and tok[2] == 7
    torch.testing.assert_close(lp, torch.log_softmax(logits / 0.8, -1).gather(1, tok[:, None])[:, 0])
    g = torch.Generator(device).manual_seed(0)
    tok, lp = sample_logits(logits.half(), temperature=1.3, generator=g)  # 16-bit logits are read as fp32
    ref = torch.log_softmax(logits.half().float() / 1.3, -1).gather(1, tok[:, None])[:, 0]
    torch.testing.assert_close(lp, ref)
    assert ((tok >= 0) & (tok < 50257)).all()


def test_sample_tokens_routes_to_the_kernel(device):
    """sample_tokens(backend="triton"): plain and greedy sampling on the kernel, top-k/top-p on the eager ops."""
    import rlhf_engine.kernels.sample as ks
    from rlhf_engine.generation import sample_tokens

    calls = []
    orig = ks.sample_logits_forward

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    ks.sample_logits_forward = spy
    try:
        z = torch.randn(4, 100, device=device)
        sample_tokens(z, backend="triton", generator=torch.Generator(device).manual_seed(0))
        sample_tokens(z, backend="triton", greedy=True)
        assert len(calls) == 2
        sample_tokens(z, backend="triton", top_k=5, generator=torch.Generator(device).manual_seed(0))
        sample_tokens(z, backend="torch")
        assert len(calls) == 2
        with pytest.raises(ValueError, match="backend"):
            sample_tokens(z, backend="cuda")
    finally:
        ks.sample_logits_forward = orig
    from rlhf_engine.kernels.sample import sample_logits
    with pytest.raises(ValueError, match="temperature"):
        sample_logits(z, temperature=0.0)
    with pytest.raises(ValueError, match="logits"):
        sample_logits(z[0])


def test_cache_attention_rotates_q_on_both_backends(device):
    """model/attention.cache_attention with q_rope: half tables (what the fused path passes) on the triton
    kernel and on the torch path both equal rotating q first with the full tables."""
    from rlhf_engine.model.attention import AttnMeta, cache_attention
    from rlhf_engine.model.rope import apply_rotary

    B, Tn, Hq, Hkv, D, L = 2, 1, 6, 2, 16, 12
    q = torch.randn(B, Tn, Hq, D, device=device)
    kc, vc = torch.randn(B, L, Hkv, D, device=device), torch.randn(B, L, Hkv, D, device=device)
    ang = torch.rand(B, Tn, D // 2, device=device) * 6
    half = (ang.cos(), ang.sin())
    full = tuple(torch.cat([t, t], -1) for t in half)
    lens = torch.tensor([12, 7], dtype=torch.int32, device=device)
    start = torch.tensor([0, 2], dtype=torch.int32, device=device)
    for backend in ("torch", "triton"):
        meta = AttnMeta(backend=backend, mode="decode", cache_lens=lens, cache_start=start)
        want = cache_attention(apply_rotary(q, *full), kc, vc, meta)
        torch.testing.assert_close(cache_attention(q, kc, vc, meta, q_rope=half), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ckpt", [False, True])
def test_fused_training_forward_matches_eager(ckpt, device, monkeypatch):
    """The training forward on the triton backend (fused add + RMSNorm and SwiGLU kernels with their backward,
    half RoPE tables, separate GEMMs) gives the eager torch-backend loss and the same gradient for every
    parameter, with left and right padding, with and without activation checkpointing; fp32."""
    from rlhf_engine.model import CausalLM, preset
    from rlhf_engine.model.logprobs import sequence_logprobs

    torch.manual_seed(0)
    ref = CausalLM(preset("tiny-qwen2")).to(device)
    with torch.no_grad():
        for p in ref.parameters():  # non-trivial norm weights and biases
            p.add_(0.05 * torch.randn_like(p))
    m = copy.deepcopy(ref)
    m.gradient_checkpointing = ref.gradient_checkpointing = ckpt
    B, T = 3, 11
    ids = torch.randint(3, m.config.vocab_size, (B, T), device=device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[1, :3] = 0  # left padding
    mask[2, -4:] = 0  # right padding
    w = torch.randn(B, T - 1, device=device)  # a grad_output that is not all ones
    from rlhf_engine.kernels import rmsnorm, swiglu

    calls = {"norm": 0, "silu": 0}
    for mod, cls, key in ((rmsnorm, "RMSNormFunction", "norm"), (swiglu, "SiluMulFunction", "silu")):
        fn = getattr(mod, cls)
        monkeypatch.setattr(mod, cls, type(cls, (), {"apply": staticmethod(
            lambda *a, _fn=fn, _k=key: (calls.__setitem__(_k, calls[_k] + 1), _fn.apply(*a))[1])}))
    losses, grads = [], []
    for model, backend in ((ref, "torch"), (m, "triton")):
        model.train()
        lp = sequence_logprobs(model, ids, mask, start=1, backend="torch", attn_backend=backend)
        loss = (lp * w * mask[:, 1:]).sum()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    # the path under test: autograd through 2 norms a layer and the final one, and one SwiGLU a layer; each layer
    # once more when the backward recomputes it
    L, again = m.config.num_layers, 2 if ckpt else 1
    assert calls == {"norm": 2 * L * again + 1, "silu": L * again}, calls
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert grads[1][name] is not None and torch.isfinite(grads[1][name]).all(), name
        torch.testing.assert_close(grads[1][name], g, atol=1e-5 * max(g.abs().max().item(), 1.0), rtol=1e-4,
                                   msg=name)


@pytest.mark.gpu
def test_fused_training_bf16_within_2x_eager_error_gpu(record_value):
    """bf16 on the GPU: the triton-backend training forward (fused norms and SwiGLU, Triton attention) and the
    eager torch backend, each against the same model in fp32; the per-token log-probs and the gradients of ours
    stay within 2x of the eager bf16 error (relative L2 over the valid tokens, and over all parameters' gradients;
    one scalar loss could cancel its errors by luck)."""
    from rlhf_engine.model import CausalLM, ModelConfig
    from rlhf_engine.model.logprobs import sequence_logprobs

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=4096, hidden_size=896, intermediate_size=4864, num_layers=2, num_heads=14,
                      num_kv_heads=2, attention_bias=True, tie_word_embeddings=True)
    ref = CausalLM(cfg).cuda()
    B, T = 4, 193
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    mask = torch.ones(B, T, dtype=torch.long, device="cuda")
    mask[1, :40] = 0
    mask[3, -50:] = 0
    w = torch.randn(B, T - 1, device="cuda")

    def run(model, backend):
        model.zero_grad(set_to_none=True)
        lp = sequence_logprobs(model, ids, mask, start=1, attn_backend=backend)
        (lp.float() * w * mask[:, 1:]).sum().backward()
        return lp.detach().double()[mask[:, 1:].bool()], torch.cat([p.grad.double().flatten()
                                                                    for p in model.parameters()])

    lp32, g32 = run(ref, "torch")
    errs = {}
    for backend in ("torch", "triton"):
        m16 = copy.deepcopy(ref).to(torch.bfloat16)
        lp, g = run(m16, backend)
        assert torch.isfinite(g).all() and torch.isfinite(lp).all()
        errs[backend] = (((lp - lp32).norm() / lp32.norm()).item(), ((g - g32).norm() / g32.norm()).item())
    for i, what in enumerate(("log-prob relative L2 error", "grad relative L2 error")):
        record_value(f"bf16 training forward, {what}: triton / eager",
                     f"{errs['triton'][i]:.3g} / {errs['torch'][i]:.3g}")
        assert errs["triton"][i] <= 2 * errs["torch"][i] + 1e-6, (what, errs)


def _tiny_qwen2(device):
    from rlhf_engine.model import CausalLM, preset

    torch.manual_seed(0)
    m = CausalLM(preset("tiny-qwen2")).to(device)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(3, m.config.vocab_size, (2, 9), device=device)
    mask = torch.ones(2, 9, dtype=torch.long, device=device)
    mask[1, :3] = 0
    return m, ids, mask


def test_scoring_forward_equals_training_forward_bitwise(device):
    """On the triton backend a forward without autograd (old log-probs, reference, values) runs the training
    forward's ops (separate GEMMs, not the generation path's packed ones): the same log-probs bit for bit, so
    the first PPO ratio is exactly 1."""
    from rlhf_engine.model.logprobs import sequence_logprobs

    m, ids, mask = _tiny_qwen2(device)
    with torch.no_grad():
        scored = sequence_logprobs(m, ids, mask, start=1, backend="torch", attn_backend="triton")
    trained = sequence_logprobs(m, ids, mask, start=1, backend="torch", attn_backend="triton")
    assert trained.requires_grad and torch.equal(scored, trained.detach())


def test_hooks_and_autocast_take_the_eager_layers(device, monkeypatch):
    """Forward and backward hooks on a decoder layer or a norm fire (the fused path would skip them), and autocast
    (layer outputs and residual stream of different dtypes) works: all take the eager layers, with no fused norm
    call."""
    from rlhf_engine.kernels import rmsnorm

    m, ids, mask = _tiny_qwen2(device)
    ref = m.hidden_states(ids, mask, attn_backend="torch")
    monkeypatch.setattr(rmsnorm, "RMSNormFunction", None)  # any fused training norm call would fail
    seen = []
    handles = [m.model.layers[0].register_forward_hook(lambda mod, i, o: seen.append("layer")),
               m.model.norm.register_forward_hook(lambda mod, i, o: seen.append("norm"))]
    out = m.hidden_states(ids, mask, attn_backend="triton")
    assert seen == ["layer", "norm"]
    valid = mask.bool()  # padding positions hold finite but meaningless values
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)
    for h in handles:
        h.remove()
    fired = []  # a backward hook too: Module.__call__ sets it up, the fused path would not
    h = m.model.layers[1].register_full_backward_hook(lambda mod, gi, go: fired.append(1))
    m.hidden_states(ids, mask, attn_backend="triton").sum().backward()
    h.remove()
    assert fired == [1]
    with torch.autocast(device.type if isinstance(device, torch.device) else str(device), dtype=torch.float16):
        out = m.hidden_states(ids, mask, attn_backend="triton")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[valid].float(), ref[valid], atol=0.05, rtol=0.05)
