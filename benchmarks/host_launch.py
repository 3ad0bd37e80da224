"""Host time of one Triton launch before its C launcher: Triton 3.6's ``kernel[grid](...)`` path against
``kernels._fastlaunch.launch`` with a cached kernel, for real launches of our wrappers, on this CPU.

Each op's wrapper runs once on CPU tensors with ``launch`` recording its launches instead of making them. Each
recorded launch is then replayed through both paths against a stand-in device 0:
  * Triton: the real ``JITFunction.run`` (binder, cache key, global check, launch metadata) finds a cached
    stand-in kernel whose launcher is a real ``CudaLauncher`` object (its Python wrapper runs) with a no-op C
    launch;
  * ours: ``launch`` with that kernel cached (the key from Triton's own specializer, then the no-op C launch).
What both leave out, and the GPU machine adds to both: the C launcher (argument parsing, ``cuLaunchKernel``).
Not a run_all benchmark (no bench_ prefix): RESULTS.md quotes it as a prediction, not a GPU result.

    python benchmarks/host_launch.py [--reps 5] [--calls 2000]
"""
from __future__ import annotations

import argparse
import types

import torch
import triton.runtime.jit as tjit
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.backends.nvidia.driver import CudaLauncher
from triton.compiler.compiler import CompiledKernel
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

import rlhf_engine.kernels._fastlaunch as FL
from rlhf_engine.kernels import gae, logprob, ppo_loss_kernels, rmsnorm, swiglu
from rlhf_engine.kernels.gae import gae_forward
from rlhf_engine.kernels.logprob import token_logprobs_forward
from rlhf_engine.kernels.ppo_loss import ppo_loss_with_grads
from rlhf_engine.kernels.rmsnorm import rms_norm_backward, rms_norm_forward
from rlhf_engine.kernels.swiglu import silu_mul

from host_overhead import _median_us  # noqa: E402 - benchmarks/ is the script's directory

BACKEND = CUDABackend(GPUTarget("cuda", 90, 32))


class _Kernel:
    """A CompiledKernel stand-in: Triton's own ``launch_metadata`` code, a real CudaLauncher object."""

    launch_metadata = CompiledKernel.launch_metadata
    name, function, packed_metadata, src = "k", 1, (0,), None

    def __init__(self):
        self.run = object.__new__(CudaLauncher)
        self.run.num_ctas, self.run.launch_cooperative_grid, self.run.launch_pdl = 1, False, False
        self.run.global_scratch_size = self.run.profile_scratch_size = 0
        self.run.global_scratch_align = self.run.profile_scratch_align = 1
        self.run.launch = lambda *args: None  # the C launcher: the part both paths pay

    def _init_handles(self):
        pass


def record_launches() -> list[tuple[str, JITFunction, tuple, tuple, dict]]:
    """(op, kernel, grid, args, kwargs) of the launches a few wrappers make, recorded without running them."""
    calls, op = [], [""]

    def record(k, grid, *a, **kw):
        calls.append((op[0], k if isinstance(k, JITFunction) else JITFunction(k.fn), grid, a, kw))

    saved = {m: m.launch for m in (gae, logprob, ppo_loss_kernels, rmsnorm, swiglu)}
    for m in saved:
        m.launch = record
    try:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(64, 896, generator=g), torch.randn(896, generator=g)
        op[0] = "rms_norm fwd"
        rms_norm_forward(x, w, 1e-6, x)
        op[0] = "rms_norm bwd"
        rms_norm_backward(x, x, x, w, 1e-6, need_dw=True)
        op[0] = "silu_mul fwd"
        silu_mul(x, x, backend="triton")
        B, T = 256, 1024
        r, v, m = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g), torch.ones(B, T, dtype=torch.bool)
        op[0] = "gae fwd"
        gae_forward(r, v, m, gamma=1.0, lam=0.95, carry=False)
        op[0] = "token_logprobs fwd"
        token_logprobs_forward(torch.randn(8, 1000, generator=g), torch.zeros(8, dtype=torch.long), 1.0)
        op[0] = "ppo_loss_with_grads"
        ppo_loss_with_grads(r, r, v, m, values=v, old_values=v, returns=r, ref_logp=r, kl_coef=0.1)
    finally:
        for mod, fn in saved.items():
            mod.launch = fn
    return calls


def _install_fakes(calls) -> None:
    """Device 0 is a stand-in: Triton's driver calls and our getters return 0; every recorded specialization has
    its stand-in kernel in Triton's cache and in ours."""
    tjit.driver = types.SimpleNamespace(active=types.SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda device: 0))
    FL._get_device, FL._get_stream = (lambda: 0), (lambda device: 0)
    FL._ENABLED = FL._SUPPORTED = True
    torch.cuda.is_available = lambda: True
    for _, kernel, grid, args, kwargs in calls:
        if 0 not in kernel.device_caches:
            kernel.device_caches[0] = ({}, {}, BACKEND.target, BACKEND,
                                       create_function_from_signature(kernel.signature, kernel.params, BACKEND))
        kernel_cache, key_cache, _, _, binder = kernel.device_caches[0]
        options = dict(kwargs, debug=kwargs.get("debug", kernel.debug) or tjit.knobs.runtime.debug,
                       instrumentation_mode=tjit.knobs.compilation.instrumentation_mode)
        _, spec, options = binder(*args, **options)
        stand_in = _Kernel()
        kernel_cache[compute_cache_key(key_cache, spec, options)] = stand_in
        state = FL._STATES[id(kernel)][1] if id(kernel) in FL._STATES else FL._state(kernel)
        state.backend = BACKEND
        _, key = state.plan(len(args), tuple(kwargs))(args, kwargs, BACKEND)
        state.compiled[(0, (len(args), *kwargs), key)] = FL._entry(stand_in)


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    calls = record_launches()
    _install_fakes(calls)
    out = {}
    print(f"{'op':20s} {'kernel':34s} {'triton us':>10s} {'ours us':>8s}   (min of reps; median)")
    for op, kernel, grid, a, kw in calls:
        t_med, t_min, _ = _median_us(lambda: kernel[grid](*a, **kw), args.calls, args.reps)
        o_med, o_min, _ = _median_us(lambda: FL.launch(kernel, grid, *a, **kw), args.calls, args.reps)
        out[f"{op}: {kernel.fn.__name__}"] = (t_min, o_min)
        print(f"{op:20s} {kernel.fn.__name__:34s} {t_min:10.1f} {o_min:8.1f}   ({t_med:.1f}; {o_med:.1f})")
    return out


if __name__ == "__main__":
    main()
