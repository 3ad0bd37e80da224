"""The batch-invariant fp32 CPU linear (model/batch_invariant.py) and the fp64-accumulated CPU attention: a row's
result does not depend on how many rows come with it, so generation's log-probs equal the training forward's."""
import pytest
import torch
import torch.nn.functional as F

import rlhf_engine.model.batch_invariant as bi
from rlhf_engine.model.attention import torch_attention, torch_decode_attention
from rlhf_engine.model.batch_invariant import (MAX_K_CHUNK, MIN_ROWS, InvariantLinearFunction, Linear, applies,
                                               invariant_mm, k_chunks, linear, logsumexp)


@pytest.fixture
def threads(request):
    """Run the test with torch set to ``request.param`` threads (MKL's split of a reduction depends on it)."""
    was = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(was)


@pytest.mark.parametrize("K", [1, 40, 512, 576, 1536, 4864])
@pytest.mark.parametrize("threads", [2, 12], indirect=True)
def test_k_chunks_cover_k_in_order(K, threads):
    width = bi.max_k_chunk(threads)
    assert width == (MAX_K_CHUNK if threads <= bi.FEW_THREADS else bi.MAX_K_CHUNK_MANY_THREADS)
    assert bi.max_k_chunk() == width and k_chunks(K) == k_chunks(K, width)  # the default follows torch's count
    chunks = k_chunks(K, width)
    assert chunks[0][0] == 0 and chunks[-1][1] == K
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert all(0 < k1 - k0 <= width for k0, k1 in chunks)


