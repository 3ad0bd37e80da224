"""Registers, pointers and the running program's state of ``gluon_emu`` (see its package docstring)."""
from __future__ import annotations

import threading

import torch
from triton.experimental.gluon import language as _gl


class GluonHazard(RuntimeError):
    """A race the hardware would not report: a slot overwritten under a product, a copy in flight at exit, ..."""


class GluonDeadlock(RuntimeError):
    """Every partition waits on a barrier that nothing can complete: the kernel would hang on a GPU."""


class _Aborted(Exception):
    """Another partition failed: this one stops."""


_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64,
          "int1": torch.bool, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
          "uint32": torch.uint32}
_FROM_TORCH = {v: k for k, v in _TORCH.items()}
_GL_NAME = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64", "int1": "int1",
            "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64", "uint32": "uint32"}
_FLOAT_RANK = {"bf16": 1, "fp16": 1, "fp32": 2, "fp64": 3}
_INT_RANK = {"int1": 0, "int8": 1, "int16": 2, "int32": 3, "uint32": 3.5, "int64": 4}  # uint32 wins over int32
_U32 = 0xFFFFFFFF


def _is_float(dt):
    return dt in _FLOAT_RANK


def _dt_name(dtype) -> str:
    """A Gluon or torch dtype as its short name ('bf16', 'int32', ...)."""
    if isinstance(dtype, torch.dtype):
        return _FROM_TORCH[dtype]
    name = getattr(dtype, "name", None) or str(dtype)
    if name not in _TORCH:
        raise TypeError(f"gluon_emu: dtype {dtype!r} is not emulated")
    return name


# ----------------------------------------------------------------------------------------------------- registers
class _Type:
    def __init__(self, shape, layout):
        self.shape, self.layout = shape, layout


class ET:
    """An emulated register tensor (or scalar): ``v`` holds the values (ints as int64, floats in their own dtype),
    ``dt`` Triton's type name; ``weak`` marks a Python literal, which takes the other operand's type."""
    __slots__ = ("dt", "layout", "pending", "v", "weak")

    def __init__(self, v, dt, weak=False, pending=False, layout=None):
        self.v, self.dt, self.weak, self.pending, self.layout = v, dt, weak, pending, layout

    # -- helpers
    def _ready(self):
        if self.pending:
            raise GluonHazard("a wgmma result is used before warpgroup_mma_wait retired it")
        return self

    @property
    def shape(self):
        return list(self.v.shape)

    @property
    def type(self):
        return _Type(self.shape, self.layout)

    @property
    def dtype(self):
        return getattr(_gl, _GL_NAME[self.dt])

    def to(self, dtype, bitcast=False):
        name = _dt_name(dtype)
        self._ready()
        if bitcast:  # only between the 32-bit integers (Philox's uniforms)
            if {name, self.dt} != {"int32", "uint32"}:
                raise NotImplementedError(f"gluon_emu: bitcast {self.dt} -> {name}")
            v = self.v & _U32
            return ET(torch.where(v >= 2**31, v - 2**32, v) if name == "int32" else v, name, layout=self.layout)
        if _is_float(name):
            return ET(self.v.to(_TORCH[name]), name, layout=self.layout)
        if name == "int1":
            return ET(self.v != 0, name, layout=self.layout)
        v = self.v.to(torch.int64) if not _is_float(self.dt) else torch.trunc(self.v.double()).to(torch.int64)
        return _check_int(ET(v, name, layout=self.layout))

    def __getitem__(self, idx):
        return ET(self._ready().v[idx], self.dt, layout=self.layout)

    def __bool__(self):
        if self._ready().v.numel() != 1:
            raise TypeError("gluon_emu: the truth value of a block is ambiguous (a scalar is needed here)")
        return bool(self.v.item())

    def __index__(self):
        if _is_float(self._ready().dt) or self.v.numel() != 1:
            raise TypeError("gluon_emu: an integer scalar is needed here")
        return int(self.v.item())

    __int__ = __index__

    def __float__(self):
        return float(self._ready().v.item())

    def __repr__(self):
        return f"ET({self.dt}, {tuple(self.v.shape)}{', pending' if self.pending else ''})"

    __hash__ = None

    def __neg__(self):
        self._ready()
        return _check_int(ET(-self.v, self.dt, layout=self.layout))

    def __invert__(self):
        self._ready()
        return _check_int(ET(~self.v, self.dt, layout=self.layout))  # (uint32: the low 32 bits)


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "and", "or", "xor", "lshift", "rshift"):
    setattr(ET, f"__{_op}__", lambda self, o, _op=_op: _binary(self, o, _op))
    setattr(ET, f"__r{_op}__", lambda self, o, _op=_op: _binary(o, self, _op))
