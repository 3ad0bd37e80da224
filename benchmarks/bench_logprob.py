"""Benchmark: token log-probs (+ entropy) from bf16 logits, N=16384 tokens, V=151936 (Qwen vocab).

Baseline (measured in the same run): ``log_softmax(logits.float(), -1).gather(-1, targets)`` — eager,
materializes two (N, V) fp32 tensors. Floor: read the logits once, N·V·2 bytes at 3.0 TB/s ≈ 1.66 ms on
an H100; forward + backward reads them twice and writes dlogits once: 3·N·V·2 bytes ≈ 4.98 ms.
Run: ``python benchmarks/bench_logprob.py`` (needs a CUDA GPU; exits with a message otherwise).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import H100_COPY_TBPS, bench, peak_mem_mb, print_table, record  # noqa: E402

from rlhf_engine.kernels.logprob import token_logprobs  # noqa: E402


def _eager(logits, targets):
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]


def _eager_entropy(logits, targets):
    lp = torch.log_softmax(logits.float(), -1)
    return lp.gather(-1, targets[:, None])[:, 0], -(lp.exp() * lp).sum(-1)


def _fwd_bwd(fn, x, g):
    """Forward + backward to dlogits (torch.autograd.grad: no .grad accumulation in the timing)."""
    def run():
        out = fn(x)
        loss = (out * g).sum() if torch.is_tensor(out) else (out[0] * g).sum() + out[1].sum()
        return torch.autograd.grad(loss, [x])[0]
    return run


def main(N: int = 16384, V: int = 151936) -> list[dict]:
    if not torch.cuda.is_available():
        print("bench_logprob: needs a CUDA GPU (the Triton kernels run only under the interpreter on CPU); skipping.")
        return []
    torch.manual_seed(0)
    dev = "cuda"
    logits = (torch.randn(N, V, device=dev) * 3).to(torch.bfloat16)
    targets = torch.randint(0, V, (N,), device=dev)
    g = torch.randn(N, device=dev)
    shape = f"N={N} V={V} bf16"
    nbytes = N * V * logits.element_size()
    floor_fwd = nbytes / (H100_COPY_TBPS * 1e12) * 1e3
    floor_fb = 3 * nbytes / (H100_COPY_TBPS * 1e12) * 1e3
    rows: list[dict] = []

    def add(op, impl, fn, floor_ms, n_bytes, base_ms=None):
        ms = bench(fn, warmup=3, rep=20)
        peak = peak_mem_mb(fn)
        rows.append({"op": op, "shape": shape, "impl": impl, "ms": ms, "metric": "effective bandwidth",
                     "value": n_bytes / ms / 1e9, "unit": "TB/s", "peak_mb": peak,
                     "vs_baseline": (base_ms / ms) if base_ms else 1.0, "floor_ms": floor_ms})
        torch.cuda.empty_cache()
        return ms

    # forward
    base = add("logprob fwd", "eager log_softmax(float).gather", lambda: _eager(logits, targets), floor_fwd, nbytes)
    add("logprob fwd", "ours (triton)", lambda: token_logprobs(logits, targets), floor_fwd, nbytes, base)
    base_e = add("logprob+entropy fwd", "eager", lambda: _eager_entropy(logits, targets), floor_fwd, nbytes)
    add("logprob+entropy fwd", "ours (triton)", lambda: token_logprobs(logits, targets, with_entropy=True),
        floor_fwd, nbytes, base_e)
    # forward + backward (dlogits is a new (N, V) bf16 tensor, except with inplace_backward)
    x = logits.clone().requires_grad_()
    base_fb = add("logprob fwd+bwd", "eager", _fwd_bwd(lambda t: _eager(t, targets), x, g), floor_fb, 3 * nbytes)
    add("logprob fwd+bwd", "ours (triton)", _fwd_bwd(lambda t: token_logprobs(t, targets), x, g),
        floor_fb, 3 * nbytes, base_fb)
    add("logprob+entropy fwd+bwd", "ours (triton)",
        _fwd_bwd(lambda t: token_logprobs(t, targets, with_entropy=True), x, g), floor_fb, 3 * nbytes, base_fb)
    # in-place backward: dlogits overwrite the logits buffer (values stay bounded, so timing is unaffected)
    add("logprob fwd+bwd", "ours (triton, inplace_backward)",
        _fwd_bwd(lambda t: token_logprobs(t, targets, inplace_backward=True), x, g),
        floor_fb, 3 * nbytes, base_fb)
    rows.append({"op": "logprob fwd", "shape": shape, "impl": "floor (read logits once)", "ms": floor_fwd,
                 "metric": "bandwidth", "value": H100_COPY_TBPS, "unit": "TB/s", "peak_mb": 0.0,
                 "vs_baseline": base / floor_fwd})
    rows.append({"op": "logprob fwd+bwd", "shape": shape, "impl": "floor (2 reads + 1 write)", "ms": floor_fb,
                 "metric": "bandwidth", "value": H100_COPY_TBPS, "unit": "TB/s", "peak_mb": 0.0,
                 "vs_baseline": base_fb / floor_fb})
    print_table(rows)
    record(rows)
    return rows


if __name__ == "__main__":
    main()
