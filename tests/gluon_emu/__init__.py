"""A CPU emulator for the project's Gluon kernels (``kernels/*_ws.py``), which no Triton interpreter runs.

``emulate(kernel)[grid](*args, **meta)`` runs a ``@gluon.jit`` kernel's own Python code, program after program, with
the Gluon builtins it calls replaced by PyTorch ones on the CPU (as ``TRITON_INTERPRET=1`` does for ``tl``):
- registers are torch tensors (layouts are carried, never applied: a layout decides which thread holds an element,
  not its value); integers are computed in int64 and checked against int32's range where Triton's type is int32;
- pointers are (tensor, element offsets), and every load or store that its mask lets through is bounds-checked
  against the tensor's own extent;
- shared memory is a tensor per allocation; a TMA copy (``tma.async_copy_global_to_shared``) reads its box from the
  descriptor's 2-D view with zeros outside the bounds, as the copy engine does;
- ``gl.warp_specialize`` runs each partition in a thread of its own, and mbarriers keep the hardware's phase rule:
  a wait on parity P returns once the barrier's current phase parity differs from P; ``mbarrier.expect`` is an
  arrive that also expects bytes (PTX ``mbarrier.arrive.expect_tx``), a TMA copy completes its bytes;
- ``warpgroup_mma`` computes in fp32 from its 16-bit operands; with ``is_async`` its result stays unusable until a
  ``warpgroup_mma_wait`` retires it (all but the ``num_outstanding`` most recent ones).

What it is for is the bugs a GPU shows as a hang or as wrong numbers, found here instead:
- **Asynchrony is made adversarial.** A TMA copy does not land when issued: its destination is filled with NaN and
  the copy lands only when a wait on its barrier needs it (in a seeded random order among those), so a consumer
  that reads a slot without waiting for its ready barrier reads NaN, and a copy nobody waits for is still in flight
  when its slot is refilled (``GluonHazard``) or when the program ends (``GluonHazard``). A wgmma's shared-memory
  operands are versioned: a copy issued into a slot between a product's issue and its retirement (a slot released
  too early) raises ``GluonHazard``. After a partition completes a barrier phase that another one waits on, it
  hands the lock over for a moment, so that the woken partition acts first (a producer refilling a released slot).
- **Deadlocks raise** ``GluonDeadlock`` (every partition blocked on a barrier that cannot complete, no copy in
  flight) with each partition's barrier and parity, where a GPU would hang.
- **A kernel that exits with a TMA copy in flight or a wgmma never waited for** raises ``GluonHazard``.

What it does not model: timing, bank conflicts, register limits, the layouts' validity (the sm_90 compile in
``tests/test_triton_compile.py`` checks those), and the hardware's exact fp32 summation order in a product.
"""
from __future__ import annotations

import dis
import itertools
import random
import types

import torch
from triton.experimental.gluon import language as _gl
from triton.experimental.gluon._runtime import GluonJITFunction
from triton.experimental.gluon.language.nvidia import hopper as _hopper
from triton.experimental.gluon.language.nvidia.hopper import mbarrier as _mbarrier
from triton.experimental.gluon.language.nvidia.hopper import tma as _tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import ConstexprFunction

from . import values as _values
from .hopper import (
    _TMA,
    EDesc,
    _thread_barrier,
    _allocate_shared_memory,
    _fence_async_shared,
    _MBarrier,
    _warp_specialize,
    _warpgroup_mma,
    _warpgroup_mma_wait,
)
from .values import (
    _TORCH,
    ET,
    EPtr,
    GluonDeadlock,
    GluonHazard,
    _check_int,
    _dt_name,
    _is_float,
    _lift,
    _load,
    _prog,
    _Program,
    _result_type,
    _store,
)

__all__ = ["GluonDeadlock", "GluonHazard", "emulate"]

# ----------------------------------------------------------------------------------------------- gl namespace
def _static_range(*args):
    return range(*(int(a) for a in args))


def _reduce(fn):
    def red(x, axis=None, keep_dims=False, **_ignored):
        x = _lift(x)
        v = x.v if _is_float(x.dt) else x.v.to(torch.int64)
        if axis is None:
            r = fn(v.reshape(-1), 0)
        else:
            r = fn(v, int(axis))
            if keep_dims:
                r = r.unsqueeze(int(axis))
        return ET(r, x.dt if x.dt != "int1" else "int32")
    return red


def _elementwise(fn, floats_only=True):
    def f(x):
        x = _lift(x)
        if floats_only and not _is_float(x.dt):
            raise TypeError(f"gluon_emu: {fn.__name__} of {x.dt}")
        return ET(fn(x.v), x.dt, layout=x.layout)
    return f


def _extremum(ffn, ifn):
    def f(a, b, propagate_nan=None):
        a, b = _lift(a), _lift(b)
        dt = _result_type(a, b)
        cd = _TORCH[dt] if _is_float(dt) else torch.int64
        fn = ffn if _is_float(dt) else ifn
        return _check_int(ET(fn(a.v.to(cd), b.v.to(cd)), dt, weak=a.weak and b.weak, layout=a.layout or b.layout))
    return f