@pytest.mark.parametrize("K,N", [(576, 192), (896, 4864), (1536, 576), (4864, 896), (97, 9), (384, 64)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("threads", [2, 3, 12], indirect=True)
def test_rows_equal_whatever_the_row_count(K, N, bias, threads):
    """Bit for bit: rows computed among 1, 3, 15, 16, 17, 97 or 700 rows, at any offset (F.linear differs below 16
    rows, and, by shape and thread count, where MKL splits the reduction: K = 384 with 12 threads, 576 with 12 and
    24, 704 with 3)."""
    g = torch.Generator().manual_seed(K + N)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g) if bias else None
    x = torch.randn(700, K, generator=g)
    full = invariant_mm(x, w, b)  # (700, N)
    for m, o in [(1, 0), (1, 311), (3, 5), (MIN_ROWS - 1, 40), (MIN_ROWS, 7), (17, 600), (97, 123), (700, 0)]:
        assert torch.equal(invariant_mm(x[o:o + m], w, b), full[o:o + m]), (m, o)
    # as accurate as F.linear against fp64
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    err_ours = (full.double() - ref).abs().max().item()
    err_torch = (F.linear(x, w, b).double() - ref).abs().max().item()
    assert err_ours <= 2 * err_torch + 1e-6, (err_ours, err_torch)


def test_linear_dispatch():
    x, w, b = torch.randn(2, 5, 24), torch.randn(7, 24), torch.randn(7)
    assert applies(x) and not applies(x.bfloat16()) and not applies(x.double())
    y = linear(x, w, b)
    assert y.shape == (2, 5, 7)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    for dt in (torch.bfloat16, torch.float64):  # other dtypes: F.linear itself
        assert torch.equal(linear(x.to(dt), w.to(dt), b.to(dt)), F.linear(x.to(dt), w.to(dt), b.to(dt)))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU autocast: F.linear's casts
        assert not applies(x) and linear(x, w, b).dtype == torch.bfloat16
    with pytest.raises(RuntimeError):  # F.linear's own shape error
        linear(x, torch.randn(7, 23))
    assert linear(torch.randn(0, 24), w).shape == (0, 7)


def test_linear_gradients_match_f_linear():
    """The autograd path (grad_output not all ones): gradients of x, weight and bias as F.linear's, and the double
    backward works (the backward is made of differentiable ops)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 600, generator=g, requires_grad=True)
    w = torch.randn(11, 600, generator=g, requires_grad=True)
    b = torch.randn(11, generator=g, requires_grad=True)
    go = torch.randn(3, 6, 11, generator=g)
    ours = torch.autograd.grad(linear(x, w, b), (x, w, b), go)
    theirs = torch.autograd.grad(F.linear(x, w, b), (x, w, b), go)
    for a, r in zip(ours, theirs):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)
    xd = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(InvariantLinearFunction.apply, (xd, wd, None))
    assert torch.autograd.gradgradcheck(InvariantLinearFunction.apply, (xd, wd, None))


def test_linear_module_is_an_nn_linear():
    m = Linear(24, 7)
    assert isinstance(m, torch.nn.Linear) and list(m.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 24)
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), rtol=1e-5, atol=1e-5)


def test_decode_attention_rows_equal_the_full_attention():
    """fp32 on the CPU: the attention of the last token over the cache (decode) equals the same row of the full
    causal attention bit for bit (both in fp64, rounded once), left padding included; and both stay within fp32
    rounding of an fp64 reference."""
    g = torch.Generator().manual_seed(0)
    B, T, Hq, Hkv, D, L = 3, 97, 14, 2, 64, 105  # in fp32 SDPA, these rows differ by up to 7e-7
    q = torch.randn(B, T, Hq, D, generator=g)
    k, v = torch.randn(B, T, Hkv, D, generator=g), torch.randn(B, T, Hkv, D, generator=g)
    start = torch.tensor([0, 5, 11], dtype=torch.int32)
    mask = torch.arange(T)[None] >= start[:, None].long()  # (B, T) left padding
    full = torch_attention(q, k, v, mask)  # (B, T, Hq, D)
    kc, vc = torch.zeros(B, L, Hkv, D), torch.zeros(B, L, Hkv, D)
    kc[:, :T], vc[:, :T] = k, v
    lens = torch.full((B,), T, dtype=torch.int32)
    for Tn, kv_len in ((1, T), (4, T), (1, None)):  # None: all L slots, the unused ones masked
        dec = torch_decode_attention(q[:, T - Tn:], kc, vc, lens, start, kv_len=kv_len)  # (B, Tn, Hq, D)
        assert torch.equal(dec, full[:, T - Tn:]), (Tn, kv_len)
    ref = torch_attention(q.double(), k.double(), v.double(), mask)
    assert (full.double() - ref).abs().max().item() < 1e-6


def test_the_switch_reaches_every_gemm_and_the_attention():
    """``ModelConfig.batch_invariant`` (default True) and ``CausalLM.batch_invariant``: off, the model's GEMMs are
    F.linear and its attention fp32 SDPA; LoRA layers take their base layer's setting and merge_lora keeps it."""
    from rlhf_engine.config import ModelSpec
    from rlhf_engine.model import CausalLM, ModelConfig, apply_lora, merge_lora, preset
    from rlhf_engine.model.attention import AttnMeta, full_attention

    with pytest.raises(TypeError, match="ModelConfig.batch_invariant"):
        ModelConfig(batch_invariant="yes")
    with pytest.raises(ValueError, match="model.batch_invariant"):
        ModelSpec(batch_invariant="no")
    cfg = preset("tiny-llama", batch_invariant=False)
    m, other = CausalLM(cfg), CausalLM(cfg)
    flags = [mod.batch_invariant for mod in m.modules() if isinstance(mod, Linear)]
    assert flags and not any(flags)
    m.batch_invariant = True
    assert m.model.config is m.config and not other.config.batch_invariant  # the shared config is not changed
    with pytest.raises(TypeError, match="batch_invariant"):
        m.batch_invariant = 1
    apply_lora(m, rank=2, alpha=4.0)
    assert m.config.batch_invariant and all(mod.batch_invariant for mod in m.modules() if hasattr(mod, "lora_A"))
    m.batch_invariant = False
    merge_lora(m)
    assert not any(mod.batch_invariant for mod in m.modules() if isinstance(mod, Linear))
    x, w = torch.randn(3, 1536), torch.randn(64, 1536)
    assert torch.equal(linear(x, w, batch_invariant=False), F.linear(x, w))
    assert not torch.equal(linear(x, w), F.linear(x, w))  # 3 rows: F.linear's small-M kernel rounds otherwise
    q, k, v = torch.randn(2, 97, 14, 64), torch.randn(2, 97, 2, 64), torch.randn(2, 97, 2, 64)
    fp32 = torch_attention(q, k, v, None, batch_invariant=False)
    assert torch.equal(full_attention(q, k, v, AttnMeta(backend="torch", batch_invariant=False)), fp32)
    assert not torch.equal(torch_attention(q, k, v, None), fp32)  # the fp64 path rounds differently somewhere


def test_padded_rows_give_a_tensor_of_their_own():
    """Below 16 rows the output is not a view of the padded product: it may be modified in place, with autograd
    (as an nn.Linear output may) and without."""
    x, w = torch.randn(3, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    y = linear(x, w)
    y.add_(1.0)  # a view created in a custom Function would refuse this
    F.relu(linear(x, w), inplace=True).sum().backward()
    assert x.grad is not None and w.grad is not None
    with torch.no_grad():
        assert linear(x, w)._base is None and invariant_mm(x, w)._base is None


def test_frozen_weight_saves_no_input():
    """The reference policy and a LoRA base: a weight without grad keeps no x for the backward."""
    x = torch.randn(20, 8, requires_grad=True)
    w = torch.randn(5, 8)
    y = linear(x, w)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert len(saved) == 1 and saved[0].shape == w.shape
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.ones(20, 5) @ w)


def test_one_row_log_sum_exp_as_among_many():
    """ATen splits a single row's log-sum-exp across threads (V >= 32768), and sums each row in one thread once
    there are two: ``logsumexp`` gives a row the same bits alone as among others, which plain torch.logsumexp
    does not (2 of 50 rows here, up to 1e-6)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 49152, generator=g) * 3
    full = torch.logsumexp(z, dim=-1)
    alone = torch.cat([logsumexp(z[i:i + 1]) for i in range(50)])
    assert torch.equal(alone, full)
    assert torch.equal(logsumexp(z), full)
    if torch.get_num_threads() > 1:  # what the helper is for
        plain = torch.cat([torch.logsumexp(z[i:i + 1], dim=-1) for i in range(50)])
        assert not torch.equal(plain, full)


# ----------------------------------------------------------------------------- packed GEMMs (decode steps)
needs_packed = pytest.mark.skipif(not bi.packed_available(), reason="this torch has no MKL packed GEMM")


@needs_packed
@pytest.mark.parametrize("K,N", [(576, 192), (896, 4864), (1536, 576), (97, 9)])
@pytest.mark.parametrize("threads", [1, 2, 12], indirect=True)
def test_packed_rows_equal_the_padded_ones(K, N, threads, monkeypatch):
    """Inside ``packed_gemms``, rows of 1 to 64 (the weights packed for each count; a strided input) equal the
    padded GEMM's rows of any other count bit for bit, with a bias. With up to 4 threads the packed GEMM was the one
    used (its first-use check passed); with more, MKL's packed GEMM splits some small-N shapes otherwise (N = 192 from
    7 rows at 6 threads, 13 at 12), the check refuses them, and the padded GEMM keeps the rows exact."""
    monkeypatch.setattr(bi, "_CHECKED", {})
    g = torch.Generator().manual_seed(K + N)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g)
    x = torch.randn(700, K + 3, generator=g)[:, 2:K + 2]  # rows K + 3 apart
    full = invariant_mm(x, w, b)
    with bi.packed_gemms():
        for m, o in [(1, 3), (2, 0), (5, 77), (MIN_ROWS - 1, 40), (MIN_ROWS, 7), (33, 600), (64, 1)]:
            assert torch.equal(invariant_mm(x[o:o + m], w, b), full[o:o + m]), (m, o)
            assert bi._CHECKED[(N, K, max(m, 2), threads)] is True or threads > bi.FEW_THREADS, m


@needs_packed
def test_packs_follow_the_weights_and_go_with_the_context():
    """A weight changed in place (an optimizer step) is packed again; packs of another row count are dropped (a
    compaction); nothing stays packed after the scope, outside one, nor in a disabled one."""
    w, x = torch.randn(40, 24), torch.randn(16, 24)
    with bi.packed_gemms():
        with bi.packed_gemms():  # nested: the outer context's packs
            a = invariant_mm(x[:4], w)
        assert len(bi._PACKS.cache) == 1
        w.mul_(2.0)  # in place: a new version of the same storage
        assert torch.equal(invariant_mm(x[:4], w), 2.0 * a)
        assert len(bi._PACKS.cache) == 1  # packed again in place of the old pack
        invariant_mm(x[:2], w)
        assert len(bi._PACKS.cache) == 1 and bi._PACKS.rows == 2
        with torch.inference_mode():  # inference tensors keep no version counter
            wi, xi = w.clone(), x.clone()
        assert torch.equal(invariant_mm(xi[:2], wi), invariant_mm(x[:2], w))
    assert bi._PACKS.cache is None
    invariant_mm(x[:4], w)
    with bi.packed_gemms(enabled=False):
        invariant_mm(x[:4], w)
    assert bi._PACKS.cache is None


@needs_packed
def test_an_optimizer_step_inside_the_scope_is_seen():
    """``MasterWeightAdamW`` on the CPU (the fused AdamW, which writes the masters behind autograd's back) bumps the
    weights' version counters, so a GEMM after a step inside a scope runs on the new weights, not a stale pack."""
    from rlhf_engine.trainer.optim import MasterWeightAdamW

    w = torch.nn.Parameter(torch.randn(40, 24))
    x = torch.randn(3, 24)
    opt = MasterWeightAdamW([w], lr=0.1)
    with bi.packed_gemms():
        invariant_mm(x, w.detach())
        w.grad = torch.randn_like(w)
        opt.step()
        assert torch.equal(invariant_mm(x, w.detach()), bi._padded_mm(x, w.detach(), None))  # a stale pack is not


@needs_packed
def test_a_packed_gemm_that_rounds_otherwise_is_not_used(monkeypatch):
    """The first-use check: where the packed GEMM's rows differ from the padded GEMM's (planted here), the shape keeps
    the padded GEMM, so the results stay batch-invariant."""
    monkeypatch.setattr(bi, "_CHECKED", {})
    real = torch.ops.mkl._mkl_linear

    class Ops:  # torch.ops.mkl with a packed GEMM one ulp off
        _mkl_reorder_linear_weight = torch.ops.mkl._mkl_reorder_linear_weight

        @staticmethod
        def _mkl_linear(*a):
            y = real(*a)
            return torch.nextafter(y, torch.full_like(y, float("inf")))

    monkeypatch.setattr(torch.ops, "mkl", Ops)
    w, x = torch.randn(40, 24), torch.randn(16, 24)
    full = invariant_mm(x, w)
    with bi.packed_gemms():
        for _ in range(2):
            assert torch.equal(invariant_mm(x[:3], w), full[:3])
    assert bi._CHECKED[(40, 24, 3, torch.get_num_threads())] is False


@needs_packed
def test_the_first_use_check_does_not_read_the_callers_input(monkeypatch):
    """A first input holding NaN does not turn the packed GEMM off for its shape (the check runs on its own input)."""
    monkeypatch.setattr(bi, "_CHECKED", {})
    w, x = torch.randn(40, 24), torch.randn(16, 24)
    x[1, 3] = float("nan")
    full = invariant_mm(x, w)
    with bi.packed_gemms():
        assert torch.equal(invariant_mm(x[:3], w).isnan(), full[:3].isnan())
        assert torch.equal(invariant_mm(x[4:7], w), full[4:7])
    assert bi._CHECKED[(40, 24, 3, torch.get_num_threads())] is True


@needs_packed
def test_generation_uses_packed_gemms_with_exact_logprob_parity(monkeypatch):
    """fp32 on the CPU: generation's decode steps run on the packed GEMMs (each used, none refused) and their log-probs
    equal the training forward's bit for bit; with the packed GEMMs off, the same tokens and log-probs."""
    from rlhf_engine.generation import generate
    from rlhf_engine.model import CausalLM, preset
    from rlhf_engine.model.logprobs import sequence_logprobs

    monkeypatch.setattr(bi, "_CHECKED", {})
    torch.manual_seed(0)
    m = CausalLM(preset("tiny-qwen2")).eval()
    ids = torch.randint(3, m.config.vocab_size, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    out = generate(m, ids, mask, max_new_tokens=9, generator=torch.Generator().manual_seed(1), eos_token_ids=())
    assert bi._CHECKED and all(bi._CHECKED.values()) and {k[2] for k in bi._CHECKED} == {3}
    lp = sequence_logprobs(m, out.sequences, out.attention_mask, start=out.prompt_len)
    assert torch.equal(lp * out.response_mask, out.logprobs)
    # a compaction inside the scope (4 rows -> 2 once most rows have stopped): packed again for 2 rows, still exact
    rows = []
    real = bi._packed_mm
    monkeypatch.setattr(bi, "_packed_mm", lambda x, w, r: rows.append(r) or real(x, w, r))
    ids4 = torch.randint(3, m.config.vocab_size, (4, 5), generator=torch.Generator().manual_seed(2))
    stops = tuple(range(m.config.vocab_size // 3))
    comp = generate(m, ids4, None, max_new_tokens=12, generator=torch.Generator().manual_seed(4), eos_token_ids=stops,
                    check_every=2, min_compact_batch=2)
    assert set(rows) == {4, 2} and {k[2] for k in bi._CHECKED} == {3, 4, 2} and all(bi._CHECKED.values())
    lp = sequence_logprobs(m, comp.sequences, comp.attention_mask, start=comp.prompt_len)
    assert torch.equal(lp * comp.response_mask, comp.logprobs)
    monkeypatch.setattr(bi, "packed_available", lambda: False)
    off = generate(m, ids, mask, max_new_tokens=9, generator=torch.Generator().manual_seed(1), eos_token_ids=())
    assert torch.equal(off.sequences, out.sequences) and torch.equal(off.logprobs, out.logprobs)
