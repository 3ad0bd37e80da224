"""Activation checkpointing (``rlhf_engine/model/checkpointing.py``): the recomputing backward gives the gradients
of the plain backward, bit for bit where the recomputation is exact; parameters behind inputs that need no gradient
(LoRA on a frozen trunk) still get theirs; dropout and autocast defer to torch.utils.checkpoint; what the scheme
cannot do (torch.autograd.grad) raises a clear error."""
from __future__ import annotations

import pytest
import torch

from rlhf_engine.model import CausalLM, apply_lora, lora_parameters
from rlhf_engine.model.checkpointing import checkpoint_layer, needs_torch_checkpoint
from rlhf_engine.model.logprobs import sequence_logprobs
from tiny import padded_batch, perturbed_model


def _model(backend: str, device) -> CausalLM:
    return perturbed_model(device, backend=backend)


_batch = padded_batch


def _grads(m: CausalLM, ckpt: bool, ids, mask, w, backend: str) -> dict:
    m.zero_grad(set_to_none=True)
    m.gradient_checkpointing = ckpt
    lp = sequence_logprobs(m, ids, mask, start=1, backend="torch", attn_backend=backend)
    (lp * w * mask[:, 1:]).sum().backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend,node", [("torch", "1"), ("triton", "0"), ("triton", "1")],
                         ids=["torch", "triton-recorded", "triton-one-node"])
