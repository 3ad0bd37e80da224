"""``integrations.hf_kernels``: a stock HF model with its norms and MLPs (and attention) on our kernels gives the
logits and every parameter's gradient of the unpatched model; undoing it restores the model."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config  # noqa: E402

from rlhf_engine.integrations import hf_kernels  # noqa: E402
from rlhf_engine.integrations.hf_kernels import apply_kernels, remove_kernels  # noqa: E402

# On the CPU the Triton kernels run under the interpreter ("triton"); on a GPU the default "auto" path.
BACKEND = "auto" if torch.cuda.is_available() else "triton"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model(kind: str, **over):
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
    common.update(over)
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[kind](**common)
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


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
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
@pytest.mark.parametrize("num_items", [None, 17])
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
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items, device=DEVICE)}

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
    tup = m(input_ids=ids, attention_mask=am, labels=labels, return_dict=False, **extra)
    torch.testing.assert_close(tup[0], ref.loss, atol=1e-5, rtol=1e-5)
    m.eval()  # metrics need logits: the model's own forward
    with torch.no_grad():
        ev = m(input_ids=ids, attention_mask=am, labels=labels, **extra)
    assert ev.logits is not None and ev.logits.shape == (B, T, 96)
    torch.testing.assert_close(ev.loss, ref.loss, atol=1e-5, rtol=1e-5)
