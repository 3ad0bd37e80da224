"""Launch geometry shared by the kernels' host code.

``cdiv`` and ``next_pow2`` are plain Python: ``triton.cdiv`` and ``triton.next_power_of_2`` are
``ConstexprFunction`` objects whose call costs ~3 us on the host, several times per launch, and the
small RL ops (GAE, PPO loss) are bound by exactly that host time.
"""
from __future__ import annotations

import functools
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, (int(x) - 1).bit_length())


@functools.lru_cache(maxsize=256)
def row_launch_config(B: int, T: int, block_t: Optional[int], max_block_t: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_T, num_warps) for kernels that walk (B, T) rows in chunks of BLOCK_T tokens:
    chunks of up to ``max_block_t`` tokens, short rows packed several per program (up to 2048
    tokens a program), and more warps for bigger tiles."""
    if block_t is None:
        block_t = min(max_block_t, next_pow2(max(T, 16)))
    if block_t < 2 or block_t & (block_t - 1):
        raise ValueError(f"block_t: expected a power of two >= 2, got {block_t}")
    rows = max(1, min(next_pow2(max(B, 1)), 2048 // block_t))
    size = rows * block_t
    num_warps = 8 if size >= 2048 else 4 if size >= 512 else 2
    return rows, block_t, num_warps


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device, default: int = 4) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM); ``default`` elsewhere (the interpreter)."""
    if device.type != "cuda":
        return default
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=8)
def _pdl_capable(index: int) -> bool:
    """Hopper or later, and a CUDA runtime of 12.3 or later (stream capture records PDL launches as programmatic
    edges of the graph from 12.3 on)."""
    version = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    return torch.cuda.get_device_capability(index)[0] >= 9 and version >= (12, 3)


def pdl_enabled() -> bool:
    """``RLHF_ENGINE_PDL`` is not "0" (the default: on). See ``use_pdl``."""
    return os.environ.get("RLHF_ENGINE_PDL", "1") != "0"


def use_pdl(device: torch.device) -> bool:
    """Whether launches on ``device`` use programmatic dependent launch (PDL): a CUDA device of compute capability
    >= 9.0 (Hopper), unless ``RLHF_ENGINE_PDL=0``. Such a kernel starts while the previous kernel on the stream
    finishes (its launch, and what it reads before waiting) and waits for it (``griddepcontrol.wait``) before
    reading anything that kernel may write; kernels that trigger early (``griddepcontrol.launch_dependents``) let
    the next start sooner. What such a kernel reads before its wait must not be written by the early-triggering
    kernels just before it (the decode GEMMs read their weights then: parameters, written by ordinary launches,
    which trigger only by completing)."""
    if device.type != "cuda" or not pdl_enabled():
        return False
    return _pdl_capable(device.index if device.index is not None else torch.cuda.current_device())


_COUNTERS: dict = {}  # (device, owner) -> int32 counters of the kernels whose last program per tile finishes the work
_RETIRED: list = []  # outgrown counter buffers: a captured CUDA graph may still use them


