"""The LM head with the sampler in its epilogue (``kernels/lm_head_sample.py`` on ``decode_gemm_ws``'s Gluon GEMM),
run on the CPU by ``tests/gluon_emu``: the same draw as ``kernels.sample`` (Triton, on the interpreter here) on the
logits the same GEMM writes, token for token, with the same log-prob; its Philox against Triton's ``tl.rand4x``
bit for bit. The sm_90 compile is in ``test_triton_compile.py``; the GPU check in ``benchmarks/ws_probe.py --gemm``
and ``test_lm_head_sample_gpu``."""
import pytest
import torch
import triton
import triton.language as tl

pytest.importorskip("triton.experimental.gluon")

from gluon_emu import emulate
from rlhf_engine.kernels import decode_gemm_ws, lm_head_sample
from rlhf_engine.kernels.lm_head_sample import _rand4x
from rlhf_engine.kernels.sample import sample_logits_forward
from test_decode_gemm_ws import gluon_decode_case, gluon_gemm_gpu
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(decode_gemm_ws, "_decode_gemm_kernel", emulate(decode_gemm_ws._decode_gemm_kernel))


@triton.jit
def _triton_rand4x_kernel(SEED, OUT, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    u0, u1, u2, u3 = tl.rand4x(tl.load(SEED), offs * 7919)
    ok = offs < N
    tl.store(OUT + offs, u0, mask=ok)
    tl.store(OUT + N + offs, u1, mask=ok)
    tl.store(OUT + 2 * N + offs, u2, mask=ok)
    tl.store(OUT + 3 * N + offs, u3, mask=ok)


@gluon.jit
def _gluon_rand4x_kernel(SEED, OUT, N, BLOCK: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1], threads_per_warp=[32], warps_per_cta=[4],
                                            order=[0])
    offs = gl.arange(0, BLOCK, layout=layout)
    u0, u1, u2, u3 = _rand4x(gl.load(SEED), offs * 7919)
    ok = offs < N
    gl.store(OUT + offs, u0, mask=ok)
    gl.store(OUT + N + offs, u1, mask=ok)
    gl.store(OUT + 2 * N + offs, u2, mask=ok)
    gl.store(OUT + 3 * N + offs, u3, mask=ok)


@pytest.mark.parametrize("seed", [0, 12345, 2**62 - 3, 0x7FFFFFFF_FFFFFFFF >> 1])
def test_gluon_philox_is_tritons(seed):
    """``_rand4x`` (Gluon, emulated) against ``tl.rand4x`` (the Triton interpreter): the same floats, bit for bit,
    for seeds whose two 32-bit halves are both used, and counters up to ~10^6."""
    n = 200
    s = torch.tensor([seed], dtype=torch.int64)
    want, got = torch.empty(4 * n), torch.empty(4 * n)
    _triton_rand4x_kernel[(1,)](s, want, n, BLOCK=256)
    emulate(_gluon_rand4x_kernel)[(1,)](s, got, n, BLOCK=256)
    assert torch.equal(got, want)
    assert (want > 0).float().mean() > 0.99 and want.max() < 1


def _draw(x, w, temperature, greedy, seed):
    logits = decode_gemm_ws.decode_gemm_ws(x, w)  # (B, V) in x's dtype: what the unfused sampler reads
    return sample_logits_forward(logits, seed, temperature, greedy)


# (B, V, H, temperature, greedy, dtype): one row, odd batches and vocabularies (a partial last tile, V % 4 != 0),
# several 64-row tiles, a batch past one 64-token tile, fp16
CASES = [
    (1, 64, 64, 1.0, False, torch.bfloat16),
    (5, 301, 128, 0.7, False, torch.bfloat16),
    (3, 1000, 64, 1.3, False, torch.float16),
    (70, 257, 64, 1.0, False, torch.bfloat16),
    (5, 301, 128, 1.0, True, torch.bfloat16),
]


@pytest.mark.parametrize("B,V,H,temperature,greedy,dtype", CASES)
def test_fused_lm_head_sample_is_the_samplers_draw(emulated, B, V, H, temperature, greedy, dtype):
    torch.manual_seed(B + V)
    x = torch.randn(B, H, dtype=dtype)
    w = (torch.randn(V, H) * 1.5 * H ** -0.5).to(dtype)  # logits of ~1.5 units: the draws are not all argmaxes
    seed = torch.tensor([987654321987], dtype=torch.int64)
    tok, lp = lm_head_sample.lm_head_sample(x, w, temperature=temperature, greedy=greedy, seed=seed)
    tok_ref, lp_ref = _draw(x, w, temperature, greedy, seed)
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32
    assert torch.equal(tok, tok_ref)
    assert not torch.isnan(lp).any()
    torch.testing.assert_close(lp, lp_ref, atol=2e-5, rtol=1e-5)
    if not greedy:  # a real draw: not the argmax everywhere
        assert (tok != decode_gemm_ws.decode_gemm_ws(x, w).float().argmax(-1)).any()


