"""Benchmark: LM head + token log-probs, fwd+bwd, N=8192 tokens, H=896, V=151936, bf16 (Qwen2.5-0.5B head).

Baselines (same run): eager ``h @ W.T`` → ``log_softmax(float)`` → ``gather`` → backward (stores the logits:
~15 GB), and Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (reduction="none", if importable).
Work: 6·N·H·V FLOPs for fwd+bwd (2 forward, 4 backward) — our chunked path actually does 8·N·H·V
(it recomputes the logits in the backward); TFLOP/s below is always against 6·N·H·V.
Floor: 6·N·H·V at 764 TFLOP/s ≈ 8.8 ms on an H100.
Run: ``python benchmarks/bench_fused_linear_logprob.py`` (needs a CUDA GPU; exits with a message otherwise;
``RLHF_BENCH_SMOKE=1 TRITON_INTERPRET=1`` runs it on tiny shapes on the CPU).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BF16_TFLOPS, bench, device, peak_mem_mb, print_table, record, smoke  # noqa: E402

from rlhf_engine.kernels.fused_linear_logprob import fused_linear_logprobs  # noqa: E402


def _eager(h, w, targets):
    logits = h @ w.T                                                     # (N, V) bf16
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]


def _liger(reduction: str):
    """Liger's fused linear cross-entropy as a log-prob function (per token for "none"; the summed
    log-prob, a scalar, for "sum", the variant BASELINES.md found fastest), or None without liger_kernel."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:  # on the GPU machine: bash benchmarks/fetch_baselines.sh, carry benchmarks/.vendor
        return None
    except Exception as e:  # noqa: BLE001 - e.g. a Liger release that does not import with this transformers
        print(f"liger_kernel failed to import: {type(e).__name__}: {e}")
        return None
    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction=reduction)
    return lambda h, w, targets: -loss_fn(w, h, targets)                 # logp = −CE


def main(N: int = 8192, H: int = 896, V: int = 151936) -> list[dict]:
    if not torch.cuda.is_available() and not smoke():
        print("bench_fused_linear_logprob: needs a CUDA GPU; skipping.")
        return []
    if smoke():
        N, H, V = 40, 32, 1000
    torch.manual_seed(0)
    dev, dt = device(), torch.bfloat16
    reps = dict(warmup=1, rep=2) if smoke() else dict(warmup=2, rep=10)
    h = torch.randn(N, H, device=dev, dtype=dt).requires_grad_()
    w = (torch.randn(V, H, device=dev) * H**-0.5).to(dt).requires_grad_()
    targets = torch.randint(0, V, (N,), device=dev)
    g = torch.randn(N, device=dev)
    shape = f"N={N} H={H} V={V} bf16"
    flops_fb, flops_f = 6.0 * N * H * V, 2.0 * N * H * V
    rows: list[dict] = []

    def add(op, impl, fn, flops, base_ms=None):
        try:
            ms = bench(fn, **reps)
            peak = peak_mem_mb(fn)
        except Exception as e:  # noqa: BLE001 - a failing baseline (e.g. Liger version) must not stop the run
            print(f"{impl}: failed: {type(e).__name__}: {e}")
            return None
        impl += tag if impl.startswith("ours") else ""
        rows.append({"op": op, "shape": shape, "impl": impl, "ms": ms, "metric": "throughput",
                     "value": flops / ms / 1e9, "unit": "TFLOP/s", "peak_mb": peak,
                     "vs_baseline": (base_ms / ms) if base_ms else 1.0})
        record(rows[-1:])  # row by row: a run cut short by its timeout keeps what it measured
        torch.cuda.empty_cache()
        return ms

    def fwd_bwd(f):
        def run():
            logp = f(h, w, targets)
            return torch.autograd.grad((logp * g).sum(), [h, w])
        return run

    def fwd(f):
        def run():
            with torch.no_grad():
                return f(h, w, targets)
        return run

    ours = lambda hh, ww, t, **kw: fused_linear_logprobs(hh, ww, t, backend="triton", **kw)  # noqa: E731
    # correctness first: the log-probs and both gradients against eager autograd (bf16 matmuls on both sides)
    got, want = fwd_bwd(ours)(), fwd_bwd(_eager)()
    with torch.no_grad():
        lp_err = (ours(h, w, targets) - _eager(h, w, targets)).abs().max().item()
    g_err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(got, want))
    tag = "" if lp_err < 5e-2 and g_err < 5e-2 else f" MISMATCH vs eager: logp {lp_err:.2g}, grads (rel) {g_err:.2g}"
    if tag:
        print(f"WARNING:{tag}")
    del got, want
    base = add("lm_head+logprob fwd+bwd", "eager matmul+log_softmax+gather", fwd_bwd(_eager), flops_fb)
    for reduction in ("none", "sum"):
        liger = _liger(reduction)
        if liger is None:
            print("liger_kernel not importable (bash benchmarks/fetch_baselines.sh): Liger baseline skipped")
            break
        add("lm_head+logprob fwd+bwd", f"Liger FLCE reduction={reduction}", fwd_bwd(liger), flops_fb, base)
    add("lm_head+logprob fwd+bwd", "ours (chunked, default chunk)", fwd_bwd(ours), flops_fb, base)
    for cs in (2**25, 2**26, 2**28):
        add("lm_head+logprob fwd+bwd", f"ours (chunk_size=2^{cs.bit_length() - 1})",
            fwd_bwd(lambda hh, ww, t, cs=cs: ours(hh, ww, t, chunk_size=cs)), flops_fb, base)
    add("lm_head+logprob+entropy fwd+bwd", "ours (chunked; ratio vs eager without entropy)",
        fwd_bwd(lambda hh, ww, t: sum(ours(hh, ww, t, with_entropy=True))), flops_fb, base)
    base_f = add("lm_head+logprob fwd", "eager", fwd(_eager), flops_f)
    add("lm_head+logprob fwd", "ours (chunked)", fwd(ours), flops_f, base_f)
    floor = flops_fb / (BF16_TFLOPS * 1e12) * 1e3
    rows.append({"op": "lm_head+logprob fwd+bwd", "shape": shape, "impl": f"floor (6NHV at {BF16_TFLOPS:.0f} TFLOP/s)",
                 "ms": floor, "metric": "throughput", "value": BF16_TFLOPS, "unit": "TFLOP/s",
                 "peak_mb": 0.0, "vs_baseline": (base / floor) if base else float("nan")})
    record(rows[-1:])
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
