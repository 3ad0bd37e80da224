"""Shared memory, mbarriers, TMA copies, wgmma and warp specialization of ``gluon_emu`` (see its package
docstring)."""
from __future__ import annotations

import itertools
import math
import threading
import time
import types

import torch
from triton.experimental.gluon import language as _gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier as _mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .values import (
    _FROM_TORCH,
    _GL_NAME,
    _TORCH,
    ET,
    GluonDeadlock,
    GluonHazard,
    _Aborted,
    _dt_name,
    _is_float,
    _lift,
    _lock,
    _prog,
    _Program,
    _Type,
)


# ------------------------------------------------------------------------------------------------ shared memory
class _Alloc:
    def __init__(self, data):
        self.data = data
        self.versions = {}

    def bump(self, key):
        self.versions[key] = self.versions.get(key, 0) + 1
        self.versions[None] = self.versions.get(None, 0) + 1


class EShared:
    """A shared-memory descriptor: a view of an allocation (``index`` takes a slot; ``permute`` transposes)."""

    def __init__(self, alloc: _Alloc, data, gdt, layout, key=None, perm=None):
        self.alloc, self.data, self._dt, self.layout, self.key, self.perm = alloc, data, gdt, layout, key, perm

    @property
    def dtype(self):
        return getattr(_gl, _GL_NAME[self._dt])

    @property
    def shape(self):
        return list(self.value().shape)

    @property
    def type(self):
        return _Type(self.shape, self.layout)

    def index(self, i):
        i = int(i)
        if self.key is not None:
            raise NotImplementedError("gluon_emu: index of an indexed view")
        if not 0 <= i < self.data.shape[0]:
            raise IndexError(f"gluon_emu: shared memory slot {i} of {self.data.shape[0]}")
        return EShared(self.alloc, self.data[i], self._dt, self.layout, key=i)

    def permute(self, order):
        return EShared(self.alloc, self.data, self._dt, self.layout, self.key, tuple(int(o) for o in order))

    def reshape(self, shape):
        """The same bytes in another row-major shape (a view: no transposed or sliced source)."""
        if self.perm is not None or not self.data.is_contiguous():
            raise NotImplementedError("gluon_emu: reshape of a permuted or sliced shared-memory view")
        return EShared(self.alloc, self.data.view([int(s) for s in shape]), self._dt, self.layout, self.key)

    def slice(self, start, length, dim=0):
        """A sub-view of ``length`` elements from ``start`` along ``dim`` of this view's shape (the same slot)."""
        start, length, dim = int(start), int(length), int(dim)
        if not (0 <= start and start + length <= self.shape[dim]):
            raise IndexError(f"gluon_emu: shared memory slice [{start}, {start + length}) of {self.shape[dim]}")
        d = dim if self.perm is None else self.perm[dim]
        return EShared(self.alloc, self.data.narrow(d, start, length), self._dt, self.layout, self.key, self.perm)

    def value(self):
        return self.data if self.perm is None else self.data.permute(self.perm)

    def version(self):
        return self.alloc.versions.get(self.key, 0) if self.key is not None else self.alloc.versions.get(None, 0)

    def load(self, layout=None):
        with _lock():
            v = self.value().clone()
        return ET(v if _is_float(self._dt) else v.to(torch.int64), self._dt, layout=layout)

    def store(self, value):
        p = _prog()
        with p.cond:
            self.value().copy_(_lift(value).v.to(self.data.dtype))
            self.alloc.bump(self.key)
            _sync_state(p)[(threading.get_ident(), id(self.alloc), self.key)] = "stored"  # needs a fence, a barrier


class EBarrier:
    """An mbarrier: ``count`` arrivals and the expected bytes complete a phase; ``phases`` counts completions."""
    _ids = itertools.count()

    def __init__(self):
        self.count = None
        self.pending = self.tx = self.phases = 0
        self.name = f"barrier#{next(EBarrier._ids)}"

    def _complete(self, prog):
        if self.pending == 0 and self.tx == 0:
            self.phases += 1
            self.pending = self.count
            prog.woken |= {t for t, (w, _, _) in prog.waiting.items() if w is self}
            prog.cond.notify_all()

    def complete_tx(self, nbytes, prog):
        self.tx -= nbytes
        self._complete(prog)


