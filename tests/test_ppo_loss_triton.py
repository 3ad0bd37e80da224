"""Fused PPO loss (Triton) vs autograd of the fp64 reference ``ppo_loss_reference``.

Loss, metrics and the gradients w.r.t. logp, values and entropy, with grad_output != 1, for every
aggregation mode, clip variant and KL kind; exact ties (first epoch); micro-batching.
"""
import pytest
import torch

from rlhf_engine.algo import ppo_loss, ppo_loss_reference
from rlhf_engine.kernels.ppo_loss import _ppo_loss_op, ppo_loss_forward, ppo_loss_triton, ppo_loss_with_grads

FRACTIONS = ("clip_frac", "vf_clip_frac")  # counts of comparisons: checked against the fp32 reference
GRAD_SCALE = 3.7


def _inputs(B, T, device, dtype=torch.float32, extreme=True):
    """Random PPO batch; ``extreme`` exercises the clamps: logp - old > 20 (e^20 ratios), |logp - ref| > 20."""
    g = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    logp = -torch.rand(B, T, device=device) * 3
    old = logp + 0.3 * g(B, T)
    ref = logp + 1.5 * g(B, T)                   # k3 of y < -2.4 exceeds 10
    if extreme:
        old.view(-1)[::53] -= 25.0               # ratio clamp: x = logp - old > 20
        ref.view(-1)[::41] += 30.0               # |y| > 20
    mask = torch.rand(B, T, device=device) > 0.2
    if B > 3:
        mask[0] = False                          # empty row
        mask[1] = True
        mask[2, T // 3:] = False                 # right padding
    values = g(B, T)
    t = dict(logp=logp, old_logp=old, advantages=g(B, T), mask=mask, values=values,
             old_values=values + 0.3 * g(B, T), returns=g(B, T), ref_logp=ref, entropy=torch.rand(B, T, device=device))
    return {k: v.to(dtype) if k != "mask" else v for k, v in t.items()}


def _run(fn, t, kw, dtype=None):
    """loss, metrics and the grads of GRAD_SCALE * loss w.r.t. logp, values, entropy (inputs cast to ``dtype``)."""
    t = {k: (v.to(dtype) if dtype is not None and k != "mask" else v).detach().clone()
         for k, v in t.items() if v is not None}
    for k in ("logp", "values", "entropy"):
        if k in t:
            t[k].requires_grad_()
    kw = {k: (v.to(dtype) if dtype is not None and isinstance(v, torch.Tensor) and v.is_floating_point() else v)
          for k, v in kw.items()}
    args = [t.pop(k) for k in ("logp", "old_logp", "advantages", "mask")]
    loss, metrics = fn(*args, **t, **kw)
    (GRAD_SCALE * loss).backward()
    grads = {"logp": args[0].grad, **{k: t[k].grad for k in ("values", "entropy") if k in t}}
    return loss.detach(), metrics, grads


def _assert_close(ours, ref, tol, name):
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours.double() - ref.double()).abs().max().item()
    bound = tol * max(1e-3, ref.double().abs().max().item())
    assert err <= bound, f"{name}: max err {err:.3g} > {bound:.3g}"


def _compare(t, kw, tol=2e-5):
    loss, metrics, grads = _run(ppo_loss_triton, t, kw)
    ref_loss, ref_metrics, ref_grads = _run(ppo_loss_reference, t, kw, dtype=torch.float64)
    _, f32_metrics, _ = _run(ppo_loss_reference, t, kw, dtype=torch.float32)
    assert set(metrics) == set(ref_metrics)
    _assert_close(loss, ref_loss, tol, "loss")
    for k in metrics:
        want = f32_metrics[k] if k in FRACTIONS else ref_metrics[k]
        _assert_close(metrics[k], want, tol, k)
        assert not metrics[k].requires_grad
    assert set(grads) == set(ref_grads)
    for k in grads:
        _assert_close(grads[k], ref_grads[k], tol, f"d {k}")


