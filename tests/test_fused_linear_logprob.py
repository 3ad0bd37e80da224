"""Fused LM head + log-probs vs the fp64 reference (CPU: Triton interpreter, small shapes; big shapes: gpu)."""
import pytest
import torch

from rlhf_engine.kernels.fused_linear_logprob import FusedLinearLogprobsFunction, fused_linear_logprobs
from rlhf_engine.kernels.reference.logprob import linear_logprobs_reference


def _inputs(N, H, V, dtype, device, bias=True, n_ignore=3):
    hidden = torch.randn(N, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) * H**-0.5 * 3).to(dtype)
    b = torch.randn(V, device=device).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), device=device)
    targets[torch.randperm(N, device=device)[: min(n_ignore, N - 1)]] = -100
    return hidden, weight, b, targets


def _run(fn, hidden, weight, bias, targets, g, ge, with_entropy, **kw):
    """Outputs and grads (hidden, weight, bias) of ``fn`` on fresh leaf copies, upstream grads g / ge."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = fn(leaves[0], leaves[1], targets, leaves[2], with_entropy=with_entropy, **kw)
    logp, ent = out if with_entropy else (out, None)
    loss = (logp * g).sum() + ((ent * ge).sum() if with_entropy else 0)
    loss.backward()
    return logp, ent, [t.grad if t is not None else None for t in leaves]


def _ours(h, w, t, b, **kw):
    return fused_linear_logprobs(h, w, t, bias=b, backend="triton", **kw)


def _reference(h, w, t, b, temperature=1.0, with_entropy=False, **_):
    return linear_logprobs_reference(h, w, t, b, temperature, -100, with_entropy)


def _eager(h, w, t, b, temperature=1.0, with_entropy=False, **_):
    """What a user writes today in the compute dtype: matmul, then log_softmax in fp32."""
    logits = h @ w.T + (b if b is not None else 0)
    lp = torch.log_softmax(logits.float() / temperature, -1)
    keep = t != -100
    logp = lp.gather(-1, t.clamp_min(0)[:, None])[:, 0] * keep
    if not with_entropy:
        return logp
    return logp, -(lp.exp() * lp).sum(-1) * keep


def _assert_close(ours, ref, tol, name):
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours.double() - ref.double()).abs().max().item()
    bound = tol * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{name}: max err {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("N, H, V, temperature, with_entropy, bias, chunk_size", [
    (37, 48, 1000, 1.0, False, False, None),     # one chunk each way
    (37, 48, 1000, 0.7, True, True, 3000),       # forward 3 rows / chunk, backward 81 vocab / chunk
    (37, 48, 3001, 0.7, True, False, 40000),     # forward 13 rows, backward 1024 vocab (last chunk partial)
    (5, 16, 50257, 1.0, True, True, 2**18),      # large vocab, N tiny
])
def test_fp32_matches_reference(N, H, V, temperature, with_entropy, bias, chunk_size, device):
    hidden, weight, b, targets = _inputs(N, H, V, torch.float32, device, bias=bias)
    g, ge = torch.randn(N, device=device), torch.randn(N, device=device)
    kw = dict(temperature=temperature, chunk_size=chunk_size)
    logp, ent, grads = _run(_ours, hidden, weight, b, targets, g, ge, with_entropy, **kw)
    r_logp, r_ent, r_grads = _run(_reference, hidden, weight, b, targets, g, ge, with_entropy, **kw)
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    _assert_close(logp, r_logp, 1e-5, "logp")
    if with_entropy:
        _assert_close(ent, r_ent, 1e-5, "entropy")
    for ours, ref, name in zip(grads, r_grads, ("dhidden", "dweight", "dbias")):
        if ref is not None:
            assert ours.dtype == torch.float32
            _assert_close(ours, ref, 1e-5, name)
    ignored = targets == -100
    assert (logp[ignored] == 0).all() and (grads[0][ignored] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_within_2x_of_pytorch(dtype, device):
    """bf16/fp16 (CPU matmuls): error vs fp64 at most 2x that of the same computation in plain PyTorch."""
    N, H, V = 37, 48, 1000
    hidden, weight, b, targets = _inputs(N, H, V, dtype, device)
    g, ge = torch.randn(N, device=device), torch.randn(N, device=device)
    kw = dict(temperature=0.7, chunk_size=9000)
    ours = _run(_ours, hidden, weight, b, targets, g, ge, True, **kw)
    eager = _run(_eager, hidden, weight, b, targets, g, ge, True, **kw)
    ref = _run(_reference, hidden, weight, b, targets, g, ge, True, **kw)
    flat = lambda r: [r[0], r[1], *r[2]]  # noqa: E731
    for o, e, r, name in zip(flat(ours), flat(eager), flat(ref), ("logp", "entropy", "dhidden", "dweight", "dbias")):
        assert torch.isfinite(o).all(), name
        err_o = (o.double() - r).abs().max().item()
        err_e = (e.double() - r).abs().max().item()
        assert err_o <= 2 * err_e + 1e-6, f"{name}: ours {err_o:.3g} vs PyTorch {err_e:.3g}"


def test_deterministic_grads(device):
    N, H, V = 37, 48, 1000
    hidden, weight, b, targets = _inputs(N, H, V, torch.float32, device)
    g, ge = torch.randn(N, device=device), torch.randn(N, device=device)
    kw = dict(temperature=0.7, chunk_size=5000)
    a = _run(_ours, hidden, weight, b, targets, g, ge, True, **kw)
    c = _run(_ours, hidden, weight, b, targets, g, ge, True, **kw)
    for x, y in zip([a[0], a[1], *a[2]], [c[0], c[1], *c[2]]):
        assert torch.equal(x, y)


def test_tied_embedding_weight(device):
    """weight = an nn.Embedding's weight that also gets the gradient of the input lookup."""
    B, T, H, V = 3, 9, 32, 700
    emb = torch.nn.Embedding(V, H).to(device)
    proj = torch.nn.Linear(H, H).to(device)
    ids = torch.randint(0, V, (B, T), device=device)
    targets = ids[:, 1:].clone()
    targets[0, 2] = -100
    g = torch.randn(B, T - 1, device=device)
    grads = []
    for use_ours in (True, False):
        emb.zero_grad(), proj.zero_grad()
        hidden = torch.tanh(proj(emb(ids)))[:, :-1]                  # (B, T-1, H), non-contiguous view
        if use_ours:
            logp = fused_linear_logprobs(hidden, emb.weight, targets, temperature=0.7, chunk_size=2000,
                                         backend="triton")
        else:
            logp = linear_logprobs_reference(hidden, emb.weight, targets, None, 0.7, -100, False)
        assert logp.shape == (B, T - 1)
        (logp * g).sum().backward()
        grads.append((emb.weight.grad.clone(), proj.weight.grad.clone()))
    for ours, ref, name in zip(grads[0], grads[1], ("embedding", "proj")):
        _assert_close(ours, ref, 1e-5, name)


