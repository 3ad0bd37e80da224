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


# ----------------------------------------------------------------------------- parallel autotune compiles

_PRECOMPILED: set = set()


def autotune_key(tuned, args: tuple, kwargs: dict) -> tuple:
    """The key under which ``tuned`` (a ``triton.autotune`` object) caches its choice for a launch with these
    arguments: its ``key`` arguments' values, then the dtype of every tensor argument (``Autotuner.run``'s rule)."""
    named = {**dict(zip(tuned.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in tuned.arg_names}
    key = [named[k] for k in tuned.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


def compile_threads() -> int:
    """Threads for parallel Triton compiles: ``RLHF_ENGINE_COMPILE_THREADS``, else the CPU count, at most 16
    (0 or 1: off)."""
    env = os.environ.get("RLHF_ENGINE_COMPILE_THREADS")
    if env is not None:
        return int(env) if env.isdigit() else 0
    return min(16, os.cpu_count() or 1)


def precompile_autotune(*launches: tuple, force: bool = False) -> int:
    """Compile, in parallel threads, every configuration the autotuners will time for these launches, once per
    autotune key, before they time them one by one. ``launches``: ``(tuned, args, kwargs)`` triples, ``tuned`` a
    ``triton.autotune`` object and ``args``/``kwargs`` what its launch will get (e.g. the dK/dV and dQ kernels
    of one backward, compiled together). Returns the number of compiles submitted.

    A cold autotune compiles its configurations one after another (1-3 s of ptxas each for the attention
    kernels, five to six a kernel and head dim); ``triton.AsyncCompileMode`` runs them in a thread pool instead
    (ptxas and most of LLVM release the GIL), and the autotuner's own launches then find them in the kernel
    cache. Each configuration is warmed up with the launch's own arguments (same specialization, same cache
    key), after its ``pre_hook`` (e.g. the TMA box shapes). Failures are ignored here: the autotuner meets them
    again and handles them as it always does. A no-op without CUDA (the interpreter compiles nothing), with
    fewer than 2 threads, or once a key is tuned; ``force`` skips the CUDA check (tests)."""
    n_threads = compile_threads()
    if n_threads < 2:
        return 0
    try:
        return _precompile(launches, force, n_threads)
    except Exception as e:  # noqa: BLE001 - best effort: the launch itself compiles whatever is missing
        warnings.warn(f"parallel Triton precompile failed ({type(e).__name__}: {e}); compiling on demand")
        return 0


def _precompile(launches, force: bool, n_threads: int) -> int:
    import triton
    from triton.runtime._async_compile import active_mode

    if active_mode.get() is not None:  # the caller runs its own AsyncCompileMode: our warm-ups would nest
        return 0
    jobs = []  # (tuned, args, kwargs, named args, config)
    for tuned, args, kwargs in launches:
        if len(tuned.configs) < 2 or not (force or any(getattr(a, "is_cuda", False) for a in args)):
            continue
        key = autotune_key(tuned, args, kwargs)
        if key in tuned.cache or (id(tuned), key) in _PRECOMPILED:
            continue
        _PRECOMPILED.add((id(tuned), key))
        nargs = dict(zip(tuned.arg_names, args))
        tuned.nargs = nargs  # what prune_configs reads, as in Autotuner.run
        try:
            configs = tuned.prune_configs(kwargs)
        finally:
            tuned.nargs = None
        jobs += [(tuned, args, kwargs, nargs, c) for c in configs]
    if not jobs:
        return 0
    t0 = time.perf_counter()
    submitted = 0
    with ThreadPoolExecutor(max_workers=min(n_threads, len(jobs))) as pool, \
            triton.AsyncCompileMode(pool, ignore_errors=True):
        for tuned, args, kwargs, nargs, config in jobs:
            meta = config.all_kwargs()
            if config.pre_hook is not None:  # before the warm-up: it may change what the launch specializes on
                config.pre_hook({**nargs, **kwargs, **meta})
            try:
                tuned.fn.warmup(*args, grid=(1,), **kwargs, **meta)
                submitted += 1
            except Exception:  # noqa: BLE001 - e.g. an invalid config: the autotuner reports it when it gets there
                pass
    if os.environ.get("RLHF_ENGINE_COMPILE_LOG") == "1":  # gpu_check.sh's benchmarks: what the threads saved
        names = sorted({getattr(t.base_fn, "__name__", "?") for t, *_ in jobs})
        print(f"precompile: {submitted} configurations of {', '.join(names)} in {time.perf_counter() - t0:.1f} s "
              f"({min(n_threads, len(jobs))} threads)", flush=True)
    return submitted