def test_fused_lm_head_sample_generator_and_errors(emulated):
    """A generator advances one draw a call (two calls, two draws; the same state, the same draw), and bad input
    is refused with the argument named."""
    torch.manual_seed(0)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    w = (torch.randn(200, 64) * 0.02).to(torch.bfloat16)  # nearly flat: 16 rows of two draws all equal ~ 200^-16
    g = torch.Generator().manual_seed(5)
    a = lm_head_sample.lm_head_sample(x, w, generator=g)[0]
    b = lm_head_sample.lm_head_sample(x, w, generator=g)[0]
    assert not torch.equal(a, b)  # the generator moved on
    g.manual_seed(5)
    assert torch.equal(lm_head_sample.lm_head_sample(x, w, generator=g)[0], a)
    with pytest.raises(ValueError, match="temperature"):
        lm_head_sample.lm_head_sample(x, w, temperature=0.0)
    with pytest.raises(ValueError, match="layout_ok"):
        lm_head_sample.lm_head_sample(x.float(), w)


@pytest.mark.parametrize("greedy,pooled", [(False, False), (True, False), (False, True)])
def test_generate_draws_in_the_lm_head(greedy, pooled, monkeypatch):
    """RLHF_ENGINE_LM_HEAD_SAMPLE=1 (fp16, the triton backend, the Gluon GEMM emulated and "Hopper" assumed): every
    decode step's tokens come from ``lm_head_sample`` on the final norm's output (the decode step ends there), the
    first from the prefill's logits; with the same generator the same tokens and log-probs as the unfused path
    (the Triton sampler on the LM head's logits), greedy and sampled, with a graph cache too (its key has the
    head), and the model's parameters untouched."""
    from tiny import count_calls, generation_model, left_padded_prompts

    from rlhf_engine.generation import generate
    from rlhf_engine.generation.cuda_graph import DecodeGraphCache

    monkeypatch.setattr(decode_gemm_ws, "on_hopper", lambda device: True)
    monkeypatch.setattr(decode_gemm_ws, "_decode_gemm_kernel", emulate(decode_gemm_ws._decode_gemm_kernel))
    m = generation_model("tiny-qwen2").half()
    ids, mask = left_padded_prompts(m.config.vocab_size, lengths=(7, 3, 5), P=7)
    cache = DecodeGraphCache() if pooled else None
    runs = {}
    for on in ("0", "1"):
        monkeypatch.setenv("RLHF_ENGINE_LM_HEAD_SAMPLE", on)
        g = torch.Generator().manual_seed(11)
        with monkeypatch.context() as mp:
            calls = count_calls(mp, ((lm_head_sample, "lm_head_sample", "fused"),))
            out = generate(m, ids, mask, max_new_tokens=5, attn_backend="triton", eos_token_ids=(),
                           use_cuda_graph=False, greedy=greedy, temperature=0.9, generator=g, graph_cache=cache)
            runs[on] = (out, dict(calls))
    (a, ca), (b, cb) = runs["0"], runs["1"]
    assert ca.get("fused", 0) == 0 and cb["fused"] == 4  # the prefill's token from the logits, 4 decode steps
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-3, rtol=1e-3)
    if pooled:
        assert len(cache._entries) == 2  # a graph (here an eager decoder) for each head