def test_frozen_weight_hidden_grad_only(device):
    N, H, V = 19, 24, 500
    hidden, weight, _, targets = _inputs(N, H, V, torch.float32, device, bias=False)
    h = hidden.clone().requires_grad_()
    fused_linear_logprobs(h, weight, targets, chunk_size=1500, backend="triton").sum().backward()
    h_ref = hidden.clone().requires_grad_()
    linear_logprobs_reference(h_ref, weight, targets).sum().backward()
    _assert_close(h.grad, h_ref.grad, 1e-5, "dhidden")
    assert weight.grad is None


def test_backends_agree(device):
    hidden, weight, b, targets = _inputs(11, 16, 300, torch.float32, device)
    a = fused_linear_logprobs(hidden, weight, targets, bias=b, backend="triton")
    r = fused_linear_logprobs(hidden, weight, targets, bias=b, backend="torch")
    auto = fused_linear_logprobs(hidden, weight, targets, bias=b)
    _assert_close(a, r, 1e-5, "triton vs torch")
    _assert_close(auto, r, 1e-5, "auto")


def test_input_validation(device):
    hidden, weight, b, targets = _inputs(4, 8, 30, torch.float32, device)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_logprobs(hidden, weight[:, :7], targets)
    with pytest.raises(TypeError, match="weight"):
        fused_linear_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_logprobs(hidden, weight, targets, bias=b[:5])
    with pytest.raises(ValueError, match="targets"):
        fused_linear_logprobs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_logprobs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(TypeError, match="targets"):
        fused_linear_logprobs(hidden, weight, targets.float())


