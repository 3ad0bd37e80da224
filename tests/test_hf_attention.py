"""Tiny random HF Llama / Qwen2 models give the same logits (and grads) on our attention as on eager / SDPA."""
import inspect
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, Qwen2Config  # noqa: E402

from rlhf_engine.integrations.hf_attention import mask_to_kv_range, register_hf_attention  # noqa: E402

# On the CPU the Triton kernels run under the interpreter ("triton"); on a GPU the default "auto" path.
NAME = register_hf_attention("rlhf_engine_test", backend="auto" if torch.cuda.is_available() else "triton")


def _config(kind: str):
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        return LlamaConfig(**common)
    return Qwen2Config(**common, use_sliding_window=False)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    torch.manual_seed(0)
    cfg = _config(request.param)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation=NAME).eval()
    assert m.config._attn_implementation == NAME
    return m


def _batch(B, T, padding, device="cpu"):
    ids = torch.randint(0, 96, (B, T), device=device)
    am = torch.ones(B, T, dtype=torch.long, device=device)
    if padding == "left":
        am[0, :5] = 0
        am[1, :2] = 0
    elif padding == "right":
        am[0, -4:] = 0
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    return ids, (am if padding != "none" else None), pos


def _logits(m, impl, **kw):
    m.set_attn_implementation(impl)
    try:
        with torch.no_grad():
            return m(**kw).logits
    finally:
        m.set_attn_implementation(NAME)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_prefill_logits_match(model, padding):
    ids, am, pos = _batch(3, 13, padding)
    kw = dict(input_ids=ids, attention_mask=am, position_ids=pos)
    ours = _logits(model, NAME, **kw)
    valid = torch.ones_like(ids, dtype=torch.bool) if am is None else am.bool()
    for impl in ("eager", "sdpa"):
        ref = _logits(model, impl, **kw)
        torch.testing.assert_close(ours[valid], ref[valid], atol=1e-4, rtol=1e-4)
    assert not torch.isnan(ours).any()


@pytest.mark.parametrize("padding", ["none", "left"])
def test_decode_steps_match(model, padding):
    """Prefill into a DynamicCache, then two decode steps (1 token, then 2 tokens)."""
    ids, am, pos = _batch(2, 11, padding)
    new = [torch.randint(0, 96, (2, 1)), torch.randint(0, 96, (2, 2))]
    outs = {}
    # transformers >= 5.2x names the cache argument ``cache`` (``past_key_values`` deprecated); 5.17 does not
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        cache = DynamicCache(config=model.config)
        mask, p = am, pos
        steps = []
        with torch.no_grad():
            steps.append(model(input_ids=ids, attention_mask=mask, position_ids=p, use_cache=True,
                               **{cache_kw: cache}).logits[:, -1])
            for tok in new:
                n = tok.shape[1]
                if mask is not None:
                    mask = torch.cat([mask, torch.ones(2, n, dtype=mask.dtype)], 1)
                p = p[:, -1:] + torch.arange(1, n + 1)[None]
                steps.append(model(input_ids=tok, attention_mask=mask, position_ids=p, use_cache=True,
                                   **{cache_kw: cache}).logits)
        outs[impl] = steps
    model.set_attn_implementation(NAME)
    for a, b in zip(outs["eager"], outs[NAME]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_training_grads_match(model):
    ids, am, pos = _batch(2, 10, "right")
    grads = {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
        (logits.float().log_softmax(-1)[am.bool()].mean()).backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.set_attn_implementation(NAME)
    model.zero_grad()
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads[NAME][n], g, atol=1e-4, rtol=1e-3, msg=lambda m: f"{n}: {m}")


def test_mask_to_kv_range_and_fallback(model):
    B, Tq, Tk = 2, 4, 7
    j = torch.arange(Tk)
    i = torch.arange(Tq)[:, None] + 3
    start = torch.tensor([1, 0])
    mask = (j <= i)[None] & (j[None, None] >= start[:, None, None])  # (B, Tq, Tk)
    r = mask_to_kv_range(mask[:, None], B, Tq, Tk)
    assert r is not None and r.offset == 3 and r.kv_start.tolist() == [1, 0] and r.kv_end.tolist() == [7, 7]
    assert r.ends_at_query
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None]
    assert mask_to_kv_range(additive, B, Tq, Tk).kv_start.tolist() == [1, 0]
    holes = mask.clone()
    holes[0, :, 4] = False  # a hole inside the range: not representable
    assert mask_to_kv_range(holes[:, None], B, Tq, Tk) is None
    assert mask_to_kv_range(additive * 0.5 + 1.0, B, Tq, Tk) is None  # a bias, not a mask

    # An arbitrary 4D mask given to the model goes to HF's SDPA with a warning, same logits.
    T = 9
    ids = torch.randint(0, 96, (2, T))
    m4 = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None].repeat(2, 1, 1, 1)
    m4[:, :, 6, 2] = False
    import transformers.integrations.sdpa_attention as sdpa_module

    with mock.patch.object(sdpa_module, "sdpa_attention_forward", wraps=sdpa_module.sdpa_attention_forward) as spy:
        ours = _logits(model, NAME, input_ids=ids, attention_mask=m4)
    assert spy.call_count == model.config.num_hidden_layers  # every layer fell back
    ref = _logits(model, "sdpa", input_ids=ids, attention_mask=m4)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("cache_implementation", ["static", "dynamic"])
def test_generate_left_padded(model, cache_implementation):
    """Greedy generate with left padding: same tokens and logits; the static cache hands us (B, Hkv, L_max, D)
    keys with unwritten slots masked, which exercises the causal-offset derivation."""
    ids, am, _ = _batch(2, 9, "left")
    outs = {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            outs[impl] = model.generate(ids, attention_mask=am, max_new_tokens=3, do_sample=False,
                                        cache_implementation=cache_implementation, output_logits=True,
                                        return_dict_in_generate=True, pad_token_id=0)
    model.set_attn_implementation(NAME)
    assert torch.equal(outs["eager"].sequences, outs[NAME].sequences)
    for a, b in zip(outs["eager"].logits, outs[NAME].logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