def test_checkpointed_backward_equals_plain_backward(backend, node, device, monkeypatch):
    """Every parameter's gradient, with left and right padding, fp32: exactly the plain backward's (the recomputed
    forward runs the same ops on the same values; the triton backend's forward without autograd is the one the
    scoring path runs, equal to the training forward bit for bit). On the triton backend both ways to recompute:
    ``checkpoint_layer`` over the layer (the recorded path) and the layer as one node (model/fused_layer.py)."""
    if backend == "triton" and device.type != "cuda" and not _interpreter():
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("RLHF_ENGINE_FUSED_LAYER_NODE", node)
    calls = _count_node_backwards(monkeypatch)
    m = _model(backend, device)
    ids, mask, w = _batch(m, device)
    plain, ckpt = _grads(m, False, ids, mask, w, backend), _grads(m, True, ids, mask, w, backend)
    assert len(calls) == (m.config.num_layers if (backend, node) == ("triton", "1") else 0)
    assert plain.keys() == ckpt.keys() == {n for n, _ in m.named_parameters()}
    for name, g in plain.items():
        assert torch.isfinite(g).all(), name
        if device.type == "cpu":
            assert torch.equal(ckpt[name], g), name
        else:  # the same kernels on the same values; allow a GEMM algorithm that a GPU library picks per call
            torch.testing.assert_close(ckpt[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_recomputed_layers_copy_no_residual_gradient(device, monkeypatch):
    """The detached inputs of a recomputed layer get their .grad read once (never accumulated into), so the residual
    add + RMSNorm hands one gradient tensor to both of its inputs there, no copy (a clone a layer before); a leaf
    of the caller's still gets its own copy (test_fused_layer_backward.py::test_rms_norm_leaf_grads_do_not_alias)."""
    if device.type != "cuda" and not _interpreter():
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    from rlhf_engine.kernels import rmsnorm

    monkeypatch.setenv("RLHF_ENGINE_FUSED_LAYER_NODE", "0")  # the recorded path (the one node calls no RMSNormFunction)
    flags = []
    real = rmsnorm.RMSNormFunction.apply
    # (x, weight, eps, residual, copy_grad): record copy_grad of the norms that have a residual
    monkeypatch.setattr(rmsnorm.RMSNormFunction, "apply",
                        lambda *a: (flags.append(a[4]) if a[3] is not None else None, real(*a))[1])
    m = _model("triton", device)
    ids, mask, w = _batch(m, device)
    _grads(m, True, ids, mask, w, "triton")
    assert len(flags) >= 2 * (m.config.num_layers - 1) and not any(flags), flags


def test_a_callers_leaves_through_checkpoint_layer_get_their_own_grads(device):
    """checkpoint_layer(f, x, r) on leaves of the caller's: x.grad and r.grad are separate tensors, and a second
    backward accumulates each right (the read-once gradients are only for inputs that come from a graph)."""
    if device.type != "cuda" and not _interpreter():
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    from rlhf_engine.kernels.rmsnorm import rms_norm

    w = torch.randn(32, device=device)
    x, r = (torch.randn(5, 32, device=device, requires_grad=True) for _ in range(2))
    dy = torch.randn(5, 32, device=device)
    for _ in range(2):
        checkpoint_layer(lambda a, b: rms_norm(a, w, 1e-6, residual=b, backend="triton")[0], x, r).backward(dy)
    x1, r1 = (t.detach().clone().requires_grad_() for t in (x, r))
    rms_norm(x1, w, 1e-6, residual=r1, backend="triton")[0].backward(dy)
    assert x.grad.data_ptr() != r.grad.data_ptr()
    torch.testing.assert_close(x.grad, 2 * x1.grad)
    torch.testing.assert_close(r.grad, 2 * r1.grad)


def test_lora_on_a_frozen_trunk_gets_its_gradients(device):
    """No input of a checkpointed layer needs a gradient (the embedding is frozen), but its adapters do."""
    m = _model("torch", device)
    apply_lora(m, rank=4, alpha=8.0)
    with torch.no_grad():
        for p in lora_parameters(m):
            p.add_(0.1 * torch.randn_like(p))  # B starts at zero: make A's gradient non-zero too
    ids, mask, w = _batch(m, device)
    plain, ckpt = _grads(m, False, ids, mask, w, "torch"), _grads(m, True, ids, mask, w, "torch")
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and plain.keys() == ckpt.keys() == names
    for name, g in plain.items():
        assert g.abs().sum() > 0, name
        assert torch.equal(ckpt[name], g), name


def test_dropout_defers_to_torch_checkpoint(device):
    """A LoRA dropout draws random numbers: the model uses torch.utils.checkpoint, which replays the RNG, so the
    gradients still equal the plain backward's under the same seed."""
    m = _model("torch", device)
    apply_lora(m, rank=4, alpha=8.0, dropout=0.3)
    with torch.no_grad():
        for p in lora_parameters(m):
            p.add_(0.1 * torch.randn_like(p))
    assert needs_torch_checkpoint(m.model)
    assert not needs_torch_checkpoint(m.model.eval()) and needs_torch_checkpoint(m.model.train())
    ids, mask, w = _batch(m, device)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(5)
        results.append(_grads(m, ckpt, ids, mask, w, "torch"))
    for name, g in results[0].items():
        torch.testing.assert_close(results[1][name], g, msg=name)


def test_autocast_defers_to_torch_checkpoint():
    m = _model("torch", torch.device("cpu"))
    assert not needs_torch_checkpoint(m.model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert needs_torch_checkpoint(m.model)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("backend,node", [("torch", "1"), ("triton", "0"), ("triton", "1")],
                         ids=["torch", "triton-recorded", "triton-one-node"])
def test_autograd_grad_and_double_backward_through_checkpointed_layers_raise(backend, node, device, monkeypatch):
    """What the recomputing backward cannot do raises (and shows that the layers are checkpointed on every path)."""
    if backend == "triton" and device.type != "cuda" and not _interpreter():
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("RLHF_ENGINE_FUSED_LAYER_NODE", node)
    m = _model(backend, device)
    m.gradient_checkpointing = True
    ids, mask, _ = _batch(m, device)
    if (backend, node) == ("triton", "1"):  # the error comes from the one node, not from checkpoint_layer
        from rlhf_engine.model import checkpointing

        monkeypatch.setattr(checkpointing, "_Recompute", None)

    def loss():
        return sequence_logprobs(m, ids, mask, start=1, backend="torch", attn_backend=backend).sum()

    with pytest.raises(RuntimeError, match="torch.autograd.grad"):
        torch.autograd.grad(loss(), list(m.parameters()))
    with pytest.raises(RuntimeError, match="create_graph"):
        loss().backward(create_graph=True)


def test_frozen_layers_build_no_graph_and_every_dropout_kind_is_seen():
    """A layer whose inputs and parameters need no gradient is just run (nothing kept, no recomputation); the
    dropout check covers Dropout1d/2d/3d and AlphaDropout too (not subclasses of nn.Dropout)."""
    lin = torch.nn.Linear(4, 4).requires_grad_(False)
    out = checkpoint_layer(lin, torch.randn(2, 4))
    assert not out.requires_grad and out.grad_fn is None
    lin.weight.requires_grad_(True)
    out = checkpoint_layer(lin, torch.randn(2, 4))
    assert out.requires_grad
    out.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    for drop in (torch.nn.Dropout2d(0.1), torch.nn.AlphaDropout(0.1), torch.nn.Dropout(0.1)):
        assert needs_torch_checkpoint(torch.nn.Sequential(torch.nn.Linear(4, 4), drop).train())
    assert not needs_torch_checkpoint(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.0)).train())


def test_checkpoint_layer_function_semantics():
    """A plain function: tuple outputs, a non-tensor argument, a None argument, an output the loss does not use,
    and no autograd at all (the function is simply called)."""
    w = torch.randn(5, 5, requires_grad=True)

    def f(x, r, scale, extra):
        assert extra is None
        y = torch.tanh(x @ w) * scale
        return y, y + r

    x, r = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    g = torch.randn(4, 5)
    y, s = f(x, r, 2.0, None)
    (s * g).sum().backward()
    ref = [t.grad.clone() for t in (x, r, w)]
    for t in (x, r, w):
        t.grad = None
    y, s = checkpoint_layer(f, x, r, 2.0, None)
    assert not y.requires_grad or y.grad_fn is s.grad_fn  # outputs of the one recomputing node
    (s * g).sum().backward()  # y unused: its gradient arrives as None
    for a, b in zip((x.grad, r.grad, w.grad), ref):
        assert torch.equal(a, b)
    with torch.no_grad():
        out = checkpoint_layer(f, x, r, 2.0, None)
    assert not out[0].requires_grad


def _count_node_backwards(monkeypatch) -> list:
    """A list that gets an entry per layer backward of the one-node path (model/fused_layer.py)."""
    import rlhf_engine.model.fused_layer as fl

    calls = []
    real = fl._layer_backward
    monkeypatch.setattr(fl, "_layer_backward", lambda *a: (calls.append(1), real(*a))[1])
    return calls


def _interpreter() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"