def test_custom_op_autograd_and_opcheck(device):
    N, H, V = 7, 16, 200
    hidden, weight, b, targets = _inputs(N, H, V, torch.float32, device, n_ignore=1)
    g, ge = torch.randn(N, device=device), torch.randn(N, device=device)

    def via_op(h, w, t, bb, with_entropy, **_):
        logp, ent, _, _ = torch.ops.rlhf_engine.fused_linear_logprobs(h, w, t, bb, 0.7, -100, with_entropy, 1000)
        return logp, ent

    def via_fn(h, w, t, bb, with_entropy, **_):
        return FusedLinearLogprobsFunction.apply(h, w, t, bb, 0.7, -100, with_entropy, 1000)

    a = _run(via_op, hidden, weight, b, targets, g, ge, True)
    c = _run(via_fn, hidden, weight, b, targets, g, ge, True)
    for x, y in zip([a[0], a[1], *a[2]], [c[0], c[1], *c[2]]):
        assert torch.equal(x, y)
    for bb in (b, None):
        args = (hidden.clone().requires_grad_(), weight.clone().requires_grad_(), targets,
                bb.clone().requires_grad_() if bb is not None else None, 0.7, -100, True, 1000)
        torch.library.opcheck(torch.ops.rlhf_engine.fused_linear_logprobs.default, args)


def test_torch_compile_traces_custom_op(device):
    N, H, V = 6, 16, 300
    hidden, weight, b, targets = _inputs(N, H, V, torch.float32, device, n_ignore=1)

    def f(h, w, bb):
        logp, ent = fused_linear_logprobs(h, w, targets, bias=bb, with_entropy=True, chunk_size=1000,
                                          backend="triton")
        return (logp + 0.1 * ent).sum()

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves).backward()
    eager = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    f(*eager).backward()
    for x, y, name in zip(leaves, eager, ("dhidden", "dweight", "dbias")):
        _assert_close(x.grad, y.grad, 1e-6, name)


