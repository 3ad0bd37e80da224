"""Host (Python + dispatch) time of the fused PPO loss with its kernel launches stubbed out, against the eager
reference in the same run: the part of the GPU cost that a CPU-only machine can measure.

The PPO loss moves ~3 us of bytes on an H100, so ours is bound by host time there; this script measures
that time minus the launches themselves (Triton's launch path costs ~8-11 us a launch on top). The eager
reference runs for real on CPU tensors (its per-op host cost is what it pays on a GPU too, plus launches).
Not a run_all benchmark (no bench_ prefix): RESULTS.md quotes it as a prediction, not a GPU result.

    python benchmarks/host_overhead.py [--reps 5] [--calls 1000]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import rlhf_engine.kernels.ppo_loss as P
import rlhf_engine.kernels.ppo_loss_kernels as K
from rlhf_engine.algo import ppo_loss_reference


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=1000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for name in ("_ppo_loss_fwd_kernel", "_ppo_loss_finalize_kernel", "_ppo_loss_finalize_grads_kernel"):
        setattr(K, name, _NoLaunch())  # looked up by the launch functions, in their module
    B, T = 4, 16
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(B, T, generator=g)).requires_grad_()
    values = torch.randn(B, T, generator=g).requires_grad_()
    c = (logp.detach() + 0.1, torch.randn(B, T, generator=g), torch.ones(B, T, dtype=torch.bool))
    kw = dict(values=values, old_values=values.detach(), returns=torch.randn(B, T, generator=g),
              ref_logp=logp.detach(), value_clip=0.2, vf_coef=0.5, kl_coef=0.1, kl_kind="k3", agg="token-mean")

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(logp, *c, **kw)[0], (logp, values))

    paths = {"eager ppo_loss_reference (real CPU ops)": fwd_bwd(ppo_loss_reference),
             "ppo_loss_triton + autograd.grad (launches stubbed)": fwd_bwd(P.ppo_loss_triton),
             "ppo_loss_with_grads (launches stubbed)": lambda: P.ppo_loss_with_grads(logp, *c, **kw)}
    out = {}
    for name, fn in paths.items():
        for _ in range(200):
            fn()
        runs = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            runs.append((time.perf_counter() - t0) / args.calls * 1e6)
        out[name] = statistics.median(runs)
        print(f"{name:52s} median {out[name]:7.1f} us per call (min {min(runs):.1f}, max {max(runs):.1f})")
    return out


if __name__ == "__main__":
    main()
