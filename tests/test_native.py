"""The native ops (rlhf_engine._C via rlhf_engine.kernels.native) against the PyTorch references.

GAE: rlhf_engine.algo.gae_reference; PPO loss: rlhf_engine.algo.ppo_loss_reference (values,
metrics, and gradients against autograd of the reference). CPU cases run here; the same cases on
CUDA are marked ``gpu``.

Tolerances. fp64: 1e-7 relative / 1e-8 absolute (the ops compute the same formulas in the same
dtype; only summation order differs). fp32: the error against the fp64 reference must be at most
twice the fp32 reference's own error plus 1e-6 of the output's scale (the flash-attention rule):
the CPU ops follow the reference's operation order (GAE) or sum in double (PPO), the CUDA GAE
reassociates the recursion into a scan, whose rounding error is of the same O(T eps) order.
"""
import pytest
import torch

from rlhf_engine.algo import gae_reference, ppo_loss_reference
from rlhf_engine.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason="rlhf_engine._C is not built")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float64, torch.float32]


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """One intra-op thread (torch's and our OpenMP loops share it): on a busy 2-core machine a
    2-thread OpenMP barrier waits for the scheduler at every op, which makes the Python-loop
    references 10-100x slower. Multi-threaded runs are covered by test_cpu_threads_agree."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _assert_matches(out, ref64, ref32=None, name="", slack=0.0):
    """fp64: tight; fp32: at most 2x the fp32 reference's error vs fp64 (+1e-6 of the scale, + slack)."""
    assert out is not None and ref64 is not None, name
    out, ref64 = out.detach().cpu(), ref64.detach().cpu().double()
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    if out.dtype == torch.float64:
        torch.testing.assert_close(out, ref64, rtol=1e-7, atol=1e-8, msg=lambda m: f"{name}: {m}")
        return
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    ref_err = (ref32.detach().cpu().double() - ref64).abs().max().item() if out.numel() else 0.0
    bound = 2 * ref_err + 1e-6 * (1 + ref64.abs().max().item() if out.numel() else 1) + slack
    assert err <= bound, f"{name}: fp32 error {err:.3g} > bound {bound:.3g} (reference fp32 error {ref_err:.3g})"