CONFIGS = [  # (drop, kwargs): drop = inputs left out
    ((), dict(agg="token-mean", kl_coef=0.1)),
    ((), dict(agg="seq-mean-token-mean", kl_coef=0.05, ent_coef=0.01, kl_kind="k3")),
    ((), dict(agg="seq-mean-token-sum", clip_high=0.28, dual_clip=3.0, kl_coef=0.2, kl_kind="k1")),
    ((), dict(agg="seq-mean-token-sum-norm", max_len=128, value_clip=None, kl_coef=0.1, kl_kind="k2")),
    ((), dict(agg="token-mean", value_clip=0.5, dual_clip=2.0, ent_coef=0.02, kl_coef=0.1,
              num_tokens=2500, num_seqs=torch.tensor(40))),
    ((), dict(agg="seq-mean-token-mean", num_tokens=torch.tensor(3000.0), num_seqs=50, kl_kind="k1", kl_coef=1.0)),
    ((), dict(agg="seq-mean-token-sum-norm", num_seqs=torch.tensor(33, dtype=torch.int64), clip_low=0.1,
              clip_high=0.3)),
    (("values", "old_values", "returns", "ref_logp", "entropy"), dict(agg="token-mean")),
    (("values", "old_values", "returns"), dict(agg="seq-mean-token-sum", ent_coef=0.01, kl_coef=0.3, kl_kind="k2")),
    (("ref_logp", "entropy"), dict(agg="seq-mean-token-mean", vf_coef=1.0, dual_clip=3.0)),
]


def _config_case(drop, kw, device):
    """The inputs of a CONFIGS entry (``drop``ped ones None) and its kwargs moved to ``device``."""
    t = _inputs(37, 97, device)
    for k in drop:
        t[k] = None
    return t, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


@pytest.mark.parametrize("drop, kw", CONFIGS)
def test_matches_reference(drop, kw, device):
    _compare(*_config_case(drop, kw, device))


@pytest.mark.gpu
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_matches_reference_gpu(agg, device):
    t = _inputs(37, 1025, device)
    _compare(t, dict(agg=agg, dual_clip=3.0, clip_high=0.28, kl_coef=0.1, ent_coef=0.01))


def test_first_epoch_exact_ties(device):
    """values == old_values and logp == old_logp: torch.maximum ties split the gradient in halves."""
    t = _inputs(37, 97, device)
    t["old_values"] = t["values"].clone()
    t["old_logp"] = t["logp"].clone()
    for agg in ("token-mean", "seq-mean-token-mean"):
        _compare(t, dict(agg=agg, kl_coef=0.1, ent_coef=0.01))


def test_tie_gradient_is_half_split(device):
    """Hand cases with exact (binary) ties of torch.maximum whose branches have different derivatives:
    token 1: V = 1, V_old = 0, G = 0.625, eps_v = 0.25 -> e = 0.375, ec = 0.25 - 0.625 = -0.375, e^2 == ec^2,
    the clipped branch has zero slope, so dvf/dV = (0.375 + 0) / 2; token 0: V == V_old (first epoch) and a
    ratio of exactly 1; token 2: A = 0 with a clipped ratio (pg1 == pg2 == 0)."""
    f = lambda *x: torch.tensor([x], device=device)  # noqa: E731
    t = dict(logp=f(-1.0, -1.0, -0.5), old_logp=f(-1.0, -1.5, -1.0), advantages=f(1.0, -2.0, 0.0),
             mask=f(1, 1, 1).bool(), values=f(1.0, 1.0, 2.0), old_values=f(1.0, 0.0, 2.0),
             returns=f(0.0, 0.625, 1.0), ref_logp=None, entropy=None)
    _compare(t, dict(agg="token-mean", value_clip=0.25))
    _, _, grads = _run(ppo_loss_triton, t, dict(agg="token-mean", value_clip=0.25, vf_coef=1.0))
    assert grads["values"][0, 1].item() == pytest.approx(GRAD_SCALE * 0.5 * 0.375 / 3)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batching(agg, device):
    """Micro-batches with the global num_tokens / num_seqs add up to the full-batch loss and gradients."""
    t = _inputs(37, 97, device)
    kw = dict(agg=agg, kl_coef=0.1, ent_coef=0.01, dual_clip=3.0)
    full_loss, full_metrics, full_grads = _run(ppo_loss_triton, t, kw)
    m = t["mask"]
    glob = dict(num_tokens=m.sum(), num_seqs=int((m.sum(1) > 0).sum()))
    loss_sum, metric_sums, grads = 0.0, {}, {k: [] for k in full_grads}
    for sl in (slice(0, 10), slice(10, 11), slice(11, 37)):
        loss, metrics, g = _run(ppo_loss_triton, {k: v[sl] for k, v in t.items()}, {**kw, **glob})
        loss_sum = loss_sum + loss
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + v
        for k, v in g.items():
            grads[k].append(v)
    _assert_close(loss_sum, full_loss, 1e-5, "loss")
    for k in full_metrics:
        _assert_close(metric_sums[k], full_metrics[k], 1e-5, k)
    for k in full_grads:
        _assert_close(torch.cat(grads[k]), full_grads[k], 1e-5, f"d {k}")


