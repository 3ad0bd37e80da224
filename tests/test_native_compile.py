"""The native GAE and PPO loss under torch.compile: their custom ops (kernels/native_ops.py) trace with
fullgraph=True and give the eager Functions' values and gradients bit for bit; opcheck on each op."""
import pytest
import torch

import rlhf_engine.kernels.native as N
from rlhf_engine.kernels import native_ops

pytestmark = pytest.mark.skipif(not N.available(), reason="the native extension is not built")


def _native_device(device):
    if device.type == "cuda" and not N.cuda_available():
        pytest.skip("the extension was built without CUDA")
    return device


def _refuse(*args, **kwargs):
    raise AssertionError("the eager autograd.Function ran under torch.compile")


def _gae_inputs(device, B=3, T=11):
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 7:] = 0  # right padding
    mask[1, :] = 0  # an empty row
    mask[2, 4] = 0  # a hole (carry mode skips it)
    lv = torch.randn(B, generator=g, dtype=torch.float64)
    w = torch.randn(2, B, T, generator=g, dtype=torch.float64)
    return [x.to(device) for x in (r, v, mask, lv, w)]


@pytest.mark.parametrize("carry", [False, True])
@pytest.mark.parametrize("with_last_value", [False, True])
def test_native_gae_compiles_and_matches_eager(carry, with_last_value, device, monkeypatch):
    device = _native_device(device)
    r, v, mask, lv, w = _gae_inputs(device)

    def f(r, v, lv):
        adv, ret = N.gae(r, v, mask, lv if with_last_value else None, gamma=0.97, lam=0.9, carry=carry)
        return (adv * w[0] + ret * w[1]).sum(), adv, ret

    outs = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        if len(outs):  # compiled: the custom op, never the eager Function
            monkeypatch.setattr(N._GAEFunction, "apply", _refuse)
        leaves = [x.clone().requires_grad_() for x in (r, v, lv)]
        loss, adv, ret = fn(*leaves)
        grads = torch.autograd.grad(loss, leaves if with_last_value else leaves[:2])
        outs.append((adv.detach(), ret.detach(), *grads))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def _ppo_inputs(device, B=4, T=9):
    g = torch.Generator().manual_seed(1)
    t = {k: torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 for k in
         ("logp", "old_logp", "advantages", "values", "old_values", "returns", "ref_logp", "entropy")}
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2] = False  # an empty row
    return {k: x.to(device) for k, x in t.items()}, mask.to(device)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_native_ppo_loss_compiles_and_matches_eager(agg, device, monkeypatch):
    device = _native_device(device)
    t, mask = _ppo_inputs(device)
    hyper = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, value_clip=0.2, vf_coef=0.5, ent_coef=0.01,
                 kl_coef=0.05, kl_kind="k3", agg=agg)

    def f(logp, values, entropy):
        loss, metrics = N.ppo_loss(logp, t["old_logp"], t["advantages"], mask, values=values,
                                   old_values=t["old_values"], returns=t["returns"], ref_logp=t["ref_logp"],
                                   entropy=entropy, **hyper)
        return loss * 1.7, torch.stack([metrics[k] for k in sorted(metrics)])

    outs = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        if len(outs):
            monkeypatch.setattr(N._PPOLossFunction, "apply", _refuse)
        leaves = [t[k].clone().requires_grad_() for k in ("logp", "values", "entropy")]
        loss, metrics = fn(*leaves)
        outs.append((loss.detach(), metrics, *torch.autograd.grad(loss, leaves)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    # only logp requires grad: the op is told so (need_values = need_entropy = False), with the same logp gradient
    seen = []
    real = native_ops.native_ppo_loss
    monkeypatch.setattr(native_ops, "native_ppo_loss", lambda *a: (seen.append(a[-3:]), real(*a))[1])
    logp = t["logp"].clone().requires_grad_()
    loss, _ = torch.compile(f, backend="aot_eager", fullgraph=True)(logp, t["values"], t["entropy"])
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.equal(g, outs[0][2]) and seen and all(tuple(s) == (True, False, False) for s in seen)


def test_native_ppo_loss_compiles_with_tensor_normalizers(device):
    """num_tokens / num_seqs as tensors (a CPU one too): read by the op through a pointer, no .item() in the graph."""
    device = _native_device(device)
    t, mask = _ppo_inputs(device)
    ntok, nseq = torch.tensor(23.0), torch.tensor(3.0, device=device)

    def f(logp):
        loss, _ = N.ppo_loss(logp, t["old_logp"], t["advantages"], mask, agg="seq-mean-token-sum",
                             num_tokens=ntok, num_seqs=nseq)
        return loss

    want = f(t["logp"])
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(t["logp"])
    assert torch.equal(got, want)


def test_opcheck_native_ops(device):
    device = _native_device(device)
    r, v, mask, lv, _ = _gae_inputs(device)
    m8 = (mask != 0).to(torch.uint8)
    rq, vq, lvq = (x.clone().requires_grad_() for x in (r, v, lv))
    torch.library.opcheck(native_ops.native_gae, (rq, vq, m8, lvq, 0.97, 0.9, False))
    torch.library.opcheck(native_ops.native_gae, (rq, vq, m8, None, 1.0, 0.95, True))
    torch.library.opcheck(native_ops.native_gae_backward, (m8, torch.ones_like(r), None, 0.97, 0.9, False,
                                                           torch.float64, True))
    t, mask = _ppo_inputs(device)
    m8 = mask.to(torch.uint8)
    lp, val, ent = (t[k].clone().requires_grad_() for k in ("logp", "values", "entropy"))
    args = (lp, t["old_logp"], t["advantages"], m8, val, t["old_values"], t["returns"], t["ref_logp"], ent, None,
            None, 0, 0.0, 0, 0.0, 0.2, 0.28, 0.0, 0.2, 0.5, 0.01, 0.05, 3, 0, float(lp.shape[1]), True, True, True)
    torch.library.opcheck(native_ops.native_ppo_loss, args)
    out = native_ops.native_ppo_loss(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    # the need flags: a gradient not asked for is not computed (a (0,) stand-in), as the eager Function does
    few = native_ops.native_ppo_loss(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args[:-2]),
                                     False, False)
    assert few[3].shape == few[4].shape == (0,) and torch.equal(few[2], out[2]) and torch.equal(few[0], out[0])
    torch.library.opcheck(native_ops.native_ppo_loss_backward, (*out[2:], torch.tensor(1.3, dtype=torch.float64,
                                                                                        device=device)))