def _mask(B: int, T: int, holes: bool, seed: int = 1) -> torch.Tensor:
    """(B, T) bool: right-padded rows of random length (row 0 empty, row 1 full, one left-padded row),
    with interior holes when ``holes``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = 0, T
    m = torch.arange(T)[None, :] < lengths[:, None]
    if B > 3:
        m[3] = torch.arange(T) >= T // 3  # left padding
    if holes:
        m &= torch.rand(B, T, generator=g) > 0.15
    return m


# ----------------------------------------------------------------------------- GAE

def _gae_case(B, T, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    lv = torch.randn(B, generator=g, dtype=torch.float64)
    m = _mask(B, T, holes=True, seed=seed + 1)  # holes: "zero" runs the plain recursion through them
    ga = torch.randn(B, T, generator=g, dtype=torch.float64)
    gr = torch.randn(B, T, generator=g, dtype=torch.float64)
    to = lambda x, dt: x.to(device=device, dtype=dt)  # noqa: E731
    return {dt: (to(r, dt), to(v, dt), to(lv, dt), m.to(device), to(ga, dt), to(gr, dt))
            for dt in {dtype, torch.float64}}


def _gae_with_grads(fn, r, v, lv, m, ga, gr):
    r, v = r.clone().requires_grad_(), v.clone().requires_grad_()
    lv = None if lv is None else lv.clone().requires_grad_()
    adv, ret = fn(r, v, m, lv)
    inputs = [r, v] + ([lv] if lv is not None else [])
    grads = torch.autograd.grad((adv, ret), inputs, (ga, gr))
    return (adv, ret, *grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["zero", "carry"])
def test_gae_matches_reference(device, dtype, mode):
    B, T = 37, 1025
    data = _gae_case(B, T, dtype, device)
    for gamma, lam, use_lv in ((1.0, 1.0, False), (0.99, 0.95, True), (0.9, 0.0, True)):
        def run(d, f):
            r, v, lv, m, ga, gr = data[d]
            return _gae_with_grads(f, r, v, lv if use_lv else None, m, ga, gr)

        ours = run(dtype, lambda r, v, m, lv: native.gae(r, v, m, lv, gamma=gamma, lam=lam, carry=mode == "carry"))
        ref = lambda r, v, m, lv: gae_reference(r, v, m, gamma=gamma, lam=lam, mask_mode=mode, last_value=lv)  # noqa
        ref64 = run(torch.float64, ref)
        ref32 = run(dtype, ref) if dtype != torch.float64 else None
        names = ["advantages", "returns", "d_rewards", "d_values", "d_last_value"]
        for i, (o, r64) in enumerate(zip(ours, ref64)):
            _assert_matches(o, r64, None if ref32 is None else ref32[i], f"{names[i]} ({gamma}, {lam})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["zero", "carry"])
def test_gae_gradcheck(device, mode):
    B, T = 4, 9
    g = torch.Generator().manual_seed(3)
    r = torch.randn(B, T, generator=g, dtype=torch.float64).to(device).requires_grad_()
    v = torch.randn(B, T, generator=g, dtype=torch.float64).to(device).requires_grad_()
    lv = torch.randn(B, generator=g, dtype=torch.float64).to(device).requires_grad_()
    m = _mask(B, T, holes=True, seed=5).to(device)
    fn = lambda r, v, lv: native.gae(r, v, m, lv, gamma=0.9, lam=0.8, carry=mode == "carry")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (r, v, lv))


@pytest.mark.parametrize("device", DEVICES)
def test_gae_mask_dtypes_and_edges(device):
    B, T = 5, 11
    r, v = torch.randn(B, T, device=device), torch.randn(B, T, device=device)
    m = _mask(B, T, holes=True).to(device)
    base = native.gae(r, v, m, gamma=0.95, lam=0.9, carry=True)
    # float/long/uint8 masks, and non-contiguous ones (transposed storage, as from a .t() of a (T, B) mask)
    for mm in (m.float(), m.long(), m.to(torch.uint8), m.float().t().contiguous().t(), m.t().contiguous().t()):
        for a, b in zip(base, native.gae(r, v, mm, gamma=0.95, lam=0.9, carry=True)):
            assert torch.equal(a, b)
    for shape in ((0, 7), (3, 0)):  # empty batch / empty rows
        z = torch.zeros(shape, device=device, requires_grad=True)
        lv = torch.ones(shape[0], device=device, requires_grad=True)
        adv, ret = native.gae(z, z, torch.ones(shape, device=device), lv)
        assert adv.shape == shape and ret.shape == shape
        (adv.sum() + ret.sum()).backward()
        assert torch.equal(lv.grad, torch.zeros_like(lv))


# ----------------------------------------------------------------------------- PPO loss

def _ppo_inputs(B, T, device, seed=0):
    """fp64 CPU inputs with some extremes: log-ratios past the +-20 clamp, KL estimates past +-10."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    logp = -rn(B, T).abs() - 0.1
    old = logp + 0.3 * rn(B, T)
    old[2, :5] = logp[2, :5] + torch.tensor([25.0, -25.0, 20.5, -19.5, 0.0])
    ref = logp + 0.5 * rn(B, T)
    ref[4, :4] = logp[4, :4] + torch.tensor([30.0, -30.0, 4.0, -4.0])
    adv = rn(B, T)
    adv[B - 1, :10] = 0.0  # pg1 == pg2: the tie rule of torch.maximum
    mask = _mask(B, T, holes=True, seed=seed + 7)
    if T >= 5:
        mask[2, :5] = mask[4, :4] = True  # the extremes above are valid tokens
    values = rn(B, T)
    return dict(logp=logp, old_logp=old, advantages=adv, mask=mask,
                values=values, old_values=values + 0.3 * rn(B, T), returns=rn(B, T), ref_logp=ref,
                entropy=rn(B, T).abs())