class EBarriers:
    def __init__(self, bars):
        self.bars = bars

    def index(self, i):
        return EBarriers([self.bars[int(i)]])

    def one(self) -> EBarrier:
        if len(self.bars) != 1:
            raise TypeError("gluon_emu: an mbarrier op on an array of barriers (index it first)")
        return self.bars[0]


def _allocate_shared_memory(element_ty, shape, layout, value=None):
    shape = [int(s) for s in shape]
    if isinstance(layout, _mbarrier.MBarrierLayout):
        n = math.prod(shape[:-1]) if len(shape) > 1 else shape[0]
        return EBarriers([EBarrier() for _ in range(n)])
    name = _dt_name(element_ty)
    data = torch.full(shape, float("nan")) if _is_float(name) else torch.zeros(shape)
    data = data.to(_TORCH[name])
    sh = EShared(_Alloc(data), data, name, layout)
    if value is not None:
        sh.store(value)
    return sh


# ------------------------------------------------------------------------------------------------------ mbarrier
class _MBarrier:
    MBarrierLayout = _mbarrier.MBarrierLayout

    @staticmethod
    def init(bar, count):
        b = bar.one()
        b.count = b.pending = int(count)

    @staticmethod
    def invalidate(bar):
        p = _prog()
        with p.cond:
            b = bar.one()
            if any(c[2] is b for c in p.queue):
                raise GluonHazard(f"{b.name} invalidated with a TMA copy still completing on it")
            b.count = None  # a later use raises (used before mbarrier.init)

    @staticmethod
    def expect(bar, bytes, pred=True):
        if not pred:
            return
        p = _prog()
        with p.cond:
            b = _inited(bar)
            b.tx += int(bytes)
            b.pending -= 1
            _over(b)
            b._complete(p)
            p.tick()

    @staticmethod
    def arrive(bar, *, count=1, pred=True):
        if not pred:
            return
        p = _prog()
        with p.cond:
            b = _inited(bar)
            b.pending -= int(count)
            _over(b)
            b._complete(p)
            p.tick()
            _handoff(p)

    @staticmethod
    def wait(bar, phase, pred=True, deps=()):
        if not pred:
            return
        p = _prog()
        me = threading.get_ident()
        parity = int(phase) & 1
        with p.cond:
            b = _inited(bar)
            p.tick()
            while (b.phases & 1) == parity:
                p.check_abort()
                mine = p.feeding(b)
                if mine:  # the copies this wait needs land (in any order); the others stay in flight
                    p.land(p.rng.choice(mine))
                    p.woken = set()  # (the other waiters on it run when the scheduler says)
                    continue
                if me not in p.waiting:
                    p.blocks[me] = p.blocks.get(me, 0) + 1
                    p.cond.notify_all()  # a partition handing off to this one may go on
                p.waiting[me] = (b, parity, getattr(p.local, "name", "?"))
                if len(p.waiting) == p.live and all((w.phases & 1) == q and not p.feeding(w)
                                                    for w, q, _ in p.waiting.values()):
                    who = "; ".join(f"{n} waits on {w.name} for parity {q} ({w.phases} phases completed, "
                                    f"{w.pending} arrivals and {w.tx} bytes missing)"
                                    for w, q, n in p.waiting.values())
                    p.abort = GluonDeadlock(f"program {p.pid}: every partition is blocked: {who}")
                    del p.waiting[me]
                    p.cond.notify_all()
                    raise p.abort
                p.cond.wait(0.5)
                del p.waiting[me]
            p.check_abort()


def _handoff(p: _Program):
    """After waking waiters, let them run first (inside ``with p.cond``) until each blocks again or ends: a partition
    that released a slot too early then sees the producer refill it before it goes on, the race to expose."""
    me = threading.get_ident()
    woken = {t: p.blocks.get(t, 0) for t in p.woken if t != me}
    p.woken = set()
    deadline = time.monotonic() + 5.0
    while any(p.blocks.get(t, 0) == n and t not in p.done for t, n in woken.items()) and p.abort is None:
        if time.monotonic() > deadline:
            break
        p.cond.wait(0.01)


def _inited(bar) -> EBarrier:
    b = bar.one()
    if b.count is None:
        raise GluonHazard(f"{b.name} used before mbarrier.init")
    return b


def _over(b: EBarrier):
    if b.pending < 0:
        raise GluonHazard(f"{b.name}: more arrivals than its count in one phase")


