"""Launch a ``@triton.jit`` kernel without Triton's per-launch Python, once it has been launched the usual way.

``kernel[grid](*args, **kwargs)`` runs ``JITFunction.run`` on every call: the argument binder (a generated function
that specializes every argument in C++), a cache key built from ``str(options)``, the current device and stream,
a check of the kernel's globals, and, because Triton 3.6's launch hooks are empty ``HookChain`` objects rather
than None, a ``LazyDict`` of launch metadata plus two hook calls from the C launcher. The small RL ops (the PPO
loss, GAE) and the training layer ops are bound by this host time on the GPU machine.

``launch(kernel, grid, *args, **kwargs)`` does the same launch. The first call for a given specialization goes
through ``kernel[grid]`` (compiling if needed) and keeps the ``CompiledKernel`` it returns; later calls compute
the same specialization Triton's binder would (its own C++ ``native_specialize_impl`` on every runtime argument,
with the parameter's flags; the constexpr values; the launch options), look the kernel up by it and call its C
launcher directly, without launch metadata or hooks. Per launch on the CPU box: ~12 us of Triton Python before
the C launcher, against ~5 us (``benchmarks/host_launch.py``).

It steps aside, every call, for what it does not model: the interpreter (``TRITON_INTERPRET=1``), autotuned or
heuristic kernels (anything but a plain ``JITFunction``), callable grids, a kernel with ``pre_run_hooks``, launch
hooks (a profiler such as proton), and arguments Triton's specializer rejects. Not followed after the first launch:
changes to ``TRITON_DEBUG`` or the instrumentation mode. ``RLHF_ENGINE_FAST_LAUNCH=0`` turns it off. Written
against Triton 3.6's ``JITFunction``/``CompiledKernel``/``CudaLauncher``; on another version it steps aside.
"""
from __future__ import annotations

import os

import torch

_ENABLED = os.environ.get("RLHF_ENGINE_FAST_LAUNCH", "1") != "0"
_SLOW = object()  # state of a kernel this module does not launch itself
_STATES: dict = {}  # id(kernel) -> (kernel, _KernelState or _SLOW): the kernel kept, so that its id is not reused

try:
    import triton
    from triton import knobs as _knobs
    from triton.knobs import HookChain as _HookChain
    from triton.runtime.jit import JITFunction as _JITFunction
    from triton.runtime.jit import native_specialize_impl as _specialize

    _SUPPORTED = triton.__version__.startswith("3.6")
except ImportError:  # pragma: no cover - another Triton: every launch takes Triton's own path
    _SUPPORTED = False

_MAX_KEYS = 1024  # compiled-kernel entries a kernel keeps before its cache is cleared
_get_device = getattr(torch._C, "_cuda_getDevice", None)
_get_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


class _KernelState:
    """Per-kernel plans (how a call's args/kwargs map onto the parameters) and compiled kernels by key."""

    __slots__ = ("kernel", "plans", "compiled", "backend")

    def __init__(self, kernel):
        self.kernel = kernel
        self.plans: dict = {}
        self.compiled: dict = {}
        self.backend = None  # Triton's backend object, known after the kernel's first launch

    def plan(self, nargs: int, kwnames: tuple):
        """A function (args, kwargs, backend) -> (all parameter values in order, key) for calls of this shape,
        generated from the parameter list like Triton's binder; None when the call does not bind (Triton then
        raises its own error). The key holds each runtime argument's specialization as Triton's binder computes
        it (the same C++ function, with the parameter's flags), the constexpr values and the launch options."""
        params = self.kernel.params
        if nargs > len(params):
            return None
        names = {p.name for p in params}
        order, keys, defaults = [], [], {}
        for i, p in enumerate(params):
            if i < nargs:
                src = f"a[{i}]"
            elif p.name in kwnames:
                src = f"k[{p.name!r}]"
            elif p.default is not p._param.empty:
                src = f"d{i}"
                defaults[src] = p.default
            else:
                return None
            order.append(src)
            if p.is_constexpr:
                keys.append(src)
            else:  # a float is always ("fp32", None) to the specializer: skip its call (~0.1 us)
                flags = f"{p.is_const}, {not p.do_not_specialize}, {not p.do_not_specialize_on_alignment}"
                keys.append(f"(F32 if {src}.__class__ is float else spec(b, {src}, {flags}))")
        keys += [f"k[{n!r}]" for n in kwnames if n not in names]  # launch options: num_warps, num_stages, ...
        body = (f"def plan(a, k, b):\n"
                f"    return ({''.join(s + ', ' for s in order)}), ({''.join(s + ', ' for s in keys)})\n")
        ns = {"spec": _specialize, "F32": ("fp32", None), **defaults}
        exec(body, ns)  # noqa: S102 - generated from the kernel's own parameter names
        return ns["plan"]


