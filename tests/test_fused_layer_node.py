"""The recomputed decoder layer as one autograd node (``rlhf_engine/model/fused_layer.py``): the same log-probs and
gradients as the recorded path (``checkpoint_layer`` over ``forward_fused``), bit for bit on the CPU, on every
parameter, with padding, biases and a grad_output that is not all ones; the configurations it does not cover
(LoRA, hooks, the torch backend, no checkpointing, the switch off) take the recorded path; what the node cannot do
raises."""
from __future__ import annotations

import os

import pytest
import torch

import rlhf_engine.model.fused_layer as fl
from rlhf_engine.model import CausalLM, apply_lora, lora_parameters, preset
from rlhf_engine.model.attention import AttnMeta, mask_to_kv_range
from rlhf_engine.model.checkpointing import checkpoint_layer
from rlhf_engine.model.logprobs import sequence_logprobs
from tiny import padded_batch, perturbed_model


@pytest.fixture(autouse=True)
def _kernels(device):
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def node_calls(monkeypatch):
    """How many layer backwards the one-node path ran."""
    calls = []
    real = fl._layer_backward
    monkeypatch.setattr(fl, "_layer_backward", lambda *a: (calls.append(1), real(*a))[1])
    return calls


def _model(name: str, device, **over) -> CausalLM:
    return perturbed_model(device, name=name, **over)


_batch = padded_batch


