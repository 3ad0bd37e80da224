"""Shared helpers for the benchmarks: timing, peak memory, environment, CSV output.

Every benchmark measures its baseline again in the same run and reports the ratio;
results are appended to ``benchmarks/results.csv`` (or ``$OUT/results.csv``) with the
GPU name, commit and date so that a number can be traced to the run that made it.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

# Ceilings of the cards the floors are computed against: dense bf16 matmul (8192^3, random data) and device-to-device
# copy (bytes read + written). H100 80GB HBM3: ../shared/BASELINES.md. H200: /work/.library/device/KINDS.md (788
# TFLOP/s and 4.3 TB/s measured on such a machine, 2026-10-28 and 2026-11-04). Another card gets the H100's figures.
CARD_CEILINGS = {"H200": (788.0, 4.3), "H100": (764.0, 3.0)}


def card_ceilings(name: str | None = None) -> tuple[str, float, float]:
    """(card, bf16 TFLOP/s, copy TB/s) for ``name`` (default: the current CUDA device's name; the H100's figures
    off a GPU or for a card not in ``CARD_CEILINGS``)."""
    if name is None:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    for card, (tflops, tbps) in CARD_CEILINGS.items():
        if card in name:
            return card, tflops, tbps
    return "H100", *CARD_CEILINGS["H100"]


# The floors of this run: the card's own ceilings (an H200's memory floors are ~1.4x lower than an H100's).
CARD, BF16_TFLOPS, COPY_TBPS = card_ceilings()


def cpu_copy_tbps(mb: int = 256, reps: int = 5) -> float:
    """This machine's CPU memory copy rate in TB/s (bytes read + written, best of ``reps`` copies of ``mb`` MB, all
    threads): the ceiling a CPU floor is computed against, where the GPU's would mean nothing."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps + 1):  # the first copy touches dst's pages
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e12


def smoke() -> bool:
    """True under ``RLHF_BENCH_SMOKE=1`` (``run_all.py --smoke``): each script runs its whole code path on tiny
    shapes, on the CPU under ``TRITON_INTERPRET=1`` when there is no GPU, so that a script that would crash is
    found before GPU time is spent on it. Its numbers mean nothing: :func:`record` writes them only to an
    explicit ``$OUT`` (never to ``benchmarks/results.csv``)."""
    return os.environ.get("RLHF_BENCH_SMOKE", "") == "1"


def time_left() -> float:
    """Seconds until this script's deadline (``BENCH_DEADLINE``, epoch seconds, set by ``run_all.py`` from the
    script's timeout), or infinity when it runs on its own. Scripts with optional passes (extra variants,
    compiled baselines) start them only while enough is left, so a timeout never kills the main rows."""
    deadline = os.environ.get("BENCH_DEADLINE")
    return float("inf") if not deadline else float(deadline) - time.time()


