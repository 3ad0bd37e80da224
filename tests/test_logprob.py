"""Token log-probs (+ entropy) from logits: Triton kernels vs the fp64 reference.

CPU runs use the Triton interpreter (small shapes); big shapes and the bf16 2x rule are ``gpu`` tests.
"""
import pytest
import torch

from rlhf_engine.kernels.logprob import (
    TokenLogprobsFunction,
    token_logprobs,
    token_logprobs_backward,
    token_logprobs_forward,
)
from rlhf_engine.kernels.reference.logprob import logprobs_reference

# Gradient tolerance (relative to max(1, |ref|)): fp32 arithmetic, or one rounding to the logits dtype.
EPS = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _inputs(N, V, dtype, device, scale=3.0, n_ignore=3):
    logits = (torch.randn(N, V, device=device) * scale).to(dtype)
    targets = torch.randint(0, V, (N,), device=device)
    targets[torch.randperm(N, device=device)[: min(n_ignore, N - 1)]] = -100
    return logits, targets


def _ref(logits, targets, temperature, with_entropy, g, ge):
    """fp64 reference outputs and dlogits for upstream grads g (logp) and ge (entropy)."""
    x = logits.detach().double().requires_grad_()
    out = logprobs_reference(x, targets, temperature, -100, with_entropy)
    logp, ent = out if with_entropy else (out, None)
    loss = (logp * g.double()).sum() + ((ent * ge.double()).sum() if with_entropy else 0)
    loss.backward()
    return logp, ent, x.grad


def _assert_close(ours, ref, tol, name):
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    ours, ref = ours.double(), ref.double()
    err = (ours - ref).abs().max().item()
    bound = tol * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{name}: max err {err:.3g} > {bound:.3g}"


CASES = [  # (N, V, dtype, temperature, with_entropy)
    (37, 1000, torch.float32, 1.0, False),
    (37, 1000, torch.float32, 0.7, True),
    (37, 3001, torch.float16, 0.7, True),
    (37, 3001, torch.float16, 1.0, False),
    (37, 1000, torch.bfloat16, 0.7, True),
    (3, 50257, torch.bfloat16, 1.0, True),
]


@pytest.mark.parametrize("N, V, dtype, temperature, with_entropy", CASES)
def test_matches_reference(N, V, dtype, temperature, with_entropy, device):
    logits, targets = _inputs(N, V, dtype, device)
    g, ge = torch.randn(N, device=device), torch.randn(N, device=device)
    x = logits.clone().requires_grad_()
    out = token_logprobs(x, targets, temperature=temperature, with_entropy=with_entropy, backend="triton")
    logp, ent = out if with_entropy else (out, None)
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    loss = (logp * g).sum() + ((ent * ge).sum() if with_entropy else 0)
    loss.backward()
    r_logp, r_ent, r_grad = _ref(logits, targets, temperature, with_entropy, g, ge)
    _assert_close(logp, r_logp, 1e-6, "logp")
    if with_entropy:
        _assert_close(ent, r_ent, 1e-6, "entropy")
    assert x.grad.dtype == dtype
    _assert_close(x.grad, r_grad, EPS[dtype], "dlogits")
    ignored = targets == -100
    assert (logp[ignored] == 0).all() and (x.grad[ignored] == 0).all()
    if with_entropy:
        assert (ent[ignored] == 0).all()


@pytest.mark.parametrize("with_entropy", [False, True])
def test_multi_chunk_online_softmax(with_entropy, device):
    """block_v=128 over V=1000: 8 chunks, exercising the running-max rescale; plus a column offset."""
    N, V, T = 9, 1000, 0.7
    logits, targets = _inputs(N, V, torch.float32, device, scale=8.0, n_ignore=1)
    logits[0, 900:] += 40.0  # the row max arrives in the last chunk
    logp, ent, lse, pz = token_logprobs_forward(logits, targets, T, -100, with_entropy, block_v=128)
    g, ge = torch.randn(N, device=device), torch.randn(N, device=device)
    r_logp, r_ent, r_grad = _ref(logits, targets, T, with_entropy, g, ge)
    _assert_close(logp, r_logp, 1e-6, "logp")
    if with_entropy:
        _assert_close(ent, r_ent, 1e-6, "entropy")
    d = token_logprobs_backward(logits, targets, lse, pz if with_entropy else None, g,
                                ge if with_entropy else None, T, -100, block_v=128)
    _assert_close(d, r_grad, 1e-5, "dlogits")
    # A block of vocab columns [300, 700) with col_offset gives the same columns of dlogits.
    blk = logits[:, 300:700].contiguous()
    d_blk = token_logprobs_backward(blk, targets, lse, pz if with_entropy else None, g,
                                    ge if with_entropy else None, T, -100, col_offset=300, block_v=128)
    _assert_close(d_blk, r_grad[:, 300:700], 1e-5, "dlogits block")


