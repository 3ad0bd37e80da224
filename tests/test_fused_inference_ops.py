"""The fused decoder-layer kernels' forward (residual add + RMSNorm, silu(gate) * up) against their eager
definitions and fp64, the model's prefill/decode on them against the unfused forward, and the one-pass sampler.
Their backward and the training forward: test_fused_layer_backward.py. Triton runs under the interpreter on the
CPU."""
import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rlhf_engine.kernels.reference.norm import rms_norm_reference
from rlhf_engine.kernels.rmsnorm import rms_norm
from rlhf_engine.kernels.swiglu import silu_mul
from tiny import DTYPES_16, rms_norm_fp64 as _rms64

# (leading shape, H): odd row counts, a non-power-of-two hidden size, Qwen2-0.5B's 896
NORM_SHAPES = [((97,), 50), ((2, 5), 896), ((1, 1), 64), ((3, 7), 130)]


@pytest.mark.parametrize("lead,H", NORM_SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp32_matches_fp64(lead, H, with_residual, device):
    x = torch.randn(*lead, H, device=device) * 3
    w = torch.randn(H, device=device)
    r = torch.randn_like(x) if with_residual else None
    out = rms_norm(x, w, 1e-6, residual=r, backend="triton")
    if with_residual:
        out, s = out
        torch.testing.assert_close(s, x + r, atol=0, rtol=0)  # one fp32 add, as eager
    s = x if r is None else x + r
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _rms64(s, w, 1e-6), atol=1e-5, rtol=1e-5)




@pytest.mark.parametrize("dtype", DTYPES_16)
def test_rms_norm_16bit_rounds_as_eager(dtype, device):
    """16-bit: the residual sum is the eager add bit for bit; the output is within two rounding steps of the
    eager ops (fp32 statistics in both, summed in another order; approximate sqrt/divide on the GPU: an fp32
    ulp can flip the rounding of y, and the weight multiply rounds again)."""
    x = (torch.randn(33, 96, device=device) * 2).to(dtype)
    r = torch.randn(33, 96, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(96, device=device)).to(dtype)
    out, s = rms_norm(x, w, 1e-5, residual=r, backend="triton")
    ref, ref_s = rms_norm_reference(x, w, 1e-5, residual=r)
    assert out.dtype == dtype and torch.equal(s, ref_s)
    ulp = torch.finfo(dtype).eps * ref.float().abs().clamp(min=1.0)
    assert ((out.float() - ref.float()).abs() <= 2 * ulp).all()
    # and the eager error against fp64 bounds ours (the 2x rule)
    exact = _rms64(ref_s, w, 1e-5)
    err_ours = (out.double() - exact).abs().max()
    err_eager = (ref.double() - exact).abs().max()
    assert err_ours <= 2 * err_eager + 1e-6


def test_rms_norm_promotes_like_eager(device):
    """An fp32 weight with bf16 activations gives fp32 output, as ``weight * y.to(bf16)`` does."""
    x = torch.randn(4, 32, device=device).bfloat16()
    w = torch.randn(32, device=device)
    out = rms_norm(x, w, 1e-6, backend="triton")
    ref = rms_norm_reference(x, w, 1e-6)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)


def test_rms_norm_strided_and_empty(device):
    x = torch.randn(6, 2 * 40, device=device)[:, ::2]  # non-unit stride on H: copied
    w = torch.randn(40, device=device)
    torch.testing.assert_close(rms_norm(x, w, 1e-6, backend="triton"), rms_norm_reference(x, w, 1e-6))
    e = torch.empty(0, 40, device=device)
    out, s = rms_norm(e, w, 1e-6, residual=e, backend="triton")
    assert out.shape == (0, 40) and s.shape == (0, 40)


def test_rms_norm_validation(device):
    x, w = torch.randn(3, 8, device=device), torch.randn(8, device=device)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.randn(9, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, w, 1e-6, residual=torch.randn(3, 9, device=device))
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, w, 1e-6, residual=x.double())
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, w, float("nan"))
    with pytest.raises(TypeError, match="x"):
        rms_norm(torch.ones(3, 8, dtype=torch.long), w, 1e-6)
    with pytest.raises(ValueError, match="backend"):
        rms_norm(x, w, 1e-6, backend="cuda")
    with pytest.raises(ValueError, match="hidden size"):
        rms_norm(torch.randn(1, 8193, device=device), torch.randn(8193, device=device), 1e-6, backend="triton")


