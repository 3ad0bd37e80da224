"""The triton decode step's own paths, each against the other one: the fused cache write (the default;
RLHF_ENGINE_DECODE_FUSED_WRITE=0 turns it off) and norms inside the GEMMs (opt-in, RLHF_ENGINE_DECODE_NORM_GEMM=1),
the CUDA-graph cache keyed on them, and the RoPE rows gathered from the model's table. Split from
test_generation.py."""
import pytest
import torch
from tiny import count_calls, decode_step_logits, qwen_decode_case
from tiny import generation_model as _model
from tiny import left_padded_prompts as _prompts

from rlhf_engine.generation import KVCache, generate


@pytest.mark.parametrize("switch", ["RLHF_ENGINE_DECODE_FUSED_WRITE", "RLHF_ENGINE_DECODE_NORM_GEMM",
                                    "RLHF_ENGINE_DECODE_GEMM_WS", "RLHF_ENGINE_PDL"])
def test_graph_cache_keys_on_the_decode_path_switches(switch, monkeypatch):
    """A graph replays the kernels it was captured with: switching an opt-in decode path gets another entry."""
    from rlhf_engine.generation import DecodeGraphCache

    m = _model("tiny-llama")
    gc = DecodeGraphCache(len_multiple=16)
    monkeypatch.setenv(switch, "0")
    a, _ = gc.get(m, 2, 10, "triton", capture=False)
    monkeypatch.setenv(switch, "1")
    b, _ = gc.get(m, 2, 10, "triton", capture=False)
    assert a is not b and gc.get(m, 2, 10, "triton", capture=False)[0] is b

@pytest.mark.gpu
def test_norm_gemm_decode_bf16_gpu(monkeypatch, record_value):
    """RLHF_ENGINE_DECODE_NORM_GEMM=1 in bf16 at Qwen2-0.5B widths (2 layers, batch 64, the autotuned kernel): a
    decode step's logits within 2x of the usual path's error against the fp32 model; and a generation through a
    CUDA graph with it gives finite log-probs equal to its eager run's."""
    m32, m, ids, mask = qwen_decode_case()

    def step_logits(model, fused: bool):
        monkeypatch.setenv("RLHF_ENGINE_DECODE_NORM_GEMM", "1" if fused else "0")
        return decode_step_logits(model, ids, mask)

    ref = step_logits(m32, False)
    err = {f: (step_logits(m, f) - ref).abs().max().item() for f in (False, True)}
    record_value("norm GEMM decode, bf16 logits max err vs fp32 (usual path, norms in GEMMs)", (err[False], err[True]))
    assert err[True] <= 2 * err[False] + 1e-3, err
    monkeypatch.setenv("RLHF_ENGINE_DECODE_NORM_GEMM", "1")
    runs = [generate(m, ids, mask, max_new_tokens=12, use_cuda_graph=g, eos_token_ids=(),
                     generator=torch.Generator("cuda").manual_seed(1)) for g in (False, True)]
    assert torch.isfinite(runs[1].logprobs).all()
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs)

def _eager_triton_batch(m, device, max_new_tokens: int):
    """Two left-padded prompts (lengths 7 and 3) on ``device`` and the generate keywords of an eager triton run."""
    ids, mask = _prompts(m.config.vocab_size, lengths=(7, 3), P=7)
    kw = dict(max_new_tokens=max_new_tokens, attn_backend="triton", eos_token_ids=(), use_cuda_graph=False)
    return ids.to(device), mask.to(device), kw


