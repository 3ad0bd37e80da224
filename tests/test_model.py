"""The Llama-family model: config interop, logit parity with transformers, padding, heads, log-probs."""
import copy

import warnings

import pytest
import torch

from rlhf_engine.model import CausalLM, ModelConfig, ScalarModel, preset, sequence_logprobs
from rlhf_engine.model.attention import mask_to_kv_range
from rlhf_engine.model.loading import to_hf_model

TINY = ["tiny-llama", "tiny-qwen2", "tiny-mistral"]


def _model(name: str, **overrides) -> CausalLM:
    """A tiny random model with non-trivial norms/biases and O(1) logits."""
    torch.manual_seed(0)
    m = CausalLM(preset(name, initializer_range=0.08, **overrides)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def _batch(vocab: int, B: int = 4, T: int = 23):
    ids = torch.randint(3, vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :7] = 0          # left padding
    mask[2, 15:] = 0         # right padding
    mask[3, :2] = 0          # both
    mask[3, 20:] = 0
    return ids.masked_fill(mask == 0, 0), mask


# ----------------------------------------------------------------------------- config
def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=6, num_kv_heads=4, hidden_size=48)
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig(hidden_size=50, num_heads=8, num_kv_heads=8)
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig(model_type="gpt2")
    with pytest.raises(ValueError, match="attn_backend"):
        ModelConfig(attn_backend="flash")
    with pytest.raises(ValueError, match="rope_scaling"):
        ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="preset"):
        preset("gpt-5")


@pytest.mark.parametrize("name", TINY + ["qwen2-0.5b", "smollm2-135m", "llama3.1-8b"])
def test_config_hf_roundtrip(name):
    cfg = preset(name)
    back = ModelConfig.from_hf(cfg.to_hf())
    assert back == cfg
    assert ModelConfig.from_hf(cfg.to_hf().to_dict()) == cfg


def test_config_from_transformers4_dict():
    d = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rope_theta=5e5, max_position_embeddings=4096,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 1024}, eos_token_id=[5, 6])
    cfg = ModelConfig.from_hf(d)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling.factor == 8.0 and cfg.head_dim == 16
    assert cfg.eos_token_ids == (5, 6)


def test_sliding_window_configs_warn():
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=8192)
    with pytest.warns(UserWarning, match="sliding_window=4096.*at most 4096 tokens"):
        ModelConfig.from_hf(dict(base, model_type="mistral", sliding_window=4096))
    with pytest.warns(UserWarning, match="sliding_window=2048"):
        ModelConfig.from_hf(dict(base, model_type="qwen2", sliding_window=2048, use_sliding_window=True,
                                 max_window_layers=1))
    with warnings.catch_warnings():  # no layer slides, or the window covers every position
        warnings.simplefilter("error")
        ModelConfig.from_hf(dict(base, model_type="qwen2", sliding_window=2048, use_sliding_window=False))
        ModelConfig.from_hf(dict(base, model_type="qwen2", sliding_window=2048, use_sliding_window=True,
                                 max_window_layers=2))
        ModelConfig.from_hf(dict(base, model_type="mistral", sliding_window=None))
        ModelConfig.from_hf(dict(base, model_type="mistral", sliding_window=8192))


def test_presets_parameter_counts():
    assert abs(preset("qwen2-0.5b").num_parameters() - 494_032_768) < 1e6
    assert abs(preset("smollm2-135m").num_parameters() - 134_515_008) < 1e6
    assert abs(preset("llama3-8b").num_parameters() - 8_030_261_248) < 1e7


# ----------------------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("name,tied", [("tiny-llama", False), ("tiny-llama", True), ("tiny-qwen2", True),
                                       ("tiny-qwen2", False), ("tiny-mistral", False)])