PPO_CASES = [
    dict(),
    dict(critic=True, agg="seq-mean-token-mean"),
    dict(critic=True, value_clip=None, dual_clip=3.0, agg="seq-mean-token-sum"),
    dict(critic=True, clip_high=0.28, agg="seq-mean-token-sum-norm", max_len=2000, num_seqs=40),
    dict(entropy=True, ent_coef=0.01, ref=True, kl_coef=0.1, kl_kind="k1", agg="seq-mean-token-mean"),
    dict(critic=True, ref=True, kl_coef=0.05, kl_kind="k2", num_tokens=20000, num_seqs=50, agg="seq-mean-token-mean"),
    dict(critic=True, entropy=True, ref=True, kl_coef=0.2, ent_coef=0.02, dual_clip=2.0, clip_low=0.1,
         clip_high=0.3, num_tokens="tensor", num_seqs="tensor", agg="seq-mean-token-sum"),
    dict(critic=True, entropy=True, ref=True, value_clip=0.5, vf_coef=1.0, num_tokens="tensor", agg="token-mean"),
]


def _ppo_kwargs(case, data, dtype, device):
    case = dict(case)
    conv = lambda k: data[k].to(device=device, dtype=dtype)  # noqa: E731
    kw = {}
    if case.pop("critic", False):
        kw.update(values=conv("values"), old_values=conv("old_values"), returns=conv("returns"))
    if case.pop("entropy", False):
        kw["entropy"] = conv("entropy")
    if case.pop("ref", False):
        kw["ref_logp"] = conv("ref_logp")
    for key, val in (("num_tokens", 20000.0), ("num_seqs", 33.0)):
        if case.get(key) == "tensor":
            case[key] = torch.tensor(val, device=device)
    kw.update(case)
    args = (conv("logp"), conv("old_logp"), conv("advantages"), data["mask"].to(device))
    return args, kw


def _ppo_run(fn, args, kw, grad_out):
    """loss, metrics, and the gradients w.r.t. logp / values / entropy for d loss = grad_out."""
    logp = args[0].clone().requires_grad_()
    kw = dict(kw)
    wrt = [logp]
    for k in ("values", "entropy"):
        if k in kw:
            kw[k] = kw[k].clone().requires_grad_()
            wrt.append(kw[k])
    loss, metrics = fn(logp, *args[1:], **kw)
    grads = torch.autograd.grad(loss, wrt, torch.tensor(grad_out, dtype=loss.dtype, device=loss.device))
    return loss, metrics, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(PPO_CASES)))
