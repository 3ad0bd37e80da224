"""GAE Triton kernels (forward scan + transposed backward scan) vs the fp64 loop reference.

CPU runs use the Triton interpreter, whose generic scan is slow (~0.25 ms per element): shapes are
kept small there; the big shapes and the bf16 2x rule at scale are ``gpu`` tests.
"""
import contextlib

import pytest
import torch

from rlhf_engine.algo import gae, gae_reference
from rlhf_engine.kernels.gae import _gae_op, gae_backward, gae_forward, gae_triton


def _mask(B, T, device, p_hole=0.25):
    """Random 0/1 mask with interior holes, an empty row, a full row and a right-padded row."""
    m = torch.rand(B, T, device=device) > p_hole
    if B > 3:
        m[0] = False                      # empty row
        m[1] = True                       # full row: last token at T-1
        m[2, T // 2:] = False             # right padding
        m[3, :3] = False                  # leading holes
    return m


def _inputs(B, T, device, dtype=torch.float32):
    r = torch.randn(B, T, device=device).to(dtype)
    v = torch.randn(B, T, device=device).to(dtype)
    lv = torch.randn(B, device=device).to(dtype)
    return r, v, _mask(B, T, device), lv


def _reference(r, v, m, lv, gamma, lam, carry, ga, gr):
    """fp64 outputs and gradients (rewards, values, last_value) of sum(adv * ga + ret * gr)."""
    x = [t.detach().double().requires_grad_() if t is not None else None for t in (r, v, lv)]
    adv, ret = gae_reference(x[0], x[1], m, gamma=gamma, lam=lam, mask_mode="carry" if carry else "zero",
                             last_value=x[2])
    ((adv * ga.double()).sum() + (ret * gr.double()).sum()).backward()
    return adv, ret, [t.grad if t is not None else None for t in x]


def _assert_close(ours, ref, tol, name):
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    bound = tol * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= bound, f"{name}: max err {err:.3g} > {bound:.3g}"


CASES = [  # (B, T, gamma, lam, carry, with last_value, block_t)
    (37, 97, 0.99, 0.95, False, True, None),
    (37, 97, 0.97, 0.9, True, True, None),
    (7, 41, 1.0, 1.0, False, False, None),
    (7, 41, 1.0, 1.0, True, False, None),
    (7, 41, 0.5, 0.0, True, True, None),       # lam = 0: A = delta
    (7, 41, 0.0, 0.5, False, True, None),      # gamma = 0: A = r - V
    (7, 97, 0.9, 0.8, False, True, 16),        # 7 chunks: carries across chunk boundaries
    (7, 97, 0.9, 0.8, True, True, 16),
    (3, 1025, 0.99, 0.95, True, True, 256),    # T = 1025 on the CPU: 5 chunks
    (2, 1025, 0.99, 0.95, False, True, 512),   # 3 chunks, zero mode
]
GPU_CASES = [
    (37, 1025, 0.99, 0.95, False, True, None),
    (37, 1025, 0.99, 0.95, True, True, None),
    (37, 1025, 1.0, 1.0, True, False, None),
    (5, 3 * 2048 + 5, 0.999, 0.95, False, True, None),   # 4 chunks of 2048
    (5, 3 * 2048 + 5, 0.999, 0.95, True, True, None),
    (300, 130, 0.99, 0.95, True, True, None),            # many packed rows per program
]


def _nan_buffers(mp):
    """torch.empty and torch.empty_like hand out NaN-filled float tensors (``mp``: a monkeypatch context): an output
    element the kernels do not write is caught."""
    for name in ("empty", "empty_like"):
        make = getattr(torch, name)

        def poisoned(*args, _make=make, **kwargs):
            t = _make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        mp.setattr(torch, name, poisoned)


def _run_case(B, T, gamma, lam, carry, with_lv, block_t, device, monkeypatch=None):
    r, v, m, lv = _inputs(B, T, device)
    lv = lv if with_lv else None
    ga, gr = torch.randn(B, T, device=device), torch.randn(B, T, device=device)
    with contextlib.ExitStack() as stack:
        if monkeypatch is not None:  # every output (the empty row's d last_value too) is written by the kernels
            _nan_buffers(stack.enter_context(monkeypatch.context()))
        adv, ret = gae_forward(r, v, m, lv, gamma=gamma, lam=lam, carry=carry, block_t=block_t)
        dr, dv, dlv = gae_backward(ga, gr, m, gamma=gamma, lam=lam, carry=carry, has_last_value=with_lv,
                                   block_t=block_t)
    ref_adv, ref_ret, (ref_dr, ref_dv, ref_dlv) = _reference(r, v, m, lv, gamma, lam, carry, ga, gr)
    tol = 2e-6 * (1 + T / 64)  # fp32 sums of up to T terms
    _assert_close(adv, ref_adv, tol, "advantages")
    _assert_close(ret, ref_ret, tol, "returns")
    _assert_close(dr, ref_dr, tol, "d rewards")
    _assert_close(dv, ref_dv, tol, "d values")
    if with_lv:
        _assert_close(dlv, ref_dlv, tol, "d last_value")
    else:
        assert dlv is None


@pytest.mark.parametrize("B, T, gamma, lam, carry, with_lv, block_t", CASES)
def test_matches_reference(B, T, gamma, lam, carry, with_lv, block_t, device, monkeypatch):
    _run_case(B, T, gamma, lam, carry, with_lv, block_t, device, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("B, T, gamma, lam, carry, with_lv, block_t", GPU_CASES)
def test_matches_reference_gpu(B, T, gamma, lam, carry, with_lv, block_t, device, monkeypatch):
    _run_case(B, T, gamma, lam, carry, with_lv, block_t, device, monkeypatch)


@pytest.mark.parametrize("carry", [False, True])
def test_hand_case_reward_to_go(carry, device):
    """gamma = lam = 1, right padding: A_t = sum_{s >= t} r_s - V_t (+ bootstrap), returns = reward-to-go."""
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 9.0, 9.0]], device=device)
    v = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 9.0, 9.0]], device=device)
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], device=device, dtype=torch.bool)
    lv = torch.tensor([10.0, 100.0], device=device)
    adv, ret = gae_triton(r, v, m, lv, gamma=1.0, lam=1.0, carry=carry)
    want_ret = torch.tensor([[20.0, 19.0, 17.0, 14.0], [99.5, 99.0, 0.0, 0.0]], device=device)
    torch.testing.assert_close(ret, want_ret, rtol=0, atol=1e-5)
    torch.testing.assert_close(adv, (want_ret - v) * m, rtol=0, atol=1e-5)