def test_logit_parity_with_transformers(name, tied):
    m = _model(name, tie_word_embeddings=tied)
    hf = to_hf_model(m)
    ids, mask = _batch(m.config.vocab_size)
    with torch.no_grad():
        ours, ref = m(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
        ours_nomask, ref_nomask = m(ids), hf(input_ids=ids).logits
    assert ref.abs().max() > 0.5  # logits of a meaningful size
    valid = mask.bool()
    assert (ours - ref)[valid].abs().max() <= 1e-4
    assert (ours_nomask - ref_nomask).abs().max() <= 1e-4
    assert torch.isfinite(ours).all()


def test_llama3_rope_scaling_matters():
    """Positions beyond original_max_position_embeddings (32 in the tiny preset) use scaled frequencies."""
    m = _model("tiny-llama")
    plain = copy.deepcopy(m)
    plain.config = m.config.replace(rope_scaling=None)
    from rlhf_engine.model.rope import RotaryEmbedding
    plain.model.rotary = RotaryEmbedding(plain.config)
    ids = torch.randint(3, m.config.vocab_size, (1, 60))
    with torch.no_grad():
        assert (m(ids) - plain(ids)).abs().max() > 1e-3


# ----------------------------------------------------------------------------- padding
@pytest.mark.parametrize("name", TINY)
def test_padded_rows_match_unpadded(name):
    m = _model(name)
    ids, mask = _batch(m.config.vocab_size)
    with torch.no_grad():
        h = m.hidden_states(ids, mask)
        for b in range(ids.shape[0]):
            keep = mask[b].bool()
            alone = m.hidden_states(ids[b:b + 1, keep])
            assert (h[b, keep] - alone[0]).abs().max() <= 1e-5


def test_mask_to_kv_range_and_holes():
    ids, mask = _batch(50)
    s, e = mask_to_kv_range(mask)
    assert s.tolist() == [0, 7, 0, 2] and e.tolist() == [23, 23, 15, 20]
    holes = mask.clone()
    holes[0, 10] = 0
    with pytest.raises(ValueError, match="contiguous"):
        mask_to_kv_range(holes)
    empty = torch.zeros(1, 5, dtype=torch.long)
    s, e = mask_to_kv_range(empty)
    assert s.item() == 0 and e.item() == 0


def test_mask_with_holes_torch_backend():
    """The torch path takes any mask: a hole is a key nobody attends to."""
    m = _model("tiny-llama")
    ids = torch.randint(3, m.config.vocab_size, (1, 12))
    mask = torch.ones(1, 12, dtype=torch.long)
    mask[0, 4] = 0
    with torch.no_grad():  # default positions cumsum(mask) - 1 skip the hole too
        h = m.hidden_states(ids, mask, attn_backend="torch")
        keep = mask[0].bool()
        alone = m.hidden_states(ids[:, keep])
    assert (h[0, keep] - alone[0]).abs().max() <= 1e-5


def test_triton_backend_matches_torch(device):
    """The Triton attention wiring (interpreter on the CPU) gives the torch path's hidden states."""
    m = _model("tiny-llama").to(device)
    ids, mask = _batch(m.config.vocab_size, T=17)
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        a = m.hidden_states(ids, mask, attn_backend="torch")
        b = m.hidden_states(ids, mask, attn_backend="triton")
    assert (a - b)[mask.bool()].abs().max() <= 1e-4
    holes = mask.clone()
    holes[0, 3] = 0
    with pytest.raises(ValueError, match="contiguous"):
        m.hidden_states(ids, holes, attn_backend="triton")


def test_input_validation():
    m = _model("tiny-llama")
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids"):
        m(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        m(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 4))


# ----------------------------------------------------------------------------- training features
def test_gradient_checkpointing_same_grads():
    m = _model("tiny-qwen2").train()
    ids, mask = _batch(m.config.vocab_size)

    def grads(ckpt):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        loss = (m(ids, mask).float().log_softmax(-1)[..., 5] * mask).sum()
        loss.backward()
        return [p.grad.clone() for p in m.parameters()]

    for a, b in zip(grads(False), grads(True)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert m.model.gradient_checkpointing


def test_lm_head_weight_tied_and_untied():
    tied, untied = _model("tiny-qwen2"), _model("tiny-llama")
    assert tied.lm_head_weight is tied.model.embed_tokens.weight
    assert untied.lm_head_weight is untied.lm_head.weight
    assert "lm_head.weight" not in tied.state_dict() and "lm_head.weight" in untied.state_dict()
    assert "model.layers.1.self_attn.q_proj.bias" in tied.state_dict()


# ----------------------------------------------------------------------------- log-probs
def _ref_logprobs(m, ids, mask, temperature):
    with torch.no_grad():
        logits = m(ids, mask).float() / temperature
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_int_start(temperature):
    m = _model("tiny-llama")
    ids, mask = _batch(m.config.vocab_size)
    s = 9
    lp, ent = sequence_logprobs(m, ids, mask, start=s, temperature=temperature, with_entropy=True)
    ref = _ref_logprobs(m, ids, mask, temperature)[:, s - 1:]
    valid = mask[:, s:].bool()
    assert lp.shape == (4, 23 - s) and lp.dtype == torch.float32
    assert (lp - ref)[valid].abs().max() <= 1e-5
    assert (lp[~valid] == 0).all() and (ent[~valid] == 0).all()
    with torch.no_grad():
        z = m(ids, mask).float()[:, s - 1:-1] / temperature
    p = z.softmax(-1)
    ent_ref = torch.logsumexp(z, -1) - (p * z).sum(-1)
    assert (ent - ent_ref)[valid].abs().max() <= 1e-4


def test_sequence_logprobs_mask_start_and_grad():
    m = _model("tiny-qwen2").train()
    ids, mask = _batch(m.config.vocab_size)
    resp = torch.zeros_like(mask)
    resp[:, 12:] = 1
    lp = sequence_logprobs(m, ids, mask, start=resp)
    ref = _ref_logprobs(m, ids, mask, 1.0)
    assert lp.shape == ids.shape
    sel = (resp.bool() & mask.bool())[:, 1:]
    assert (lp[:, 1:] - ref)[sel].abs().max() <= 1e-5
    assert (lp[:, 1:][~sel] == 0).all() and (lp[:, 0] == 0).all()
    lp.sum().backward()
    assert m.model.embed_tokens.weight.grad is not None
    assert torch.isfinite(m.model.embed_tokens.weight.grad).all()
    with pytest.raises(ValueError, match="start"):
        sequence_logprobs(m, ids, mask, start=0)


def test_sequence_logprobs_triton_backend(device):
    """The fused LM-head kernel path (interpreter on the CPU) matches the chunked torch path."""
    m = _model("tiny-llama").to(device)
    ids, mask = _batch(m.config.vocab_size, T=15)
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        a = sequence_logprobs(m, ids, mask, start=6, backend="torch", attn_backend="torch")
        b = sequence_logprobs(m, ids, mask, start=6, backend="triton", attn_backend="torch")
    assert (a - b).abs().max() <= 1e-4


# ----------------------------------------------------------------------------- scalar heads
def test_scalar_model_values_and_scores():
    lm = _model("tiny-llama")
    rm = ScalarModel.from_causal_lm(lm)
    assert rm.model is not lm.model
    assert rm.model.embed_tokens.weight.data_ptr() != lm.model.embed_tokens.weight.data_ptr()
    ids, mask = _batch(lm.config.vocab_size)
    with torch.no_grad():
        v = rm(ids, mask)
        s = rm.score_sequences(ids, mask)
    assert v.shape == ids.shape and v.dtype == torch.float32
    last = torch.tensor([22, 22, 14, 19])
    assert torch.allclose(s, v[torch.arange(4), last], atol=1e-6)
    shared = ScalarModel.from_causal_lm(lm, copy_trunk=False)
    assert shared.model is lm.model
    assert set(k.split(".")[0] for k in rm.state_dict()) == {"model", "score"}
    rm2 = ScalarModel.from_config(preset("tiny-qwen2"))
    assert rm2(ids % 200).shape == ids.shape


def test_triton_backend_gradients_match_torch(device):
    """Backward through the Triton attention + RoPE kernels equals the torch path's (fp32)."""
    m = _model("tiny-qwen2").to(device).train()
    ids, mask = _batch(m.config.vocab_size, T=13)
    ids, mask = ids.to(device), mask.to(device)

    def grads(backend):
        m.zero_grad()
        lp = sequence_logprobs(m, ids, mask, start=4, attn_backend=backend, backend="torch")
        (lp * torch.linspace(0.5, 1.5, lp.shape[1], device=device)).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    ref, got = grads("torch"), grads("triton")
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=1e-4, rtol=1e-3), n


@pytest.mark.parametrize("checkpointing", [False, True])
def test_torch_compile_traces_the_triton_backend_model(checkpointing, device):
    """A tiny CausalLM on the triton backend (its kernels as custom ops, the interpreter on the CPU) compiles with
    fullgraph=True: the same loss and gradients as eager, and the mask check becomes an assert in the graph."""
    torch.manual_seed(0)
    m = CausalLM(preset("tiny-qwen2", num_layers=2, attn_backend="triton")).to(device).train()
    m.gradient_checkpointing = checkpointing
    ids = torch.randint(3, m.config.vocab_size, (2, 9)).to(device)
    am = torch.ones_like(ids)
    am[0, :3] = 0

    def loss(ids, am):
        return m(ids, am).float().square().mean()

    want = loss(ids, am)
    want.backward()
    want_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = compiled(ids, am)
    got.backward()
    torch.testing.assert_close(got, want)
    for p, g in zip(m.parameters(), want_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-7, rtol=1e-5)
    if device.type == "cuda":
        return  # on a GPU the assert is a device-side assert, which leaves the CUDA context unusable for the rest
    holes = am.clone()
    holes[1, 4] = 0
    with pytest.raises(RuntimeError, match="contiguous run"):
        compiled(ids, holes)