def _where(cond, x, y):
    c, x, y = _lift(cond), _lift(x), _lift(y)
    dt = _result_type(x, y)
    cd = _TORCH[dt] if _is_float(dt) else torch.int64
    return ET(torch.where(c.v.bool(), x.v.to(cd), y.v.to(cd)), dt, layout=c.layout or x.layout or y.layout)


def _full(shape, value, dtype, layout=None):
    name = _dt_name(dtype)
    cd = _TORCH[name] if _is_float(name) else (torch.bool if name == "int1" else torch.int64)
    return ET(torch.full([int(s) for s in shape], value, dtype=cd), name, layout=layout)


def _arange(start, end, layout=None):
    return ET(torch.arange(int(start), int(end), dtype=torch.int64), "int32", layout=layout)


def _program_id(axis):
    return ET(torch.tensor(_prog().pid[int(axis)], dtype=torch.int64), "int32")


def _num_programs(axis):
    return ET(torch.tensor(_prog().grid[int(axis)], dtype=torch.int64), "int32")


def _convert_layout(value, layout, assert_trivial=False):
    value = _lift(value)
    return ET(value.v, value.dt, layout=layout)


def _expand_dims(x, axis):
    x = _lift(x)
    return ET(x.v.unsqueeze(int(axis)), x.dt, layout=x.layout)


def _inline_asm_elementwise(asm, constraints, args, dtype, is_pure, pack):
    """Only PTX's griddepcontrol (programmatic dependent launch), which has no value: a launch with ``launch_pdl=True``
    is checked from its first instruction to its wait (``emulate(..., pdl_early=...)``), and must wait."""
    p = _prog()
    if "griddepcontrol.wait" in asm:
        p.pdl_waited = True
    elif "griddepcontrol.launch_dependents" not in asm:
        raise NotImplementedError(f"gluon_emu: inline asm {asm!r}")
    if not p.pdl:
        raise GluonHazard("griddepcontrol in a kernel not launched with launch_pdl=True")
    return ET(torch.zeros((), dtype=torch.int64), "int32")


_GL_OVERRIDES = {
    "program_id": _program_id, "num_programs": _num_programs, "arange": _arange, "full": _full,
    "zeros": lambda shape, dtype, layout=None: _full(shape, 0, dtype, layout),
    "to_tensor": _lift, "maximum": _extremum(torch.fmax, torch.maximum),
    "minimum": _extremum(torch.fmin, torch.minimum),
    "max": _reduce(lambda v, d: v.amax(d)), "min": _reduce(lambda v, d: v.amin(d)),
    "sum": _reduce(lambda v, d: v.sum(d, dtype=v.dtype if v.is_floating_point() else torch.int64)),
    "exp2": _elementwise(torch.exp2), "exp": _elementwise(torch.exp), "log2": _elementwise(torch.log2),
    "log": _elementwise(torch.log), "sqrt": _elementwise(torch.sqrt), "abs": _elementwise(torch.abs, False),
    "where": _where, "convert_layout": _convert_layout, "expand_dims": _expand_dims, "load": _load, "store": _store,
    "atomic_add": _values._atomic_add, "atomic_xchg": _values._atomic_xchg, "atomic_max": _values._atomic_max,
    "allocate_shared_memory": _allocate_shared_memory, "warp_specialize": _warp_specialize,
    "static_range": _static_range, "thread_barrier": _thread_barrier,
    "inline_asm_elementwise": _inline_asm_elementwise, "umulhi": _values._umulhi,
}


class _EmuGL(types.SimpleNamespace):
    """``gl`` inside an emulated kernel: the overridden builtins, and the real module's types, layouts and dtypes."""

    def __getattr__(self, name):
        obj = getattr(_gl, name)
        if callable(obj) and not isinstance(obj, type) and not isinstance(obj, _gl.dtype):
            raise NotImplementedError(f"gluon_emu: gl.{name} is not emulated")
        return obj


_EMU = {
    id(_gl): _EmuGL(**_GL_OVERRIDES),
    id(_mbarrier): _MBarrier,
    id(_tma): _TMA,
    id(_hopper.warpgroup_mma): _warpgroup_mma,
    id(_hopper.warpgroup_mma_wait): _warpgroup_mma_wait,
    id(_hopper.fence_async_shared): _fence_async_shared,
}
_FUNCS: dict = {}
_GLOBALS: dict = {}


def _call(fn):
    """The emulated form of a Gluon (or constexpr) function, or fn itself for anything else."""
    if isinstance(fn, (GluonJITFunction, ConstexprFunction)):
        if id(fn) not in _FUNCS:
            raw = fn.fn
            if isinstance(fn, GluonJITFunction):
                _check_globals(raw)
            _FUNCS[id(fn)] = types.FunctionType(raw.__code__, _globals_of(raw), raw.__name__, raw.__defaults__,
                                                raw.__closure__)
        return _FUNCS[id(fn)]
    return fn


