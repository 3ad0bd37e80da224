"""Packed q/k/v and gate/up projections (model/packing.py): separate parameters over one storage, kept packed
through conversions, copies, loading and optimizer steps, and one GEMM equal to the separate ones."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rlhf_engine.model import CausalLM, apply_lora, disable_adapters, preset
from rlhf_engine.model.loading import from_hf_model, model_from_state_dict, save_pretrained
from rlhf_engine.model.packing import (PackedLinearFunction, group_linear, lora_group_linear, pack_linears,
                                       packed_lora, packed_weights)


def _groups(model):
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        yield (a.q_proj, a.k_proj, a.v_proj)
        yield (m.gate_proj, m.up_proj)


def _assert_packed(model):
    with torch.no_grad():
        for g in _groups(model):
            pw = packed_weights(g)
            assert pw is not None, [type(m).__name__ for m in g]
            w, b = pw
            assert w.data_ptr() == g[0].weight.data_ptr()
            assert torch.equal(w, torch.cat([m.weight for m in g]))
            if g[0].bias is not None:
                assert torch.equal(b, torch.cat([m.bias for m in g]))
            else:
                assert b is None


def test_a_new_model_is_packed_and_one_gemm_equals_three():
    torch.manual_seed(0)
    m = CausalLM(preset("tiny-qwen2"))  # q/k/v with biases
    _assert_packed(m)
    a = m.model.layers[1].self_attn
    x = torch.randn(3, 5, m.config.hidden_size)
    with torch.no_grad():
        w, b = packed_weights((a.q_proj, a.k_proj, a.v_proj))
        y = F.linear(x, w, b)
        ref = torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], dim=-1)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    keys = set(m.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in keys and not any("pack" in k for k in keys)


def test_conversions_and_copies_repack():
    m = CausalLM(preset("tiny-llama"))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m = m.to(torch.float64)  # every parameter gets a new tensor: Transformer._apply repacks
    _assert_packed(m)
    ref = copy.deepcopy(m)  # the PPO reference: Transformer.__setstate__ repacks
    _assert_packed(ref)
    q_ref, q = ref.model.layers[0].self_attn.q_proj.weight, m.model.layers[0].self_attn.q_proj.weight
    assert q_ref.data_ptr() != q.data_ptr()
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k].double(), atol=0, rtol=0)
        assert torch.equal(ref.state_dict()[k], v)


def test_loading_packs_and_assign_needs_a_repack():
    src = CausalLM(preset("tiny-qwen2"))
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    m = model_from_state_dict(src.config, sd)  # meta model + load_state_dict(assign=True) + pack_projections
    _assert_packed(m)
    m.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    g = next(_groups(m))
    assert packed_weights(g) is None  # not packed any more: the inference path falls back to separate GEMMs
    m.model.pack_projections()
    _assert_packed(m)


def test_loading_assigns_packed_views_one_copy_at_a_time(monkeypatch):
    """model_from_state_dict packs the state dict before load_state_dict(assign=True): the parameters arrive
    packed, so Transformer.pack_projections has nothing left to copy (no second copy of q/k/v, gate/up)."""
    import rlhf_engine.model.llama as llama
    from rlhf_engine.model.packing import _rows, pack_state_dict

    src = CausalLM(preset("tiny-qwen2"))
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    calls = []

    def spy(linears):
        if linears[0].weight.device.type != "meta":
            calls.append(_rows([m.weight for m in linears]) is not None)
        return pack_linears(linears)

    monkeypatch.setattr(llama, "pack_linears", spy)
    m = model_from_state_dict(src.config, sd)
    assert calls and all(calls)  # every group was already packed when the model checked
    _assert_packed(m)
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    # the dict helper alone: views of one tensor per group, other keys untouched
    sd2 = {k: v.clone() for k, v in src.state_dict().items()}
    emb = sd2["model.embed_tokens.weight"]
    pack_state_dict(sd2, src.config.num_layers)
    qkv = [sd2[f"model.layers.1.self_attn.{n}_proj.bias"] for n in "qkv"]
    assert _rows(qkv) is not None and sd2["model.embed_tokens.weight"] is emb


def test_packed_weights_skips_layers_one_gemm_would_bypass():
    m = CausalLM(preset("tiny-llama"))
    a = m.model.layers[0].self_attn
    g = (a.q_proj, a.k_proj, a.v_proj)
    with torch.no_grad():
        assert packed_weights(g) is not None
        h = a.k_proj.register_forward_hook(lambda mod, inp, out: out * 2)
        assert packed_weights(g) is None  # a hook on k_proj must still run
        h.remove()
        assert packed_weights(g) is not None
    a.v_proj.bias = nn.Parameter(torch.zeros(a.v_proj.out_features))  # a trainable bias on one layer only
    with torch.no_grad():
        assert packed_weights(g) is None  # mixed biases: not packed together


def test_optimizer_steps_keep_the_packing_and_the_addresses():
    torch.manual_seed(0)
    m = CausalLM(preset("tiny-llama"))
    ptrs = [p.data_ptr() for p in m.parameters()]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    ids = torch.randint(0, m.config.vocab_size, (2, 7))
    for _ in range(2):
        m(ids).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert [p.data_ptr() for p in m.parameters()] == ptrs
    _assert_packed(m)  # the packed views show the updated values (compared with the parameters)


def test_packed_weights_refuses_when_a_gradient_or_an_adapter_is_needed():
    m = CausalLM(preset("tiny-llama"))
    g = next(_groups(m))
    assert packed_weights(g) is None  # grad mode, weights require grad: a storage view would lose the gradient
    with torch.no_grad():
        assert packed_weights(g) is not None
    apply_lora(m, rank=2, target_modules=("q_proj", "v_proj"))
    g = next(_groups(m))
    with torch.no_grad():
        assert packed_weights(g) is None  # the adapter is on: q and v are not their base weights alone
        with disable_adapters(m):
            assert packed_weights(g) is not None  # the reference policy: the base weights, packed


def test_packed_lora_group_equals_the_layers_and_refuses_what_it_cannot_run():
    """With adapters on every layer of a group, one packed base GEMM + one A GEMM + the B terms equal the layers
    run one by one; None when an adapter is off or missing, autograd needs a gradient, dropout is active in
    training mode, or a layer has a hook."""
    torch.manual_seed(0)
    m = CausalLM(preset("tiny-qwen2")).eval()
    apply_lora(m, rank=3, alpha=6.0)
    g = next(_groups(m))
    for layer in g:
        nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(2, 5, m.config.hidden_size)
    assert packed_lora(g) is None  # grad mode and trainable adapters
    with torch.no_grad():
        lo = packed_lora(g)
        assert lo is not None and lo[0].data_ptr() == g[0].weight.data_ptr()
        torch.testing.assert_close(lora_group_linear(x, *lo), torch.cat([layer(x) for layer in g], -1),
                                   atol=1e-6, rtol=1e-5)
        g[1].adapters_enabled = False
        assert packed_lora(g) is None  # k's adapter off: packed_weights' case only if all are off
        g[1].adapters_enabled = True
        h = g[2].register_forward_hook(lambda *a: None)
        assert packed_lora(g) is None
        h.remove()
        g[0].dropout = nn.Dropout(0.1)
        g[0].train()
        assert packed_lora(g) is None  # dropout is part of the training-mode forward
        g[0].eval()
        assert packed_lora(g) is not None
    plain = CausalLM(preset("tiny-qwen2")).eval()
    apply_lora(plain, rank=2, target_modules=("q_proj",))
    with torch.no_grad():
        assert packed_lora(next(_groups(plain))) is None  # k and v carry no adapter


def test_packed_lora_with_unequal_ranks_and_its_refusals():
    """Ranks 2, 4 and 8 with one scaling (alpha = 2 r): each B reads its own slice of the stacked low-rank
    activations; unequal scalings, adapters in another dtype, autocast and global hooks are refused."""
    from rlhf_engine.model.lora import LoRALinear

    torch.manual_seed(0)
    bases = [nn.Linear(24, n) for n in (24, 8, 8)]
    assert pack_linears(bases)
    group = [LoRALinear(b, rank=r, alpha=2.0 * r) for b, r in zip(bases, (2, 4, 8))]
    for layer in group:
        nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 24)
    with torch.no_grad():
        lo = packed_lora(group)
        assert lo is not None and lo[2].shape == (14, 24)
        torch.testing.assert_close(lora_group_linear(x, *lo), torch.cat([layer(x) for layer in group], -1),
                                   atol=1e-6, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert packed_lora(group) is None
        h = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
        assert packed_lora(group) is None and packed_weights(bases) is None
        h.remove()
        group[2].scaling = 1.5
        assert packed_lora(group) is None
        group[2].scaling = 2.0
        group[0].lora_A.data = group[0].lora_A.data.double()
        assert packed_lora(group) is None


def test_pack_linears_leaves_mismatched_layers_alone():
    a, b = nn.Linear(4, 3), nn.Linear(4, 2, bias=False)  # only one has a bias
    pa = a.weight.data_ptr()
    assert not pack_linears((a, b)) and a.weight.data_ptr() == pa
    c = nn.Linear(5, 2)  # another in_features
    assert not pack_linears((a, c))
    d = nn.Linear(4, 2).double()
    assert not pack_linears((a, d))
    e = nn.Linear(4, 6)
    w = (a.weight.detach().clone(), e.weight.detach().clone())
    assert pack_linears((a, e)) and pack_linears((a, e))  # idempotent
    assert torch.equal(a.weight, w[0]) and torch.equal(e.weight, w[1])


def test_save_and_hf_round_trip_from_packed_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = CausalLM(preset("tiny-qwen2"))
    save_pretrained(m, tmp_path / "ckpt")  # safetensors takes the non-overlapping views
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"))
    back = from_hf_model(hf)
    _assert_packed(back)
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


# ----------------------------------------------------------------------------- packed GEMMs with autograd
def _grads(out, grad_out, wrt):
    return torch.autograd.grad(out, wrt, grad_out, allow_unused=True)


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])  # q/k/v with and without biases
def test_group_linear_with_autograd_equals_the_layers(name):
    """In grad mode group_linear runs one GEMM through PackedLinearFunction: the output and the gradients of x and
    of every weight and bias equal the layers' own (fp64: to rounding), each parameter getting its own gradient,
    also with a frozen weight; the gate/up pair without biases too."""
    torch.manual_seed(0)
    m = CausalLM(preset(name)).double()
    for g in (next(_groups(m)), list(_groups(m))[1]):
        x = torch.randn(2, 7, m.config.hidden_size, dtype=torch.float64, requires_grad=True)
        params = [t for mod in g for t in (mod.weight, mod.bias) if t is not None]
        for frozen in (None, g[1].weight):
            if frozen is not None:
                frozen.requires_grad_(False)
            wrt = [x] + [t for t in params if t.requires_grad]
            y = group_linear(x, g)
            assert y is not None and y.grad_fn is not None and "PackedLinear" in type(y.grad_fn).__name__
            ref = torch.cat([mod(x) for mod in g], dim=-1)
            torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
            go = torch.randn_like(y)
            for a, b in zip(_grads(y, go, wrt), _grads(ref, go, wrt)):
                assert a is not None and a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            if frozen is not None:
                frozen.requires_grad_(True)


def test_packed_linear_function_gradcheck_and_version_check():
    """First and second derivatives (gradcheck, gradgradcheck: the backward is differentiable), the same gradients
    when saved-tensor hooks hand the weights back as copies (save_on_cpu, offloading), and autograd's version check
    when a weight is updated in place between forward and backward."""
    torch.manual_seed(0)
    m = CausalLM(preset("tiny-qwen2")).double()
    g = next(_groups(m))
    x = torch.randn(3, m.config.hidden_size, dtype=torch.float64, requires_grad=True)
    ws, bs = [mod.weight for mod in g], [mod.bias for mod in g]
    fn = lambda x, *p: PackedLinearFunction.apply(x, 3, None, None, *p)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *ws, *bs))
    small = [t[:4].detach().clone().requires_grad_() for t in ws]  # gradgradcheck on a smaller problem
    assert torch.autograd.gradgradcheck(fn, (x[:2].detach().clone().requires_grad_(), *small))
    go = torch.randn(3, sum(t.shape[0] for t in ws), dtype=torch.float64)
    ref = _grads(group_linear(x, g), go, [x, *ws, *bs])
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        y = group_linear(x, g)
    for a, b in zip(_grads(y, go, [x, *ws, *bs]), ref):
        assert torch.equal(a, b)
    y = group_linear(x, g)
    with torch.no_grad():
        g[1].weight.mul_(2.0)  # an optimizer step between the forward and the backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_group_linear_with_autograd_falls_back_where_one_gemm_would_skip_something():
    """Hooks (forward or backward), autocast, an adapter that is on, unpacked parameters, another dtype: None, and
    the caller runs the layers one by one."""
    torch.manual_seed(0)
    m = CausalLM(preset("tiny-llama"))
    g = next(_groups(m))
    x = torch.randn(2, 3, m.config.hidden_size)
    assert group_linear(x, g) is not None
    h = g[1].register_forward_hook(lambda *a: None)
    assert group_linear(x, g) is None
    h.remove()
    h = g[2].register_full_backward_hook(lambda *a: None)
    assert group_linear(x, g) is None
    h.remove()
    assert group_linear(x.double(), g) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert group_linear(x, g) is None
    apply_lora(m, rank=2, target_modules=("q_proj",), freeze_base=False)  # the base weights still train
    g = next(_groups(m))
    assert group_linear(x, g) is None
    with disable_adapters(m):
        assert group_linear(x, g) is not None  # the adapter off: the base weights alone, one GEMM
    g[0].weight.data = g[0].weight.data.clone()  # no longer a row block of the packed tensor
    with disable_adapters(m):
        assert group_linear(x, g) is None


def test_cached_packed_views_follow_in_place_updates_and_new_tensors():
    """The packed views are cached per group: an in-place update shows in the next call, and parameters given new
    tensors (then repacked) are read from the new ones, never from the cached old storage."""
    torch.manual_seed(0)
    m = CausalLM(preset("tiny-qwen2"))
    g = next(_groups(m))
    x = torch.randn(2, 3, m.config.hidden_size)

    def layers():
        return torch.cat([lin(x) for lin in g], -1)

    with torch.no_grad():
        torch.testing.assert_close(group_linear(x, g), layers())
        for lin in g:
            lin.weight.mul_(1.5)  # an optimizer-style in-place step
        torch.testing.assert_close(group_linear(x, g), layers())
        for lin in g:
            lin.weight.data = lin.weight.data.clone() * -2  # new tensors: not packed until repacked
            lin.bias.data = lin.bias.data.clone() + 1
        assert group_linear(x, g) is None
        assert pack_linears(g)
        torch.testing.assert_close(group_linear(x, g), layers())
    y = group_linear(x, g)  # with autograd: the same cached views
    torch.testing.assert_close(y, layers())
