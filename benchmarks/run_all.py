"""Run every ``benchmarks/bench_*.py`` in its own subprocess, then print one summary table with targets.

Each script runs in a fresh Python process (a crash, an OOM or a hang in one cannot take the others
down) with its own timeout, under an overall time budget. Inside that process the script's ``main()``
is called and its rows come back to the runner (as JSON); the rows also go to ``$OUT/results.csv``
(or ``benchmarks/results.csv``) through ``common.record``, which the scripts call themselves (the
runner records them when a script returns rows without recording them). A script that is missing,
crashes, times out or returns nothing is reported in the summary and the run goes on.

    python benchmarks/run_all.py                          # everything, default timeouts
    python benchmarks/run_all.py --budget 240             # stop starting scripts after 240 s in all
    python benchmarks/run_all.py --only logprob ppo_step  # substrings of script names
    python benchmarks/run_all.py --summary summary.md     # also write the summary as markdown
    python benchmarks/run_all.py --smoke --out /tmp/smoke  # every script on tiny shapes (the CPU: interpreter)

``--smoke`` (``RLHF_BENCH_SMOKE=1`` for the scripts, ``TRITON_INTERPRET=1`` without a GPU) runs each script's
whole code path, its correctness check against the baseline included, on tiny shapes, so that a script that
would crash is found on the CPU before GPU time is spent on it (``tests/test_benchmarks.py``). Its numbers
mean nothing and are recorded only to an explicit ``--out``.

Row conventions the summary relies on (see benchmarks/README.md): ``impl`` starting with "ours" is
our implementation, with "floor" the physical floor; other rows are baselines; ``vs_baseline`` is
baseline_ms / ms as the script computed it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Cheap scripts first, so that a tight budget still gets the most numbers; unknown scripts run
# before the two long end-to-end ones. The PPO step runs before generation: it times a generation
# phase against HF generate too. bench_layer_ops, which no issue target needs (and which compiles
# our attention again for its HF row), runs last.
ORDER = ["bench_gae", "bench_ppo_loss", "bench_native_cpu", "bench_logprob", "bench_fused_linear_logprob",
         "bench_decode_attention", "bench_decode_gemm", "bench_attention", "bench_ppo_step", "bench_generate",
         "bench_layer_ops"]
LONG = ("bench_ppo_step", "bench_generate", "bench_layer_ops")
TIMEOUT_S = {"bench_attention": 150, "bench_generate": 200, "bench_ppo_step": 200,  # generate: 148 s at a235d55
             "bench_decode_gemm": 120}  # autotunes 15 tiles for each of 16 (shape, form) keys
DEFAULT_TIMEOUT_S = 90
# Do not start a script with less than this left in the budget: a script killed before its first record() leaves
# nothing, and the seconds it burnt are better left to the cheaper scripts after it (a second run picks it up).
# bench_attention's target rows (ours and SDPA, both shapes, cold autotune) need ~90 s; the PPO step builds
# eight Qwen2-0.5B-shape models and runs the HF step (8 s there) before ours.
MIN_START_S = {"bench_attention": 90, "bench_ppo_step": 110, "bench_generate": 60, "bench_layer_ops": 45,
               "bench_decode_gemm": 60}
DEFAULT_MIN_START_S = 20

BASELINE_WORDS = ("eager", "python", "hf", "huggingface", "transformers", "sdpa", "liger", "pytorch", "torch",
                  "flash", "fa2", "cudnn", "efficient", "math", "flex", "reference", "baseline", "generate", "cublas",
                  "usual")


# ----------------------------------------------------------------------------- discovery and running

def discover(only: list[str] | None = None) -> list[Path]:
    """bench_*.py in run order (ORDER first, then unknown ones, then the long end-to-end ones)."""
    found = {p.stem: p for p in sorted(HERE.glob("bench_*.py"))}
    known = [n for n in ORDER if n in found and n not in LONG]
    unknown = [n for n in found if n not in ORDER]
    longs = [n for n in LONG if n in found]
    names = known + unknown + longs
    if only:
        names = [n for n in names if any(o in n for o in only)]
    return [found[n] for n in names]


def may_start(script: str, left_s: float) -> bool:
    """Whether ``script`` (a stem, e.g. "bench_attention") may start with ``left_s`` seconds of the budget left."""
    return left_s >= MIN_START_S.get(script, DEFAULT_MIN_START_S)


def _child(script: str, rows_json: str) -> int:
    """Child mode: import ``script``, call its ``main()``, write the rows to ``rows_json``."""
    sys.path.insert(0, str(HERE))
    from common import record, results_path

    path = Path(script)
    sys.argv = [str(path)]  # scripts that parse sys.argv in main() see no arguments
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses and pickling look the module up
    spec.loader.exec_module(module)
    csv_path = results_path()
    before = csv_path.stat().st_size if csv_path.exists() else 0
    rows = module.main() or []
    after = csv_path.stat().st_size if csv_path.exists() else 0
    if rows and after == before:  # the script did not record its rows itself
        record(rows)
    with open(rows_json, "w") as f:
        json.dump([{k: _plain(v) for k, v in r.items()} for r in rows], f, default=str)
    return 0


def _plain(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    try:
        return float(v)  # 0-dim tensors, numpy scalars
    except (TypeError, ValueError):
        return str(v)


def _csv_rows() -> list[dict]:
    """The rows of the results CSV (``common.results_path()``), as strings."""
    sys.path.insert(0, str(HERE))
    from common import results_path

    path = results_path()
    if not path.exists():
        return []
    import csv

    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run_script(path: Path, timeout_s: float, tmp: Path) -> dict:
    """Run one script in a subprocess (own process group, killed as a whole on timeout)."""
    rows_json = tmp / f"{path.stem}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), str(rows_json)]
    print(f"\n===== {path.name} (timeout {timeout_s:.0f} s) =====", flush=True)
    csv_before = len(_csv_rows())
    t0 = time.perf_counter()
    # the script's own deadline (common.time_left), a few seconds inside the timeout, for its optional passes
    env = dict(os.environ, BENCH_DEADLINE=str(time.time() + timeout_s - 5))
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    status = "ok"
    try:
        rc = proc.wait(timeout=timeout_s)
        if rc != 0:
            status = f"error (exit {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = f"TIMEOUT after {timeout_s:.0f} s"
    finally:  # the runner itself stopped (SIGTERM from an outer timeout, Ctrl-C): no orphan keeps the GPU
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.perf_counter() - t0
    rows = []
    if rows_json.exists():
        try:
            rows = json.loads(rows_json.read_text())
        except json.JSONDecodeError as e:
            status = f"error (unreadable rows: {e})"
    if status != "ok" and not rows:  # what the script recorded before it failed (e.g. its baseline)
        rows = _csv_rows()[csv_before:]
        if rows:
            status += f", {len(rows)} rows recorded before that"
    if status == "ok" and not rows:
        status = "no rows (no GPU, or skipped)"
    for r in rows:
        r.setdefault("script", path.stem)
    print(f"----- {path.name}: {status}, {len(rows)} rows, {seconds:.1f} s", flush=True)
    return {"script": path.stem, "status": status, "seconds": seconds, "rows": rows}


# ----------------------------------------------------------------------------- summary and targets

def _num(v) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return x


def kind(impl: str) -> str:
    """'ours', 'floor' or 'baseline' from an impl name (see the module docstring)."""
    s = str(impl).strip().lower()
    if s.startswith("ours"):
        return "ours"
    if s.startswith("floor"):
        return "floor"
    if any(w in s for w in BASELINE_WORDS):
        return "baseline"
    return "ours"


def _find(group: list[dict], *words: str, exclude: tuple[str, ...] = ()) -> dict | None:
    for r in group:
        s = str(r.get("impl", "")).lower()
        if kind(r.get("impl", "")) == "baseline" and any(w in s for w in words) and not any(x in s for x in exclude):
            return r
    return None


def _floor_ms(row: dict, group: list[dict]) -> float:
    if math.isfinite(_num(row.get("floor_ms"))):
        return _num(row["floor_ms"])
    for r in group:
        if kind(r.get("impl", "")) == "floor":
            return _num(r.get("ms"))
    return float("nan")


def _verdict(*checks) -> str:
    """'yes' if every check holds, 'NO' if one fails, '?' if one cannot be evaluated (None)."""
    if any(c is False for c in checks):
        return "NO"
    if any(c is None for c in checks):
        return "?"
    return "yes"


def _ge(a: float, b: float):
    return None if not (math.isfinite(a) and math.isfinite(b)) else a >= b


def _le(a: float, b: float):
    return None if not (math.isfinite(a) and math.isfinite(b)) else a <= b


def target(row: dict, group: list[dict]) -> tuple[str, str]:
    """(target text, verdict) for one of our rows, from the issues' targets (benchmarks/RESULTS.md)."""
    op = str(row.get("op", "")).lower()
    ms, ratio, peak = _num(row.get("ms")), _num(row.get("vs_baseline")), _num(row.get("peak_mb"))
    floor = _floor_ms(row, group)
    if op.startswith("ppo step:"):
        return "-", ""
    if op.startswith("ppo step"):
        base = next((r for r in group if kind(r.get("impl", "")) == "baseline"), None)
        return ">=5x HF+PyTorch step, peak <= baseline", _verdict(
            _ge(ratio, 5.0), _le(peak, _num(base.get("peak_mb")) if base else float("nan")))
    if "lm_head" in op or "linear" in op:
        eager = _find(group, "eager")
        ligers = [_num(r.get("ms")) for r in group
                  if kind(r.get("impl", "")) == "baseline" and "liger" in str(r.get("impl", "")).lower()]
        return "< eager (31 ms) and < fastest Liger, extra peak < 1 GB", _verdict(
            ms < _num(eager["ms"]) if eager else None, ms < min(ligers) if ligers else True, _le(peak, 1024.0))
    if "rmsnorm" in op or "swiglu" in op or "hf qwen2" in op:  # no issue target: training-forward layer ops
        eager = _find(group, "eager")
        return "faster than eager, peak <= eager", _verdict(
            _ge(ratio, 1.0), _le(peak, _num(eager.get("peak_mb"))) if eager else None)
    if "logprob" in op:
        return ">=8x eager, <=1.5x floor", _verdict(_ge(ratio, 8.0), _le(ms, 1.5 * floor))
    if "gae" in op:
        return ">=1000x Python loop", _verdict(_ge(ratio, 1000.0))
    if "ppo_loss" in op or "ppo loss" in op:
        return ">=20x eager", _verdict(_ge(ratio, 20.0))
    if "gemm" in op:  # the decode step's GEMMs: no issue target of their own, they serve the decode step's
        return "faster than cuBLAS", _verdict(_ge(ratio, 1.0))
    if "generat" in op or ("decode" in op and "att" not in op):  # generation, decode step of the model
        step, floor_step = _num(row.get("ms_per_step")), float("nan")
        for r in group:
            if kind(r.get("impl", "")) == "floor":
                floor_step = _num(r.get("ms_per_step"))
        if not (math.isfinite(step) and math.isfinite(floor_step)):  # no per-step numbers: whole runs
            step, floor_step = ms, floor
        return ">=10x HF generate, decode step <=3x floor", _verdict(
            _ge(ratio, 10.0), _le(step, 3.0 * floor_step) if math.isfinite(floor_step) else True)
    if "decode" in op:  # decode attention (one query token against the KV cache)
        tbps = _num(row.get("value")) if str(row.get("unit", "")).lower() == "tb/s" else float("nan")
        return ">=2x SDPA, >=2.4 TB/s", _verdict(_ge(ratio, 2.0), _ge(tbps, 2.4))
    if "attention" in op or "attn" in op:
        fa2 = _find(group, "flash", "fa2")
        sdpa = _find(group, "sdpa", exclude=("flash", "fa2", "cudnn", "efficient", "math"))
        return ">=1.3x FA2-forced, >=0.9x default SDPA", _verdict(
            _ge(_num(fa2["ms"]) / ms, 1.3) if fa2 else None, _ge(_num(sdpa["ms"]) / ms, 0.9) if sdpa else None)
    return "-", ""


