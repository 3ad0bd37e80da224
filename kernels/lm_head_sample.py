"""The decode step's LM head and sampler in one Gluon GEMM on Hopper: the logits are never written.

The unfused step runs the LM-head GEMM (cuBLAS: B x V bf16 logits, 19 MB at batch 64 and V = 151,936), then
``kernels.sample`` (a partial kernel over vocabulary splits reading them back, and a combine kernel). Here the
swap-AB decode GEMM of ``decode_gemm_ws`` (``SAMPLE=True``) computes each program's 64 vocabulary rows x up to 64
tokens of logits in registers, and its epilogue reduces them at once to what the sampler's partial kernel keeps per
split: the running max m, the sum of exp(z - m), the best race key and its index, and the winner's logit (the
sampler reads it back from the logits; here there are none). ``kernels.sample``'s combine kernel then draws each
row's token from the (B, cdiv(V, 64)) partials.

The draw is ``kernels.sample``'s, uniform for uniform: z = logit / T with the logit rounded to the parameter dtype
first (as the GEMM's output would be), logit i of row r raced with U = output i % 4 of Philox(seed, r ceil(V / 4) +
i // 4) (``tl.rand4x``'s stream, written here in Gluon: ``_rand4x``). For that the epilogue stores the tile of z to
shared memory and reads it back as 4 interleaved (16, tokens) blocks, z_c[g] = z[4 g + c], so that one Philox call
gives the 4 uniforms of logits 4 g .. 4 g + 3 in the thread that holds them (as the sampler's 4 interleaved loads
do). Same logits and seed, same tokens (up to fp32 rounding on a near tie: the race keys are scaled by another
running max); the log-prob the same up to the log-sum-exp's summation order.

Why (RESULTS.md, "Generation"): the sampler's kernel was 45.9 us of the 1.194 ms step on the H200, arithmetic-bound
(Philox and a log a logit), after the LM head's 71.5 us of bandwidth-bound GEMM; in the epilogue that arithmetic
runs on SMs whose other resident program is streaming weights, and the logits' write and read (39 MB) go.
Inputs: ``decode_gemm_ws.eligible`` (an sm_90 GPU), temperature sampling or greedy without top-k / top-p.
"""
from __future__ import annotations

import torch

from ._launch import cdiv

try:  # Gluon ships with Triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - an older Triton
    HAVE_GLUON = False


