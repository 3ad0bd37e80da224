"""Host (Python + dispatch) time of the fused PPO loss with its kernel launches stubbed out, against the eager
reference in the same run: the part of the GPU cost that a CPU-only machine can measure.

The PPO loss moves ~3 us of bytes on an H100, so ours is bound by host time there; this script measures
that time minus the launches themselves. The eager reference runs for real on CPU tensors (its per-op host
cost is what it pays on a GPU too, plus launches). Also measured:
  * the native op (``kernels.native.ppo_loss_with_grads``), whose two CUDA launches happen inside one C++ call:
    with that call stubbed, and with the real C++ CPU op (B=4, T=16: well under a microsecond of math);
  * the Python part of a Triton launch that a CPU can run: Triton's argument binder and cache key for our two
    ``ppo_loss_with_grads`` kernels (``JITFunction.run`` runs both before every launch; the driver calls and
    the C launcher come on top, and need a GPU).
Not a run_all benchmark (no bench_ prefix): RESULTS.md quotes it as a prediction, not a GPU result.

    python benchmarks/host_overhead.py [--reps 5] [--calls 1000]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import rlhf_engine.kernels.native as N
import rlhf_engine.kernels.ppo_loss as P
import rlhf_engine.kernels.ppo_loss_kernels as K
from rlhf_engine.algo import ppo_loss_reference


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _NoNativeCall:
    """Stands in for ``rlhf_engine._C`` with ``ppo_loss_grads`` a no-op."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def ppo_loss_grads(self, *args):
        return None


def _triton_binder_us(kernels, calls: int, reps: int):
    """Median us of Triton's binder + cache key for the two kernels of ppo_loss_with_grads (B=256, T=1024, fp32),
    with an sm_90 backend object and CPU tensors standing in for CUDA ones (alignment is all the binder reads)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.runtime.jit import compute_cache_key, create_function_from_signature
    except ImportError as e:  # Triton internals (3.6): report, do not fail
        print(f"triton binder not measured ({e})")
        return None
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    x = torch.empty(256 * 1024)
    jobs = []
    for fn in kernels:
        if not hasattr(fn, "params"):  # an InterpretedFunction (TRITON_INTERPRET=1): no binder to time
            print("triton binder not measured (the kernels are interpreted: unset TRITON_INTERPRET)")
            return None
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        args, kwargs = [], {"num_warps": 4, "debug": False, "instrumentation_mode": ""}
        for prm in fn.params:
            if prm.is_constexpr:
                kwargs[prm.name] = 1024 if "BLOCK" in prm.name or prm.name == "ROWS" else True
            else:
                args.append(x if prm.name.endswith("_ptr") else 256 if prm.name in ("B", "T", "n") else 0.5)
        jobs.append((binder, args, kwargs, {}))

    def run():
        for binder, args, kwargs, cache in jobs:
            bound, spec, opts = binder(*args, **kwargs)
            compute_cache_key(cache, spec, opts)
    return _median_us(run, calls, reps)


def _median_us(fn, calls: int, reps: int) -> tuple[float, float, float]:
    for _ in range(200):
        fn()
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(runs), min(runs), max(runs)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=1000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    kernels = (K._ppo_loss_fwd_kernel, K._ppo_loss_finalize_grads_kernel)  # before they are stubbed out
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

    def native_stubbed():
        real, N._C = N._C, _NoNativeCall(N._C)
        try:
            return N.ppo_loss_with_grads(logp, *c, **kw)
        finally:
            N._C = real

    paths = {"eager ppo_loss_reference (real CPU ops)": fwd_bwd(ppo_loss_reference),
             "ppo_loss_triton + autograd.grad (launches stubbed)": fwd_bwd(P.ppo_loss_triton),
             "ppo_loss_with_grads (launches stubbed)": lambda: P.ppo_loss_with_grads(logp, *c, **kw)}
    if N.available():
        paths["native ppo_loss_with_grads (C++ call stubbed)"] = native_stubbed
        paths["native ppo_loss_with_grads (real C++ CPU op)"] = lambda: N.ppo_loss_with_grads(logp, *c, **kw)
    out = {}
    for name, fn in paths.items():
        med, lo, hi = _median_us(fn, args.calls, args.reps)
        out[name] = med
        print(f"{name:52s} median {med:7.1f} us per call (min {lo:.1f}, max {hi:.1f})")
    binder = _triton_binder_us(kernels, args.calls, args.reps)
    if binder is not None:
        out["triton binder + cache key, both kernels"] = binder[0]
        print(f"{'triton binder + cache key, both kernels':52s} median {binder[0]:7.1f} us per call "
              f"(min {binder[1]:.1f}, max {binder[2]:.1f})")
    return out


if __name__ == "__main__":
    main()