def test_ppo_loss_matches_reference(device, dtype, case):
    data = _ppo_inputs(37, 1025, device)
    args, kw = _ppo_kwargs(PPO_CASES[case], data, dtype, device)
    args64, kw64 = _ppo_kwargs(PPO_CASES[case], data, torch.float64, device)
    loss, metrics, grads = _ppo_run(native.ppo_loss, args, kw, 1.7)
    ref64 = _ppo_run(ppo_loss_reference, args64, kw64, 1.7)
    ref32 = _ppo_run(ppo_loss_reference, args, kw, 1.7) if dtype != torch.float64 else (None, {}, [None] * 3)
    assert loss.dtype == dtype and loss.dim() == 0 and loss.requires_grad
    assert set(metrics) == set(ref64[1])
    _assert_matches(loss, ref64[0], ref32[0], "loss")
    for k in metrics:
        assert metrics[k].dim() == 0 and not metrics[k].requires_grad
        # A clip decision of a token within an ulp of the boundary may flip in fp32 (another exp):
        # allow two tokens (of the 16386 valid ones, or of the num_tokens given) in the fraction.
        _assert_matches(metrics[k], ref64[1][k], ref32[1].get(k), k, slack=2 / 16386 if "clip_frac" in k else 0.0)
    for i, (gr, r64, r32) in enumerate(zip(grads, ref64[2], ref32[2])):
        _assert_matches(gr, r64, r32, f"grad {i}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(PPO_CASES)))
def test_ppo_loss_with_grads_matches(device, dtype, case):
    """ppo_loss_with_grads: the fp64 reference's loss, metrics and gradients of grad_scale * loss, and bit for bit
    what the autograd op gives for grad_output = grad_scale (1.75: exact in fp32, as the op's grad_output is)."""
    data = _ppo_inputs(37, 1025, device)
    args, kw = _ppo_kwargs(PPO_CASES[case], data, dtype, device)
    args64, kw64 = _ppo_kwargs(PPO_CASES[case], data, torch.float64, device)
    loss, metrics, grads = native.ppo_loss_with_grads(*args, **kw, grad_scale=1.75)
    op = _ppo_run(native.ppo_loss, args, kw, 1.75)
    ref64 = _ppo_run(ppo_loss_reference, args64, kw64, 1.75)
    ref32 = _ppo_run(ppo_loss_reference, args, kw, 1.75) if dtype != torch.float64 else (None, {}, [None] * 3)
    assert loss.dtype == dtype and loss.dim() == 0 and not loss.requires_grad
    assert set(metrics) == set(ref64[1]) and len(metrics) == len(ref64[1])
    assert list(grads) == ["logp"] + [k for k in ("values", "entropy") if k in kw]
    assert torch.equal(loss, op[0].detach())
    for k in metrics:
        assert metrics[k].dim() == 0 and torch.equal(metrics[k], op[1][k]), k
    for k, g, g_op in zip(grads, grads.values(), op[2]):
        assert g.shape == args[0].shape and g.dtype == dtype and torch.equal(g, g_op), k
    _assert_matches(loss, ref64[0], ref32[0], "loss")
    for i, (g, r64, r32) in enumerate(zip(grads.values(), ref64[2], ref32[2])):
        _assert_matches(g, r64, r32, f"grad {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_ppo_loss_with_grads_layouts_and_edges(device):
    """Non-contiguous inputs (two of them: copies made for the call must all stay alive until the op has run),
    masks of any dtype or layout, and empty batches / rows."""
    data = _ppo_inputs(9, 40, device)
    args, kw = _ppo_kwargs(PPO_CASES[6], data, torch.float32, device)
    base = native.ppo_loss_with_grads(*args, **kw, grad_scale=0.5)
    nc = lambda x: x.t().contiguous().t()  # noqa: E731 - same values, transposed storage
    m = args[3]
    variants = [
        ((nc(args[0]), nc(args[1]), nc(args[2]), m), dict(kw, returns=nc(kw["returns"]))),
        ((*args[:3], m.float()), kw), ((*args[:3], m.to(torch.uint8)), kw), ((*args[:3], nc(m)), kw),
        ((*args[:3], nc(m.long())), kw),
    ]
    for a, k in variants:
        loss, metrics, grads = native.ppo_loss_with_grads(*a, **k, grad_scale=0.5)
        assert torch.equal(loss, base[0]) and all(torch.equal(metrics[n], base[1][n]) for n in metrics)
        assert all(torch.equal(g, base[2][n]) and g.is_contiguous() for n, g in grads.items())
    for shape in ((0, 7), (3, 0)):
        z, ones = torch.zeros(shape, device=device), torch.ones(shape, device=device)
        loss, metrics, grads = native.ppo_loss_with_grads(z, z, z, ones, values=z, old_values=z, returns=z)
        assert loss.item() == 0.0 and all(v.item() == 0.0 for v in metrics.values())
        assert grads["logp"].shape == shape and grads["values"].shape == shape


@pytest.mark.parametrize("device", DEVICES)
def test_ppo_loss_gradcheck(device):
    data = _ppo_inputs(5, 7, "cpu", seed=3)
    data["old_logp"][2, :5] = data["logp"][2, :5] + 0.2  # keep finite differences away from the +-20 clamp
    data["ref_logp"][4, :4] = data["logp"][4, :4] + 0.3
    args, kw = _ppo_kwargs(dict(critic=True, entropy=True, ref=True, kl_coef=0.1, ent_coef=0.05, dual_clip=3.0,
                                agg="seq-mean-token-mean"), data, torch.float64, device)
    lp = args[0].clone().requires_grad_()
    v, h = kw.pop("values").clone().requires_grad_(), kw.pop("entropy").clone().requires_grad_()
    fn = lambda lp, v, h: native.ppo_loss(lp, *args[1:], values=v, entropy=h, **kw)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (lp, v, h))


@pytest.mark.parametrize("device", DEVICES)
def test_ppo_loss_no_grad_and_retain_graph(device):
    data = _ppo_inputs(6, 33, device)
    args, kw = _ppo_kwargs(dict(critic=True), data, torch.float64, device)
    with torch.no_grad():
        loss0, _ = native.ppo_loss(*args, **kw)
    logp = args[0].clone().requires_grad_()
    loss, _ = native.ppo_loss(logp, *args[1:], **kw)
    assert torch.equal(loss0, loss.detach())
    g1 = torch.autograd.grad(loss, logp, retain_graph=True)[0]
    g2 = torch.autograd.grad(loss, logp)[0]
    assert torch.equal(g1, g2)


def test_cpu_threads_agree():
    """OpenMP over rows: any thread count gives bitwise the same result (rows are independent and
    the cross-row reduction is sequential)."""
    data = _ppo_inputs(37, 257, "cpu")
    args, kw = _ppo_kwargs(PPO_CASES[6], data, torch.float32, "cpu")
    outs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            loss, metrics, grads = _ppo_run(native.ppo_loss, args, kw, 0.5)
            adv, ret = native.gae(args[0], args[2], args[3], gamma=0.9, lam=0.7, carry=True)
        finally:
            torch.set_num_threads(1)
        outs.append([loss, *metrics.values(), *grads, adv, ret])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_algo_backends_use_native():
    """rlhf_engine.algo.gae / ppo_loss with backend="cpp" route here and agree with the reference."""
    from rlhf_engine.algo import gae, ppo_loss

    data = _ppo_inputs(7, 40, "cpu")
    m = data["mask"]
    a1 = gae(data["returns"], data["values"], m, gamma=0.99, lam=0.95, mask_mode="carry", backend="cpp")
    a2 = gae(data["returns"], data["values"], m, gamma=0.99, lam=0.95, mask_mode="carry", backend="torch")
    torch.testing.assert_close(a1, a2, rtol=1e-12, atol=1e-12)
    args, kw = _ppo_kwargs(dict(critic=True, ref=True, kl_coef=0.1), data, torch.float64, "cpu")
    l1, _ = ppo_loss(*args, **kw, backend="cpp")
    l2, _ = ppo_loss(*args, **kw, backend="torch")
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- bad inputs

def test_gae_bad_inputs():
    r, v, m = torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(3, 4)
    cases = [
        ((torch.zeros(3, 4, dtype=torch.long), v, m), {}, TypeError),
        ((r.half(), v.half(), m), {}, TypeError),
        ((r, v.double(), m), {}, TypeError),
        ((r, torch.zeros(3, 5), m), {}, ValueError),
        ((r, v, torch.ones(4, 3)), {}, ValueError),
        ((r[0], v[0], m[0]), {}, ValueError),
        (("r", v, m), {}, TypeError),
        ((r, v, m, torch.zeros(4)), {}, ValueError),
        ((r, v, m, torch.zeros(3, dtype=torch.long)), {}, TypeError),
        ((r, torch.zeros(3, 4, device="meta"), m), {}, ValueError),
        ((r, v, m), dict(gamma=1.5), ValueError),
        ((r, v, m), dict(lam=-0.1), ValueError),
    ]
    for args, kw, exc in cases:
        with pytest.raises(exc):
            native.gae(*args, **kw)


@pytest.mark.parametrize("fn", [native.ppo_loss, native.ppo_loss_with_grads])
def test_ppo_loss_bad_inputs(fn):
    x, m = torch.zeros(3, 4), torch.ones(3, 4)
    cases = [
        ((x.half(), x.half(), x.half(), m), {}, TypeError),
        ((x, x.double(), x, m), {}, TypeError),
        ((x, x, torch.zeros(3, 5), m), {}, ValueError),
        ((x, x, x, torch.ones(3)), {}, ValueError),
        ((x, x, x, m), dict(values=x), ValueError),
        ((x, x, x, m), dict(values=x, old_values=x, returns=x.double()), TypeError),
        ((x, x, x, m), dict(kl_coef=0.1), ValueError),
        ((x, x, x, m), dict(ent_coef=0.1), ValueError),
        ((x, x, x, m), dict(agg="mean"), ValueError),
        ((x, x, x, m), dict(kl_kind="k4"), ValueError),
        ((x, x, x, m), dict(clip_low=0.0), ValueError),
        ((x, x, x, m), dict(dual_clip=0.5), ValueError),
        ((x, x, x, m), dict(value_clip=-1.0), ValueError),
        ((x, x, x, m), dict(num_tokens="10"), TypeError),
        ((x, x, x, m), dict(num_seqs=torch.ones(2)), ValueError),
        ((x, torch.zeros(3, 4, device="meta"), x, m), {}, ValueError),
        ((x, "x", x, m), {}, TypeError),
        ((x, x, x, [[1.0]]), {}, TypeError),
        ((x[0], x[0], x[0], m[0]), {}, ValueError),
        ((x, x, x, m), dict(max_len=0), ValueError),
    ]
    if fn is native.ppo_loss_with_grads:
        cases += [((x, x, x, m), dict(grad_scale=bad), TypeError)
                  for bad in (None, "1", float("nan"), float("-inf"), True, 10 ** 400)]
    for args, kw, exc in cases:
        with pytest.raises(exc):
            fn(*args, **kw)
    # hyperparameter errors name the argument
    for kw, exc, name in ((dict(clip_low=None), TypeError, "clip_low"), (dict(max_len="5"), TypeError, "max_len"),
                          (dict(vf_coef="a"), TypeError, "vf_coef"), (dict(kl_coef=float("nan")), ValueError,
                                                                       "kl_coef")):
        with pytest.raises(exc, match=name):
            fn(x, x, x, m, **kw)


@pytest.mark.parametrize("fn", [native.ppo_loss, native.ppo_loss_with_grads])
def test_ppo_loss_tensor_hyperparameters_are_read_each_call(fn):
    """A 0-dim tensor hyperparameter is read at every call, not served stale from the configuration cache."""
    data = _ppo_inputs(6, 9, "cpu")
    args, kw = _ppo_kwargs(dict(entropy=True), data, torch.float64, "cpu")
    coef = torch.tensor(0.01)
    first = fn(*args, **kw, ent_coef=coef)[0]
    coef.fill_(5.0)
    second = fn(*args, **kw, ent_coef=coef)[0]
    assert not torch.equal(first, second) and torch.equal(second, fn(*args, **kw, ent_coef=5.0)[0])


# ----------------------------------------------------------------------------- CUDA only

@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["zero", "carry"])
@pytest.mark.parametrize("B,T", [(3, 4097), (256, 1024), (2, 1)])
def test_gae_cuda_long_rows(mode, B, T):
    """Several scan tiles per row (tile = 1024 positions), a partial last tile, the launch shape."""
    data = _gae_case(B, T, torch.float64, "cuda", seed=4)
    kw = dict(gamma=0.99, lam=0.95)
    ours = _gae_with_grads(lambda r, v, m, lv: native.gae(r, v, m, lv, carry=mode == "carry", **kw),
                           *data[torch.float64])
    ref = _gae_with_grads(lambda r, v, m, lv: gae_reference(r, v, m, mask_mode=mode, last_value=lv, **kw),
                          *data[torch.float64])
    for name, o, r in zip(["advantages", "returns", "d_rewards", "d_values", "d_last_value"], ours, ref):
        _assert_matches(o, r, name=name)


