"""GPU check of ``kernels._fastlaunch``: outputs with the cached launch path equal Triton's own path, bit for bit.

Runs the ops whose kernels launch through ``launch`` (RMSNorm + residual fwd/bwd, RoPE fwd/bwd, SwiGLU fwd/bwd and
its packed form, RoPE + attention on a packed q/k/v tensor fwd/bwd,
GAE fwd/bwd, ``ppo_loss_with_grads``, token log-probs with entropy, causal GQA attention fwd/bwd on fixed tiles,
decode attention with 1 and 3 splits, the norm + GEMM + SwiGLU decode kernel, the sampler, a KV-cache write), each
three times with the cached path on (the first launch compiles, the second caches, the third uses the
cache), and once with it off; then checks that every output and gradient is identical, nothing is NaN, and that
the kernels were launched from the cache. ``benchmarks/gpu_check.sh`` runs it before anything else and turns the
cached path off (``RLHF_ENGINE_FAST_LAUNCH=0``) for the rest of the run if it fails or crashes.

    python benchmarks/fastlaunch_check.py              # needs CUDA; exit 0 ok, 1 mismatch, 2 no CUDA
    python benchmarks/fastlaunch_check.py --cpu-smoke  # the same ops on the CPU under the Triton interpreter,
                                                       # where nothing is cached (tests/test_fastlaunch.py)
"""
from __future__ import annotations

import os
import sys


def _ops(torch, dev: str):
    from rlhf_engine.kernels.attention import flash_attention, rope_attention_packed
    from rlhf_engine.kernels.decode_attention import decode_attention
    from rlhf_engine.kernels.gae import gae_triton
    from rlhf_engine.kernels.kv_cache import apply_rope, write_kv_cache
    from rlhf_engine.kernels.logprob import token_logprobs
    from rlhf_engine.kernels.norm_linear import decode_linear, rms_norm_linear
    from rlhf_engine.kernels.ppo_loss import ppo_loss_with_grads
    from rlhf_engine.kernels.rmsnorm import rms_norm
    from rlhf_engine.kernels.sample import sample_logits
    from rlhf_engine.kernels.swiglu import silu_mul, silu_mul_packed

    g = torch.Generator(device=dev).manual_seed(0)
    bf = torch.bfloat16 if dev == "cuda" else torch.float32  # the interpreter's bf16 dots are wrong (3.6)

    def rnd(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=g, device=dev).to(dtype).requires_grad_(grad)

    n, h, i, vocab = (97, 896, 4864, 50257) if dev == "cuda" else (9, 40, 72, 301)  # the interpreter is slow
    x, r, w = rnd(n, h, dtype=bf, grad=True), rnd(n, h, dtype=bf, grad=True), rnd(h, dtype=bf, grad=True)
    gate, up = rnd(n, i, dtype=bf, grad=True), rnd(n, i, dtype=bf, grad=True)
    rew, val = rnd(7, 131, grad=True), rnd(7, 131, grad=True)
    mask = torch.rand(7, 131, generator=g, device=dev) > 0.2
    logits, tgt = rnd(37, vocab, dtype=bf, grad=True), torch.randint(0, vocab, (37,), generator=g, device=dev)
    q, k, v = rnd(2, n, 14, 64, dtype=bf, grad=True), rnd(2, n, 2, 64, dtype=bf, grad=True), \
        rnd(2, n, 2, 64, dtype=bf, grad=True)
    cache_k, cache_v = torch.zeros(3, 40, 2, 64, device=dev, dtype=bf), torch.zeros(3, 40, 2, 64, device=dev, dtype=bf)
    new_k, new_v, pos = rnd(3, 1, 2, 64, dtype=bf), rnd(3, 1, 2, 64, dtype=bf), torch.tensor([5, 17, 39], device=dev)

    def grads(out, *inputs):  # the same grad_output on every call
        go = torch.randn(out.shape, generator=torch.Generator(device=dev).manual_seed(1), device=dev).to(out.dtype)
        return (out, *torch.autograd.grad(out, inputs, go))

    def norm():
        y, s = rms_norm(x, w, 1e-6, residual=r, backend="triton")
        return grads(y + s, x, r, w)

    def kv_write():
        ck, cv = cache_k.clone(), cache_v.clone()
        write_kv_cache(ck, cv, new_k, new_v, pos, backend="triton")
        return ck, cv

    def ppo():
        loss, metrics, gr = ppo_loss_with_grads(rew, rew.detach() + 0.1, val.detach(), mask, values=val,
                                                old_values=val.detach(), returns=rew.detach(), kl_coef=0.1,
                                                ref_logp=rew.detach())
        return (loss, gr["logp"], gr["values"], *metrics.values())

    cos, sin = rnd(2, n, 64), rnd(2, n, 64)
    dq, dk, dv = rnd(3, 2, 14, 64, dtype=bf), rnd(3, 40, 2, 64, dtype=bf), rnd(3, 40, 2, 64, dtype=bf)
    lens = torch.tensor([40, 23, 31], device=dev)
    w_gu = rnd(2 * i, h, dtype=bf)
    gu = rnd(n, 2 * i, dtype=bf, grad=True)  # the packed gate/up GEMM output of the training path
    qkv = rnd(2, n, 18, 64, dtype=bf, grad=True)  # the packed q/k/v GEMM output (14 + 2 + 2 heads)

    def sample():  # a fresh generator each call: the same draw
        tok, lp = sample_logits(logits.detach(), temperature=0.8, generator=torch.Generator(dev).manual_seed(5))
        return tok, lp

    return {
        "rms_norm + residual fwd/bwd": norm,
        "rope fwd/bwd": lambda: grads(apply_rope(q, cos, sin, backend="triton"), q),
        "decode_attention, 1 and 3 splits": lambda: tuple(
            decode_attention(dq, dk, dv, lens, num_splits=s, backend="triton") for s in (1, 3)),
        "rms_norm_linear + SwiGLU": lambda: rms_norm_linear(x.detach()[:7], w.detach(), 1e-6, w_gu,
                                                            residual=r.detach()[:7], swiglu=True, backend="triton"),
        "decode_linear split-K, residual + sums": lambda: tuple(decode_linear(
            x.detach()[:7], w_gu[:h], out_residual=r.detach()[:7], return_sumsq=True, backend="triton",
            tile=dict(BLOCK_N=32, BLOCK_K=64, SPLITS=8))[::2]),
        "sample_logits": sample,
        "silu_mul fwd/bwd": lambda: grads(silu_mul(gate, up, backend="triton"), gate, up),
        "silu_mul_packed fwd/bwd": lambda: grads(silu_mul_packed(gu, backend="triton"), gu),
        "rope + attention packed fwd/bwd": lambda: grads(rope_attention_packed(qkv, cos, sin, 14, 2), qkv),
        "gae fwd/bwd": lambda: grads(torch.stack(gae_triton(rew, val, mask, gamma=0.99, lam=0.95)), rew, val),
        "ppo_loss_with_grads": ppo,
        "token_logprobs + entropy fwd/bwd": lambda: grads(
            torch.stack(token_logprobs(logits, tgt, temperature=0.7, with_entropy=True)), logits),
        "flash_attention fwd/bwd": lambda: grads(flash_attention(q, k, v, causal=True, backend="triton"), q, k, v),
        "write_kv_cache": kv_write,
    }


