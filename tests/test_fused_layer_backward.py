"""The backward of the fused decoder-layer kernels (residual add + RMSNorm, silu(gate) * up) against fp64 and the
eager ops, their custom ops' autograd for torch.compile, and the model's training forward on them against the
torch backend (gradients of every parameter, checkpointing, hooks, autocast, scoring = training bit for bit).
Triton runs under the interpreter on the CPU; bf16 cases are marked ``gpu``."""
import copy

import pytest
import torch
import torch.nn.functional as F

from rlhf_engine.kernels.reference.norm import rms_norm_reference
from rlhf_engine.kernels.rmsnorm import rms_norm
from rlhf_engine.kernels.swiglu import silu_mul
from tiny import DTYPES_16, rms_norm_fp64 as _rms64

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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_weight_grad_column_sum(dtype, device):
    """The weight gradient's sum over the backward's per-program fp32 partials (kernels/rmsnorm.py ``_col_sum``):
    the fp64 column sums rounded to the weight's dtype (to an fp32 rounding before it), odd shapes."""
    from rlhf_engine.kernels.rmsnorm import _col_sum

    for rows, cols in ((1, 7), (37, 130), (264, 896)):
        p = torch.randn(rows, cols, device=device) * 10
        got = _col_sum(p, dtype)
        want = p.double().sum(0)
        assert got.dtype == dtype and got.shape == (cols,)
        torch.testing.assert_close(got.double(), want.to(dtype).double(), atol=1e-4 * rows ** 0.5,
                                   rtol=torch.finfo(dtype).eps)


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


def test_silu_mul_packed_one_gradient_no_join(device):
    """silu_mul_packed(gu): the values and the (..., 2 I) gradient of silu_mul on gu's two halves, bit for bit, with
    the gradient written by the kernel as one tensor (no cat joining the halves' gradients); no grad: the plain op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from rlhf_engine.kernels.swiglu import silu_mul_packed

    class Ops(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    gu = (torch.randn(3, 4, 2 * 130, device=device) * 3).requires_grad_()
    dout = torch.randn(3, 4, 130, device=device)
    want_y = silu_mul(*gu.chunk(2, dim=-1), backend="triton")
    (want,) = _grads(want_y, (gu,), dout)
    y = silu_mul_packed(gu, backend="triton")
    with Ops():
        (got,) = torch.autograd.grad(y, gu, dout)
    assert torch.equal(y, want_y) and torch.equal(got, want) and got.shape == gu.shape
    assert "cat" not in Ops.seen, Ops.seen
    with torch.no_grad():
        assert torch.equal(silu_mul_packed(gu, backend="triton"), want_y)
    with pytest.raises(ValueError, match="gu"):
        silu_mul_packed(gu[..., :-1], backend="triton")
    empty = torch.zeros(3, 0, device=device, requires_grad=True)  # I = 0: empty gradients, no error
    assert silu_mul_packed(empty, backend="triton").shape == (3, 0)
    assert torch.autograd.grad(silu_mul(empty, empty, backend="triton").sum(), empty)[0].shape == (3, 0)


@pytest.mark.parametrize("padded", [False, True])
def test_rope_attention_packed_equals_the_separate_nodes(padded, device):
    """rope_attention_packed (the training path: RoPE + attention as one autograd node on the packed q/k/v GEMM
    output) against apply_rope_qk + flash_attention on the split views: the same output and the same packed
    gradient, bit for bit on the CPU, with left/right padding; its backward writes that gradient without a cat."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from rlhf_engine.kernels.attention import flash_attention, rope_attention_packed
    from rlhf_engine.kernels.kv_cache import apply_rope_qk

    class Ops(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    B, T, Hq, Hkv, D = 2, 13, 6, 2, 16
    qkv = torch.randn(B, T, Hq + 2 * Hkv, D, device=device, requires_grad=True)
    ang = torch.rand(B, T, D // 2, device=device) * 5
    cos, sin = ang.cos(), ang.sin()
    kv = dict(kv_start=torch.tensor([3, 0], device=device, dtype=torch.int32),
              kv_end=torch.tensor([T, 10], device=device, dtype=torch.int32)) if padded else {}
    do = torch.randn(B, T, Hq, D, device=device)
    o = rope_attention_packed(qkv, cos, sin, Hq, Hkv, **kv)
    with Ops():
        (g,) = torch.autograd.grad(o, qkv, do)
    assert "cat" not in Ops.seen, Ops.seen
    qk, v = qkv.split([Hq + Hkv, Hkv], dim=2)
    q, k = apply_rope_qk(qk, cos, sin, Hq)
    o2 = flash_attention(q, k, v, causal=True, backend="triton", **kv)
    (g2,) = torch.autograd.grad(o2, qkv, do)
    same = torch.equal if device.type == "cpu" else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    assert same(o, o2) and same(g, g2) and torch.isfinite(g).all()
    with pytest.raises(ValueError, match="qkv"):
        rope_attention_packed(qkv, cos, sin, Hq + 1, Hkv)


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


@pytest.mark.parametrize("ckpt", ["off", "recorded", "one-node"])
def test_fused_training_forward_matches_eager(ckpt, device, monkeypatch):
    """The training forward on the triton backend (fused add + RMSNorm and SwiGLU kernels with their backward,
    half RoPE tables, separate GEMMs) gives the eager torch-backend loss and the same gradient for every
    parameter, with left and right padding, without activation checkpointing and with both ways to recompute a
    layer (``checkpoint_layer``'s recorded graph, and the layer as one node: model/fused_layer.py); fp32."""
    monkeypatch.setenv("RLHF_ENGINE_FUSED_LAYER_NODE", "1" if ckpt == "one-node" else "0")
    from rlhf_engine.model import CausalLM, preset
    from rlhf_engine.model.logprobs import sequence_logprobs

    torch.manual_seed(0)
    ref = CausalLM(preset("tiny-qwen2")).to(device)
    with torch.no_grad():
        for p in ref.parameters():  # non-trivial norm weights and biases
            p.add_(0.05 * torch.randn_like(p))
    m = copy.deepcopy(ref)
    m.gradient_checkpointing = ref.gradient_checkpointing = ckpt != "off"
    B, T = 3, 11
    ids = torch.randint(3, m.config.vocab_size, (B, T), device=device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[1, :3] = 0  # left padding
    mask[2, -4:] = 0  # right padding
    w = torch.randn(B, T - 1, device=device)  # a grad_output that is not all ones
    from rlhf_engine.kernels import rmsnorm, swiglu

    calls = {"norm": 0, "silu": 0}
    for mod, cls, key in ((rmsnorm, "RMSNormFunction", "norm"), (swiglu, "SiluMulFunction", "silu"),
                          (swiglu, "SiluMulPackedFunction", "silu")):  # the packed one where gate/up are one GEMM
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
    # the path under test: autograd through 2 norms a layer and the final one, and one SwiGLU a layer; with
    # checkpointing the first forward runs without autograd (model/checkpointing.py) and the backward's recomputation
    # through these Functions; as one node a layer calls the kernels and their backward directly: the final norm only
    L = m.config.num_layers
    assert calls == ({"norm": 1, "silu": 0} if ckpt == "one-node" else {"norm": 2 * L + 1, "silu": L}), calls
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