def _state(kernel):
    ok = (_ENABLED and _SUPPORTED and type(kernel) is _JITFunction and not kernel.pre_run_hooks
          and _get_device is not None and _get_stream is not None and torch.cuda.is_available())
    state = _KernelState(kernel) if ok else _SLOW
    _STATES[id(kernel)] = (kernel, state)
    return state


def _entry(compiled):
    """(launcher, its fixed arguments) for ``compiled``, read once: the C launcher itself when the kernel needs no
    scratch memory (``CudaLauncher.__call__`` only allocates that), else ``CudaLauncher.__call__``; the fixed
    arguments are the function handle, the launch flags and metadata, and None for the launch metadata and hooks."""
    launcher = compiled.run  # initializes the handles (loads the module) if the first launch has not
    if (type(launcher).__name__ == "CudaLauncher" and launcher.global_scratch_size == 0
            and launcher.profile_scratch_size == 0):
        return launcher.launch, (compiled.function, launcher.launch_cooperative_grid, launcher.launch_pdl,
                                 None, None, compiled.packed_metadata, None, None, None)
    return launcher, (compiled.function, compiled.packed_metadata, None, None, None)


def launch(kernel, grid: tuple, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, with Triton's per-launch Python skipped once this specialization has
    been launched before (see the module docstring). ``grid`` is a tuple of 1-3 ints. Returns nothing."""
    known = _STATES.get(id(kernel))
    state = known[1] if known is not None else _state(kernel)
    if state is _SLOW or grid.__class__ is not tuple or torch.compiler.is_compiling():
        kernel[grid](*args, **kwargs)  # (dynamo traces a user-defined Triton launch itself)
        return
    enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
    if enter.__class__ is not _HookChain or enter.calls or leave.__class__ is not _HookChain or leave.calls:
        kernel[grid](*args, **kwargs)  # a profiler's launch hooks: Triton's path calls them
        return
    shape = (len(args), *kwargs)
    plan = state.plans.get(shape)
    if plan is None:
        plan = state.plans[shape] = state.plan(len(args), tuple(kwargs)) or _SLOW
    if plan is _SLOW:
        kernel[grid](*args, **kwargs)
        return
    device = _get_device()
    if state.backend is None:  # the first launch: Triton's path, which makes the backend
        kernel[grid](*args, **kwargs)
        state.backend = kernel.device_caches[device][3]
        return
    try:
        vals, key = plan(args, kwargs, state.backend)
        key = (device, shape, key)  # the call's shape names the launch options whose values the key holds
        entry = state.compiled.get(key)
    except Exception:  # noqa: BLE001 - an argument Triton's specializer rejects or an unhashable constexpr
        kernel[grid](*args, **kwargs)
        return
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        if hasattr(compiled, "packed_metadata"):
            if len(state.compiled) >= _MAX_KEYS:
                state.compiled.clear()
            state.compiled[key] = _entry(compiled)
        return
    c_launch, fixed = entry
    n = len(grid)
    c_launch(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, _get_stream(device), *fixed, *vals)


def enabled() -> bool:
    """Whether launches may take the cached path (``RLHF_ENGINE_FAST_LAUNCH``, ``set_enabled``)."""
    return _ENABLED


def set_enabled(on: bool) -> None:
    """Turn the cached path on or off for this process (``RLHF_ENGINE_FAST_LAUNCH`` sets it at import); forgets
    every cached kernel, so that the next launches re-decide. For A/B measurements and checks."""
    global _ENABLED
    _ENABLED = bool(on)
    _STATES.clear()


def cached_launches() -> int:
    """How many kernel specializations the cached path holds, over all kernels (0: every launch took Triton's
    path)."""
    return sum(len(s.compiled) for _, s in _STATES.values() if s is not _SLOW)