def main(argv: list[str] | None = None) -> int:
    cpu = "--cpu-smoke" in (sys.argv[1:] if argv is None else argv)
    if cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import torch

    if not cpu and not torch.cuda.is_available():
        print("fastlaunch check: no CUDA device")
        return 2
    os.environ["RLHF_ENGINE_AUTOTUNE"] = "0"  # fixed tiles: plain JITFunction launches
    os.environ["RLHF_ENGINE_ATTN_DQ"] = "split"  # the deterministic backward: the runs must agree bit for bit
    import rlhf_engine.kernels._fastlaunch as FL

    ok = True
    for name, op in _ops(torch, "cpu" if cpu else "cuda").items():
        FL.set_enabled(True)
        fast = [op() for _ in range(3)][-1]
        cached = FL.cached_launches()
        FL.set_enabled(False)
        slow = op()
        if not cpu:
            torch.cuda.synchronize()
        same = all(torch.equal(a, b) for a, b in zip(fast, slow)) and len(fast) == len(slow)
        finite = all(torch.isfinite(t.float()).all().item() for t in fast if t.is_floating_point())
        good = same and finite and (cached > 0 or cpu)
        ok &= good
        print(f"fastlaunch check: {name:34s} {'ok' if good else 'FAILED'} (identical {same}, finite {finite}, "
              f"cached kernels {cached})")
    FL.set_enabled(True)
    print(f"fastlaunch check: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