for _op in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(ET, f"__{_op}__", lambda self, o, _op=_op: _binary(self, o, _op))


def _check_int(x: ET) -> ET:
    """Triton's int32 arithmetic wraps on a GPU; here it raises, since every such wrap in these kernels is a bug.
    uint32 wraps modulo 2^32 (Philox's arithmetic), as on the GPU."""
    if x.dt == "uint32":
        return ET(x.v & _U32, x.dt, weak=x.weak, layout=x.layout)
    if x.dt == "int32" and x.v.numel() and (x.v.max().item() > 2**31 - 1 or x.v.min().item() < -2**31):
        raise OverflowError("gluon_emu: int32 overflow (cast to gl.int64 before this product)")
    return x


def _lift(x) -> ET:
    if isinstance(x, ET):
        return x._ready()
    if isinstance(x, bool):
        return ET(torch.tensor(x), "int1", weak=True)
    if isinstance(x, int):
        return ET(torch.tensor(x, dtype=torch.int64), "int32" if -2**31 <= x < 2**31 else "int64", weak=True)
    if isinstance(x, float):
        return ET(torch.tensor(x, dtype=torch.float32), "fp32", weak=True)
    if isinstance(x, _gl.constexpr):
        return _lift(x.value)
    raise TypeError(f"gluon_emu: cannot use {type(x).__name__} as a tensor")


def _result_type(a: ET, b: ET) -> str:
    if a.weak and not b.weak:
        a, b = b, a
    if b.weak and not a.weak:  # a literal takes the tensor's type, but an int tensor and a float literal is fp32
        if _is_float(b.dt) and not _is_float(a.dt):
            return "fp32"
        return a.dt
    if _is_float(a.dt) or _is_float(b.dt):
        if _is_float(a.dt) and _is_float(b.dt):
            if a.dt == b.dt:
                return a.dt
            return a.dt if _FLOAT_RANK[a.dt] > _FLOAT_RANK[b.dt] else (
                b.dt if _FLOAT_RANK[b.dt] > _FLOAT_RANK[a.dt] else "fp32")
        return a.dt if _is_float(a.dt) else b.dt
    return a.dt if _INT_RANK[a.dt] >= _INT_RANK[b.dt] else b.dt