# ------------------------------------------------------------------------------------------------------------ TMA
class EDesc:
    """A TMA descriptor: the 2-D (or N-D) view it describes and its box."""

    def __init__(self, td: TensorDescriptor, early: bool = False):
        self.td, self.early = td, early
        self.view = td.base.as_strided(list(td.shape), list(td.strides))  # raises if it overruns the storage
        self.block_shape = [int(s) for s in td.block_shape]
        self.layout = td.layout
        self._dt = _FROM_TORCH[td.base.dtype]
        self.nbytes = math.prod(self.block_shape) * td.base.element_size()

    @property
    def dtype(self):
        return getattr(_gl, _GL_NAME[self._dt])

    @property
    def block_type(self):
        return types.SimpleNamespace(nbytes=self.nbytes, shape=self.block_shape, element_ty=self.dtype)

    def box(self, coord):
        out = torch.zeros(self.block_shape, dtype=self.view.dtype)
        src, dst = [], []
        for c, n, size in zip(coord, self.block_shape, self.view.shape):
            lo, hi = max(c, 0), min(c + n, size)
            if hi <= lo:
                return out  # entirely out of bounds: zeros
            src.append(slice(lo, hi))
            dst.append(slice(lo - c, hi - c))
        out[tuple(dst)] = self.view[tuple(src)]
        return out


class _TMA:
    @staticmethod
    def async_copy_global_to_shared(tensor_desc, coord, barrier, result, pred=True):
        if not pred:
            return
        p = _prog()
        coord = [int(c) for c in coord]
        if list(result.value().shape) != tensor_desc.block_shape:
            raise TypeError(f"gluon_emu: TMA box {tensor_desc.block_shape} into a buffer of {result.shape}")
        if result.perm is not None:
            raise TypeError("gluon_emu: TMA into a permuted view")
        if p.pdl and not p.pdl_waited and not tensor_desc.early:
            raise GluonHazard("a TMA copy before griddepcontrol.wait from a tensor the kernel before may write (only "
                              "the launch's pdl_early descriptors may be read before the wait)")
        with p.cond:
            b = _inited(barrier)
            if any(c[3].alloc is result.alloc and c[3].key == result.key for c in p.queue):
                raise GluonHazard("a TMA copy into a slot that another copy still fills: the slot was released "
                                  "before its copies landed")
            result.data.fill_(float("nan") if _is_float(result._dt) else -1)  # in flight: undefined
            result.alloc.bump(result.key)
            p.queue.append((tensor_desc, coord, b, result))
            p.tick()

    @staticmethod
    def async_copy_shared_to_global(tensor_desc, coord, src):
        raise NotImplementedError("gluon_emu: TMA stores")


# ------------------------------------------------------------------------------------------------------- wgmma
def _operand(x, what):
    if isinstance(x, EShared):
        _check_synced(x)
        return x.value().float(), x._dt, (x, x.version())
    if isinstance(x, ET):
        x._ready()
        return x.v.float(), x.dt, None
    raise TypeError(f"gluon_emu: wgmma {what} must be shared memory or a register tensor")


def _warpgroup_mma(a, b, acc, *, use_acc=True, precision=None, max_num_imprecise_acc=None, is_async=False):
    p = _prog()
    if not isinstance(b, EShared):
        raise TypeError("gluon_emu: wgmma's B operand must be in shared memory")
    with p.cond:
        av, adt, aread = _operand(a, "A")
        bv, bdt, bread = _operand(b, "B")
    if adt != bdt or adt not in ("bf16", "fp16"):
        raise TypeError(f"gluon_emu: wgmma operands {adt} x {bdt} (16-bit floats of one type expected)")
    M, K = av.shape
    K2, N = bv.shape
    if K != K2 or M % 64 or N % 8 or N > 256 or K % 16 or list(acc.v.shape) != [M, N]:
        raise TypeError(f"gluon_emu: wgmma shapes A {list(av.shape)} B {list(bv.shape)} acc {acc.shape}")
    out = av @ bv
    if bool(use_acc):
        out = out + acc.v.float()  # a pending accumulator may chain: wgmma orders its own accumulations
    r = ET(out.to(_TORCH[acc.dt]), acc.dt, layout=acc.layout)
    if is_async:
        r.pending = True
        p.outstanding().append((r, [x for x in (aread, bread) if x is not None]))
    else:  # a synchronous product waits for every product before it too
        _warpgroup_mma_wait(0, deps=[r])
    return r