def tile_counters(device: torch.device, n: int, owner: str) -> torch.Tensor:
    """The int32 tile counters of one kind of kernel (``owner``: "decode_linear", "decode_attention") on ``device``,
    at least ``n``: its programs take a ticket per output tile, and the last program of a tile puts the counter back
    to zero, so they are zero whenever no such launch runs. One buffer per (device, owner), shared by its launches and
    every CUDA graph: two launches of one owner must not run concurrently on two streams. Made outside a CUDA graph
    capture only: a capture would record the zero fill without running it, and a graph replayed before that one
    would start from garbage (a warm-up call before capturing makes them). An outgrown buffer is kept alive, not
    freed: graphs captured with it still replay over it."""
    key = (str(device), owner)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED.append(buf)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("tile counters (split-K decode GEMM, split decode attention) are made on the first "
                               "call, which must not be inside a CUDA graph capture: run one call (a warm-up) first")
        buf = _COUNTERS[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


# ----------------------------------------------------------------------------- parallel autotune compiles

_FORCE_PARALLEL_COMPILE = False  # tests: hook on CPU tensors too (the launch itself is stubbed there)


def compile_threads() -> int:
    """Threads for parallel Triton compiles: ``RLHF_ENGINE_COMPILE_THREADS``, else the CPU count, at most 16
    (0 or 1: off)."""
    env = os.environ.get("RLHF_ENGINE_COMPILE_THREADS")
    if env is not None:
        return int(env) if env.isdigit() else 0
    return min(16, os.cpu_count() or 1)


def parallel_autotune(tuned):
    """Make the autotuner ``tuned`` (a ``triton.autotune`` object) compile the configurations it is about to
    time in parallel threads first; returns it.

    A cold autotune compiles its configurations one after another as it times them (1-3 s of ptxas each for the
    attention kernels, five or six a kernel and head dim). ``Autotuner.run`` calls ``prune_configs`` exactly when
    a key is not tuned yet, with ``nargs`` set to the launch's arguments: this hook on the instance then warms
    every kept configuration up with those arguments (same specialization, so the autotuner's own launches hit
    the kernel cache), after its ``pre_hook`` (e.g. the TMA box shapes), inside ``triton.AsyncCompileMode`` over a
    thread pool (ptxas and most of LLVM release the GIL). Launches of a tuned key never get here: no cost per
    call. Best effort: a failure warns and leaves the compiles to the autotuner, which meets (and handles) them
    again. A no-op without CUDA tensors (the interpreter compiles nothing) or with fewer than 2 threads."""
    original = tuned.prune_configs

    def prune_configs(kwargs):
        configs = original(kwargs)
        nargs = tuned.nargs
        if nargs is not None and len(configs) > 1:
            compile_configs(tuned, tuple(nargs.values()), kwargs, configs)
        return configs

    tuned.prune_configs = prune_configs
    return tuned


def compile_configs(tuned, args: tuple, kwargs: dict, configs) -> int:
    """Compile ``configs`` of ``tuned`` for a launch with ``args``/``kwargs`` in parallel (see
    ``parallel_autotune``); returns the number of compiles submitted."""
    n_threads = compile_threads()
    if n_threads < 2 or not (_FORCE_PARALLEL_COMPILE or any(getattr(a, "is_cuda", False) for a in args)):
        return 0
    try:
        return _compile_configs(tuned, args, kwargs, configs, n_threads)
    except Exception as e:  # noqa: BLE001 - best effort: the autotuner compiles whatever is missing
        warnings.warn(f"parallel Triton compile failed ({type(e).__name__}: {e}); compiling on demand")
        return 0


def _compile_configs(tuned, args, kwargs, configs, n_threads: int) -> int:
    import triton
    from triton.runtime._async_compile import active_mode

    if active_mode.get() is not None:  # the caller runs its own AsyncCompileMode: our warm-ups would nest
        return 0
    t0 = time.perf_counter()
    nargs = dict(zip(tuned.arg_names, args))
    # Autotuner.run's kwargs also carry the launch's grid and warmup flag (KernelInterface passes them on)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    submitted = 0
    with ThreadPoolExecutor(max_workers=min(n_threads, len(configs))) as pool, \
            triton.AsyncCompileMode(pool, ignore_errors=True):
        for config in configs:
            meta = config.all_kwargs()
            if config.pre_hook is not None:  # before the warm-up: it may change what the launch specializes on
                config.pre_hook({**nargs, **kwargs, **meta})
            try:
                tuned.fn.warmup(*args, grid=(1,), **kwargs, **meta)
                submitted += 1
            except Exception:  # noqa: BLE001 - e.g. an invalid config: the autotuner reports it when it gets there
                pass
    if os.environ.get("RLHF_ENGINE_COMPILE_LOG") == "1":  # gpu_check.sh's benchmarks: what the threads saved
        name = getattr(tuned.base_fn, "__name__", "?")
        print(f"precompile: {submitted} configurations of {name} in {time.perf_counter() - t0:.1f} s "
              f"({min(n_threads, len(configs))} threads)", flush=True)
    return submitted