def _binary(a, b, op) -> ET:
    a, b = _lift(a), _lift(b)
    dt = _result_type(a, b)
    weak = a.weak and b.weak
    layout = a.layout or b.layout
    if op in ("lt", "le", "gt", "ge", "eq", "ne"):
        cd = _TORCH[dt] if _is_float(dt) else torch.int64
        x, y = a.v.to(cd), b.v.to(cd)
        r = {"lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq, "ne": torch.ne}[op](x, y)
        return ET(r, "int1", weak=weak, layout=layout)
    if op == "truediv":
        if not _is_float(dt):
            dt = "fp32"
        return ET(a.v.to(_TORCH[dt]) / b.v.to(_TORCH[dt]), dt, weak=weak, layout=layout)
    if _is_float(dt):
        x, y = a.v.to(_TORCH[dt]), b.v.to(_TORCH[dt])
        fns = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "mod": torch.fmod,
               "floordiv": lambda p, q: torch.floor(p / q)}
        if op not in fns:
            raise TypeError(f"gluon_emu: {op} on floating point")
        return ET(fns[op](x, y), dt, weak=weak, layout=layout)
    if dt == "int1" and op in ("and", "or", "xor"):
        fn = {"and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor}[op]
        return ET(fn(a.v.bool(), b.v.bool()), "int1", weak=weak, layout=layout)
    x, y = a.v.to(torch.int64), b.v.to(torch.int64)
    if op in ("floordiv", "mod") and (y == 0).any():
        raise ZeroDivisionError("gluon_emu: integer division by zero")
    fns = {"add": torch.add, "sub": torch.sub, "mul": torch.mul,
           "floordiv": lambda p, q: torch.div(p, q, rounding_mode="trunc"),  # C's division, as Triton's
           "mod": torch.fmod, "and": torch.bitwise_and, "or": torch.bitwise_or, "xor": torch.bitwise_xor,
           "lshift": torch.bitwise_left_shift, "rshift": torch.bitwise_right_shift}
    return _check_int(ET(fns[op](x, y), dt if dt != "int1" else "int32", weak=weak, layout=layout))


def _umulhi(a, b) -> ET:
    """The high 32 bits of the 64-bit product of two 32-bit unsigned integers (exact in int64: b split in halves)."""
    a, b = _lift(a), _lift(b)
    dt = _result_type(a, b)
    if dt != "uint32":
        raise NotImplementedError(f"gluon_emu: umulhi on {dt}")
    x, y = a.v & _U32, b.v & _U32
    hi = (x * (y >> 16) + ((x * (y & 0xFFFF)) >> 16)) >> 16
    return ET(hi & _U32, dt, weak=a.weak and b.weak, layout=a.layout or b.layout)


# ------------------------------------------------------------------------------------------------------ pointers
class EPtr:
    """A pointer block: element offsets (an int64 ET) into a tensor's storage, from the tensor's first element."""

    def __init__(self, base: torch.Tensor, off: ET):
        self.base, self.off = base, off

    def __add__(self, o):
        return EPtr(self.base, _binary(self.off, o, "add").to(_gl.int64))

    __radd__ = __add__

    def __sub__(self, o):
        return EPtr(self.base, _binary(self.off, o, "sub").to(_gl.int64))

    def __getitem__(self, idx):
        return EPtr(self.base, self.off[idx])

    @property
    def dtype(self):
        return _gl.pointer_type(getattr(_gl, _GL_NAME[_FROM_TORCH[self.base.dtype]]))

    def _flat(self, mask):
        p = _CURRENT[0]
        if p is not None and p.pdl and not p.pdl_waited:
            raise GluonHazard("a global load, store or atomic before griddepcontrol.wait in a programmatic dependent "
                              "launch: the kernel before it may still be writing")
        t = self.base.detach()
        n = t.untyped_storage().nbytes() // t.element_size()
        flat = torch.as_strided(t, (n,), (1,), 0)
        lo = t.storage_offset()
        hi = lo + (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1 if t.numel() else 0)
        idx = lo + self.off.v
        if mask is not None:
            mask = torch.broadcast_to(_lift(mask).v.bool(), idx.shape)
            live = idx[mask]
        else:
            live = idx
        if live.numel() and (live.min().item() < lo or live.max().item() >= hi):
            raise IndexError(f"gluon_emu: access out of the bounds of a tensor of shape {tuple(t.shape)} "
                             f"(element offsets {live.min().item() - lo} to {live.max().item() - lo})")
        return flat, idx, mask


def _load(pointer, mask=None, other=None, **_ignored):
    if not isinstance(pointer, EPtr):
        raise TypeError("gluon_emu: gl.load needs a pointer")
    flat, idx, m = pointer._flat(mask)
    dt = _FROM_TORCH[pointer.base.dtype]
    if m is None:
        vals = flat[idx]
    else:
        vals = flat[torch.where(m, idx, torch.zeros_like(idx) + pointer.base.storage_offset())]
        fill = _lift(0 if other is None else other).v.to(vals.dtype)
        vals = torch.where(m, vals, fill)
    if not _is_float(dt):
        vals = vals.to(torch.int64) if dt != "int1" else vals
    return ET(vals, dt)


def _store(pointer, value, mask=None, **_ignored):
    if not isinstance(pointer, EPtr):
        raise TypeError("gluon_emu: gl.store needs a pointer")
    flat, idx, m = pointer._flat(mask)
    val = torch.broadcast_to(_lift(value).v, idx.shape).to(pointer.base.dtype)
    with _lock():
        if m is None:
            flat[idx.reshape(-1)] = val.reshape(-1)
        else:
            flat[idx[m]] = val[m]


def _atomic(update):
    """An atomic read-modify-write (programs run one at a time here, so any memory order holds): the old values."""
    def rmw(pointer, val, mask=None, sem=None, scope=None):
        if not isinstance(pointer, EPtr):
            raise TypeError("gluon_emu: an atomic needs a pointer")
        flat, idx, m = pointer._flat(mask)
        dt = _FROM_TORCH[pointer.base.dtype]
        safe = idx if m is None else torch.where(m, idx, torch.zeros_like(idx) + pointer.base.storage_offset())
        with _lock():
            old = flat[safe].clone()  # (masked-off lanes read the first element, and write nothing)
            new = torch.broadcast_to(update(old, _lift(val).v.to(old.dtype)), idx.shape)
            keep = idx if m is None else idx[m]
            flat[keep] = new if m is None else new[m]
        return ET(old if _is_float(dt) else old.to(torch.int64), dt)
    return rmw


_atomic_add = _atomic(torch.add)
_atomic_xchg = _atomic(lambda old, val: val.expand_as(old) if val.dim() == 0 else val)
_atomic_max = _atomic(torch.maximum)


# --------------------------------------------------------------------------------------------- program state
class _Program:
    """The state of one running program: barriers, the copy engine's queue, the partitions' threads."""

    def __init__(self, pid, grid, rng, eager):
        self.pid, self.grid, self.rng, self.eager = pid, grid, rng, eager
        self.cond = threading.Condition()
        self.queue = []  # TMA copies issued and not landed: (desc, coord, barrier, dest)
        self.live = 1
        self.waiting = {}  # thread id -> (barrier, parity, partition name)
        self.abort = None
        self.pdl = self.pdl_waited = False  # programmatic dependent launch: griddepcontrol seen, its wait passed
        self.woken = set()  # threads a completed phase woke, which the completing one lets run first
        self.blocks = {}  # thread id -> how many times it blocked in a wait
        self.done = set()
        self.local = threading.local()

    def outstanding(self):
        if not hasattr(self.local, "mma"):
            self.local.mma = []
        return self.local.mma

    def land(self, k):
        desc, coord, bar, dest = self.queue.pop(k)
        dest.data.copy_(desc.box(coord))
        bar.complete_tx(desc.nbytes, self)

    def tick(self):
        """The copy engine: copies land as late as they can, when a wait needs them (the order that exposes a
        slot read or released before its copies landed); ``emulate(..., eager=p)`` also lands a random one after an
        operation with probability p, for other interleavings."""
        if self.queue and self.eager and self.rng.random() < self.eager:
            self.land(self.rng.randrange(len(self.queue)))

    def feeding(self, bar):
        """The copies in flight that complete bytes of ``bar``."""
        return [i for i, c in enumerate(self.queue) if c[2] is bar]

    def check_abort(self):
        if self.abort is not None:
            raise _Aborted()


_CURRENT: list = [None]
_GLOBAL = threading.RLock()


def _prog() -> _Program:
    p = _CURRENT[0]
    if p is None:
        raise RuntimeError("gluon_emu: a Gluon builtin outside an emulated launch")
    return p


def _lock():
    return _prog().cond