@pytest.mark.parametrize("shape", [(97, 130), (2, 3, 4864), (1, 1)])
def test_silu_mul_matches_eager(shape, device):
    g, u = torch.randn(*shape, device=device) * 4, torch.randn(*shape, device=device)
    out = silu_mul(g, u, backend="triton")
    ref = g.double() * torch.sigmoid(g.double()) * u.double()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_silu_mul_reads_strided_halves(device):
    """gate and up as the two halves of one packed (..., 2 I) GEMM output are read in place; a non-unit column
    stride is copied first; a 0-dim pair works too."""
    gu = torch.randn(2, 5, 2 * 130, device=device) * 3
    g, u = gu.chunk(2, dim=-1)
    assert not g.is_contiguous()
    out = silu_mul(g, u, backend="triton")
    assert out.shape == (2, 5, 130) and out.is_contiguous()
    torch.testing.assert_close(out, F.silu(g) * u, atol=1e-6, rtol=1e-5)
    g2, u2 = gu[..., ::2], gu[..., 1::2]  # column stride 2
    torch.testing.assert_close(silu_mul(g2, u2, backend="triton"), F.silu(g2) * u2, atol=1e-6, rtol=1e-5)
    s = torch.tensor(1.5, device=device)
    torch.testing.assert_close(silu_mul(s, s, backend="triton"), F.silu(s) * s)


@pytest.mark.parametrize("dtype", DTYPES_16)
def test_silu_mul_16bit_rounds_as_eager(dtype, device):
    g = (torch.randn(37, 200, device=device) * 4).to(dtype)
    u = torch.randn(37, 200, device=device).to(dtype)
    out, ref = silu_mul(g, u, backend="triton"), F.silu(g) * u
    assert out.dtype == dtype
    ulp = torch.finfo(dtype).eps * ref.float().abs().clamp(min=1e-3)
    # the same rounding steps; the GPU's exp/divide may flip silu's rounding, and the product rounds again
    assert ((out.float() - ref.float()).abs() <= 2 * ulp).all()


def test_silu_mul_validation(device):
    g = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match="up"):
        silu_mul(g, torch.randn(3, 9, device=device))
    with pytest.raises(ValueError, match="up"):
        silu_mul(g, g.double())
    with pytest.raises(TypeError, match="gate"):
        silu_mul(torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.long))
    empty = torch.empty(0, 8, device=device)
    assert silu_mul(empty, empty, backend="triton").shape == (0, 8)


def test_custom_ops_fake_tensor():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.empty(5, 64, dtype=torch.bfloat16), torch.empty(64)
        y = torch.ops.rlhf_engine.rms_norm(x, w, 1e-6)
        y2, s = torch.ops.rlhf_engine.add_rms_norm(x, x, w, 1e-6)
        a = torch.ops.rlhf_engine.silu_mul(x, x)
    assert y.dtype == y2.dtype == torch.float32 and s.dtype == a.dtype == torch.bfloat16
    assert y.shape == s.shape == a.shape == (5, 64)


@pytest.mark.parametrize("name,lora", [("tiny-llama", False), ("tiny-qwen2", False), ("tiny-qwen2", True)])
def test_fused_generation_path_matches_unfused_forward(name, lora, device):
    """Prefill + decode on the triton backend (packed q/k/v and gate/up GEMMs, with LoRA adapters on too, fused
    norm / residual / SwiGLU kernels, RoPE inside the cache write) give the logits of the unfused full forward
    (torch backend), fp32."""
    from rlhf_engine.generation import KVCache
    from rlhf_engine.model import CausalLM, preset
    from rlhf_engine.model.packing import packed_weights

    from rlhf_engine.model import apply_lora
    from rlhf_engine.model.packing import packed_lora

    torch.manual_seed(0)
    m = CausalLM(preset(name)).to(device).eval()
    if lora:  # adapters on every projection: the groups run as packed base GEMMs + one A GEMM + B terms
        apply_lora(m, rank=4, alpha=8.0)
    with torch.no_grad():
        for p in m.parameters():  # non-trivial norm weights, biases and adapters
            p.add_(0.05 * torch.randn_like(p))
        a, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
        packed = packed_lora if lora else packed_weights  # the path under test
        assert packed((a.q_proj, a.k_proj, a.v_proj)) is not None
        assert packed((mlp.gate_proj, mlp.up_proj)) is not None
    B, P, N = 3, 6, 3
    ids = torch.randint(3, m.config.vocab_size, (B, P + N), device=device)
    mask = torch.ones(B, P + N, dtype=torch.long, device=device)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    with torch.no_grad():
        full = m(ids, mask, attn_backend="torch").float()  # (B, P + N, V): the eager, unfused definition
        cache = KVCache.allocate(m.config, B, P + N, dtype=torch.float32, device=device)
        logits = [m.prefill(ids[:, :P], mask[:, :P], cache, attn_backend="triton")]
        for t in range(P, P + N - 1):
            logits.append(m.decode_step(ids[:, t:t + 1], cache, attn_backend="triton")[:, 0])
    got = torch.stack(logits, 1)  # logits after positions P-1 .. P+N-2
    torch.testing.assert_close(got, full[:, P - 1:P + N - 1], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- one-pass sampler
def _sampler_check(n, temperature, tol, device):
    from rlhf_engine.kernels.sample import sample_logits

    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.5, 2.0, float("-inf")], device=device)
    g = torch.Generator(device).manual_seed(7)
    tok, lp = sample_logits(logits.expand(n, 7), temperature=temperature, generator=g)
    target = torch.softmax(logits / temperature, -1)
    freq = torch.bincount(tok, minlength=7).float() / n
    assert (freq - target).abs().max() < tol
    assert freq[6] == 0  # a -inf logit is never drawn
    torch.testing.assert_close(lp, torch.log_softmax(logits / temperature, -1)[tok])
    # the stream depends on (seed, row, token) only: the same generator state replays the first rows
    m = min(n, 200)
    tok2, _ = sample_logits(logits.expand(m, 7), temperature=temperature, generator=g.manual_seed(7))
    assert torch.equal(tok[:m], tok2)
    tok3, _ = sample_logits(logits.expand(m, 7), temperature=temperature, generator=g.manual_seed(8))
    assert not torch.equal(tok[:m], tok3)


