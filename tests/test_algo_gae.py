"""RL math core: GAE and returns against hand-computed cases and invariances."""
import math

import pytest
import torch

from rlhf_engine.algo import discounted_returns, gae, gae_reference, last_valid_index


def _right_padded_mask(B, T, gen, min_len=0):
    lens = torch.randint(min_len, T + 1, (B,), generator=gen)
    return (torch.arange(T)[None, :] < lens[:, None]).double()


def test_gae_gamma_lambda_one_is_reward_to_go_minus_values():
    g = torch.Generator().manual_seed(1)
    r, v = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    m = torch.ones(3, 7, dtype=torch.float64)
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0, backend="torch")
    rtg = r.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv, rtg - v)
    torch.testing.assert_close(ret, rtg)


def test_gae_hand_case():
    # T=2, gamma=0.9, lam=0.8: delta_1 = 2 - 1 = 1, A_1 = 1; delta_0 = 1 + 0.9*1 - 0.5 = 1.4,
    # A_0 = 1.4 + 0.72 * 1 = 2.12; returns = A + V = [2.62, 2.0].
    r = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 1.0]], dtype=torch.float64)
    m = torch.ones_like(r)
    for mode in ("zero", "carry"):
        adv, ret = gae(r, v, m, gamma=0.9, lam=0.8, mask_mode=mode, backend="torch")
        torch.testing.assert_close(adv, torch.tensor([[2.12, 1.0]], dtype=torch.float64))
        torch.testing.assert_close(ret, torch.tensor([[2.62, 2.0]], dtype=torch.float64))


def test_gae_truncation_bootstrap_hand_case():
    # mask [1, 1, 0]: the last valid token is t=1; last_value = 3 stands in for V_2.
    r = torch.tensor([[0.0, 1.0, 5.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, 2.0, 7.0]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    lv = torch.tensor([3.0], dtype=torch.float64)
    # delta_1 = 1 + 0.5*3 - 2 = 0.5; delta_0 = 0 + 0.5*2 - 1 = 0; A_0 = 0 + 0.5*0.5*0.5 = 0.125
    for mode in ("zero", "carry"):
        adv, ret = gae(r, v, m, gamma=0.5, lam=0.5, mask_mode=mode, last_value=lv, backend="torch")
        torch.testing.assert_close(adv, torch.tensor([[0.125, 0.5, 0.0]], dtype=torch.float64))
        torch.testing.assert_close(ret, torch.tensor([[1.125, 2.5, 0.0]], dtype=torch.float64))


def test_gae_modes_agree_on_right_padding():
    g = torch.Generator().manual_seed(2)
    B, T = 37, 29
    r, v = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    m = _right_padded_mask(B, T, g)
    lv = torch.randn(B, generator=g, dtype=torch.float64)
    a0, r0 = gae(r, v, m, gamma=0.99, lam=0.95, mask_mode="zero", last_value=lv, backend="torch")
    a1, r1 = gae(r, v, m, gamma=0.99, lam=0.95, mask_mode="carry", last_value=lv, backend="torch")
    torch.testing.assert_close(a0, a1)
    torch.testing.assert_close(r0, r1)
    assert (a0[m == 0] == 0).all()


def test_gae_carry_skips_interior_holes():
    """Carry mode on a row with holes equals plain GAE on the compacted row."""
    g = torch.Generator().manual_seed(3)
    T = 11
    r, v = torch.randn(1, T, generator=g, dtype=torch.float64), torch.randn(1, T, generator=g, dtype=torch.float64)
    m = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0]], dtype=torch.float64)
    keep = m[0].bool()
    adv, ret = gae(r, v, m, gamma=0.97, lam=0.9, mask_mode="carry", backend="torch")
    adv_c, ret_c = gae(r[:, keep], v[:, keep], torch.ones(1, int(keep.sum()), dtype=torch.float64),
                       gamma=0.97, lam=0.9, backend="torch")
    torch.testing.assert_close(adv[:, keep], adv_c)
    torch.testing.assert_close(ret[:, keep], ret_c)
    assert (adv[:, ~keep] == 0).all()