def _global_loads(code) -> set:
    """The names a code object (and those nested in it) reads as globals."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname == "LOAD_GLOBAL"}
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_loads(c)
    return names


def _check_globals(raw):
    """Triton's rule: a jit function reads no module-level value but constexprs, functions, modules and types (a
    global ``BLOCK = 64`` fails to compile). Names the code loads that are such plain values in its module raise
    here as they would there."""
    for name in _global_loads(raw.__code__):
        val = raw.__globals__.get(name)
        if isinstance(val, (bool, int, float, str, torch.Tensor)):
            raise NameError(f"gluon_emu: {raw.__name__} reads the global {name} = {val!r}, which Triton refuses: make "
                            f"it a gl.constexpr(...) or an argument")


class _Lazy:
    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "fn")

    def __call__(self, *args, **kwargs):
        return _call(self.fn)(*args, **kwargs)


def _globals_of(raw) -> dict:
    src = raw.__globals__
    key = id(src)
    if key not in _GLOBALS:
        g = dict(src)
        for name, val in src.items():
            if id(val) in _EMU:
                g[name] = _EMU[id(val)]
            elif isinstance(val, (GluonJITFunction, ConstexprFunction)):
                g[name] = _Lazy(val)
        _GLOBALS[key] = g
    return _GLOBALS[key]


# ------------------------------------------------------------------------------------------------------ launches
def _arg(value, constexpr, name="", early=()):
    if constexpr:
        return value.value if isinstance(value, _gl.constexpr) else value
    if isinstance(value, TensorDescriptor):
        return EDesc(value, early=name in early)
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise TypeError("gluon_emu: tensors must be on the CPU")
        return EPtr(value, ET(torch.zeros((), dtype=torch.int64), "int64"))
    if value is None:
        return None
    if isinstance(value, (bool, int, float)):
        return ET(_lift(value).v, _lift(value).dt)
    raise TypeError(f"gluon_emu: kernel argument of type {type(value).__name__}")


class _Launcher:
    def __init__(self, kernel, seed, eager, pdl_early):
        self.kernel, self.seed, self.eager, self.launches, self.pdl_launches = kernel, seed, eager, 0, 0
        self.pdl_early = tuple(pdl_early)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            return self.run(grid, args, kwargs)
        return launch

    def run(self, grid, args, kwargs):
        kernel = self.kernel
        grid = tuple(grid(kwargs) if callable(grid) else grid)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        pdl = bool(kwargs.pop("launch_pdl", False))
        self.pdl_launches += pdl
        for opt in ("num_warps", "num_ctas", "num_stages", "maxnreg"):
            kwargs.pop(opt, None)
        params = kernel.params
        bound = dict(zip((p.name for p in params), args))
        bound.update(kwargs)
        values = []
        for p in params:
            if p.name in bound:
                values.append(_arg(bound[p.name], p.is_constexpr, p.name, self.pdl_early))
            elif p.has_default:
                values.append(p.default)
            else:
                raise TypeError(f"gluon_emu: {kernel.fn.__name__} is missing argument {p.name!r}")
        fn = _call(kernel)
        rng = random.Random(self.seed * 1_000_003 + self.launches)
        self.launches += 1
        with _values._GLOBAL:
            pids = list(itertools.product(*(range(g) for g in grid)))
            rng.shuffle(pids)  # programs in a seeded order: none may rely on another's running first
            for pid in pids:
                prog = _Program(pid, grid, rng, self.eager)
                prog.pdl = pdl  # a programmatic dependent launch: checked from its first instruction
                _values._CURRENT[0] = prog
                try:
                    prog.local.name = "the kernel"
                    fn(*values)
                    if prog.queue:
                        raise GluonHazard(f"program {pid} exits with {len(prog.queue)} TMA copies in flight")
                    if prog.outstanding():
                        raise GluonHazard(f"program {pid} exits with a wgmma never waited for")
                    if prog.pdl and not prog.pdl_waited:
                        raise GluonHazard(f"program {pid} of a programmatic dependent launch never ran "
                                          "griddepcontrol.wait")
                finally:
                    _values._CURRENT[0] = None


def emulate(kernel, seed: int = 0, eager: float = 0.0, pdl_early=()) -> _Launcher:
    """A launcher that runs a ``@gluon.jit`` kernel on the CPU: ``emulate(kernel)[grid](*args, **meta)``. ``seed``
    picks the order in which programs run and copies land; ``eager`` the chance that a copy lands early, after any
    operation. ``pdl_early``: the descriptor arguments a programmatic dependent launch may read before its
    ``griddepcontrol.wait`` (what the kernel before it cannot write: weights); in a program that waits, any other
    TMA copy, load, store or atomic before the wait raises ``GluonHazard``."""
    if not isinstance(kernel, GluonJITFunction):
        raise TypeError("gluon_emu.emulate takes a @gluon.jit kernel")
    return _Launcher(kernel, seed, eager, pdl_early)