def _lm_head_gpu():
    """``gluon_gemm_gpu``, and the same for benchmarks/ws_probe.py --lm-head (RLHF_ENGINE_LM_HEAD_SAMPLE_BROKEN)."""
    import os

    if not gluon_gemm_gpu():
        return False
    if os.environ.get("RLHF_ENGINE_LM_HEAD_SAMPLE_BROKEN") == "notrun":
        pytest.skip("gpu_check.sh had no time left to probe the LM head + sampler: off for this run")
    if os.environ.get("RLHF_ENGINE_LM_HEAD_SAMPLE_BROKEN") == "1":
        pytest.fail("benchmarks/ws_probe.py --lm-head found the LM head + sampler broken: see ws_probe.txt")
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("greedy", [False, True])
def test_lm_head_sample_gpu(greedy, record_value):
    """On an sm_90 GPU, Qwen2-0.5B's LM head at batch 64 (bf16): the Triton sampler's draw on the logits the same
    GEMM writes (a near tie may flip a row: fp32 race keys scaled by other maxima), its log-probs."""
    if not _lm_head_gpu():
        pytest.skip("the Gluon GEMM is for sm_90")
    torch.manual_seed(3)
    x = torch.randn(64, 896, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(151936, 896, device="cuda") * 2 * 896 ** -0.5).to(torch.bfloat16)
    seed = torch.tensor([2024], device="cuda")
    tok, lp = lm_head_sample.lm_head_sample(x, w, temperature=0.8, greedy=greedy, seed=seed, pdl=True)
    tok_ref, lp_ref = sample_logits_forward(decode_gemm_ws.decode_gemm_ws(x, w), seed, 0.8, greedy)
    eq = tok == tok_ref
    record_value(f"LM head + sampler ({'greedy' if greedy else 'sampled'}): rows equal to the Triton sampler's",
                 f"{int(eq.sum())} / 64")
    assert eq.sum() >= 63 and not torch.isnan(lp).any()
    torch.testing.assert_close(lp[eq], lp_ref[eq], atol=1e-3, rtol=1e-4)


@pytest.mark.gpu
def test_generate_draws_in_the_lm_head_gpu(monkeypatch):
    """generate() with RLHF_ENGINE_LM_HEAD_SAMPLE=1 on a bf16 Qwen2-shaped model (2 layers) through its captured
    CUDA graphs: each decode step's graph ends with the fused head, and the tokens and log-probs agree with the
    unfused path's on
    most rows (the LM head's GEMM differs from cuBLAS in its last bits, which a near tie turns into another token,
    and a sampled sequence then diverges)."""
    if not _lm_head_gpu():
        pytest.skip("the Gluon GEMM is for sm_90")
    from tiny import count_calls, qwen_decode_case

    from rlhf_engine.generation import generate
    from rlhf_engine.generation.cuda_graph import DecodeGraphCache

    from rlhf_engine.generation import cuda_graph

    _, m16, ids, mask = qwen_decode_case()
    outs = {}
    for on in ("0", "1"):
        monkeypatch.setenv("RLHF_ENGINE_LM_HEAD_SAMPLE", on)
        with monkeypatch.context() as mp:
            calls = count_calls(mp, ((cuda_graph.CudaGraphDecoder, "draw_seed", "seeds"),))
            g = torch.Generator("cuda").manual_seed(5)
            gc = DecodeGraphCache()
            outs[on] = (generate(m16, ids, mask, max_new_tokens=12, eos_token_ids=(), generator=g, graph_cache=gc),
                        calls["seeds"], [k[-1] for k in gc._entries])
    (a, na, ha), (b, nb, hb) = outs["0"], outs["1"]
    # a seed drawn before each of the 11 decode steps, whose captured graphs end with the draw
    assert na == 0 and nb == 11 and ha == ["logits"] and hb == [cuda_graph.sample_head_name(1.0, False)]
    same = (a.response_ids == b.response_ids).all(1)
    assert same.float().mean() >= 0.8, same
    torch.testing.assert_close(a.logprobs[same], b.logprobs[same], atol=2e-2, rtol=1e-2)


def test_generate_with_every_gluon_switch(monkeypatch):
    """The three opt-in Gluon paths together, as bench_generate's "everything" row runs them (fp16, emulated,
    "Hopper" assumed): the decode GEMMs with the norms and residual adds fused in, and the tokens drawn in the LM
    head. The same greedy tokens as the default path's, the log-probs to fp16 rounding; every decode step's tokens
    from the fused head."""
    from tiny import count_calls

    from rlhf_engine.generation import generate

    m, ids, mask, kw = gluon_decode_case(monkeypatch, "tiny-qwen2")
    runs = {}
    for on in ("0", "1"):
        for var in ("RLHF_ENGINE_DECODE_GEMM_WS", "RLHF_ENGINE_DECODE_NORM_GEMM", "RLHF_ENGINE_LM_HEAD_SAMPLE"):
            monkeypatch.setenv(var, on)
        with monkeypatch.context() as mp:
            calls = count_calls(mp, ((lm_head_sample, "lm_head_sample", "fused"),))
            runs[on] = (generate(m, ids, mask, **kw), dict(calls))
    (a, ca), (b, cb) = runs["0"], runs["1"]
    assert ca["fused"] == 0 and cb["fused"] == kw["max_new_tokens"] - 1
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=2e-2, rtol=1e-2)
