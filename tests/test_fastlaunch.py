"""``kernels._fastlaunch.launch``: the cached-kernel launch path against Triton's own binder and cache key.

The launches themselves need a GPU; what a CPU can check is everything before the C launcher: that the argument
list handed to it is exactly the one ``JITFunction.run`` would hand it (the binder's bound arguments, in order),
that two calls share a cached kernel only when Triton's cache key would also be equal (so a kernel specialized on
16-byte alignment, ``== 1`` or a dtype is never reused for arguments it was not compiled for), and that every
case it does not model takes Triton's path. Calls are recorded from the real kernel wrappers on CPU tensors, and
checked against an sm_90 backend object (alignment and types are all the specializer reads).
"""
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.backends.nvidia.driver import CudaLauncher
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

import rlhf_engine.kernels._fastlaunch as FL
from rlhf_engine.kernels import attention_bwd, attention_fwd, gae, logprob, ppo_loss_kernels, rmsnorm, swiglu
from rlhf_engine.kernels.attention import flash_attention
from rlhf_engine.kernels.gae import gae_forward
from rlhf_engine.kernels.logprob import token_logprobs_forward
from rlhf_engine.kernels.ppo_loss import ppo_loss_with_grads
from rlhf_engine.kernels.rmsnorm import rms_norm_forward

BACKEND = CUDABackend(GPUTarget("cuda", 90, 32))
_MODULES = (attention_bwd, attention_fwd, gae, logprob, ppo_loss_kernels, rmsnorm, swiglu)


def _jit(kernel) -> JITFunction:
    """The JITFunction of a kernel (under TRITON_INTERPRET=1 ``triton.jit`` returns an InterpretedFunction)."""
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


@pytest.fixture(scope="module")
def recorded_calls():
    """(kernel, grid, args, kwargs) of every launch the wrappers make for a few ops, without running them."""
    calls = []
    mp = pytest.MonkeyPatch()
    for m in _MODULES:
        mp.setattr(m, "launch", lambda k, grid, *a, **kw: calls.append((_jit(k), grid, a, kw)))
    try:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(7, 40, generator=g), torch.randn(40, generator=g)
        rms_norm_forward(x, w, 1e-6, None)
        rms_norm_forward(x, w, 1e-6, torch.randn(7, 40, generator=g))
        r, v, m = torch.randn(3, 17, generator=g), torch.randn(3, 17, generator=g), torch.rand(3, 17, generator=g) > .3
        gae_forward(r, v, m, gamma=0.99, lam=0.95, carry=False)
        gae_forward(r, v, m, torch.randn(3, generator=g), gamma=1.0, lam=1.0, carry=True)
        token_logprobs_forward(torch.randn(5, 97, generator=g), torch.randint(0, 97, (5,), generator=g), 0.7,
                               with_entropy=True)
        ppo_loss_with_grads(r, r + 0.1, v, m, values=v, old_values=v, returns=r, kl_coef=0.1, ref_logp=r)
        q = torch.randn(2, 9, 6, 16, generator=g, requires_grad=True)
        kv = [torch.randn(2, 9, 2, 16, generator=g, requires_grad=True) for _ in range(2)]
        flash_attention(q, *kv, causal=True, backend="triton").sum().backward()
    finally:
        mp.undo()
    return calls


def _triton_key(kernel, args, kwargs):
    binder = create_function_from_signature(kernel.signature, kernel.params, BACKEND)
    bound, spec, options = binder(*args, **kwargs, debug=False, instrumentation_mode="")
    return list(bound.values()), compute_cache_key({}, spec, options)


def _plan(kernel, args, kwargs):
    return FL._KernelState(kernel).plan(len(args), tuple(kwargs))(args, kwargs, BACKEND)


def test_recorded_calls_cover_the_wrappers(recorded_calls):
    names = {k.fn.__name__ for k, *_ in recorded_calls}
    assert {"_rms_norm_kernel", "_gae_fwd_kernel", "_logprob_fwd_kernel", "_ppo_loss_fwd_kernel",
            "_attn_fwd_kernel", "_bwd_dkdv_kernel"} <= names


def test_arguments_reach_the_launcher_in_the_binders_order(recorded_calls):
    for kernel, _, args, kwargs in recorded_calls:
        vals, _ = _plan(kernel, args, kwargs)
        bound, _ = _triton_key(kernel, args, kwargs)
        assert len(vals) == len(bound), kernel.fn.__name__
        assert all(a is b for a, b in zip(vals, bound)), kernel.fn.__name__


