"""Parallel compiles of an autotuner's configurations (kernels/_launch.py ``precompile_autotune``).

The compiles themselves need a GPU target (they run on the GPU machine: the attention and decode launches call
this before their autotuners). What runs here: which configurations get warmed up, with which arguments and in
what order relative to their pre-hooks, once per autotune key, and the switches that turn it off."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl

from rlhf_engine.kernels import _launch
from rlhf_engine.kernels._launch import autotune_key, precompile_autotune


@triton.jit
def _toy_kernel(X, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < N) + 1, mask=offs < N)


def _tuned(events):
    def hook(nargs):
        events.append(("pre_hook", nargs["BLOCK"]))

    configs = [triton.Config({"BLOCK": b}, num_warps=w, pre_hook=hook) for b, w in ((16, 1), (32, 2), (64, 4))]

    def prune(configs, named_args, **kwargs):  # the launch's named arguments reach the prune, as in a real run
        assert named_args["X"] is not None and "N" in named_args
        return [c for c in configs if c.kwargs["BLOCK"] <= named_args["N"]]

    return triton.autotune(configs=configs, key=["N"], prune_configs_by={"early_config_prune": prune})(_toy_kernel)


@pytest.fixture
def threads(monkeypatch):
    monkeypatch.setenv("RLHF_ENGINE_COMPILE_THREADS", "4")
    _launch._PRECOMPILED.clear()


def test_every_pruned_config_is_warmed_up_once_per_key(threads, monkeypatch):
    events = []
    tuned = _tuned(events)
    monkeypatch.setattr(tuned.fn, "warmup", lambda *a, grid, **kw: events.append(("warmup", kw["BLOCK"],
                                                                                     kw["num_warps"], a, grid)))
    x = torch.zeros(40)
    assert precompile_autotune((tuned, (x, 40), {}), force=True) == 2  # BLOCK 64 > N is pruned
    assert [e[:3] for e in events] == [("pre_hook", 16), ("warmup", 16, 1), ("pre_hook", 32), ("warmup", 32, 2)]
    assert all(e[3] == (x, 40) for e in events if e[0] == "warmup")  # the launch's own arguments
    assert precompile_autotune((tuned, (x, 40), {}), force=True) == 0  # this key is done
    assert precompile_autotune((tuned, (x, 64), {}), force=True) == 3  # a new key: N = 64 keeps all three
    tuned.cache[autotune_key(tuned, (x, 100), {})] = tuned.configs[0]  # a key the autotuner has tuned already
    assert precompile_autotune((tuned, (x, 100), {}), force=True) == 0


def test_autotune_key_is_the_autotuners():
    """The key precompile_autotune dedups on is the one Autotuner.run caches its choice under."""
    tuned = _tuned([])
    x = torch.zeros(8, dtype=torch.float16)
    assert autotune_key(tuned, (x, 8), {}) == (8, "torch.float16")
    assert autotune_key(tuned, (x,), {"N": 5}) == (5, "torch.float16")


def test_switched_off(threads, monkeypatch):
    events = []
    tuned = _tuned(events)
    monkeypatch.setattr(tuned.fn, "warmup", lambda *a, grid, **kw: events.append(kw["BLOCK"]))
    x = torch.zeros(40)
    assert precompile_autotune((tuned, (x, 40), {})) == 0  # CPU tensors: nothing to compile for
    monkeypatch.setenv("RLHF_ENGINE_COMPILE_THREADS", "1")
    assert precompile_autotune((tuned, (x, 40), {}), force=True) == 0
    assert events == []


def test_a_failure_never_breaks_the_launch(threads, monkeypatch):
    tuned = _tuned([])

    def broken(configs, named_args, **kwargs):
        raise RuntimeError("prune exploded")

    monkeypatch.setattr(tuned, "early_config_prune", broken)
    with pytest.warns(UserWarning, match="compiling on demand"):
        assert precompile_autotune((tuned, (torch.zeros(4), 4), {}), force=True) == 0


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
    from rlhf_engine.kernels import attention_fwd as af
    from rlhf_engine.kernels._launch import precompile_autotune

    B, T, Hq, Hkv, D = 2, 256, 14, 2, 64
    q = torch.zeros(B, T, Hq, D, dtype=torch.bfloat16)
    k, v = torch.zeros(B, T, Hkv, D, dtype=torch.bfloat16), torch.zeros(B, T, Hkv, D, dtype=torch.bfloat16)
    o, lse, ks, ke = af.forward_buffers(q, None, None)
    args = (q, k, v, o, lse, ks, ke, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            Hq, T, T, Hq // Hkv, 0.125 * af.LOG2E, af.t_bucket(T))
    meta = dict(HEAD_DIM=D, BLOCK_D=64, IS_CAUSAL=True, HAS_KV_RANGE=False, PRECISION=af.dot_precision(q.dtype))
    tuned = af._attn_fwd_kernel_tuned
    n = precompile_autotune((tuned, args, meta), force=True)
    cache = tuned.fn.device_caches[0][0]
    compiled = len(cache)
    tuned.nargs = dict(zip(tuned.arg_names, args))
    configs = tuned.prune_configs(meta)
    tuned.nargs = None
    t0 = time.perf_counter()
    for c in configs:  # what the autotuner's timed launches look up: every one must hit the cache
        tuned.fn.warmup(*args, grid=(1,), **meta, **c.all_kwargs())
    print(n, len(configs), compiled, len(cache), round(time.perf_counter() - t0, 3))
""")


def test_parallel_compiles_fill_the_kernel_cache_the_autotuner_reads(tmp_path):
    """In a child without the interpreter, with a driver that reports an sm_90 GPU: the attention forward's
    configurations compile through AsyncCompileMode threads into the JIT's kernel cache, under the keys the
    autotuner's own launches look up (re-launching every configuration compiles nothing more)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(RLHF_ENGINE_COMPILE_THREADS="2", TRITON_CACHE_DIR=str(tmp_path / "triton_cache"))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    submitted, n_configs, compiled, after, relaunch_s = proc.stdout.split()[-5:]
    assert int(submitted) == int(n_configs) == int(compiled) >= 2
    assert int(after) == int(compiled)  # the autotuner's launches hit the cache
    assert float(relaunch_s) < 1.0
