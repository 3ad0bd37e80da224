"""Token sampling from logits in one pass: the log-sum-exp, the draw and the drawn token's log-prob (Triton).

For one row of logits l (V,) and temperature T, with z = l / T:
    token = argmax_i (z_i + G_i),  G_i = -log(-log U_i),  U_i ~ Uniform(0, 1)   (Gumbel-max: P(token = i) =
            softmax(z)_i; the same draw as the exponential race argmax p_i / E_i with E_i = -log U_i, which
            is how it is computed: exp(z_i - m) / E_i against the running max m, sharing the exponentials
            of the log-sum-exp, one log a logit instead of the Gumbel key's two)
    greedy: token = argmax_i z_i
    logp  = z_token - logsumexp(z)                                             (online over vocab blocks)
U_i = output i % 4 of Philox(seed, row * ceil(V / 4) + i // 4) (``tl.rand4x``: one Philox call for 4 logits), with
one 62-bit seed per call drawn from the caller's ``torch.Generator`` on the device: no host sync, reproducible for a
given generator state.
Two kernels: programs (row, vocab split of ~8K entries) reduce their slice to (max, sum of exp, best key,
its index), so that a batch of 64 rows still fills the GPU (one program per row would stream 600 KB
through each of 64 SMs); one program per row then combines the splits and reads the drawn logit.

The eager sampler (``rlhf_engine.generation.sampling.sample_tokens``) runs ~8 kernels over the (B, V) fp32
logits (scale, softmax, exponential noise, clamp, divide, argmax, gather, logsumexp), ~12 reads and writes
of them: at B = 64 and V = 151936 that is ~0.5 GB a decode step, ~0.15 ms at 3 TB/s; these kernels read the
logits once (39 MB).
Top-k / top-p sampling stays on the eager path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._fastlaunch import launch
from ._launch import cdiv, next_pow2

_BLOCK_V = 2048
_SPLIT_ELEMS = 8192  # vocab entries per program: B = 64 rows of V = 151936 make ~1200 programs, not 64


@triton.jit
def _finite_top(z):
    """+inf (an overflowed logit, or one scaled past fp32 by a tiny temperature) as the largest finite float: such
    tokens keep winning the race among themselves (exp(z - max) = 1, not inf - inf = NaN); NaN stays NaN."""
    return tl.where(z == float("inf"), 3.4028234663852886e38, z)


@triton.jit
def _race_key(e, u):
    return e / -tl.log(u)  # exp(z - m) / E, E = -log U ~ Exp(1); u = 0 gives 0 (never drawn)


@triton.jit
def _index_if(key, idx, k_max):
    return tl.where(key == k_max, idx, 2147483647)


@triton.jit
def _sample_partial_kernel(
    Z, SEED, PM, PS, PK, PI,
    stride_z, V, VQ, chunk, S, inv_t,
    GREEDY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Program (row, split): vocab [split * chunk, +chunk) of one row -> running max m, sum of exp(z - m), the best
    # race key and its index. A block of BLOCK_V logits is read as 4 interleaved vectors z_c = logits v0 + 4 q + c
    # (q < BLOCK_V / 4), so that one Philox call (tl.rand4x) gives the 4 uniforms of logits v0 + 4 q .. + 3 in the
    # thread that holds them: Philox (~100 integer ops a call) is the kernel's cost, and one call per logit made the
    # H200 run's sampler 63 µs a step for 5 µs of bytes. The 4 loads cover the same cache lines (L1 hits).
    row = tl.program_id(0)
    sp = tl.program_id(1)
    base = Z + row.to(tl.int64) * stride_z
    seed = tl.load(SEED)
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, V)
    quad = tl.arange(0, BLOCK_V // 4)
    m = -float("inf")  # running max of z
    s = 0.0  # running sum of exp(z - m)
    # best race key so far: greedy, the largest z; sampling, the largest exp(z - m) / E (relative to the running max
    # m, rescaled as s is; starting at -1, which the first block's rescaling by exp(-inf) = 0 turns into -0: no NaN,
    # as -inf * 0 would give, and a split that never sees a positive key ends at -inf below)
    best = -float("inf") if GREEDY else -1.0
    best_i = 0
    for v0 in range(lo, hi, BLOCK_V):  # v0 is a multiple of BLOCK_V, so of 4
        i0 = v0 + 4 * quad
        i1, i2, i3 = i0 + 1, i0 + 2, i0 + 3
        z0 = _finite_top(tl.load(base + i0, mask=i0 < hi, other=-float("inf")).to(tl.float32) * inv_t)
        z1 = _finite_top(tl.load(base + i1, mask=i1 < hi, other=-float("inf")).to(tl.float32) * inv_t)
        z2 = _finite_top(tl.load(base + i2, mask=i2 < hi, other=-float("inf")).to(tl.float32) * inv_t)
        z3 = _finite_top(tl.load(base + i3, mask=i3 < hi, other=-float("inf")).to(tl.float32) * inv_t)
        m_new = tl.maximum(m, tl.max(tl.maximum(tl.maximum(z0, z1), tl.maximum(z2, z3)), axis=0))
        # m_new = -inf only while every logit so far is -inf: keep s = 0 (exp(-inf - -inf) would be NaN)
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)  # what the sums (and race keys) so far are rescaled by
        e0, e1, e2, e3 = tl.exp(z0 - shift), tl.exp(z1 - shift), tl.exp(z2 - shift), tl.exp(z3 - shift)
        s = s * alpha + tl.sum(e0 + e1 + e2 + e3, axis=0)
        m = m_new
        if GREEDY:
            k0, k1, k2, k3 = z0, z1, z2, z3
        else:
            # the stream of logit i of a row: output i % 4 of Philox(seed, row * VQ + i // 4); the exponential race
            # in linear space, argmax exp(z - m) / E with E = -log U: the Gumbel-max winner argmax z - log(-log U)
            # with one log a logit instead of two, the exponentials shared with the sum
            u0, u1, u2, u3 = tl.rand4x(seed, row * VQ + v0 // 4 + quad)
            k0, k1, k2, k3 = _race_key(e0, u0), _race_key(e1, u1), _race_key(e2, u2), _race_key(e3, u3)
            best = best * alpha
        k0 = tl.where(i0 < hi, k0, -float("inf"))
        k1 = tl.where(i1 < hi, k1, -float("inf"))
        k2 = tl.where(i2 < hi, k2, -float("inf"))
        k3 = tl.where(i3 < hi, k3, -float("inf"))
        k_max = tl.max(tl.maximum(tl.maximum(k0, k1), tl.maximum(k2, k3)), axis=0)
        # the first index of the block's maximum (as torch.argmax); strict: an earlier block keeps a tie
        first = tl.min(tl.minimum(tl.minimum(_index_if(k0, i0, k_max), _index_if(k1, i1, k_max)),
                                  tl.minimum(_index_if(k2, i2, k_max), _index_if(k3, i3, k_max))), axis=0)
        best_i = tl.where(k_max > best, first, best_i)
        best = tl.maximum(best, k_max)
    if not GREEDY:  # the key in log space, comparable across splits: log(exp(z - m) / E) + m = z - log E
        # (a split's winner has a key >= exp(0) / E of its max token, > 0.046 for any u < 1 but u = 0 (E = inf,
        # probability 2^-24 per split): the clamp keeps log(0) out of the lanes tl.where drops)
        best = tl.where(best > 0.0, tl.log(tl.maximum(best, 1e-30)) + m, -float("inf"))
    i = row * S + sp
    tl.store(PM + i, m)
    tl.store(PS + i, s)
    tl.store(PK + i, best)
    tl.store(PI + i, best_i)


@triton.jit
def _sample_combine_kernel(
    Z, PM, PS, PK, PI, TOK, LOGP,
    stride_z, S, inv_t,
    BLOCK_S: tl.constexpr, HAS_PZ: tl.constexpr = False,
):
    # One program per row: lse = M + log(sum_j s_j exp(m_j - M)); the token of the largest key (first split on ties).
    # HAS_PZ: Z holds each split's winning z (B, S) (``lm_head_sample``: no logits in memory) instead of the logits.
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_S)
    ok = offs < S
    i = row * S + offs
    pm = tl.load(PM + i, mask=ok, other=-float("inf"))
    ps = tl.load(PS + i, mask=ok, other=0.0)
    pk = tl.load(PK + i, mask=ok, other=-float("inf"))
    pi = tl.load(PI + i, mask=ok, other=0)
    mx = tl.max(pm, axis=0)
    shift = tl.where(mx == -float("inf"), 0.0, mx)
    total = tl.sum(ps * tl.exp(pm - shift), axis=0)
    j = tl.argmax(pk, axis=0)
    tok = tl.sum(tl.where(offs == j, pi, 0), axis=0)
    if HAS_PZ:
        z_tok = tl.sum(tl.where(offs == j, tl.load(Z + i, mask=ok, other=0.0), 0.0), axis=0)
    else:
        z_tok = tl.load(Z + row.to(tl.int64) * stride_z + tok).to(tl.float32) * inv_t
    tl.store(TOK + row, tok.to(tl.int64))
    tl.store(LOGP + row, z_tok - (mx + tl.log(total)))


def sample_logits_forward(logits: torch.Tensor, seed: torch.Tensor, temperature: float,
                          greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the two kernels: logits (B, V) with unit stride on V, seed (1,) int64 on the same device."""
    B, V = logits.shape
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logp = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B == 0:
        return tokens, logp
    chunk = cdiv(cdiv(V, cdiv(V, _SPLIT_ELEMS)), _BLOCK_V) * _BLOCK_V  # a multiple of BLOCK_V
    S = cdiv(V, chunk)
    part = torch.empty((3, B, S), dtype=torch.float32, device=logits.device)
    idx = torch.empty((B, S), dtype=torch.int32, device=logits.device)
    inv_t = 1.0 / temperature
    launch(_sample_partial_kernel, (B, S), logits, seed, part[0], part[1], part[2], idx, logits.stride(0), V,
           cdiv(V, 4), chunk, S, inv_t, GREEDY=greedy, BLOCK_V=_BLOCK_V, num_warps=8)
    launch(_sample_combine_kernel, (B,), logits, part[0], part[1], part[2], idx, tokens, logp, logits.stride(0), S,
           inv_t, BLOCK_S=max(16, next_pow2(S)), num_warps=1)
    return tokens, logp


