"""``integrations.hf_kernels``: a stock HF model with its norms and MLPs (and attention) on our kernels gives the
logits and every parameter's gradient of the unpatched model; undoing it restores the model."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config  # noqa: E402

from rlhf_engine.integrations import hf_kernels  # noqa: E402
from rlhf_engine.integrations.hf_kernels import apply_kernels, remove_kernels  # noqa: E402

# On the CPU the Triton kernels run under the interpreter ("triton"); on a GPU the default "auto" path.
BACKEND = "auto" if torch.cuda.is_available() else "triton"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model(kind: str, **over):
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
    common.update(over)
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[kind](**common)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).to(DEVICE)
    with torch.no_grad():  # non-trivial norm weights
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def _loss_and_grads(m, ids, am, w):
    m.zero_grad(set_to_none=True)
    logits = m(input_ids=ids, attention_mask=am).logits
    (logits.float().log_softmax(-1)[..., 0] * w).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("attention", [False, True])
def test_patched_model_matches_unpatched(kind, attention):
    m = _model(kind)
    B, T = 3, 11
    ids = torch.randint(0, 96, (B, T), device=DEVICE)
    am = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    am[1, :3] = 0  # left padding
    w = torch.randn(B, T, device=DEVICE)
    ref_logits, ref_grads = _loss_and_grads(m, ids, am, w)

    counts = apply_kernels(m, attention=attention, backend=BACKEND)
    L = m.config.num_hidden_layers
    norms = 2 * L + 1 + (2 * L if kind == "qwen3" else 0)  # Qwen3 also norms q and k per head (4-dim input)
    assert counts == {"rms_norm": norms, "mlp": L, "lm_head_loss": 1, "skipped": 0, "attention": int(attention)}
    assert apply_kernels(m, attention=attention, backend=BACKEND) == counts  # idempotent
    calls = {"norm": 0, "mlp": 0}
    orig_norm, orig_mlp = hf_kernels._rms_norm, hf_kernels._silu_mul

    def count(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    try:
        hf_kernels._rms_norm, hf_kernels._silu_mul = count("norm", orig_norm), count("mlp", orig_mlp)
        logits, grads = _loss_and_grads(m, ids, am, w)
    finally:
        hf_kernels._rms_norm, hf_kernels._silu_mul = orig_norm, orig_mlp
    assert calls == {"norm": norms, "mlp": L}  # the patched forwards ran, once each
    if attention:  # and our attention kernel, not HF's fallback
        from rlhf_engine.integrations import hf_attention

        n_attn = []
        orig_fa = hf_attention.flash_attention
        hf_attention.flash_attention = lambda *a, **k: (n_attn.append(1), orig_fa(*a, **k))[1]
        try:
            _loss_and_grads(m, ids, am, w)
        finally:
            hf_attention.flash_attention = orig_fa
        assert len(n_attn) == L
    valid = am.bool()
    torch.testing.assert_close(logits[valid], ref_logits[valid], atol=1e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        assert torch.isfinite(grads[n]).all(), n
        torch.testing.assert_close(grads[n], g, atol=1e-5 * max(g.abs().max().item(), 1.0), rtol=1e-4, msg=n)

    assert remove_kernels(m) == norms + L + 1
    assert m.config._attn_implementation == "sdpa"
    assert all(not hasattr(mod, "_rlhf_engine_kernels") and "forward" not in vars(mod) for mod in m.modules())
    torch.testing.assert_close(_loss_and_grads(m, ids, am, w)[0], ref_logits, atol=0, rtol=0)


def test_non_silu_mlp_is_skipped():
    m = _model("llama", hidden_act="gelu")
    counts = apply_kernels(m, attention=False, backend=BACKEND)
    assert counts["mlp"] == 0 and counts["skipped"] == m.config.num_hidden_layers
    assert counts["rms_norm"] == 2 * m.config.num_hidden_layers + 1


def test_validation():
    m = _model("llama")
    with pytest.raises(TypeError, match="model"):
        apply_kernels("not a model")
    with pytest.raises(ValueError, match="backend"):
        apply_kernels(m, backend="cuda")
    with pytest.raises(ValueError, match="attention"):
        apply_kernels(torch.nn.Sequential(m.model.norm))
    assert apply_kernels(torch.nn.Sequential(m.model.norm), attention=False, backend=BACKEND)["rms_norm"] == 1


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("num_items", [None, 17, "tensor"])
def test_fused_lm_head_loss_matches_hf_loss(kind, num_items):
    """In training mode with labels the patched model returns HF's causal-LM loss (shifted labels, -100 ignored,
    mean or sum / num_items_in_batch) from the fused LM head, logits None, and the same gradients; in eval mode
    and without labels it is the model's own forward (logits)."""
    m = _model(kind, tie_word_embeddings=(kind == "qwen2")).train()
    B, T = 3, 10
    ids = torch.randint(0, 96, (B, T), device=DEVICE)
    am = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    am[2, :4] = 0
    labels = ids.masked_fill(am == 0, -100)
    labels[0, 3:6] = -100  # ignored span (a prompt)
    extra = ({} if num_items is None else {"num_items_in_batch": 17 if num_items == 17 else
                                            torch.tensor(23, device=DEVICE)})

    def run():
        m.zero_grad(set_to_none=True)
        out = m(input_ids=ids, attention_mask=am, labels=labels, **extra)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref, ref_grads = run()
    assert apply_kernels(m, rms_norm=False, swiglu=False, attention=False, backend=BACKEND)["lm_head_loss"] == 1
    calls = []
    orig = hf_kernels.fused_linear_logprobs
    hf_kernels.fused_linear_logprobs = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    try:
        out, grads = run()
    finally:
        hf_kernels.fused_linear_logprobs = orig
    assert calls == [1] and out.logits is None and ref.logits is not None
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-5 * max(g.abs().max().item(), 1.0), rtol=1e-4, msg=n)
    tup = m(input_ids=ids, attention_mask=am, labels=labels, return_dict=False, **extra)  # HF's forward, tuple
    torch.testing.assert_close(tup[0], ref.loss, atol=1e-5, rtol=1e-5)
    assert tup[1].shape == (B, T, 96)
    with torch.no_grad():  # no autograd (an evaluation loop in training mode): logits for the metrics
        assert m(input_ids=ids, attention_mask=am, labels=labels, **extra).logits is not None
    m.eval()  # metrics need logits: the model's own forward
    with torch.no_grad():
        ev = m(input_ids=ids, attention_mask=am, labels=labels, **extra)
    assert ev.logits is not None and ev.logits.shape == (B, T, 96)
    torch.testing.assert_close(ev.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_shift_labels_custom_loss_and_autocast():
    """shift_labels given directly; a model with its own loss function keeps HF's head and loss; under autocast
    (Trainer's bf16=True) the fused head runs on bf16 operands, as autocast's matmul would, close to HF's loss."""
    m = _model("llama").train()
    ids = torch.randint(0, 96, (2, 9), device=DEVICE)
    labels = ids.clone()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    ref = m(input_ids=ids, labels=labels).loss
    apply_kernels(m, rms_norm=False, swiglu=False, attention=False, backend=BACKEND)
    calls = []
    orig = hf_kernels.fused_linear_logprobs
    hf_kernels.fused_linear_logprobs = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    try:
        torch.testing.assert_close(m(input_ids=ids, shift_labels=shift, labels=labels).loss, ref, atol=1e-5,
                                   rtol=1e-5)
        assert len(calls) == 1
        m.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().square().mean()
        out = m(input_ids=ids, labels=labels)
        assert len(calls) == 1 and out.logits is not None  # HF's head and the custom loss
        torch.testing.assert_close(out.loss, out.logits.float().square().mean())
        del m._loss_function  # the property keeps a set loss there
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            ours = m(input_ids=ids, labels=labels).loss
        assert len(calls) == 2 and torch.isfinite(ours)
        remove_kernels(m)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            hf = m(input_ids=ids, labels=labels).loss
        torch.testing.assert_close(ours, hf, atol=2e-2, rtol=2e-2)
    finally:
        hf_kernels.fused_linear_logprobs = orig


def test_pickles_and_keeps_foreign_instance_forwards(tmp_path):
    """A patched model pickles (torch.save / torch.load) and runs the same; a module whose forward an earlier
    wrapper replaced (accelerate's hooks do) is skipped, and remove_kernels leaves a later wrapper alone."""
    m = _model("qwen2", attn_implementation="eager")
    counts = apply_kernels(m, backend=BACKEND)
    ids = torch.randint(0, 96, (2, 7), device=DEVICE)
    with torch.no_grad():
        want = m(input_ids=ids).logits
    torch.save(m, tmp_path / "m.pt")
    m2 = torch.load(tmp_path / "m.pt", weights_only=False)
    assert all(vars(a).get("forward") is None or vars(a)["forward"].args[0] is a for a in m2.modules())
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=ids).logits, want)

    mlp = m.model.layers[1].mlp
    ours = mlp.forward
    mlp.forward = lambda x: ours(x)  # a wrapper added after apply_kernels
    assert remove_kernels(m) == counts["rms_norm"] + counts["mlp"] + counts["lm_head_loss"] - 1
    assert "forward" in vars(mlp)  # the later wrapper stays
    assert m.config._attn_implementation == "eager"  # the implementation the model had before

    m = _model("qwen2")
    norm = m.model.layers[0].input_layernorm
    own = norm.forward
    norm.forward = lambda x: own(x)  # stands for an accelerate hook: a forward set on the instance before
    counts = apply_kernels(m, backend=BACKEND)
    assert counts["skipped"] == 1 and counts["rms_norm"] == 2 * m.config.num_hidden_layers
    assert not hasattr(norm, "_rlhf_engine_kernels") and vars(norm)["forward"].__name__ == "<lambda>"


def test_gradient_checkpointing():
    """HF's own activation checkpointing over the patched layers: the loss and every gradient of the unpatched
    model with checkpointing."""
    m = _model("qwen2").train()
    if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name warns there
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert any(getattr(mod, "gradient_checkpointing", False) for mod in m.modules())
    ids = torch.randint(0, 96, (2, 9), device=DEVICE)

    def run():
        m.zero_grad(set_to_none=True)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    ref_loss, ref = run()
    apply_kernels(m, backend=BACKEND)
    loss, got = run()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for n, g in ref.items():
        torch.testing.assert_close(got[n], g, atol=1e-5 * max(g.abs().max().item(), 1.0), rtol=1e-4, msg=n)