@pytest.mark.parametrize("carry", [False, True])
def test_autograd_grad_output_not_ones(carry, device):
    """Through GAEFunction (eager) and the custom op: loss = 3.7 sum(adv^2) + sum(ret * w)."""
    r, v, m, lv = _inputs(7, 41, device)
    w = torch.randn(7, 41, device=device)
    results = []
    for fn in (lambda *a: gae_triton(*a, gamma=0.95, lam=0.9, carry=carry),
               lambda *a: _gae_op(*a, 0.95, 0.9, carry),
               lambda *a: gae_reference(*a[:3], gamma=0.95, lam=0.9, mask_mode="carry" if carry else "zero",
                                        last_value=a[3])):
        is_ref = len(results) == 2
        x = [t.detach().clone().double() if is_ref else t.detach().clone() for t in (r, v, lv)]
        for t in x:
            t.requires_grad_()
        adv, ret = fn(x[0], x[1], m, x[2])
        (3.7 * (adv * adv).sum() + (ret * w.to(ret.dtype)).sum()).backward()
        results.append([adv] + [t.grad for t in x])
    for ours in results[:2]:
        for a, b, name in zip(ours, results[2], ("adv", "d rewards", "d values", "d last_value")):
            _assert_close(a, b, 1e-5, name)


def test_only_advantages_used(device):
    """The returns output unused: its gradient is None inside the Function (loads skipped)."""
    r, v, m, lv = _inputs(7, 41, device)
    x = [t.clone().requires_grad_() for t in (r, v)]
    adv, _ = gae_triton(x[0], x[1], m, lv, gamma=0.9, lam=0.7, carry=True)
    adv.sum().backward()
    ones = torch.ones(7, 41, device=device)
    _, _, (ref_dr, ref_dv, _) = _reference(r, v, m, lv, 0.9, 0.7, True, ones, torch.zeros_like(ones))
    _assert_close(x[0].grad, ref_dr, 1e-5, "d rewards")
    _assert_close(x[1].grad, ref_dv, 1e-5, "d values")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype, device):
    """Outputs in the rewards dtype; error vs fp64 at most 2x that of the reference loop run in ``dtype``."""
    r, v, m, lv = _inputs(7, 41, device, dtype)
    x = [t.clone().requires_grad_() for t in (r, v, lv)]
    adv, ret = gae_triton(x[0], x[1], m, x[2], gamma=0.99, lam=0.95, carry=False)
    assert adv.dtype == dtype and ret.dtype == dtype
    (adv.float().sum() + ret.float().sum()).backward()
    assert all(t.grad.dtype == dtype for t in x)
    ref_adv, ref_ret = gae_reference(r.double(), v.double(), m, gamma=0.99, lam=0.95, last_value=lv.double())
    own_adv, own_ret = gae_reference(r, v, m, gamma=0.99, lam=0.95, last_value=lv)   # PyTorch in ``dtype``
    for ours, own, ref in ((adv, own_adv, ref_adv), (ret, own_ret, ref_ret)):
        assert torch.isfinite(ours).all()
        err = (ours.double() - ref).abs().max().item()
        own_err = (own.double() - ref).abs().max().item()
        assert err <= 2 * own_err + 1e-6, f"{dtype}: err {err:.3g} > 2x torch's {own_err:.3g}"