def test_dispatch_from_algo_and_determinism(device):
    t = _inputs(37, 97, device)
    kw = dict(agg="token-mean", kl_coef=0.1)
    a = ppo_loss(**t, backend="triton", **kw)
    b = ppo_loss_triton(**t, **kw)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_no_grad_and_requires_grad_subsets(device):
    t = _inputs(7, 41, device)
    with torch.no_grad():
        loss, metrics = ppo_loss_triton(**t)
    ref_loss, _ = ppo_loss_reference(**{k: v.double() if k != "mask" else v for k, v in t.items()})
    _assert_close(loss, ref_loss, 2e-5, "loss")
    v = t["values"].clone().requires_grad_()     # only the critic trains
    loss, _ = ppo_loss_triton(**{**t, "values": v})
    loss.backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype, device):
    """Loss/metrics/grads in the input dtype; error vs fp64 at most 2x that of the reference in ``dtype``."""
    t = {k: (v.to(dtype) if k != "mask" else v) for k, v in _inputs(7, 41, device, extreme=False).items()}
    kw = dict(agg="token-mean", kl_coef=0.1, ent_coef=0.01)
    loss, _, grads = _run(ppo_loss_triton, t, kw)
    assert loss.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    ref_loss, _, ref_grads = _run(ppo_loss_reference, t, kw, dtype=torch.float64)
    own_loss, _, own_grads = _run(ppo_loss_reference, t, kw)
    pairs = [(loss, own_loss, ref_loss, "loss")] + [(grads[k], own_grads[k], ref_grads[k], k) for k in grads]
    for ours, own, ref, name in pairs:
        assert torch.isfinite(ours).all(), name
        err = (ours.double() - ref).abs().max().item()
        own_err = (own.double() - ref).abs().max().item()
        assert err <= 2 * own_err + 1e-7 * ref.abs().max().item(), f"{name}: {err:.3g} > 2x {own_err:.3g}"


def test_custom_op_registration(device):
    t = _inputs(3, 9, device)
    for k in ("logp", "values", "entropy"):
        t[k].requires_grad_()
    args = (t["logp"], t["old_logp"], t["advantages"], t["mask"], t["values"], t["old_values"], t["returns"],
            t["ref_logp"], t["entropy"], None, torch.tensor(2, device=device), 20.0, None,
            0.2, 0.28, 3.0, 0.2, 0.5, 0.01, 0.1, "k3", "seq-mean-token-mean", None)
    torch.library.opcheck(_ppo_loss_op, args, test_utils=("test_schema", "test_autograd_registration",
                                                           "test_faketensor"))


