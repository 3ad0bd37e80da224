"""Tiny random HF Llama / Qwen2 models give the same logits (and grads) on our attention as on eager / SDPA."""
import inspect
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, Qwen2Config  # noqa: E402

import rlhf_engine.integrations.hf_attention as hf_attention  # noqa: E402
from rlhf_engine.integrations.hf_attention import mask_to_kv_range, register_hf_attention  # noqa: E402

# On the CPU the Triton kernels run under the interpreter ("triton"); on a GPU the default "auto" path.
NAME = register_hf_attention("rlhf_engine_test", backend="auto" if torch.cuda.is_available() else "triton")
# The model and its inputs live on CUDA when present (so that "auto" runs the Triton kernels there), else on the CPU.
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation=NAME).to(DEV).eval()
    assert m.config._attn_implementation == NAME
    return m


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts of what our attention function ran: {"flash": n, "decode": n}; a fallback to HF's SDPA raises, so
    that a parity test cannot pass on HF's own attention."""
    calls = {"flash": 0, "decode": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    def no_fallback(reason, *args):
        raise AssertionError(f"fell back to HF's SDPA: {reason}")

    monkeypatch.setattr(hf_attention, "flash_attention", spy("flash", hf_attention.flash_attention))
    monkeypatch.setattr(hf_attention, "decode_attention", spy("decode", hf_attention.decode_attention))
    monkeypatch.setattr(hf_attention, "_fallback", no_fallback)
    return calls


def _batch(B, T, padding, device=DEV):
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
def test_prefill_logits_match(model, padding, kernel_calls):
    ids, am, pos = _batch(3, 13, padding)
    kw = dict(input_ids=ids, attention_mask=am, position_ids=pos)
    ours = _logits(model, NAME, **kw)
    assert kernel_calls == {"flash": model.config.num_hidden_layers, "decode": 0}
    valid = torch.ones_like(ids, dtype=torch.bool) if am is None else am.bool()
    for impl in ("eager", "sdpa"):
        ref = _logits(model, impl, **kw)
        torch.testing.assert_close(ours[valid], ref[valid], atol=1e-4, rtol=1e-4)
    assert not torch.isnan(ours).any()


@pytest.mark.parametrize("padding", ["none", "left"])
def test_decode_steps_match(model, padding, kernel_calls):
    """Prefill into a DynamicCache, then two decode steps (1 token, then 2 tokens)."""
    ids, am, pos = _batch(2, 11, padding)
    new = [torch.randint(0, 96, (2, 1), device=DEV), torch.randint(0, 96, (2, 2), device=DEV)]
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
                    mask = torch.cat([mask, torch.ones(2, n, dtype=mask.dtype, device=DEV)], 1)
                p = p[:, -1:] + torch.arange(1, n + 1, device=DEV)[None]
                steps.append(model(input_ids=tok, attention_mask=mask, position_ids=p, use_cache=True,
                                   **{cache_kw: cache}).logits)
        outs[impl] = steps
    model.set_attn_implementation(NAME)
    layers = model.config.num_hidden_layers  # the prefill on flash_attention, both decode steps on decode_attention
    assert kernel_calls == {"flash": layers, "decode": 2 * layers}
    for a, b in zip(outs["eager"], outs[NAME]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_training_grads_match(model, kernel_calls):
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
    assert kernel_calls == {"flash": model.config.num_hidden_layers, "decode": 0}
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
    ids = torch.randint(0, 96, (2, T), device=DEV)
    m4 = torch.tril(torch.ones(T, T, dtype=torch.bool, device=DEV))[None, None].repeat(2, 1, 1, 1)
    m4[:, :, 6, 2] = False
    import transformers.integrations.sdpa_attention as sdpa_module

    with mock.patch.object(sdpa_module, "sdpa_attention_forward", wraps=sdpa_module.sdpa_attention_forward) as spy:
        ours = _logits(model, NAME, input_ids=ids, attention_mask=m4)
    assert spy.call_count == model.config.num_hidden_layers  # every layer fell back
    ref = _logits(model, "sdpa", input_ids=ids, attention_mask=m4)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("cache_implementation", ["static", "dynamic"])
def test_generate_left_padded(model, cache_implementation, kernel_calls):
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
    layers = model.config.num_hidden_layers  # the prompt on flash_attention, 2 more tokens on decode_attention
    assert kernel_calls == {"flash": layers, "decode": 2 * layers}
    assert torch.equal(outs["eager"].sequences, outs[NAME].sequences)
    for a, b in zip(outs["eager"].logits, outs[NAME].logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_autocast_casts_qkv_as_hf_sdpa_does(model):
    """An fp32 model under bf16 autocast (Trainer's bf16=True): the projections give bf16, RoPE in fp32 promotes
    q and k back to fp32, v stays bf16. Our path casts all three to the autocast dtype, as HF's SDPA path does
    (it raised a dtype error), and the loss matches HF's under the same autocast."""
    ids, am, pos = _batch(2, 10, "right")
    losses = {}
    for impl in ("sdpa", NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad(), torch.autocast(DEV.type, dtype=torch.bfloat16):
            losses[impl] = model(input_ids=ids, attention_mask=am, position_ids=pos, labels=ids).loss
    model.set_attn_implementation(NAME)
    assert torch.isfinite(losses[NAME])
    torch.testing.assert_close(losses[NAME], losses["sdpa"], atol=3e-2, rtol=3e-2)


def test_inference_mode_with_a_padding_mask(model):
    """Inference tensors have no version counter: the mask cache must not ask for one."""
    ids, am, pos = _batch(3, 11, "left")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
    with torch.inference_mode():
        got = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
    torch.testing.assert_close(got, want)


def test_packed_sequences_without_a_mask_attend_within_their_segment(model):
    """Two sequences packed in one row with restarting position_ids and no mask (what transformers hands over
    when it detects packing): each segment's logits equal those of the segment run alone."""
    torch.manual_seed(3)
    a, b = torch.randint(0, 96, (1, 7), device=DEV), torch.randint(0, 96, (1, 5), device=DEV)
    ids = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(7, device=DEV), torch.arange(5, device=DEV)])[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits
        alone = [model(input_ids=x).logits for x in (a, b)]
    torch.testing.assert_close(packed[:, :7], alone[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed[:, 7:], alone[1], atol=1e-4, rtol=1e-4)
    # unpacked rows (positions 0..T-1) keep our kernel: no block mask
    from rlhf_engine.integrations.hf_attention import packed_causal_mask

    assert packed_causal_mask(torch.arange(12)[None], None, 1, 12) is None
    seg = packed_causal_mask(pos, None, 1, 12)[0, 0]
    assert seg[8, 7] and not seg[8, 6] and not seg[6, 7]  # row 8 (b's 2nd token) sees b's 1st, not a's last
    cu = packed_causal_mask(None, torch.tensor([0, 7, 12], device=DEV), 1, 12)[0, 0]
    assert torch.equal(cu, seg)
    two = packed_causal_mask(pos, None, 2, 12)  # the same position tensor at another batch size: still packed
    assert two.shape == (2, 1, 12, 12) and torch.equal(two[1, 0], seg)
    import gc

    import rlhf_engine.integrations.hf_attention as hfa

    del pos
    gc.collect()
    assert hfa._last_packed["mask"] is None  # the cached mask went with its position tensor


def test_mask_ranges_keep_temporaries_to_a_block(monkeypatch):
    """mask_to_kv_range works through (B, rows, Tk) blocks: no temporary of (B, Tq, Tk) int elements (an int64
    one was 8 bytes per mask entry, 4.3 GB at B=8, T=8192)."""
    import rlhf_engine.integrations.hf_attention as hfa
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # not a view
                    Largest.biggest = max(Largest.biggest, t.untyped_storage().nbytes())
            return out

    B, T = 2, 64
    j = torch.arange(T)
    mask = (j[None, :] <= j[:, None])[None, None].repeat(B, 1, 1, 1)
    mask[0, :, :, :3] = False  # left padding in row 0
    monkeypatch.setattr(hfa, "MASK_BLOCK_ELEMENTS", B * T * 8)  # 8 query rows a block
    with Largest():
        r = mask_to_kv_range(mask, B, T, T)
    assert r is not None and r.kv_start.tolist() == [3, 0]
    assert Largest.biggest <= B * 8 * T * 4  # one block of int32, not the (B, T, T) int64 of before