# ----------------------------------------------------------------------------- GPU: Qwen2.5-0.5B LM head shape
@pytest.mark.gpu
def test_gpu_qwen_shape_bf16_rule_memory_determinism():
    """N=8192, H=896, V=151936 bf16: 2x rule on logp/dH/dW (vs eager bf16), extra peak < 1 GB, bitwise repeatable."""
    N, H, V, dev = 8192, 896, 151936, "cuda"
    hidden, weight, _, targets = _inputs(N, H, V, torch.bfloat16, dev, bias=False, n_ignore=100)
    g = torch.randn(N, device=dev)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    (fused_linear_logprobs(h, w, targets) * g).sum().backward()   # extra peak includes the new dW and dH
    torch.cuda.synchronize()
    extra_gb = (torch.cuda.max_memory_allocated() - base) / 2**30
    assert extra_gb < 1.0, f"extra peak {extra_gb:.2f} GB"
    ours = _run(_ours, hidden, weight, None, targets, g, None, False)
    assert torch.equal(ours[2][0], h.grad) and torch.equal(ours[2][1], w.grad), "not deterministic"
    del h, w
    eager = _run(_eager, hidden, weight, None, targets, g, None, False)
    # fp64 references: logp and dH on a row subset, dW over all rows in row chunks (the full fp64 logits are 10 GB).
    rows = torch.arange(0, N, 61, device=dev)
    w64 = weight.double()
    r_h = hidden[rows].double().requires_grad_()
    r_logp = linear_logprobs_reference(r_h, w64, targets[rows])
    (r_logp * g[rows]).sum().backward()
    r_dw = torch.zeros(V, H, dtype=torch.float64, device=dev)
    for i0 in range(0, N, 512):
        h_c, t_c = hidden[i0:i0 + 512].double(), targets[i0:i0 + 512]
        g_c = g[i0:i0 + 512].double() * (t_c != -100)
        dz = -torch.softmax(h_c @ w64.T, -1) * g_c[:, None]         # g (onehot − p)
        dz.scatter_add_(1, t_c.clamp_min(0)[:, None], g_c[:, None])
        r_dw += dz.T @ h_c
        del dz
    checks = [(ours[0][rows], eager[0][rows], r_logp, "logp"),
              (ours[2][0][rows], eager[2][0][rows], r_h.grad, "dhidden"),
              (ours[2][1], eager[2][1], r_dw, "dweight")]
    for o, e, r, name in checks:
        err_o = (o.double() - r).abs().max().item()
        err_e = (e.double() - r).abs().max().item()
        assert torch.isfinite(o).all() and err_o <= 2 * err_e + 1e-6, f"{name}: ours {err_o:.3g} vs eager {err_e:.3g}"


def test_entropy_kept_as_a_metric_does_not_change_grads(device):
    """Entropy computed but not differentiated (a metric): its gradient arrives as None and the
    hidden/weight gradients equal those of the log-prob alone."""
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(29, 40, generator=g).to(device).requires_grad_()
    weight = (torch.randn(1003, 40, generator=g) * 0.2).to(device).requires_grad_()
    targets = torch.randint(0, 1003, (29,), generator=g).to(device)
    gout = torch.randn(29, generator=g).to(device)
    logp, ent = fused_linear_logprobs(hidden, weight, targets, with_entropy=True, chunk_size=1500, backend="triton")
    dh1, dw1 = torch.autograd.grad((logp * gout).sum(), [hidden, weight])
    logp2 = fused_linear_logprobs(hidden, weight, targets, chunk_size=1500, backend="triton")
    dh2, dw2 = torch.autograd.grad((logp2 * gout).sum(), [hidden, weight])
    assert torch.isfinite(ent).all()
    torch.testing.assert_close(dh1, dh2)
    torch.testing.assert_close(dw1, dw2)


def test_addmm_f32_accumulates_in_fp32(device, record_value):
    """dH accumulation of the backward: fp32 += bf16 @ bf16 with the fp32 accumulator: in place through
    addmm(out_dtype=, out=acc) where the device's probe accepts it (on a GPU; the run records which path it
    took), mm_f32 + add elsewhere; fp32 operands: plain addmm_. Checked against fp64 on the test device."""
    from rlhf_engine.kernels.fused_linear_logprob import _addmm_out_dtype_ok, addmm_f32_

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(9, 33, generator=g), torch.randn(33, 5, generator=g)
    for dt in (torch.bfloat16, torch.float32):
        acc = torch.randn(9, 5, generator=g)
        want = acc.double() + a.to(dt).double() @ b.to(dt).double()
        acc = acc.to(device)
        addmm_f32_(acc, a.to(dt).to(device), b.to(dt).to(device))
        assert acc.dtype == torch.float32
        torch.testing.assert_close(acc.double().cpu(), want, rtol=1e-5, atol=1e-5)
    in_place = _addmm_out_dtype_ok(device.type, torch.bfloat16)
    record_value("addmm(out_dtype=fp32, out=acc) used for dH (bf16)", in_place)
    if device.type == "cpu":
        assert in_place is False  # the overload is CUDA-only: the probe says so