def summarize(results: list[dict], on_gpu: bool = True) -> tuple[list[list[str]], list[str]]:
    """Summary lines (one per row of ours) and status lines (one per script). The targets are GPU
    targets: without a GPU the verdict column says so instead of judging CPU numbers."""
    header = ["op", "shape", "ours", "ms", "baseline", "base ms", "ratio", "peak MB", "x floor", "target", "met"]
    lines = [header]
    fmt = lambda x: "-" if not math.isfinite(x) else f"{x:.4g}"  # noqa: E731
    for res in results:
        groups: dict[tuple, list[dict]] = {}
        for r in res["rows"]:
            groups.setdefault((r.get("op", ""), r.get("shape", "")), []).append(r)
        for (op, shape), group in groups.items():
            bases = [r for r in group if kind(r.get("impl", "")) == "baseline"]
            if bases and not any(kind(r.get("impl", "")) == "ours" for r in group):  # e.g. ours failed
                b = bases[0]
                lines.append([str(op), str(shape), "(none)", "-", str(b.get("impl", "")), fmt(_num(b.get("ms"))),
                              "-", fmt(_num(b.get("peak_mb"))), "-", "-", ""])
            for r in group:
                if kind(r.get("impl", "")) != "ours":
                    continue
                ms, ratio = _num(r.get("ms")), _num(r.get("vs_baseline"))
                # the baseline this ratio was taken against: the one whose ms matches ratio * ms best
                base = None
                if bases:
                    want = ratio * ms if math.isfinite(ratio) else _num(bases[0].get("ms"))
                    base = min(bases, key=lambda b: abs(_num(b.get("ms")) - want)
                               if math.isfinite(_num(b.get("ms"))) else float("inf"))
                floor = _floor_ms(r, group)
                text, met = target(r, group)
                met = met if on_gpu or not met else "n/a (CPU)"
                lines.append([str(op), str(shape), str(r.get("impl", "")), fmt(ms),
                              str(base.get("impl", "")) if base else "-", fmt(_num(base.get("ms")) if base else
                                                                            float("nan")),
                              fmt(ratio) + ("x" if math.isfinite(ratio) else ""), fmt(_num(r.get("peak_mb"))),
                              fmt(ms / floor) if math.isfinite(floor) and floor > 0 else "-", text, met])
    status = [f"{res['script']}: {res['status']} ({len(res['rows'])} rows, {res['seconds']:.1f} s)"
              for res in results]
    return lines, status


