"""Parallel compiles of an autotuner's configurations (kernels/_launch.py ``parallel_autotune``).

The compiles themselves need a GPU target (they run on the GPU machine, for the attention and decode
autotuners). What runs here: the hook fires inside a real ``Autotuner.run`` exactly when a key is tuned (never
for a tuned key), warms up every kept configuration with the launch's arguments after its pre-hook, and stays
out of the way when switched off; and, in a child with a driver that reports an sm_90 GPU, the compiles land
in the JIT's kernel cache under the keys the autotuner's launches look up."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl

from rlhf_engine.kernels import _launch
from rlhf_engine.kernels._launch import parallel_autotune

# The toy kernel launches on CPU tensors, which only the interpreter runs (CI and every CPU machine); on a CUDA
# machine Triton refuses them. There the real autotuners' parallel compiles show in gpu_check.sh's precompile lines.
interpreter_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                      reason="launches a toy kernel on CPU tensors: needs TRITON_INTERPRET=1")


@triton.jit
def _toy_kernel(X, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < N) + 1, mask=offs < N)


def _tuned(events):
    def hook(nargs):
        events.append(("pre_hook", nargs["BLOCK"]))

    configs = [triton.Config({"BLOCK": b}, num_warps=w, pre_hook=hook) for b, w in ((16, 1), (32, 2), (64, 4))]

    def prune(configs, named_args, **kwargs):  # the launch's named arguments reach the prune, as in a real run
        return [c for c in configs if c.kwargs["BLOCK"] <= named_args["N"]]

    tuned = parallel_autotune(triton.autotune(configs=configs, key=["N"],
                                              prune_configs_by={"early_config_prune": prune})(_toy_kernel))
    tuned.do_bench = lambda kernel_call, quantiles: (kernel_call(), [1.0, 1.0, 1.0])[1]  # no GPU timer here
    return tuned


@pytest.fixture
def hooked(monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_COMPILE_THREADS", "4")
    monkeypatch.setattr(_launch, "_FORCE_PARALLEL_COMPILE", True)  # CPU tensors: the warm-ups are stubbed


def _recording(tuned, events, monkeypatch):
    monkeypatch.setattr(tuned.fn, "warmup", lambda *a, grid, **kw: events.append(("warmup", kw["BLOCK"],
                                                                                     kw["num_warps"], a)))


@interpreter_only
def test_hook_fires_inside_autotuner_run_once_per_key(hooked, monkeypatch):
    """Through Triton's own Autotuner.run (the interpreter launches, a stub timer): the kept configurations are
    warmed up with the launch's arguments, each after its pre-hook, before the autotuner times them; a tuned key
    launches without the hook."""
    events = []
    tuned = _tuned(events)
    _recording(tuned, events, monkeypatch)
    x = torch.zeros(40)
    tuned[lambda meta: (triton.cdiv(40, meta["BLOCK"]),)](x, 40)
    warm = [e for e in events if e[0] == "warmup"]
    assert [e[1:3] for e in warm] == [(16, 1), (32, 2)]  # BLOCK 64 > N is pruned
    assert all(e[3] == (x, 40) for e in warm)  # the launch's own arguments
    first_timed_hook = events.index(("pre_hook", 16), events.index(warm[-1]))
    assert events[:4] == [("pre_hook", 16), warm[0], ("pre_hook", 32), warm[1]] and first_timed_hook == 4
    assert torch.equal(x, torch.full((40,), float(len(tuned.configs_timings) + 1)))  # timed runs + the launch
    n = len(events)
    tuned[lambda meta: (triton.cdiv(40, meta["BLOCK"]),)](x, 40)  # a tuned key: no prune, no warm-up
    assert [e for e in events[n:] if e[0] == "warmup"] == []
    tuned[lambda meta: (triton.cdiv(64, meta["BLOCK"]),)](torch.zeros(64), 64)  # a new key: N = 64 keeps all three
    assert [e[1] for e in events[n:] if e[0] == "warmup"] == [16, 32, 64]


@interpreter_only
def test_switched_off(monkeypatch):
    events = []
    tuned = _tuned(events)
    _recording(tuned, events, monkeypatch)
    monkeypatch.setenv("RLHF_ENGINE_COMPILE_THREADS", "4")
    tuned[(1,)](torch.zeros(40), 40)  # CPU tensors: nothing to compile for
    monkeypatch.setattr(_launch, "_FORCE_PARALLEL_COMPILE", True)
    monkeypatch.setenv("RLHF_ENGINE_COMPILE_THREADS", "1")
    tuned[(1,)](torch.zeros(48), 48)
    assert [e for e in events if e[0] == "warmup"] == []


@interpreter_only
def test_a_failure_never_breaks_the_launch(hooked, monkeypatch):
    tuned = _tuned([])

    def broken(*a, **kw):
        raise RuntimeError("warm-up machinery exploded")

    monkeypatch.setattr(_launch, "_compile_configs", broken)
    x = torch.zeros(40)
    with pytest.warns(UserWarning, match="compiling on demand"):
        tuned[(1,)](x, 40)
    assert x[0] > 0  # the autotuner went on and launched


_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver


    class FakeDriver:  # an H100 as far as Triton's JIT asks: launches would fail, compiles do not
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")


    driver.set_active(FakeDriver())
    from rlhf_engine.kernels import _launch
    from rlhf_engine.kernels import attention_fwd as af

    B, T, Hq, Hkv, D = 2, 256, 14, 2, 64
    q = torch.zeros(B, T, Hq, D, dtype=torch.bfloat16)
    k, v = torch.zeros(B, T, Hkv, D, dtype=torch.bfloat16), torch.zeros(B, T, Hkv, D, dtype=torch.bfloat16)
    o, lse, ks, ke = af.forward_buffers(q, None, None)
    args = (q, k, v, o, lse, ks, ke, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            Hq, T, T, Hq // Hkv, 0.125 * af.LOG2E, af.t_bucket(T))
    meta = dict(HEAD_DIM=D, BLOCK_D=64, IS_CAUSAL=True, HAS_KV_RANGE=False, PRECISION=af.dot_precision(q.dtype),
                FLAT_GRID=False)
    tuned = af._attn_fwd_kernel_tuned
    _launch._FORCE_PARALLEL_COMPILE = True  # CPU tensors pose as the GPU launch's
    tuned.nargs = dict(zip(tuned.arg_names, args))  # as Autotuner.run sets them before it prunes
    # the hook, given what Autotuner.run gives it (the launch's grid and warmup flag too): parallel compiles
    configs = tuned.prune_configs({**meta, "grid": (1,), "warmup": False})
    tuned.nargs = None
    cache = tuned.fn.device_caches[0][0]
    compiled = len(cache)
    t0 = time.perf_counter()
    for c in configs:  # what the autotuner's timed launches look up: every one must hit the cache
        tuned.fn.warmup(*args, grid=(1,), **meta, **c.all_kwargs())
    print(len(configs), compiled, len(cache), round(time.perf_counter() - t0, 3))
""")


def test_parallel_compiles_fill_the_kernel_cache_the_autotuner_reads(tmp_path):
    """In a child without the interpreter, with a driver that reports an sm_90 GPU: the attention forward's
    configurations compile through AsyncCompileMode threads into the JIT's kernel cache, under the keys the
    autotuner's own launches look up (re-launching every configuration compiles nothing more)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(RLHF_ENGINE_COMPILE_THREADS="2", TRITON_CACHE_DIR=str(tmp_path / "triton_cache"))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_configs, compiled, after, relaunch_s = proc.stdout.split()[-4:]
    assert int(n_configs) == int(compiled) >= 2
    assert int(after) == int(compiled)  # the autotuner's launches hit the cache
    assert float(relaunch_s) < 1.0