@pytest.mark.gpu
def test_bf16_rule_gpu(device):
    r, v, m, lv = _inputs(37, 1025, device, torch.bfloat16)
    adv, ret = gae_triton(r, v, m, lv, gamma=0.99, lam=0.95, carry=True)
    ref_adv, ref_ret = gae_reference(r.double(), v.double(), m, gamma=0.99, lam=0.95, mask_mode="carry",
                                     last_value=lv.double())
    own_adv, own_ret = gae_reference(r, v, m, gamma=0.99, lam=0.95, mask_mode="carry", last_value=lv)
    for ours, own, ref in ((adv, own_adv, ref_adv), (ret, own_ret, ref_ret)):
        assert torch.isfinite(ours).all()
        assert (ours.double() - ref).abs().max() <= 2 * (own.double() - ref).abs().max() + 1e-6


def test_dispatch_from_algo(device):
    r, v, m, lv = _inputs(7, 41, device)
    for mode in ("zero", "carry"):
        ours = gae(r, v, m, gamma=0.9, lam=0.9, mask_mode=mode, last_value=lv, backend="triton")
        ref = gae_reference(r.double(), v.double(), m, gamma=0.9, lam=0.9, mask_mode=mode, last_value=lv.double())
        for a, b in zip(ours, ref):
            _assert_close(a, b, 1e-5, mode)


def test_custom_op_registration(device):
    r, v, m, lv = _inputs(2, 8, device)
    args = (r.requires_grad_(), v.requires_grad_(), m, lv.requires_grad_(), 0.9, 0.8, True)
    torch.library.opcheck(_gae_op, args, test_utils=("test_schema", "test_autograd_registration",
                                                      "test_faketensor"))


def test_torch_compile_traces(device):
    r, v, m, lv = _inputs(3, 9, device)

    def fn(r, v, lv):
        adv, ret = gae_triton(r, v, m, lv, gamma=0.9, lam=0.8, carry=True)
        return (2.0 * adv + ret).sum()

    grads = []
    for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        x = [t.clone().requires_grad_() for t in (r, v, lv)]
        f(*x).backward()
        grads.append([t.grad for t in x])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_empty_shapes(device):
    for B, T in ((0, 5), (3, 0)):
        r = torch.zeros(B, T, device=device)
        adv, ret = gae_triton(r, r, r.bool(), None, gamma=0.9, lam=0.9)
        assert adv.shape == (B, T) and ret.shape == (B, T)


@pytest.mark.parametrize("kwargs, err", [
    (dict(values=torch.zeros(2, 4)), ValueError),
    (dict(rewards=torch.zeros(2, 3, dtype=torch.long)), TypeError),
    (dict(last_value=torch.zeros(3)), ValueError),
    (dict(gamma=1.5), ValueError),
    (dict(lam=-0.1), ValueError),
    (dict(rewards=torch.zeros(6)), ValueError),
])
def test_errors(kwargs, err):
    args = dict(rewards=torch.zeros(2, 3), values=torch.zeros(2, 3), mask=torch.ones(2, 3), last_value=None,
                gamma=0.9, lam=0.9)
    args.update(kwargs)
    with pytest.raises(err):
        gae_triton(args["rewards"], args["values"], args["mask"], args["last_value"], gamma=args["gamma"],
                   lam=args["lam"])