@pytest.mark.gpu
def test_cuda_ops_launch_on_the_current_stream():
    """Inputs written on a side stream behind a long sleep: an op that launched on another stream than the current
    one would read them before they are written (the caching allocator hands out recycled memory)."""
    data = _ppo_inputs(64, 300, "cpu")
    args, kw = _ppo_kwargs(PPO_CASES[6], data, torch.float32, "cuda")
    expected = native.ppo_loss_with_grads(*args, **kw)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the copies below run
        late = [a.clone() for a in args[:3]]
        out = native.ppo_loss_with_grads(*late, args[3], **kw)
    torch.cuda.synchronize()
    assert torch.equal(out[0], expected[0])
    for k in expected[2]:
        assert torch.equal(out[2][k], expected[2][k]), k


@pytest.mark.gpu
def test_cuda_deterministic_stream_and_no_host_sync():
    data = _ppo_inputs(64, 300, "cpu")
    args, kw = _ppo_kwargs(PPO_CASES[6], data, torch.float32, "cuda")
    r, v = args[0].detach(), args[2]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            out1 = (native.ppo_loss(*args, **kw)[0], native.gae(r, v, args[3], gamma=0.9, lam=0.9)[0],
                    *native.ppo_loss_with_grads(*args, **kw)[2].values())
        out2 = (native.ppo_loss(*args, **kw)[0], native.gae(r, v, args[3], gamma=0.9, lam=0.9)[0],
                *native.ppo_loss_with_grads(*args, **kw)[2].values())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    for a, b in zip(out1, out2):
        assert torch.equal(a, b)  # bitwise: no atomics, fixed reduction order