def _run(m: CausalLM, node: bool, ids, mask, w, monkeypatch, attn_backend: str = "triton"):
    monkeypatch.setenv("RLHF_ENGINE_FUSED_LAYER_NODE", "1" if node else "0")
    m.zero_grad(set_to_none=True)
    lp = sequence_logprobs(m, ids, mask, start=1, backend="torch", temperature=0.8, attn_backend=attn_backend)
    (lp * w * mask[:, 1:]).sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _assert_same(a: dict, b: dict, device) -> None:
    assert a.keys() == b.keys()
    for name, g in a.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
        if device.type == "cpu":
            assert torch.equal(b[name], g), name
        else:  # the same kernels on the same values; a GPU library may pick another GEMM algorithm per call
            torch.testing.assert_close(b[name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("name,over", [("tiny-qwen2", {}), ("tiny-llama", {"o_proj_bias": True}),
                                       ("tiny-qwen2", {"batch_invariant": False, "head_dim": 12})],
                         ids=["qwen2-qkv-bias", "llama-o-bias", "qwen2-not-batch-invariant-heads-wider"])
def test_one_node_equals_recorded_path(name, over, device, monkeypatch, node_calls):
    """Log-probs and every parameter's gradient (the embedding's carries the first layer's input gradient) equal the
    recorded path's; the node ran once per layer. Also where the heads are wider than the hidden size (Hq * D = 72
    against 48: the o projection's input is not the layer's width)."""
    m = _model(name, device, **over)
    m.gradient_checkpointing = True
    ids, mask, w = _batch(m, device)
    lp0, ref = _run(m, False, ids, mask, w, monkeypatch)
    assert not node_calls
    lp1, got = _run(m, True, ids, mask, w, monkeypatch)
    assert len(node_calls) == m.config.num_layers
    assert torch.equal(lp0, lp1)
    assert ref.keys() == {n for n, _ in m.named_parameters()}
    _assert_same(ref, got, device)


def test_other_configurations_take_the_recorded_path(device, monkeypatch, node_calls):
    """LoRA adapters, a module hook, the torch backend and training without checkpointing keep the recorded path
    (the node never runs), and the LoRA model's gradients are still right."""
    m = _model("tiny-qwen2", device)
    ids, mask, w = _batch(m, device)
    m.gradient_checkpointing = False
    _run(m, True, ids, mask, w, monkeypatch)
    m.gradient_checkpointing = True
    h = m.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    _, mixed = _run(m, True, ids, mask, w, monkeypatch)
    assert len(node_calls) == m.config.num_layers - 1  # layers 0 and 2 only
    _, recorded = _run(m, False, ids, mask, w, monkeypatch)
    _assert_same(recorded, mixed, device)  # one-node layers around a recorded one
    h.remove()
    node_calls.clear()
    _run(m, True, ids, mask, w, monkeypatch, attn_backend="torch")
    assert not node_calls
    apply_lora(m, rank=4, alpha=8.0)
    with torch.no_grad():
        for p in lora_parameters(m):
            p.add_(0.1 * torch.randn_like(p))
    _, on = _run(m, True, ids, mask, w, monkeypatch)
    assert not node_calls
    m.gradient_checkpointing = False
    _, plain = _run(m, True, ids, mask, w, monkeypatch)
    _assert_same(plain, on, device)


def _layer_inputs(m: CausalLM, device):
    ids, mask, _ = _batch(m, device)
    B, T = ids.shape
    g = torch.Generator().manual_seed(2)
    x, d = (torch.randn(B, T, m.config.hidden_size, generator=g).to(device) for _ in range(2))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cos, sin = m.model.rotary(pos, x.dtype, half=True)
    meta = AttnMeta(backend="triton", fused_ops=True, batch_invariant=m.config.batch_invariant)
    meta.kv_start, meta.kv_end = mask_to_kv_range(mask)
    return x, d, cos, sin, meta


@pytest.mark.parametrize("used,with_d", [("x", True), ("d", True), ("both", True), ("both", False)],
                         ids=["x-used", "d-used", "both-used", "first-layer-form"])
def test_layer_node_direct(used, with_d, device):
    """One layer called directly on leaves of the caller's: an output the loss does not use (its gradient None), the
    first layer's form (no d), frozen parameters; the inputs' gradients equal the recorded path's and x.grad and
    d.grad never share memory."""
    m = _model("tiny-qwen2", device)
    layer = m.model.layers[0]
    x0, d0, cos, sin, meta = _layer_inputs(m, device)
    assert fl.applies(layer, x0, meta)
    g = torch.Generator().manual_seed(3)
    gx, gd = (torch.randn(x0.shape, generator=g).to(device) for _ in range(2))

    def grads(node: bool, frozen: bool):
        layer.requires_grad_(not frozen)
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        d = d0.clone().requires_grad_() if with_d else None
        args = (x, d, cos, sin, meta)
        xo, do = (fl.fused_layer_forward(layer, *args) if node
                  else checkpoint_layer(layer.forward_fused, *args))
        loss = (xo * gx).sum() if used == "x" else (do * gd).sum() if used == "d" else (xo * gx + do * gd).sum()
        loss.backward()
        if with_d:
            assert x.grad.data_ptr() != d.grad.data_ptr()
        out = {"x": x.grad, "d": None if d is None else d.grad}
        out.update({n: p.grad for n, p in layer.named_parameters() if p.grad is not None})
        return out

    for frozen in (False, True):
        ref, got = grads(False, frozen), grads(True, frozen)
        assert ref.keys() == got.keys()
        assert frozen == (len(ref) == 2)
        for k, v in ref.items():
            if v is None:
                assert got[k] is None, k
            elif device.type == "cpu":
                assert torch.equal(got[k], v), k
            else:
                torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5, msg=k)
    layer.requires_grad_(True)


@pytest.mark.parametrize("frozen", [("input_layernorm", "self_attn.k_proj", "mlp.up_proj"),
                                    ("model.embed_tokens", "input_layernorm", "self_attn")],
                         ids=["some-parameters", "embedding-norm1-attention"])
def test_partly_frozen_layers(frozen, device, monkeypatch, node_calls):
    """Some parameters frozen (one of a packed group, a norm), or the embedding and, in every layer, the first norm
    and the whole attention (the first layer's node then skips the attention backward: nothing upstream needs a
    gradient): the gradients that remain equal the recorded path's, the frozen ones stay None."""
    m = _model("tiny-qwen2", device)
    m.gradient_checkpointing = True
    for name, mod in m.named_modules():
        if any(name.endswith(f) for f in frozen):
            mod.requires_grad_(False)
    ids, mask, w = _batch(m, device)
    _, ref = _run(m, False, ids, mask, w, monkeypatch)
    _, got = _run(m, True, ids, mask, w, monkeypatch)
    assert len(node_calls) == m.config.num_layers
    assert ref.keys() == {n for n, p in m.named_parameters() if p.requires_grad} and len(ref) > 10
    _assert_same(ref, got, device)


def test_in_place_update_before_backward_and_autograd_grad_raise(device):
    """A parameter changed in place between the forward and the backward is caught (autograd's version check: the
    node saves the parameters, where the recorded path would recompute with the new values and return gradients of
    a forward that never ran); torch.autograd.grad through the node raises the checkpointing error."""
    m = _model("tiny-llama", device)
    layer = m.model.layers[0]
    x, d, cos, sin, meta = _layer_inputs(m, device)
    xo, do = fl.fused_layer_forward(layer, x.requires_grad_(), d, cos, sin, meta)
    with torch.no_grad():
        layer.mlp.down_proj.weight.mul_(1.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (xo.sum() + do.sum()).backward()
    xo, do = fl.fused_layer_forward(layer, x, d, cos, sin, meta)
    with pytest.raises(RuntimeError, match="torch.autograd.grad"):
        torch.autograd.grad((xo.sum() + do.sum()), [x])


@pytest.mark.gpu
def test_one_node_bf16_gpu(monkeypatch, node_calls, record_value):
    """bf16 on the GPU, the Qwen2-0.5B layer widths (2 layers): the node's gradients against the recorded path's (the
    same kernels: equal up to a GEMM algorithm cuBLAS may pick per call)."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    m = CausalLM(preset("qwen2-0.5b", num_layers=2, attn_backend="triton")).to(device, torch.bfloat16).train()
    m.gradient_checkpointing = True
    ids = torch.randint(3, m.config.vocab_size, (4, 257), device=device)
    mask = torch.ones_like(ids)
    mask[1, :50] = 0
    mask[2, -31:] = 0
    w = torch.randn(4, 256, device=device)
    lp0, ref = _run(m, False, ids, mask, w, monkeypatch)
    lp1, got = _run(m, True, ids, mask, w, monkeypatch)
    assert len(node_calls) == 2 and torch.equal(lp0, lp1)
    worst = 0.0
    for name, g in ref.items():
        assert torch.isfinite(got[name]).all(), name
        rel = ((got[name].float() - g.float()).norm() / g.float().norm().clamp(min=1e-30)).item()
        worst = max(worst, rel)
        assert rel <= 1e-2, (name, rel)
    record_value("one-node layer vs recorded path, bf16 grads: max relative L2 difference", worst)