def _variants(args):
    """Each tensor argument misaligned, retyped or replaced by a same-kind tensor; each int set to 1, 16, 17 and
    2**40; each float set to an int. Yields the changed argument tuples."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.numel() > 1:
            flat = a.detach().reshape(-1)
            yield args[:i] + (flat[1:],) + args[i + 1:]                 # address + 4 bytes: not 16-aligned
            yield args[:i] + (a.detach().to(torch.float16),) + args[i + 1:]
            yield args[:i] + (a.detach().clone(),) + args[i + 1:]         # another tensor, same kind
        elif type(a) is int:
            for n in (1, 16, 17, 2 ** 40):
                yield args[:i] + (n,) + args[i + 1:]
        elif type(a) is float:
            yield args[:i] + (1,) + args[i + 1:]


def test_keys_are_equal_exactly_when_tritons_are(recorded_calls):
    checked = 0
    for kernel, _, args, kwargs in recorded_calls:
        _, key0 = _plan(kernel, args, kwargs)
        _, tkey0 = _triton_key(kernel, args, kwargs)
        for changed in _variants(args):
            _, key = _plan(kernel, changed, kwargs)
            _, tkey = _triton_key(kernel, changed, kwargs)
            assert (key == key0) == (tkey == tkey0), kernel.fn.__name__
            checked += 1
        for name, value in kwargs.items():  # constexprs and launch options
            if type(value) in (int, bool):
                other = dict(kwargs, **{name: value + 1 if type(value) is int else not value})
                assert _plan(kernel, args, other)[1] != key0, (kernel.fn.__name__, name)
    assert checked > 200


class _Recorder:
    """What a launch reached: Triton's path (``run``) or the cached C launcher (``c_launch``)."""

    def __init__(self):
        self.run, self.c_launch = [], []