def test_torch_compile_traces(device):
    t = _inputs(5, 13, device)

    def fn(logp, values):
        loss, metrics = ppo_loss_triton(logp, t["old_logp"], t["advantages"], t["mask"], values=values,
                                        old_values=t["old_values"], returns=t["returns"], ref_logp=t["ref_logp"],
                                        kl_coef=0.1, num_tokens=40)
        return loss * 2.0, metrics["clip_frac"]

    results = []
    for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        x = [t["logp"].clone().requires_grad_(), t["values"].clone().requires_grad_()]
        loss, frac = f(*x)
        loss.backward()
        results.append([loss, frac] + [v.grad for v in x])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_forward_grad_buffers_are_unnormalized(device):
    """Layer 2: u * inv_n is the gradient; buffers are skipped when not needed."""
    t = _inputs(7, 41, device)
    loss, metrics, u_logp, u_v, u_ent, inv_n = ppo_loss_forward(
        t["logp"], t["old_logp"], t["advantages"], t["mask"], values=t["values"], old_values=t["old_values"],
        returns=t["returns"], need_grads=(True, False, False))
    assert u_logp.shape == (7, 41) and u_v.numel() == 0 and u_ent.numel() == 0
    assert metrics.shape == (7,) and inv_n.item() == pytest.approx(1.0 / t["mask"].sum().item())