def test_gae_empty_row_is_zero_and_finite():
    r = torch.randn(2, 5, dtype=torch.float64)
    v = torch.randn(2, 5, dtype=torch.float64)
    m = torch.tensor([[0.0] * 5, [1.0] * 5], dtype=torch.float64)
    for mode in ("zero", "carry"):
        adv, ret = gae(r, v, m, mask_mode=mode, last_value=torch.ones(2, dtype=torch.float64), backend="torch")
        assert torch.isfinite(adv).all() and (adv[0] == 0).all() and (ret[0] == 0).all()


def test_gae_reference_is_differentiable_and_linear():
    g = torch.Generator().manual_seed(4)
    r = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    m = _right_padded_mask(4, 9, g, min_len=1)
    for mode in ("zero", "carry"):
        assert torch.autograd.gradcheck(
            lambda r_, v_: gae_reference(r_, v_, m, gamma=0.9, lam=0.7, mask_mode=mode), (r, v))


def test_discounted_returns_hand_case():
    r = torch.tensor([[1.0, 0.0, 2.0, 9.0]], dtype=torch.float64)
    m = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    out = discounted_returns(r, m, gamma=0.5)
    # valid tokens 0 and 2: G_2 = 2, G_0 = 1 + 0.5 * 2 = 2 (the hole is skipped, the padded 9 ignored)
    torch.testing.assert_close(out, torch.tensor([[2.0, 0.0, 2.0, 0.0]], dtype=torch.float64))


def test_last_valid_index():
    m = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 1]])
    assert last_valid_index(m).tolist() == [1, -1, 2]


@pytest.mark.parametrize("bad", [
    dict(values=torch.zeros(2, 4)), dict(mask=torch.ones(3, 6)), dict(gamma=1.5), dict(lam=-0.1),
    dict(mask_mode="both"), dict(last_value=torch.zeros(4)), dict(backend="jax"),
])
def test_gae_bad_input_raises(bad):
    args = dict(rewards=torch.zeros(3, 5), values=torch.zeros(3, 5), mask=torch.ones(3, 5), gamma=1.0, lam=0.95,
                mask_mode="zero", last_value=None, backend="torch")
    args.update(bad)
    with pytest.raises(ValueError):
        gae(args.pop("rewards"), args.pop("values"), args.pop("mask"), **args)


def test_gae_int_rewards_type_error():
    with pytest.raises(TypeError):
        gae(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), backend="torch")


def test_gae_no_nan_with_extreme_values():
    r = torch.full((2, 6), 1e30, dtype=torch.float64)
    adv, _ = gae(r, torch.zeros_like(r), torch.ones_like(r), gamma=1.0, lam=1.0, backend="torch")
    assert torch.isfinite(adv).all() and math.isclose(adv[0, 0].item(), 6e30)


def test_auto_backend_traces_under_torch_compile(monkeypatch):
    """"auto" picks the C++ ops on the CPU, eager or compiled (their custom ops, kernels/native_ops.py, trace): GAE
    and the PPO loss compile with fullgraph=True and give the eager values."""
    from rlhf_engine.algo import ppo_loss
    from rlhf_engine.kernels import native

    if not native.available():
        pytest.skip("the native extension is not built")
    ran = []
    for op in ("native_gae", "native_ppo_loss"):
        real = getattr(native.native_ops, op)
        monkeypatch.setattr(native.native_ops, op, lambda *a, _r=real, _op=op: (ran.append(_op), _r(*a))[1])

    torch.manual_seed(0)
    r, v = torch.randn(3, 11), torch.randn(3, 11, requires_grad=True)
    m = torch.rand(3, 11) > 0.2
    logp = (-torch.rand(3, 11)).requires_grad_()

    def f(r, v, m, logp):
        adv, ret = gae(r, v.detach(), m, gamma=0.99, lam=0.95)
        loss, _ = ppo_loss(logp, logp.detach() + 0.1, adv, m, values=v, old_values=v.detach() + 0.1, returns=ret,
                           backend="auto")
        return loss

    want = f(r, v, m, logp)
    assert not ran  # eager: the autograd.Function
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(r, v, m, logp)
    assert set(ran) == {"native_gae", "native_ppo_loss"}  # traced: both custom ops
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.autograd.grad(got, logp)[0].abs().sum() > 0