def _fake_cuda(monkeypatch, kernel, rec: _Recorder):
    """Make ``kernel`` launch on a fake device 0: its ``run`` records the call and returns a CompiledKernel
    stand-in whose launcher is a real ``CudaLauncher`` object with a recording C ``launch``."""
    launcher = object.__new__(CudaLauncher)
    launcher.num_ctas, launcher.launch_cooperative_grid, launcher.launch_pdl = 1, False, False
    launcher.global_scratch_size = launcher.profile_scratch_size = 0
    launcher.global_scratch_align = launcher.profile_scratch_align = 1
    launcher.launch = lambda *a: rec.c_launch.append(a)
    compiled = types.SimpleNamespace(run=launcher, function="fn", packed_metadata=("meta",))

    def run(*args, grid, warmup, **kwargs):
        rec.run.append((grid, args, kwargs))
        return compiled

    monkeypatch.setattr(kernel, "run", run, raising=False)
    kernel.device_caches[0] = ({}, {}, BACKEND.target, BACKEND, None)
    monkeypatch.setattr(FL, "_get_device", lambda: 0)
    monkeypatch.setattr(FL, "_get_stream", lambda device: 1234)
    monkeypatch.setattr(FL, "_SUPPORTED", True)
    monkeypatch.setattr(FL, "_ENABLED", True)
    monkeypatch.setattr(FL.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(FL, "_STATES", {})
    return compiled


@pytest.fixture
def rms_call(recorded_calls):
    kernel, grid, args, kwargs = next(c for c in recorded_calls if c[0].fn.__name__ == "_rms_norm_kernel")
    return JITFunction(kernel.fn), grid, args, kwargs


@pytest.fixture
def faked(monkeypatch, rms_call):
    """The recorded RMSNorm launch on a fake device: (kernel, grid, args, kwargs, recorder, compiled stand-in)."""
    kernel, grid, args, kwargs = rms_call
    rec = _Recorder()
    return kernel, grid, args, kwargs, rec, _fake_cuda(monkeypatch, kernel, rec)


def test_cached_launch_calls_the_c_launcher_with_the_binders_arguments(faked):
    kernel, grid, args, kwargs, rec, _ = faked
    for _ in range(4):
        FL.launch(kernel, grid, *args, **kwargs)
    # 1st: Triton's path (the backend is made there); 2nd: Triton's path, and the kernel it returns is kept
    assert len(rec.run) == 2 and len(rec.c_launch) == 2
    bound, _ = _triton_key(kernel, args, kwargs)
    from triton.backends.nvidia.driver import _BASE_ARGS_FORMAT_LEN

    assert _BASE_ARGS_FORMAT_LEN == 13  # the C launcher's fixed arguments before the kernel's (Triton 3.6)
    head, tail = rec.c_launch[0][:13], rec.c_launch[0][13:]
    assert head == (grid[0], 1, 1, 1234, "fn", False, False, None, None, ("meta",), None, None, None)
    assert len(tail) == len(bound) and all(a is b for a, b in zip(tail, bound))


def test_a_new_specialization_goes_through_triton_again(faked):
    kernel, grid, args, kwargs, rec, _ = faked
    for _ in range(3):
        FL.launch(kernel, grid, *args, **kwargs)
    x = args[0]
    odd = torch.empty(x.numel() + 1)[1:].view_as(x)  # 4 bytes past an aligned address
    changed = (odd,) + args[1:]
    FL.launch(kernel, grid, *changed, **kwargs)
    assert len(rec.run) == 3 and rec.run[-1][1][0] is odd
    FL.launch(kernel, grid, *changed, **kwargs)  # now cached too
    assert len(rec.run) == 3 and rec.c_launch[-1][13] is odd
    FL.launch(kernel, grid, *args, **dict(kwargs, num_warps=8))  # another launch option
    assert len(rec.run) == 4


def test_launch_options_are_keyed_by_name(faked):
    """num_warps=4, num_stages=2 and num_warps=2, num_stages=4 (the same values, other names) are two kernels."""
    kernel, grid, args, kwargs, rec, _ = faked
    kwargs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    for _ in range(3):
        FL.launch(kernel, grid, *args, **kwargs, num_warps=4, num_stages=2)
    assert len(rec.run) == 2
    FL.launch(kernel, grid, *args, **kwargs, num_stages=4, num_warps=2)
    assert len(rec.run) == 3 and rec.run[-1][2]["num_warps"] == 2


def test_scratch_memory_keeps_tritons_python_launcher(monkeypatch, faked):
    kernel, grid, args, kwargs, rec, compiled = faked
    compiled.run.global_scratch_size = 64  # the kernel needs global scratch: CudaLauncher.__call__ allocates it
    allocs = []
    monkeypatch.setattr(FL.triton.runtime._allocation, "_allocator",
                        types.SimpleNamespace(get=lambda: lambda size, align, stream: allocs.append(size) or "buf"),
                        raising=False)
    for _ in range(3):
        FL.launch(kernel, grid, *args, **kwargs)
    assert rec.c_launch and rec.c_launch[-1][7] == "buf" and allocs


@pytest.mark.parametrize("case", ["callable grid", "launch hook", "interpreted", "disabled", "unknown type"])
def test_what_it_does_not_model_takes_tritons_path(monkeypatch, faked, case):
    kernel, grid, args, kwargs, rec, _ = faked
    if case == "callable grid":
        grid = lambda meta: (7,)  # noqa: E731
    elif case == "launch hook":
        FL._knobs.runtime.launch_enter_hook.add(print)
        monkeypatch.setattr(FL, "_STATES", {})
    elif case == "interpreted":
        calls = []
        kernel = type("Interpreted", (), {"__getitem__": lambda self, g: lambda *a, **k: calls.append(g)})()
    elif case == "disabled":
        monkeypatch.setattr(FL, "_ENABLED", False)
    elif case == "unknown type":
        args = args[:5] + (object(),) + args[6:]
    try:
        for _ in range(3):
            FL.launch(kernel, grid, *args, **kwargs)
    finally:
        FL._knobs.runtime.launch_enter_hook.remove(print)
    if case == "interpreted":
        assert len(calls) == 3
    elif case == "unknown type":
        assert not rec.c_launch  # the specializer rejects it on every call; Triton's path raises or handles it
        assert len(rec.run) == 3
    else:
        assert len(rec.run) == 3 and not rec.c_launch


def test_the_cache_is_bounded(monkeypatch, faked):
    kernel, grid, args, kwargs, rec, _ = faked
    monkeypatch.setattr(FL, "_MAX_KEYS", 4)
    FL.launch(kernel, grid, *args, **kwargs)
    for n in range(10):  # num_warps values: each a new key
        FL.launch(kernel, grid, *args, **dict(kwargs, num_warps=n))
    assert len(FL._STATES[id(kernel)][1].compiled) <= 4


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run_check(*args):
    return subprocess.run([sys.executable, str(BENCHMARKS / "fastlaunch_check.py"), *args], capture_output=True,
                          text=True, timeout=600)


def test_gpu_check_script_runs_on_the_cpu():
    """benchmarks/fastlaunch_check.py (gpu_check.sh's first check): every op runs and compares, under the
    interpreter (nothing is cached there: the comparison is of Triton's path with itself)."""
    proc = _run_check("--cpu-smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" ok (identical True, finite True") == 14


@pytest.mark.gpu
def test_cached_launches_equal_tritons_path_on_the_gpu():
    proc = _run_check()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cached kernels 0)" not in proc.stdout


def test_host_launch_script_runs():
    """benchmarks/host_launch.py (quoted by RESULTS.md): both paths replay every recorded launch."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "host_launch.py"), "--reps", "1", "--calls", "20"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("\n") == 8 and "_ppo_loss_finalize_grads_kernel" in proc.stdout