@pytest.mark.parametrize("kwargs, err", [
    (dict(old_logp=torch.zeros(2, 4)), ValueError),
    (dict(mask=torch.ones(3, 2)), ValueError),
    (dict(advantages="x"), TypeError),
    (dict(old_logp=torch.zeros(2, 3, device="meta")), ValueError),
    (dict(logp=torch.zeros(6)), ValueError),
    (dict(logp=torch.zeros(2, 3, dtype=torch.long)), TypeError),
    (dict(values=torch.zeros(2, 3)), ValueError),
    (dict(agg="mean"), ValueError),
    (dict(kl_kind="k4"), ValueError),
    (dict(kl_coef=0.1), ValueError),
    (dict(ent_coef=0.1), ValueError),
    (dict(dual_clip=0.5), ValueError),
    (dict(num_tokens="10"), TypeError),
    (dict(max_len=0), ValueError),
])
@pytest.mark.parametrize("fn", [ppo_loss_triton, ppo_loss_with_grads])
def test_errors(kwargs, err, fn):
    """Both entry points raise the same errors (ppo_loss_with_grads tests its tensors in one pass, then runs the
    descriptive checks on a failure; its hyperparameters are checked once per configuration, cached)."""
    args = dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), advantages=torch.zeros(2, 3),
                mask=torch.ones(2, 3))
    args.update(kwargs)
    with pytest.raises(err):
        fn(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"), args.pop("mask"), **args)


@pytest.mark.parametrize("B, T", [(0, 5), (3, 0)])
def test_empty_shapes(B, T, device):
    x = torch.zeros(B, T, device=device, requires_grad=True)
    z, m = x.detach(), torch.ones(B, T, device=device, dtype=torch.bool)
    loss, metrics = ppo_loss_triton(x, z, z, m, values=x, old_values=z, returns=z)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (B, T) and all(v.item() == 0.0 for v in metrics.values())


# ----------------------------------------------------------------------------- loss and gradients, no autograd
def _with_grads(t, kw, grad_scale=GRAD_SCALE):
    t = {k: v for k, v in t.items() if v is not None}
    args = [t.pop(k) for k in ("logp", "old_logp", "advantages", "mask")]
    return ppo_loss_with_grads(*args, **t, **kw, grad_scale=grad_scale)


@pytest.mark.parametrize("drop, kw", CONFIGS)
def test_with_grads_matches_reference(drop, kw, device):
    """The two-launch loss + gradients equal autograd of the fp64 reference (gradients of GRAD_SCALE * loss)."""
    t, kw = _config_case(drop, kw, device)
    loss, metrics, grads = _with_grads(t, kw)
    ref_loss, ref_metrics, ref_grads = _run(ppo_loss_reference, t, kw, dtype=torch.float64)
    _, f32_metrics, _ = _run(ppo_loss_reference, t, kw, dtype=torch.float32)
    assert not loss.requires_grad and set(metrics) == set(ref_metrics) and set(grads) == set(ref_grads)
    _assert_close(loss, ref_loss, 2e-5, "loss")
    for k in metrics:
        _assert_close(metrics[k], f32_metrics[k] if k in FRACTIONS else ref_metrics[k], 2e-5, k)
    for k in grads:
        assert grads[k].dtype == torch.float32 and grads[k].shape == t["logp"].shape
        _assert_close(grads[k], ref_grads[k], 2e-5, f"d {k}")


def test_with_grads_feeds_autograd_backward(device):
    """Handing the gradients to the producer's graph gives the parameter gradients of loss.backward()."""
    t = _inputs(9, 33, device)
    w = torch.randn(33, device=device)
    kw = dict(agg="seq-mean-token-mean", kl_coef=0.1, ent_coef=0.01)
    results = []
    for fused in (False, True):
        p = w.clone().requires_grad_()
        logp, values, ent = t["logp"] * p, t["values"] + p, t["entropy"] * p.abs()   # a toy "model"
        args = (t["old_logp"], t["advantages"], t["mask"])
        rest = dict(values=values, old_values=t["old_values"], returns=t["returns"], ref_logp=t["ref_logp"],
                    entropy=ent, **kw)
        if fused:
            _, _, g = ppo_loss_with_grads(logp, *args, **rest, grad_scale=0.25)
            torch.autograd.backward([logp, values, ent], [g["logp"], g["values"], g["entropy"]])
        else:
            (0.25 * ppo_loss_triton(logp, *args, **rest)[0]).backward()
        results.append(p.grad)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_with_grads_low_precision_inputs(device):
    """bf16 inputs: gradients come back in bf16, equal to the fp32 gradients of the same (rounded) inputs."""
    t = _inputs(11, 70, device, dtype=torch.bfloat16)
    kw = dict(agg="token-mean", kl_coef=0.1, ent_coef=0.01)
    loss, _, grads = _with_grads(t, kw)
    t32 = {k: v.float() if k != "mask" else v for k, v in t.items()}
    loss32, _, grads32 = _with_grads(t32, kw)
    assert loss.dtype == torch.bfloat16
    for k in grads:
        assert grads[k].dtype == torch.bfloat16
        torch.testing.assert_close(grads[k].float(), grads32[k], rtol=8e-3, atol=1e-7)


@pytest.mark.parametrize("B, T", [(0, 5), (3, 0)])
def test_with_grads_empty_shapes(B, T, device):
    z, m = torch.zeros(B, T, device=device), torch.ones(B, T, device=device, dtype=torch.bool)
    loss, metrics, grads = ppo_loss_with_grads(z, z, z, m, values=z, old_values=z, returns=z)
    assert loss.item() == 0.0 and grads["logp"].shape == (B, T) and grads["values"].shape == (B, T)


def test_with_grads_non_contiguous_inputs(device):
    """Transposed (non-contiguous) inputs, mask included, give what their contiguous copies give, in fp32 and bf16
    (the bf16 gradients are new buffers: written row-major, they must be contiguous whatever the input's strides)."""
    kw = dict(agg="seq-mean-token-mean", kl_coef=0.1, ent_coef=0.01)
    for dtype in (torch.float32, torch.bfloat16):
        t = _inputs(7, 19, device, dtype=dtype)
        ref = _with_grads(t, kw)
        t_nc = {k: v.t().contiguous().t() for k, v in t.items()}
        assert not t_nc["logp"].is_contiguous() and not t_nc["mask"].is_contiguous()
        out = _with_grads(t_nc, kw)
        assert torch.equal(out[0], ref[0])
        assert all(torch.equal(out[1][k], ref[1][k]) for k in ref[1])
        for k in ref[2]:
            assert out[2][k].is_contiguous() and torch.equal(out[2][k], ref[2][k]), (dtype, k)


def test_with_grads_metrics_mapping(device):
    """The metrics are a read-only mapping with the reference's keys; its values are the metrics of the fused
    forward (views made on first read)."""
    t = _inputs(6, 21, device)
    kw = dict(agg="token-mean", kl_coef=0.1)
    t.pop("entropy")
    _, metrics, _ = _with_grads(t, kw)
    _, ref_metrics, _ = _run(ppo_loss_triton, t, kw)
    assert list(metrics) == ["pg_loss", "clip_frac", "approx_kl", "vf_loss", "vf_clip_frac", "kl"]
    assert len(metrics) == 6 and "kl" in metrics and "entropy" not in metrics
    with pytest.raises(KeyError):
        metrics["entropy"]
    as_dict = dict(metrics)
    assert set(as_dict) == set(ref_metrics)
    for k, v in as_dict.items():
        assert v.dim() == 0 and torch.equal(v, ref_metrics[k]), k
    with pytest.raises(TypeError):
        metrics["kl"] = v


def test_in_place_ops_on_outputs(device):
    """The autograd path's loss and metrics are tensors of their own: `loss /= n` and an in-place op on a metric
    (an all-reduce, say) before backward() work, as they do on the eager reference."""
    t = _inputs(5, 17, device)
    logp = t["logp"].clone().requires_grad_()
    loss, metrics = ppo_loss_triton(logp, t["old_logp"], t["advantages"], t["mask"])
    ref = torch.autograd.grad(loss, logp, retain_graph=True)[0]
    metrics["pg_loss"].mul_(2.0)
    loss /= 4
    loss.backward()
    torch.testing.assert_close(logp.grad, ref / 4)


@pytest.mark.parametrize("fn", [ppo_loss_triton, ppo_loss_with_grads])
def test_tensor_hyperparameters_are_read_each_call(fn, device):
    """A hyperparameter given as a 0-dim tensor is read at every call, never served from the configuration cache
    (a tensor hashes by identity and may change in place)."""
    t = _inputs(4, 9, device)
    coef = torch.tensor(0.01)
    args = (t["logp"], t["old_logp"], t["advantages"], t["mask"])
    first = fn(*args, entropy=t["entropy"], ent_coef=coef)[0]
    coef.fill_(5.0)
    second = fn(*args, entropy=t["entropy"], ent_coef=coef)[0]
    expected = fn(*args, entropy=t["entropy"], ent_coef=5.0)[0]
    assert not torch.equal(first, second) and torch.equal(second, expected)


@pytest.mark.parametrize("fn", [ppo_loss_triton, ppo_loss_with_grads])
@pytest.mark.parametrize("kwargs, err, name", [
    (dict(clip_low=None), TypeError, "clip_low"), (dict(clip_high="0.3"), TypeError, "clip_high"),
    (dict(max_len="5"), TypeError, "max_len"), (dict(max_len=2.5), TypeError, "max_len"),
    (dict(vf_coef="a"), TypeError, "vf_coef"), (dict(kl_coef=float("nan")), ValueError, "kl_coef"),
    (dict(ent_coef=float("inf")), ValueError, "ent_coef"), (dict(dual_clip=True), TypeError, "dual_clip"),
    (dict(value_clip=torch.ones(2)), TypeError, "value_clip"),
])
def test_hyperparameter_errors_name_the_argument(fn, kwargs, err, name):
    z = torch.zeros(2, 3)
    with pytest.raises(err, match=name):
        fn(z, z, z, torch.ones(2, 3), **kwargs)


@pytest.mark.parametrize("bad", [None, "1", float("nan"), float("inf"), True, 10 ** 400])
def test_with_grads_bad_grad_scale(bad):
    z = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="grad_scale"):
        ppo_loss_with_grads(z, z, z, z, grad_scale=bad)


def test_with_grads_torch_compile_traces(device):
    """Under torch.compile (fullgraph) ppo_loss_with_grads goes through the custom op: same loss and gradients."""
    t = _inputs(5, 13, device)

    def fn(logp, values):
        loss, metrics, grads = ppo_loss_with_grads(
            logp, t["old_logp"], t["advantages"], t["mask"], values=values, old_values=t["old_values"],
            returns=t["returns"], ref_logp=t["ref_logp"], kl_coef=0.1, num_tokens=torch.tensor(40.0, device=device),
            grad_scale=0.5)
        return loss, metrics["clip_frac"], grads["logp"], grads["values"]

    eager = fn(t["logp"], t["values"])
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(t["logp"], t["values"])
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