def test_triton_generation_with_the_cache_write_fused(device, monkeypatch):
    """RLHF_ENGINE_DECODE_FUSED_WRITE=1: the decode attention kernel writes the KV cache itself (one split); the
    tokens and log-probs equal the separate write's (bit for bit on the CPU; left-padded prompts, greedy and
    sampled)."""
    from rlhf_engine.kernels import decode_attention as da

    m = _model().to(device)
    ids, mask, kw = _eager_triton_batch(m, device, max_new_tokens=4)
    runs = {}
    for fused in (False, True):
        monkeypatch.setenv("RLHF_ENGINE_DECODE_FUSED_WRITE", "1" if fused else "0")
        writes = []
        with monkeypatch.context() as mp:  # count the separate cache writes of the decode steps
            real = da.write_kv_cache
            mp.setattr(da, "write_kv_cache", lambda *a, **k: (writes.append(1), real(*a, **k))[1])
            import rlhf_engine.kernels.kv_cache as kv
            real_fwd = kv.write_kv_cache_forward
            mp.setattr(kv, "write_kv_cache_forward", lambda *a, **k: (writes.append(1), real_fwd(*a, **k))[1])
            g = torch.Generator(device).manual_seed(3)
            runs[fused] = (generate(m, ids, mask, greedy=True, **kw), generate(m, ids, mask, generator=g, **kw),
                           len(writes))
    (ga, sa, n_sep), (gb, sb, n_fused) = runs[False], runs[True]
    assert n_sep > 0 and n_fused == 0  # the fused path never launched a separate write
    for a, b in ((ga, gb), (sa, sb)):
        assert torch.equal(a.sequences, b.sequences)
        if device.type == "cpu":  # the interpreter: the same arithmetic; a GPU may contract the rotation differently
            assert torch.equal(a.logprobs, b.logprobs)
        else:
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_triton_generation_with_norms_in_the_gemms(name, device, monkeypatch):
    """RLHF_ENGINE_DECODE_NORM_GEMM=1: each decode layer runs norm + q/k/v GEMM, attention, o + residual, norm +
    gate/up GEMM + silu * up, down + residual (the split-K GEMMs of kernels/norm_linear.py) and never the separate
    norm or SwiGLU kernels; the greedy tokens equal the usual path's and the log-probs agree to fp32 rounding (the
    sums of squares and the GEMMs accumulate in another order); q/k/v biases (Qwen2) and left-padded prompts
    included."""
    import rlhf_engine.kernels.norm_linear as nl
    import rlhf_engine.kernels.rmsnorm as rn
    import rlhf_engine.kernels.swiglu as sw

    m = _model(name).to(device)
    with torch.no_grad():  # norm weights that are not ones and biases that are not zeros: the wiring shows
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids, mask, kw = _eager_triton_batch(m, device, max_new_tokens=5)
    runs = {}
    for fused in (False, True):
        monkeypatch.setenv("RLHF_ENGINE_DECODE_NORM_GEMM", "1" if fused else "0")
        with monkeypatch.context() as mp:
            calls = count_calls(mp, ((nl, "decode_linear_forward", "norm_gemm"), (rn, "rms_norm_forward", "norm"),
                                     (sw, "silu_mul_forward", "silu")))
            runs[fused] = (generate(m, ids, mask, greedy=True, **kw), dict(calls))
    (a, ca), (b, cb) = runs[False], runs[True]
    L, steps = m.config.num_layers, kw["max_new_tokens"] - 1  # the prefill draws the first token
    assert ca["norm_gemm"] == 0 and cb["norm_gemm"] == 4 * L * steps  # q/k/v, o, gate/up, down
    # the split-K path keeps the first layer's norm (no GEMM before it leaves the sums of squares) and the final one
    assert cb["norm"] == ca["norm"] - (2 * L - 1) * steps and cb["silu"] == ca["silu"] - L * steps
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=2e-5, rtol=1e-5)


def test_norm_gemm_path_steps_aside_for_module_hooks(device, monkeypatch):
    """A forward hook on a layer's MLP (which the norm-GEMM path never calls) or its attention module: that layer
    runs the usual path, and the hook runs."""
    import rlhf_engine.kernels.norm_linear as nl

    m = _model("tiny-llama").to(device)
    ids, mask = (t.to(device) for t in _prompts(m.config.vocab_size, lengths=(5, 3), P=5))
    monkeypatch.setenv("RLHF_ENGINE_DECODE_NORM_GEMM", "1")
    seen, fused = [], []
    real = nl.decode_linear_forward
    monkeypatch.setattr(nl, "decode_linear_forward", lambda *a, **k: (fused.append(1), real(*a, **k))[1])
    h = m.model.layers[0].mlp.register_forward_hook(lambda *a: seen.append("mlp"))
    h2 = m.model.layers[1].self_attn.register_forward_pre_hook(lambda *a: seen.append("attn"))
    generate(m, ids, mask, max_new_tokens=3, greedy=True, attn_backend="triton", eos_token_ids=(),
             use_cuda_graph=False)
    h.remove()
    h2.remove()
    assert seen.count("mlp") == 3 and seen.count("attn") == 3  # prefill + 2 decode steps each
    assert len(fused) == 0  # both layers stepped aside (layer 0: its MLP; layer 1: its attention)