def test_triton_sampler_distribution_and_logprob(device):
    """kernels/sample.py: draws follow softmax(logits / T); the log-prob is exact; a generator replays.
    The interpreter spends ~20 ms a row in tl.rand: 1000 draws, a 4.5-sigma bound (0.07)."""
    _sampler_check(1000, 0.5, 0.07, device)


def test_triton_sampler_uses_each_of_the_four_uniforms(device):
    """One Philox call gives the uniforms of 4 neighbouring logits (tl.rand4x): with equal logits over V = 13 (three
    full groups of 4 and a partial one), every token is drawn at its 1/13 rate, the last group's too, and draws of
    different rows are independent (rows do not share a stream). 800 rows: a 4.5-sigma bound of 0.042."""
    from rlhf_engine.kernels.sample import sample_logits

    n, V = 800, 13
    g = torch.Generator(device).manual_seed(3)
    tok, lp = sample_logits(torch.zeros(n, V, device=device), generator=g)
    freq = torch.bincount(tok, minlength=V).float() / n
    assert (freq - 1 / V).abs().max() < 0.042, freq
    torch.testing.assert_close(lp, torch.full_like(lp, -math.log(V)))
    pairs = (tok[0::2] * V + tok[1::2]).unique().numel()  # 400 pairs of rows over 169 combinations
    assert pairs > 120, pairs  # rows repeating their neighbour's draw would leave 13


@triton.jit
def _philox_uniforms_kernel(SEED, OUT, VQ, BLOCK_Q: tl.constexpr):
    # the sampler's stream: logit i of row r takes output i % 4 of Philox(seed, r * VQ + i // 4)
    row = tl.program_id(0)
    q = tl.arange(0, BLOCK_Q)
    u0, u1, u2, u3 = tl.rand4x(tl.load(SEED), row * VQ + q)
    base = OUT + row * 4 * BLOCK_Q + 4 * q
    tl.store(base, u0)
    tl.store(base + 1, u1)
    tl.store(base + 2, u2)
    tl.store(base + 3, u3)