def test_strided_3d_view_and_int32_targets(device):
    """logits[:, :-1] is read in place (no copy); the gradient lands in the right positions."""
    B, T, V = 3, 6, 700
    full = (torch.randn(B, T, V, device=device) * 2).requires_grad_()
    ids = torch.randint(0, V, (B, T), device=device, dtype=torch.int32)
    ids[1, 3] = -100
    logits, targets = full[:, :-1], ids[:, 1:]
    assert not logits.is_contiguous()
    logp, ent = token_logprobs(logits, targets, temperature=0.7, with_entropy=True, backend="triton")
    assert logp.shape == (B, T - 1)
    g, ge = torch.randn(B, T - 1, device=device), torch.randn(B, T - 1, device=device)
    ((logp * g).sum() + (ent * ge).sum()).backward()
    ref = full.detach().double().requires_grad_()
    r_logp, r_ent = logprobs_reference(ref[:, :-1], targets, 0.7, -100, True)
    ((r_logp * g).sum() + (r_ent * ge).sum()).backward()
    _assert_close(logp, r_logp, 1e-6, "logp")
    _assert_close(ent, r_ent, 1e-6, "entropy")
    _assert_close(full.grad, ref.grad, 1e-5, "dlogits")
    assert (full.grad[:, -1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(dtype, device):
    N, V = 23, 900
    base, targets = _inputs(N, V, dtype, device)
    g, ge = torch.randn(N, device=device), torch.randn(N, device=device)
    grads = []
    for inplace in (False, True):
        leaf = base.clone().requires_grad_()
        logits = leaf * 1.0  # a non-leaf the trainer owns
        logp, ent = token_logprobs(logits, targets, temperature=0.7, with_entropy=True,
                                   inplace_backward=inplace, backend="triton")
        ((logp * g).sum() + (ent * ge).sum()).backward()
        grads.append(leaf.grad)
        if inplace:  # the logits buffer now holds dlogits
            assert torch.equal(logits.detach(), leaf.grad)
    assert torch.equal(grads[0], grads[1])


def test_entropy_only_gradient(device):
    N, V = 11, 600
    logits, targets = _inputs(N, V, torch.float32, device)
    x = logits.clone().requires_grad_()
    _, ent = token_logprobs(x, targets, with_entropy=True, backend="triton")
    ge = torch.randn(N, device=device)
    (ent * ge).sum().backward()
    _, _, r_grad = _ref(logits, targets, 1.0, True, torch.zeros(N, device=device), ge)
    _assert_close(x.grad, r_grad, 1e-5, "dlogits")


def test_backends_agree_and_auto(device):
    logits, targets = _inputs(13, 500, torch.float32, device)
    a = token_logprobs(logits, targets, temperature=0.7, backend="triton")
    b = token_logprobs(logits, targets, temperature=0.7, backend="torch")
    c = token_logprobs(logits, targets, temperature=0.7)  # auto
    assert b.dtype == torch.float32
    _assert_close(a, b, 1e-6, "triton vs torch")
    _assert_close(c, b, 1e-6, "auto")


def test_out_of_range_target_gives_nan_on_a_gpu_and_an_error_on_the_cpu(device):
    logits, targets = _inputs(4, 300, torch.float32, device, n_ignore=0)
    targets[2] = 300
    if targets.device.type == "cpu":  # checked where it costs no device sync
        with pytest.raises(ValueError, match="targets: expected ids in"):
            token_logprobs(logits, targets, backend="triton")
        return
    logp = token_logprobs(logits, targets, backend="triton")
    assert torch.isnan(logp[2]) and torch.isfinite(logp[[0, 1, 3]]).all()


def test_empty_input(device):
    logits = torch.randn(0, 50, device=device, requires_grad=True)
    logp = token_logprobs(logits, torch.zeros(0, dtype=torch.long, device=device), backend="triton")
    logp.sum().backward()
    assert logp.shape == (0,) and logits.grad.shape == (0, 50)


def test_input_validation(device):
    logits, targets = _inputs(4, 30, torch.float32, device)
    with pytest.raises(TypeError, match="logits"):
        token_logprobs(logits.long(), targets)
    with pytest.raises(TypeError, match="targets"):
        token_logprobs(logits, targets.float())
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(logits, targets[:3])
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        token_logprobs(logits, targets, backend="cuda")


def test_custom_op_autograd_and_opcheck(device):
    """The custom op (used under torch.compile) agrees with the autograd.Function; opcheck passes."""
    N, V = 7, 200
    logits, targets = _inputs(N, V, torch.float32, device, n_ignore=1)
    g, ge = torch.randn(N, device=device), torch.randn(N, device=device)
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    logp, ent, lse, pz = torch.ops.rlhf_engine.token_logprobs(x1, targets, 0.7, -100, True)
    assert not lse.requires_grad and not pz.requires_grad
    ((logp * g).sum() + (ent * ge).sum()).backward()
    logp2, ent2 = TokenLogprobsFunction.apply(x2, targets, 0.7, -100, True, False)
    ((logp2 * g).sum() + (ent2 * ge).sum()).backward()
    assert torch.equal(logp, logp2) and torch.equal(ent, ent2) and torch.equal(x1.grad, x2.grad)
    for with_entropy in (False, True):
        torch.library.opcheck(torch.ops.rlhf_engine.token_logprobs.default,
                              (logits.clone().requires_grad_(), targets, 0.7, -100, with_entropy))


def test_torch_compile_traces_custom_op(device):
    N, V = 5, 300
    logits, targets = _inputs(N, V, torch.float32, device, n_ignore=1)

    def f(x, t):
        logp, ent = token_logprobs(x, t, temperature=0.7, with_entropy=True, backend="triton")
        return (logp + 0.1 * ent).sum()

    x = logits.clone().requires_grad_()
    torch.compile(f, backend="aot_eager", fullgraph=True)(x, targets).backward()
    y = logits.clone().requires_grad_()
    f(y, targets).backward()
    _assert_close(x.grad, y.grad, 1e-6, "compiled grad")


# ----------------------------------------------------------------------------- GPU: big shapes, bf16 rule
@pytest.mark.gpu
@pytest.mark.parametrize("V", [49152, 50257, 128256, 151936])
def test_gpu_bf16_rule(V, record_value):
    """Error vs fp64 is at most 2x PyTorch's own bf16 error (log_softmax in bf16; grad rounded to bf16)."""
    N, dev = 512, "cuda"
    logits, targets = _inputs(N, V, torch.bfloat16, dev, scale=4.0, n_ignore=7)
    g, ge = torch.randn(N, device=dev), torch.randn(N, device=dev)
    x = logits.clone().requires_grad_()
    logp, ent = token_logprobs(x, targets, temperature=0.7, with_entropy=True)
    ((logp * g).sum() + (ent * ge).sum()).backward()
    r_logp, r_ent, r_grad = _ref(logits, targets, 0.7, True, g, ge)
    keep = targets != -100
    y = logits.clone().requires_grad_()  # PyTorch in bf16
    t_lp = torch.log_softmax(y / 0.7, -1)
    t_logp = t_lp.gather(-1, targets.clamp_min(0)[:, None])[:, 0]
    t_ent = -(t_lp.exp() * t_lp).sum(-1)
    ((t_logp.float() * g * keep).sum() + (t_ent.float() * ge * keep).sum()).backward()
    for ours, theirs, ref, name in [(logp, t_logp, r_logp, "logp"), (ent, t_ent, r_ent, "entropy"),
                                    (x.grad, y.grad, r_grad, "dlogits")]:
        ours, theirs = ours.double()[keep], theirs.double()[keep]
        e_ours = (ours - ref[keep]).abs().max().item()
        e_torch = (theirs - ref[keep]).abs().max().item()
        record_value(f"bf16 {name}: max err ours / PyTorch's", e_ours / max(e_torch, 1e-30))
        assert torch.isfinite(ours).all() and e_ours <= 2 * e_torch + 1e-6, f"{name}: {e_ours} vs torch {e_torch}"


@pytest.mark.gpu
def test_gpu_large_n_int64_offsets():
    """N·V > 2^31 elements: rows past the int32 range are addressed correctly (checked on sampled rows)."""
    N, V, dev = 16384, 151936, "cuda"
    logits = torch.randn(N, V, device=dev, dtype=torch.bfloat16)
    targets = torch.randint(0, V, (N,), device=dev)
    logp, ent = token_logprobs(logits, targets, with_entropy=True)
    rows = torch.tensor([0, 1, 8191, 14134, 14135, N - 1], device=dev)  # 14135·V > 2^31
    r_logp, r_ent = logprobs_reference(logits[rows], targets[rows], 1.0, -100, True)
    _assert_close(logp[rows], r_logp, 1e-5, "logp")
    _assert_close(ent[rows], r_ent, 1e-5, "entropy")
    _, _, r_grad = _ref(logits[rows], targets[rows], 1.0, False,
                        torch.ones(len(rows), device=dev), torch.zeros(len(rows), device=dev))
    x = logits.requires_grad_()
    logp = token_logprobs(x, targets, inplace_backward=True)  # destroys the logits buffer
    logp.sum().backward()
    # x is a leaf, so its .grad holds dlogits even though the buffer was overwritten.
    _assert_close(x.grad[rows], r_grad, EPS[torch.bfloat16], "dlogits")