@pytest.mark.parametrize("hooked", ["0.self_attn.o_proj", "1.mlp.down_proj"])
def test_norm_gemm_layers_mixed_with_usual_ones(hooked, device, monkeypatch):
    """A hook on one layer's o or down projection (which the split-K path does not call): that layer runs the usual
    path and the other the split-K one, so the residual stream passes between the two forms (an addend into the
    prologue's residual add; the whole stream with its sums of squares into the usual norm and the final norm); the
    tokens and log-probs equal the usual path's, and the hook runs."""
    import rlhf_engine.kernels.norm_linear as nl

    m = _model("tiny-qwen2").to(device)
    ids, mask, kw = _eager_triton_batch(m, device, max_new_tokens=4)
    monkeypatch.setenv("RLHF_ENGINE_DECODE_NORM_GEMM", "0")
    ref = generate(m, ids, mask, greedy=True, **kw)
    monkeypatch.setenv("RLHF_ENGINE_DECODE_NORM_GEMM", "1")
    seen, fused = [], []
    real = nl.decode_linear_forward
    monkeypatch.setattr(nl, "decode_linear_forward", lambda *a, **k: (fused.append(1), real(*a, **k))[1])
    h = m.model.layers.get_submodule(hooked).register_forward_hook(lambda *a: seen.append(1))
    out = generate(m, ids, mask, greedy=True, **kw)
    h.remove()
    steps = kw["max_new_tokens"] - 1
    assert len(seen) == 1 + steps and len(fused) == 4 * steps  # the hooked layer: prefill and every step
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the decode step's RoPE table
def test_rope_half_table_is_the_computed_rows():
    """RotaryEmbedding.half_table: rows [cos | sin] for positions 0 .. L-1 (L a power of two >= 256 covering the
    length), bit for bit what forward(half=True) computes (llama3 scaling included), kept per (device, dtype, L)."""
    for name in ("tiny-llama", "tiny-qwen2"):
        m = _model(name, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
                   if name == "tiny-llama" else None)
        rot = m.model.rotary
        for dtype in (torch.float32, torch.bfloat16):
            table = rot.half_table(300, torch.device("cpu"), dtype)
            half = m.config.head_dim // 2
            assert table.shape == (512, 2 * half) and table.dtype == dtype and table.is_contiguous()
            assert rot.half_table(400, torch.device("cpu"), dtype) is table  # same rounded length: cached
            pos = torch.tensor([[0, 1, 77, 255, 299, 511]])
            cos, sin = rot(pos, dtype, half=True)
            assert torch.equal(table[pos[0], :half], cos[0]) and torch.equal(table[pos[0], half:], sin[0])
        assert rot.half_table(10, torch.device("cpu"), torch.float32).shape[0] == 256


@pytest.mark.parametrize("Tn", [1, 2])
def test_decode_step_rope_table_matches_computed_tables(Tn, device, monkeypatch):
    """The triton decode step gathers its RoPE rows from the table: logits and cache contents bit for bit those
    of the step that computes cos/sin from the position ids (left-padded prompts, Tn new tokens), and the step
    keeps its constants (the table, rope_rows) across steps."""
    m = _model("tiny-qwen2").to(device)
    ids, mask = (t.to(device) for t in _prompts(m.config.vocab_size, lengths=(9, 4, 6)))
    B, P = ids.shape
    cont = torch.randint(4, m.config.vocab_size, (B, 2 * Tn)).to(device)
    outs = []
    for use_table in (True, False):
        with monkeypatch.context() as mp:
            if not use_table:  # as inside a first CUDA-graph capture: no table, the rows computed per step
                mp.setattr(type(m.model.rotary), "half_table", lambda *a, **k: None)
            cache = KVCache.allocate(m.config, B, P + 2 * Tn, device=device)
            m.prefill(ids, mask, cache, attn_backend="triton")
            lg = [m.decode_step(cont[:, i:i + Tn], cache, attn_backend="triton") for i in range(0, 2 * Tn, Tn)]
            outs.append((torch.cat(lg, 1), cache.k_all.clone(), cache.v_all.clone(), cache.lengths.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert len(m._rope_rows_cache) == 1 and len(m.model.rotary._tables) == 1
