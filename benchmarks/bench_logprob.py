"""Benchmark: token log-probs (+ entropy) from bf16 logits, N=16384 tokens, V=151936 (Qwen vocab).

Baseline (measured in the same run): ``log_softmax(logits.float(), -1).gather(-1, targets)`` — eager,
materializes two (N, V) fp32 tensors. Floor: read the logits once, N·V·2 bytes at 3.0 TB/s ≈ 1.66 ms on
an H100; forward + backward reads them twice and writes dlogits once: 3·N·V·2 bytes ≈ 4.98 ms.
Run: ``python benchmarks/bench_logprob.py`` (needs a CUDA GPU; exits with a message otherwise;
``RLHF_BENCH_SMOKE=1 TRITON_INTERPRET=1`` runs it on tiny shapes on the CPU).
"""
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import COPY_TBPS, bench, device, peak_mem_mb, print_table, record, smoke  # noqa: E402

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
    if not torch.cuda.is_available() and not smoke():
        print("bench_logprob: needs a CUDA GPU (the Triton kernels run only under the interpreter on CPU); skipping.")
        return []
    if smoke():
        N, V = 48, 1000
    torch.manual_seed(0)
    dev = device()
    reps = dict(warmup=1, rep=2) if smoke() else dict(warmup=3, rep=20)
    logits = (torch.randn(N, V, device=dev) * 3).to(torch.bfloat16)
    targets = torch.randint(0, V, (N,), device=dev)
    g = torch.randn(N, device=dev)
    shape = f"N={N} V={V} bf16"
    nbytes = N * V * logits.element_size()
    floor_fwd = nbytes / (COPY_TBPS * 1e12) * 1e3
    floor_fb = 3 * nbytes / (COPY_TBPS * 1e12) * 1e3
    rows: list[dict] = []

    def add(op, impl, fn, floor_ms, n_bytes, base_ms=None):
        ms = bench(fn, **reps)
        peak = peak_mem_mb(fn)
        impl += tag if impl.startswith("ours") else ""
        rows.append({"op": op, "shape": shape, "impl": impl, "ms": ms, "metric": "effective bandwidth",
                     "value": n_bytes / ms / 1e9, "unit": "TB/s", "peak_mb": peak,
                     "vs_baseline": (base_ms / ms) if base_ms else 1.0, "floor_ms": floor_ms})
        record(rows[-1:])  # row by row: a run cut short by its timeout keeps what it measured
        torch.cuda.empty_cache()
        return ms

    ours = functools.partial(token_logprobs, backend="triton")  # "auto" would take the reference on a CPU (smoke)

    # correctness first: a fast wrong kernel is not a result
    ref_lp, ref_ent = _eager_entropy(logits, targets)
    lp, ent = ours(logits, targets, with_entropy=True)
    err = max((lp - ref_lp).abs().max().item(), (ent - ref_ent).abs().max().item())
    tag = "" if err < 1e-3 else f" MISMATCH vs eager: max abs err {err:.2g}"  # NaN fails too
    if tag:
        print(f"WARNING:{tag}")

    # forward
    base = add("logprob fwd", "eager log_softmax(float).gather", lambda: _eager(logits, targets), floor_fwd, nbytes)
    add("logprob fwd", "ours (triton)", lambda: ours(logits, targets), floor_fwd, nbytes, base)
    base_e = add("logprob+entropy fwd", "eager", lambda: _eager_entropy(logits, targets), floor_fwd, nbytes)
    add("logprob+entropy fwd", "ours (triton)", lambda: ours(logits, targets, with_entropy=True),
        floor_fwd, nbytes, base_e)
    # forward + backward (dlogits is a new (N, V) bf16 tensor, except with inplace_backward)
    x = logits.clone().requires_grad_()
    base_fb = add("logprob fwd+bwd", "eager", _fwd_bwd(lambda t: _eager(t, targets), x, g), floor_fb, 3 * nbytes)
    add("logprob fwd+bwd", "ours (triton)", _fwd_bwd(lambda t: ours(t, targets), x, g),
        floor_fb, 3 * nbytes, base_fb)
    add("logprob+entropy fwd+bwd", "ours (triton; ratio vs eager without entropy)",
        _fwd_bwd(lambda t: ours(t, targets, with_entropy=True), x, g), floor_fb, 3 * nbytes, base_fb)
    # in-place backward: dlogits overwrite the logits buffer (values stay bounded, so timing is unaffected)
    add("logprob fwd+bwd", "ours (triton, inplace_backward)",
        _fwd_bwd(lambda t: ours(t, targets, inplace_backward=True), x, g),
        floor_fb, 3 * nbytes, base_fb)
    rows.append({"op": "logprob fwd", "shape": shape, "impl": "floor (read logits once)", "ms": floor_fwd,
                 "metric": "bandwidth", "value": COPY_TBPS, "unit": "TB/s", "peak_mb": 0.0,
                 "vs_baseline": base / floor_fwd})
    rows.append({"op": "logprob fwd+bwd", "shape": shape, "impl": "floor (2 reads + 1 write)", "ms": floor_fb,
                 "metric": "bandwidth", "value": COPY_TBPS, "unit": "TB/s", "peak_mb": 0.0,
                 "vs_baseline": base_fb / floor_fb})
    record(rows[-2:])
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