if HAVE_GLUON:
    @gluon.jit
    def _rand4x(seed, offset):
        """Triton's ``tl.rand4x(seed, offset)`` (Philox4x32-10, a 64-bit key from the seed, the counter (offset, 0,
        0, 0)) for an int64 seed >= 0 and int32 offsets >= 0: four uniform fp32 blocks in [0, 1), bit for bit."""
        c0 = offset.to(gl.uint32)
        c1 = c0 * 0
        c2 = c1
        c3 = c1
        k0 = (seed & 0xFFFFFFFF).to(gl.uint32)
        k1 = ((seed >> 32) & 0xFFFFFFFF).to(gl.uint32)
        for _ in gl.static_range(10):
            a0 = c0
            a2 = c2
            c0 = gl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
            c2 = gl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
            c1 = a2 * 0xCD9E8D57
            c3 = a0 * 0xD2511F53
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        return _uniform(c0), _uniform(c1), _uniform(c2), _uniform(c3)

    @gluon.jit
    def _uniform(x):
        """Triton's ``uint_to_uniform_float`` for 32 bits: a uniform fp32 in [0, 1)."""
        x = x.to(gl.int32, bitcast=True)
        x = gl.where(x < 0, ~x, x)  # ~x = -x - 1 (Triton's form), with no int32 wrap at x = -2^31
        return x * 4.6566127342e-10

    @gluon.jit
    def _finite_top(z):
        """+inf as the largest finite float (``kernels.sample._finite_top``): such tokens still win among themselves."""
        return gl.where(z == float("inf"), 3.4028234663852886e38, z)

    @gluon.jit
    def _quarter(z_smem, c: gl.constexpr, v, V, q_l: gl.constexpr, BLOCK_T: gl.constexpr):
        """z[4 g + c, :] for g < 16 (read from the tile in shared memory), -inf past the vocabulary's end."""
        zc = z_smem.slice(c * BLOCK_T, BLOCK_T, dim=1).load(q_l)
        return gl.where((v + c < V)[:, None], zc, -float("inf"))

    @gluon.jit
    def _race(e, z, u, GREEDY: gl.constexpr):
        """The race key of a logit: greedy its z, else exp(z - m) / E with E = -log U (``kernels.sample``)."""
        if GREEDY:
            return z
        else:
            return e / -gl.log(u)

    @gluon.jit
    def _first_of(k, idx, k_max):
        return gl.where(k == k_max[None, :], idx[:, None], 2147483647)

    @gluon.jit
    def sample_tile(acc, SEED, PART, PIDX, pid_n, t0, M, V, VQ, inv_t, GREEDY: gl.constexpr,
                    BLOCK_N: gl.constexpr, BLOCK_T: gl.constexpr, dtype: gl.constexpr):
        """The LM head's epilogue: the (vocabulary rows, tokens) fp32 tile ``acc`` of logits -> for each token t,
        the sampler's partial of split ``pid_n``: PART[0..3, t, pid_n] = (m, sum of exp(z - m), best key in log
        space, z of the best), PIDX[t, pid_n] = its vocabulary index."""
        z_l: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
        z_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_N, BLOCK_T], z_l)
        # the logits rounded as the GEMM's output would be, tempered, then the sampler's clamp of +inf
        z_smem.store(_finite_top(acc.to(dtype).to(gl.float32) * inv_t))
        gl.thread_barrier()  # every thread's part of the tile stored before any reads another's
        zq = z_smem.reshape([BLOCK_N // 4, 4 * BLOCK_T])  # row g: tile rows 4 g .. 4 g + 3, one after the other
        q_l: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[4, 8], warps_per_cta=[4, 1],
                                             order=[1, 0])
        g = gl.arange(0, BLOCK_N // 4, layout=gl.SliceLayout(1, q_l))
        rt = t0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, q_l))
        v = pid_n * BLOCK_N + 4 * g  # the vocabulary index of z0's rows
        z0 = _quarter(zq, 0, v, V, q_l, BLOCK_T)
        z1 = _quarter(zq, 1, v, V, q_l, BLOCK_T)
        z2 = _quarter(zq, 2, v, V, q_l, BLOCK_T)
        z3 = _quarter(zq, 3, v, V, q_l, BLOCK_T)
        m = gl.max(gl.maximum(gl.maximum(z0, z1), gl.maximum(z2, z3)), axis=0)  # (tokens,)
        shift = gl.where(m == -float("inf"), 0.0, m)
        e0 = gl.exp(z0 - shift[None, :])
        e1 = gl.exp(z1 - shift[None, :])
        e2 = gl.exp(z2 - shift[None, :])
        e3 = gl.exp(z3 - shift[None, :])
        s = gl.sum(e0 + e1 + e2 + e3, axis=0)
        seed = gl.load(SEED)
        if GREEDY:
            u0 = z0  # (unused)
            u1 = z0
            u2 = z0
            u3 = z0
        else:  # the sampler's stream: logit i of row r takes output i % 4 of Philox(seed, r * VQ + i // 4)
            u0, u1, u2, u3 = _rand4x(seed, rt[None, :] * VQ + (v // 4)[:, None])
        k0 = gl.where((v < V)[:, None], _race(e0, z0, u0, GREEDY), -float("inf"))
        k1 = gl.where((v + 1 < V)[:, None], _race(e1, z1, u1, GREEDY), -float("inf"))
        k2 = gl.where((v + 2 < V)[:, None], _race(e2, z2, u2, GREEDY), -float("inf"))
        k3 = gl.where((v + 3 < V)[:, None], _race(e3, z3, u3, GREEDY), -float("inf"))
        k_max = gl.max(gl.maximum(gl.maximum(k0, k1), gl.maximum(k2, k3)), axis=0)
        first = gl.min(gl.minimum(gl.minimum(_first_of(k0, v, k_max), _first_of(k1, v + 1, k_max)),
                                  gl.minimum(_first_of(k2, v + 2, k_max), _first_of(k3, v + 3, k_max))), axis=0)
        z_win = gl.max(gl.maximum(gl.maximum(gl.where(v[:, None] == first[None, :], z0, -float("inf")),
                                             gl.where(v[:, None] + 1 == first[None, :], z1, -float("inf"))),
                                  gl.maximum(gl.where(v[:, None] + 2 == first[None, :], z2, -float("inf")),
                                             gl.where(v[:, None] + 3 == first[None, :], z3, -float("inf")))), axis=0)
        z_win = gl.where(z_win == 3.4028234663852886e38, float("inf"), z_win)  # the logit before the clamp (as the
        # sampler's combine reads it back from the logits: an infinite logit's log-prob stays infinite)
        if GREEDY:
            best = k_max
        else:  # the key in log space, comparable across tiles: log(exp(z - m) / E) + m = z - log E
            best = gl.where(k_max > 0.0, gl.log(gl.maximum(k_max, 1e-30)) + m, -float("inf"))
        S = gl.num_programs(0).to(gl.int64)
        ok = rt < M
        at = rt.to(gl.int64) * S + pid_n
        plane = S * M
        gl.store(PART + at, m, mask=ok)
        gl.store(PART + plane + at, s, mask=ok)
        gl.store(PART + 2 * plane + at, best, mask=ok)
        gl.store(PART + 3 * plane + at, z_win, mask=ok)
        gl.store(PIDX + at, first, mask=ok)


def lm_head_sample_fits(batch: int, vocab: int) -> bool:
    """Whether a (batch, vocab) draw's random-stream offsets (row * ceil(vocab / 4) + i // 4, 4 logits a counter)
    stay in int32."""
    return batch * cdiv(vocab, 4) * 4 < 2**31


def lm_head_sample(x: torch.Tensor, weight: torch.Tensor, *, temperature: float = 1.0, greedy: bool = False,
                   generator: torch.Generator | None = None, seed: torch.Tensor | None = None,
                   pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of softmax(x weightᵀ / temperature) (or take its argmax) without writing the logits.

    x (B, H) hidden states (the final norm applied), weight (V, H) the LM head, both ``decode_gemm_ws.layout_ok``
    (one 16-bit dtype); temperature > 0. ``generator`` advances by one draw a sampling call, as
    ``kernels.sample.sample_logits`` does (or pass ``seed``, (1,) int64 in [0, 2^62), e.g. a CUDA graph's input).
    Returns tokens (B,) int64 and log softmax(logits / temperature)[token] (B,) fp32, where logits = (x weightᵀ)
    rounded to x's dtype; the same draw as ``sample_logits`` on those logits. Never syncs the host."""
    from . import decode_gemm_ws as dg
    from .sample import sample_combine, sample_seed

    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if not dg.layout_ok(x, weight):
        raise ValueError(f"lm_head_sample: x {tuple(x.shape)} {x.dtype} and weight {tuple(weight.shape)} "
                         f"{weight.dtype} must be decode_gemm_ws.layout_ok (16-bit, TMA-aligned rows, M <= 256)")
    B, V = x.shape[0], weight.shape[0]
    if not lm_head_sample_fits(B, V):
        raise ValueError(f"lm_head_sample: B * V = {B * V} exceeds the int32 random-stream offsets")
    if seed is None:
        seed = sample_seed(x.device, greedy, generator)
    S = cdiv(V, dg.BLOCK_N)  # the vocabulary tiles: one partial each
    part = torch.empty((4, B, S), dtype=torch.float32, device=x.device)
    idx = torch.empty((B, S), dtype=torch.int32, device=x.device)
    dg.decode_gemm_ws(x, weight, sample=(seed, part, idx, 1.0 / float(temperature), cdiv(V, 4), bool(greedy)),
                      pdl=pdl)
    return sample_combine(part, idx, B, S)