def _warpgroup_mma_wait(num_outstanding=0, deps=None):
    if deps is None:
        raise ValueError("warpgroup_mma_wait deps must be given")
    p = _prog()
    ops = p.outstanding()
    keep = int(num_outstanding)
    with p.cond:
        while len(ops) > keep:
            r, reads = ops.pop(0)
            for sh, ver in reads:
                if sh.version() != ver:
                    raise GluonHazard("a shared-memory operand of a wgmma was overwritten (a TMA copy issued into "
                                      "its slot) before the product was waited for: the slot was released early")
            r.pending = False
    return deps[0] if len(deps) == 1 else tuple(deps)


def _sync_state(p) -> dict:
    """Shared-memory stores not yet made visible to the async proxy (wgmma, TMA) and to the rest of the storing
    partition's warps, of every partition of the program: {(thread, allocation, slot): "stored" | "fenced"}. A
    partition publishes its own with fence_async_shared(), then gl.thread_barrier(); a wgmma of any partition reading
    an unpublished slot is a hazard (another partition's stores reach it through an mbarrier arrive after both)."""
    if not hasattr(p, "stores"):
        p.stores = {}
    return p.stores


def _fence_async_shared(cluster=False):
    p = _prog()
    me = threading.get_ident()
    with p.cond:
        st = _sync_state(p)
        for k in [k for k in st if k[0] == me]:
            st[k] = "fenced"


def _thread_barrier():
    p = _prog()
    me = threading.get_ident()
    with p.cond:
        st = _sync_state(p)
        for k in [k for k, v in st.items() if k[0] == me and v == "fenced"]:
            del st[k]  # fenced, then every warp past the barrier: wgmma may read it


def _check_synced(sh):
    """A wgmma reading shared memory stored to needs fence_async_shared() (the async proxy), then
    gl.thread_barrier() (every warp's stores done) in between, by the partition that stored it."""
    me = threading.get_ident()
    # a slot's own stores and the whole allocation's; reading the whole allocation, any slot's
    for (who, alloc, key), state in list(_sync_state(_prog()).items()):
        if alloc != id(sh.alloc) or not (sh.key is None or key in (sh.key, None)):
            continue
        by = "the threads" if who == me else "another partition"
        if state == "stored":
            raise GluonHazard(f"wgmma reads shared memory stored by {by} without fence_async_shared() since")
        if state == "fenced":
            raise GluonHazard(f"wgmma reads shared memory stored by {by} without gl.thread_barrier() after the "
                              "fence (other warps' stores may not be done)")


# ------------------------------------------------------------------------------------------- warp specialization
def _warp_specialize(functions_and_args, worker_num_warps, worker_num_regs):
    from . import _call  # the emulated form of each partition's function

    p = _prog()
    parts = list(functions_and_args)
    if len(parts) - 1 != len(worker_num_warps) or len(worker_num_warps) != len(worker_num_regs):
        raise TypeError("gluon_emu: warp_specialize needs one warp count and one register count per worker")
    errors = [None] * len(parts)

    def run(i, fn, args):
        p.local.name = f"partition {i} ({getattr(fn, '__name__', fn)})"
        try:
            fn(*args)
            if p.outstanding():
                raise GluonHazard(f"{p.local.name} ends with a wgmma never waited for")
        except BaseException as e:  # noqa: BLE001 - handed to the launching thread
            errors[i] = e
            with p.cond:
                if p.abort is None and not isinstance(e, _Aborted):
                    p.abort = e
                p.cond.notify_all()
        finally:
            with p.cond:
                p.live -= 1
                p.done.add(threading.get_ident())
                p.cond.notify_all()

    with p.cond:
        p.live = len(parts)
    threads = [threading.Thread(target=run, args=(i, _call(f), a), daemon=True)
               for i, (f, a) in enumerate(parts[1:], 1)]
    for t in threads:
        t.start()
    run(0, _call(parts[0][0]), parts[0][1])
    for t in threads:
        t.join(600)  # (a deadlock raises long before: this is for a partition stuck outside the barriers)
        if t.is_alive():
            raise GluonDeadlock(f"program {p.pid}: a partition did not finish in 600 s")
    p.live = 1
    p.local.name = "the kernel"
    for e in errors:
        if e is not None and not isinstance(e, _Aborted):
            raise e