def device() -> str:
    """'cuda' when a GPU is there, else 'cpu' (only meaningful in a smoke run)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def commit() -> str:
    """The git commit; on a machine with a copy of the tree but no .git, set RLHF_ENGINE_COMMIT."""
    if os.environ.get("RLHF_ENGINE_COMMIT"):
        return os.environ["RLHF_ENGINE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - no git on the machine: still record the run
        return "unknown"


def env_info() -> dict:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"device": dev, "torch": torch.__version__, "triton": triton_version, "commit": commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def bench(fn: Callable[[], object], warmup: int = 3, rep: int = 20, inner: int = 1, cuda: bool | None = None) -> float:
    """Median milliseconds of one ``fn()`` call over ``rep`` samples; CUDA events when ``cuda`` (default: a GPU is
    there), else the wall clock (CPU work: events would time the GPU stream, which it never touches).

    Each sample times ``inner`` calls back to back and divides by ``inner``: with ``inner=1`` a sample starts on
    an idle GPU and so includes the call's launch latency (what a single call costs its caller); with
    ``inner > 1`` the launches overlap the previous calls' kernels (the steady-state cost inside a loop, e.g.
    a decode kernel or a graph replay of a few µs, whose launch latency would otherwise be half the number)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(rep):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / inner)
    times.sort()
    return times[len(times) // 2]


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph after a warm call (which also autotunes) and a second one on a side stream;
    returns the graph's replay (how the generation engine runs a decode step: no launch cost per kernel)."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def peak_mem_mb(fn: Callable[[], object]) -> float:
    """Extra peak CUDA memory (MB) that one call of ``fn`` allocates above what is live before it."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def kernel_ms(fn: Callable[[], object], calls: int = 3) -> float:
    """Milliseconds of GPU kernel time per ``fn()`` call (the sum of its kernels' own device time, from
    ``torch.profiler``), to hold against the wall time of :func:`bench`: when the kernels take a fraction of
    it, the call is bound by its host side (Python, dispatch, launches), not by its kernels. Without CUDA the
    CPU ops' own time instead (only so that smoke runs take this path; it means nothing there)."""
    cuda = torch.cuda.is_available()
    fn()  # warm: nothing compiles or allocates for the first time inside the profile
    times = profiled_op_times(lambda: [fn() for _ in range(calls)], cuda)
    if cuda and not times:  # a profile that caught no kernel must not read as "all host time"
        return float("nan")
    return sum(us for _, us in times.values()) / calls / 1e3


def profiled_op_times(fn: Callable[[], object], cuda: bool) -> dict[str, tuple[int, float]]:
    """{name: (calls, µs)} of what ``fn()`` runs: with ``cuda``, the GPU kernels (and copies) and their own device
    time, counted once each (CPU and CUDA activity are both recorded, as torch.profiler expects, and only the
    device-side events are summed, not the CPU ops that launched them nor user annotations); else the CPU ops and
    their self CPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    out: dict[str, tuple[int, float]] = {}
    for e in prof.events():  # one event per launch (key_averages could merge a range's host and device copies)
        if getattr(e, "is_user_annotation", False):
            continue
        if cuda and e.device_type != DeviceType.CUDA:
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            c, t = out.get(e.name, (0, 0.0))
            out[e.name] = (c + 1, t + us)
    return out


def results_path() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "results.csv" if out else Path(__file__).resolve().parent / "results.csv"


def record(rows: list[dict]) -> None:
    """Append result rows (dicts with op, impl, shape, ms, ... ) to the CSV with the environment."""
    if not rows or (smoke() and not os.environ.get("OUT")):
        return
    info = env_info()
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["date", "commit", "device", "torch", "triton", "op", "shape", "impl", "ms", "metric", "value",
              "unit", "peak_mb", "vs_baseline"]
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**info, **r})


def autotune_report(tuned: dict) -> list[str]:
    """One line per tuning result of each Triton autotuner in ``tuned`` (name -> triton.autotune object):
    the winning config per key and, for the latest tuning run, every config's time. Printed by the kernel
    benchmarks (prefix "autotune ") so that a GPU run records which tiles won, for choosing the defaults
    used without autotuning (kernels/attention_*.py ``*_DEFAULT``)."""
    def cfg(c) -> str:
        kw = ",".join(f"{k}={v}" for k, v in c.kwargs.items())
        return f"{kw},w={c.num_warps},s={c.num_stages}"

    lines = []
    for name, t in tuned.items():
        for key, best in getattr(t, "cache", {}).items():
            lines.append(f"autotune {name} key={key}: best {cfg(best)}")
        timings = getattr(t, "configs_timings", None) or {}
        if timings:
            ms = lambda v: v[0] if isinstance(v, (list, tuple)) else v  # noqa: E731 - (median, ...) or a float
            lines.append(f"autotune {name} last run: " + "; ".join(
                f"{cfg(c)} {ms(v):.4g} ms" for c, v in sorted(timings.items(), key=lambda kv: ms(kv[1]))))
    return lines


def print_table(rows: list[dict]) -> None:
    """Print rows as a fixed-width table (op, shape, impl, ms, metric, value, unit, peak, ratio; and the GPU kernel
    time, ``kernel_ms``, when a row has it: printed only, not in the CSV)."""
    cols = ["op", "shape", "impl", "ms", "value", "unit", "peak_mb", "vs_baseline"]
    if any("kernel_ms" in r for r in rows):
        cols.insert(4, "kernel_ms")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    table = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)] if table else [len(c) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))