def sample_combine(part: torch.Tensor, idx: torch.Tensor, B: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The combine kernel over partials that carry each split's winning z: part (4, B, S) fp32 (max, sum of exp,
    best key, the best's z), idx (B, S) int32 (``lm_head_sample``). Returns tokens (B,) int64, log-probs (B,) fp32."""
    tokens = torch.empty(B, dtype=torch.int64, device=part.device)
    logp = torch.empty(B, dtype=torch.float32, device=part.device)
    if B:
        launch(_sample_combine_kernel, (B,), part[3], part[0], part[1], part[2], idx, tokens, logp, S, S, 1.0,
               BLOCK_S=max(16, next_pow2(S)), HAS_PZ=True, num_warps=4 if S > 512 else 1)
    return tokens, logp


def sample_logits(logits: torch.Tensor, *, temperature: float = 1.0, greedy: bool = False,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from softmax(logits / temperature) (or take the argmax) and return its log-prob.

    logits: (B, V) float, any float dtype (read as fp32). temperature: > 0. greedy: argmax, no randomness.
    generator: a torch.Generator on the logits' device (None: the default one), advanced by one draw a
        sampling call (not by greedy ones).
    Returns tokens (B,) int64 and log softmax(logits / temperature)[token] (B,) fp32. Never syncs the host.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits: expected a float (B, V) tensor, got {logits!r:.80}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    B, V = logits.shape
    if V == 0:
        raise ValueError("logits: expected V >= 1")
    if B * V >= 2**31:
        raise ValueError(f"logits: B * V = {B * V} exceeds the int32 random-stream offsets (< 2**31)")
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    return sample_logits_forward(logits, sample_seed(logits.device, greedy, generator), float(temperature),
                                 bool(greedy))


def sample_seed(device: torch.device, greedy: bool, generator: torch.Generator | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """A sampling call's seed, (1,) int64 on ``device`` (into ``out`` if given): 62 random bits from ``generator``
    (Philox takes a 64-bit key, so steps do not share noise after ~2^16 calls), one draw a call; greedy: zeros,
    unused, and the generator not advanced. The Triton sampler, the fused LM head and its CUDA graph input draw it
    so, which keeps their random streams equal."""
    if out is None:
        out = torch.empty(1, dtype=torch.int64, device=device)
    if greedy:
        return out.zero_()
    return torch.randint(0, 2**62, (1,), generator=generator, out=out)