@pytest.mark.parametrize("V", [37, 2500, 20000])
def test_triton_sampler_draws_the_gumbel_max_of_its_uniforms(V, device):
    """The kernel's winner is argmax_i z_i - log(-log U_i) for its own Philox uniforms (recomputed here by a kernel
    of four lines), computed in fp64: the exponential race in linear space that the kernel runs (exp(z - m) / E,
    rescaled block to block and compared across vocab splits in log space) picks the same token (up to fp32
    rounding on a near-tie); 37 logits (one block), 2,500 (two blocks), 20,000 (three splits); masked prefixes, a
    jump of the running max, +inf logits (the race among them)."""
    from rlhf_engine.kernels.sample import sample_logits

    B, T = 6, 0.7
    torch.manual_seed(V)
    logits = torch.randn(B, V, device=device) * 2
    logits[0, : V // 2] = float("-inf")  # a row whose first half (a whole split at V = 20,000) is masked
    logits[1, : min(V - 5, 10300)] = float("-inf")  # a split (at 20,000) whose first block is masked, later ones not
    if V > 2048:
        logits[2, 2048:] += 200.0  # the running max jumps by 200 between blocks: the keys so far rescale to 0
    logits[3, V // 3] = logits[3, V - 1] = float("inf")  # overflowed logits: drawn before any finite one
    g = torch.Generator(device).manual_seed(11)
    tok, _ = sample_logits(logits, temperature=T, generator=g)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device, generator=g.manual_seed(11))
    vq = -(-V // 4)
    block_q = triton.next_power_of_2(vq)
    u = torch.empty(B, 4 * block_q, device=device)
    _philox_uniforms_kernel[(B,)](seed, u, vq, BLOCK_Q=block_q)
    z = (logits.float() * (1.0 / T)).double()
    key = z - torch.log(-torch.log(u[:, :V].double()))
    key[3] = torch.where(z[3] == float("inf"), -torch.log(-torch.log(u[3, :V].double())), float("-inf"))  # (inf - inf)
    ref = key.argmax(-1)
    assert torch.equal(tok, ref), (tok, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.7])
def test_triton_sampler_distribution_gpu(temperature, device):
    _sampler_check(400_000, temperature, 0.005, device)


def test_triton_sampler_greedy_long_vocab(device):
    """Vocab over several blocks, not a power of two; ties go to the first index, as torch.argmax."""
    from rlhf_engine.kernels.sample import sample_logits

    logits = torch.randn(5, 50257, device=device) * 3
    logits[2, 7] = logits[2, 40000] = 100.0  # a tie across blocks
    tok, lp = sample_logits(logits, temperature=0.8, greedy=True)
    assert torch.equal(tok, logits.argmax(-1)) and tok[2] == 7
    torch.testing.assert_close(lp, torch.log_softmax(logits / 0.8, -1).gather(1, tok[:, None])[:, 0])
    g = torch.Generator(device).manual_seed(0)
    tok, lp = sample_logits(logits.half(), temperature=1.3, generator=g)  # 16-bit logits are read as fp32
    ref = torch.log_softmax(logits.half().float() / 1.3, -1).gather(1, tok[:, None])[:, 0]
    torch.testing.assert_close(lp, ref)
    assert ((tok >= 0) & (tok < 50257)).all()


def test_sample_tokens_routes_to_the_kernel(device):
    """sample_tokens(backend="triton"): plain and greedy sampling on the kernel, top-k/top-p on the eager ops."""
    import rlhf_engine.kernels.sample as ks
    from rlhf_engine.generation import sample_tokens

    calls = []
    orig = ks.sample_logits_forward

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    ks.sample_logits_forward = spy
    try:
        z = torch.randn(4, 100, device=device)
        sample_tokens(z, backend="triton", generator=torch.Generator(device).manual_seed(0))
        sample_tokens(z, backend="triton", greedy=True)
        assert len(calls) == 2
        sample_tokens(z, backend="triton", top_k=5, generator=torch.Generator(device).manual_seed(0))
        sample_tokens(z, backend="torch")
        assert len(calls) == 2
        with pytest.raises(ValueError, match="backend"):
            sample_tokens(z, backend="cuda")
    finally:
        ks.sample_logits_forward = orig
    from rlhf_engine.kernels.sample import sample_logits
    with pytest.raises(ValueError, match="temperature"):
        sample_logits(z, temperature=0.0)
    with pytest.raises(ValueError, match="logits"):
        sample_logits(z[0])


def test_cache_attention_rotates_q_on_both_backends(device):
    """model/attention.cache_attention with q_rope: half tables (what the fused path passes) on the triton
    kernel and on the torch path both equal rotating q first with the full tables."""
    from rlhf_engine.model.attention import AttnMeta, cache_attention
    from rlhf_engine.model.rope import apply_rotary

    B, Tn, Hq, Hkv, D, L = 2, 1, 6, 2, 16, 12
    q = torch.randn(B, Tn, Hq, D, device=device)
    kc, vc = torch.randn(B, L, Hkv, D, device=device), torch.randn(B, L, Hkv, D, device=device)
    ang = torch.rand(B, Tn, D // 2, device=device) * 6
    half = (ang.cos(), ang.sin())
    full = tuple(torch.cat([t, t], -1) for t in half)
    lens = torch.tensor([12, 7], dtype=torch.int32, device=device)
    start = torch.tensor([0, 2], dtype=torch.int32, device=device)
    for backend in ("torch", "triton"):
        meta = AttnMeta(backend=backend, mode="decode", cache_lens=lens, cache_start=start)
        want = cache_attention(apply_rotary(q, *full), kc, vc, meta)
        torch.testing.assert_close(cache_attention(q, kc, vc, meta, q_rope=half), want, atol=1e-5, rtol=1e-5)