def render_text(lines: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)


def render_markdown(lines: list[list[str]], status: list[str], env: dict) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    out = [f"device: {env.get('device')} | torch {env.get('torch')} | triton {env.get('triton')} | "
           f"commit {env.get('commit')} | {env.get('date')} UTC", ""]
    out += ["| " + " | ".join(esc(c) for c in lines[0]) + " |", "|" + " --- |" * len(lines[0])]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in lines[1:]]
    if len(lines) == 1:
        out.append("| (no results: no GPU, or every script failed) |" + " |" * (len(lines[0]) - 1))
    out += ["", "scripts:"] + [f"- {s}" for s in status]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description="Run every benchmarks/bench_*.py and summarize against the targets.")
    p.add_argument("--budget", type=float, default=None, help="total seconds for all scripts (default: none)")
    p.add_argument("--timeout", type=float, default=None, help="per-script timeout in s (default: per script)")
    p.add_argument("--only", nargs="*", default=None, help="substrings of script names to run")
    p.add_argument("--summary", default=None, help="also write the summary as markdown to this file")
    p.add_argument("--out", default=None, help="results folder (sets $OUT; default: $OUT or benchmarks/)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; without a GPU, the Triton interpreter")
    p.add_argument("--child", nargs=2, metavar=("SCRIPT", "ROWS_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        sys.exit(_child(*args.child))
    # SIGTERM (an outer `timeout`) as an exception, so that run_script's cleanup kills the running script's group
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.out:
        os.environ["OUT"] = str(Path(args.out).resolve())
        Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.smoke:  # inherited by every child (set before anything imports triton)
        os.environ["RLHF_BENCH_SMOKE"] = "1"

    sys.path.insert(0, str(HERE))
    from common import env_info  # imports torch: once here, for the header

    env = env_info()
    if args.smoke and env["device"] == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    print(f"run_all: {env}", flush=True)
    if env["device"] == "cpu" and not args.smoke:
        print("run_all: no CUDA device: the scripts will report that they have nothing to measure.", flush=True)
    scripts = discover(args.only)
    if args.only and not scripts:
        print(f"run_all: no script matches {args.only}", flush=True)
    t_start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="run_all_") as tmp:
        for path in scripts:
            timeout = args.timeout or TIMEOUT_S.get(path.stem, DEFAULT_TIMEOUT_S)
            if args.budget is not None:
                left = args.budget - (time.perf_counter() - t_start)
                if not may_start(path.stem, left):
                    results.append({"script": path.stem, "status": f"skipped (budget: {left:.0f} s left)",
                                    "seconds": 0.0, "rows": []})
                    print(f"----- {path.name}: skipped, {left:.0f} s left in the budget", flush=True)
                    continue
                timeout = min(timeout, left)
            try:
                results.append(run_script(path, timeout, Path(tmp)))
            except Exception as e:  # noqa: BLE001 - the runner itself must always reach the summary
                results.append({"script": path.stem, "status": f"runner error: {type(e).__name__}: {e}",
                                "seconds": 0.0, "rows": []})
    lines, status = summarize(results, on_gpu=env["device"] != "cpu")
    print(f"\n===== summary ({time.perf_counter() - t_start:.0f} s) =====")
    print(render_text(lines) if len(lines) > 1 else "(no results: no GPU, or every script failed)")
    print("\n".join(status), flush=True)
    if args.summary:
        Path(args.summary).write_text(render_markdown(lines, status, env))
    return [r for res in results for r in res["rows"]]


if __name__ == "__main__":
    main()
