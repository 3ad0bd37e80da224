"""Batched sampling throughput: ours (static KV cache, Triton decode attention, CUDA-graph decode step)
vs Hugging Face ``generate`` on the same random bf16 weights, same shapes.

Shapes (BASELINES.md): Qwen2-0.5B (494M params, 24 layers, 14/2 heads, D=64, V=151936) and SmolLM2-135M
(30 layers, 9/3 heads, V=49152), B=64, prompt 128, 256 new tokens, pure sampling (T=1, no top-k/top-p),
EOS disabled so every row makes all 256 tokens.
Reported: new tokens/s, ms per decode step, peak MB, and the floor of one decode step: reading every weight
once plus the KV cache at the mean context (P + N/2), at the card's copy ceiling (``common.COPY_TBPS``: 3.0 TB/s on
an H100, 4.3 on an H200):
  floor_step = (param_bytes + B·(P + N/2)·kv_bytes_per_token) / COPY_TBPS.
Ours includes prefill and the CUDA-graph capture (once per call; once per run with a DecodeGraphCache
reused across calls, as a training loop would); ms/step = (total - prefill) / N.

    python benchmarks/bench_generate.py              # GPU: both shapes
    python benchmarks/bench_generate.py --cpu        # CPU: SmolLM2-135M (real weights if installed), B=4, 16 new
    RLHF_BENCH_SMOKE=1 TRITON_INTERPRET=1 python benchmarks/bench_generate.py   # tiny model on the CPU (smoke)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import COPY_TBPS, cpu_copy_tbps, print_table, profiled_op_times, record, smoke, time_left  # noqa: E402

from rlhf_engine.generation import DecodeGraphCache, KVCache, generate  # noqa: E402
from rlhf_engine.generation.cache import kv_bytes_per_token  # noqa: E402
from rlhf_engine.kernels import decode_gemm_ws  # noqa: E402
from rlhf_engine.model import CausalLM, preset  # noqa: E402
from rlhf_engine.model.loading import to_hf_model  # noqa: E402

GPU_CASES = [("qwen2-0.5b", 64, 128, 256), ("smollm2-135m", 64, 128, 256)]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> tuple[float, float, object]:
    """(seconds, peak extra MB, result) of one call."""
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if torch.cuda.is_available() else float("nan")
    return dt, peak, out


def _hf_generate(hf, ids, mask, n, seed):
    torch.manual_seed(seed)
    return hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                       max_new_tokens=n, pad_token_id=0)  # EOS disabled below


def _ours(model, ids, mask, n, seed, fused_write: bool | None = None, norm_gemm: bool | None = None,
          batch_invariant: bool | None = None, gemm_ws: bool | None = None, lm_head_sample: bool = False, **kw):
    """Our generate; ``fused_write`` / ``norm_gemm`` / ``gemm_ws`` True/False set RLHF_ENGINE_DECODE_FUSED_WRITE /
    RLHF_ENGINE_DECODE_NORM_GEMM / RLHF_ENGINE_DECODE_GEMM_WS for the call (None: as set); ``lm_head_sample``
    RLHF_ENGINE_LM_HEAD_SAMPLE (the tokens drawn in the LM head's epilogue); ``batch_invariant`` the model's for the
    call (the CPU's batch-invariant GEMMs and fp64 attention, model/batch_invariant.py)."""
    g = torch.Generator(ids.device).manual_seed(seed)
    env = {} if fused_write is None else {"RLHF_ENGINE_DECODE_FUSED_WRITE": "1" if fused_write else "0"}
    env["RLHF_ENGINE_LM_HEAD_SAMPLE"] = "1" if lm_head_sample else "0"
    if norm_gemm is not None:
        env["RLHF_ENGINE_DECODE_NORM_GEMM"] = "1" if norm_gemm else "0"
    if gemm_ws is not None:
        env["RLHF_ENGINE_DECODE_GEMM_WS"] = "1" if gemm_ws else "0"
    was = model.batch_invariant
    model.batch_invariant = was if batch_invariant is None else batch_invariant
    try:
        with mock.patch.dict(os.environ, env):
            return generate(model, ids, mask, max_new_tokens=n, eos_token_ids=(), generator=g, **kw)
    finally:
        model.batch_invariant = was


def decode_step_profile(model, ids, mask, n_lo: int = 8, n_hi: int = 24) -> dict[str, tuple[float, float]]:
    """What one eager decode step runs: {name: (launches per step, µs per step)} of the GPU kernels and their device
    time on CUDA (CPU ops and their self CPU time elsewhere), from the difference of two profiled generations of
    ``n_lo`` and ``n_hi`` new tokens, so that the prefill and the warm-up steps cancel. On a GPU the eager step is
    host-bound, so each kernel runs alone: the sum is the step's kernel time without launch gaps, to hold against
    the graph replay's ms/step."""
    def stats(n: int) -> dict[str, tuple[int, float]]:
        with torch.no_grad():
            return profiled_op_times(lambda: _ours(model, ids, mask, n, 2, use_cuda_graph=False), ids.is_cuda)

    lo, hi, steps = stats(n_lo), stats(n_hi), n_hi - n_lo
    per = {k: ((c - lo.get(k, (0, 0.0))[0]) / steps, (t - lo.get(k, (0, 0.0))[1]) / steps) for k, (c, t) in hi.items()}
    return {k: v for k, v in sorted(per.items(), key=lambda kv: -kv[1][1]) if v[0] > 0}


def print_step_profile(shape: str, per: dict[str, tuple[float, float]], graph_ms: float | None, top: int = 15):
    n, us = sum(c for c, _ in per.values()), sum(t for _, t in per.values())
    what = "kernels" if torch.cuda.is_available() else "CPU ops"
    graph = f"; the graph replay took {graph_ms * 1e3:.0f} µs a step" if graph_ms else ""
    print(f"{shape}: one eager decode step runs {n:.0f} {what}, {us:.0f} µs of their own time{graph}")
    for name, (c, t) in list(per.items())[:top]:
        print(f"  {t:9.1f} µs  {c:5.1f}x  {name[:90]}")


def run_case(name: str, B: int, P: int, N: int, device: torch.device, dtype: torch.dtype,
             real_model=None, variants=None, reps: int = 1, profile_step: bool = False,
             on_rows=None) -> list[dict]:
    """Time HF generate and each of our variants (best of ``reps`` interleaved runs) on one shape; hand the rows to
    ``on_rows`` (e.g. ``record``) before the optional decode-step profile, so that a timeout in it loses nothing."""
    if real_model is not None:
        model = real_model
    else:
        torch.manual_seed(0)
        with torch.device(device):
            model = CausalLM(preset(name)).to(dtype).eval()
    hf = to_hf_model(model)
    hf.generation_config.eos_token_id = None
    cfg = model.config
    ids = torch.randint(4, cfg.vocab_size, (B, P), device=device)
    mask = torch.ones_like(ids)
    shape = f"{name} {str(dtype).replace('torch.', '')} B={B} P={P} N={N}"
    rows = []

    # Prefill alone (ours), to split the total into prefill + decode steps.
    cache = KVCache.allocate(cfg, B, P + N, dtype=model.dtype, device=device)
    with torch.no_grad():
        model.prefill(ids, mask, cache)  # warm (Triton compile)
        prefill_s = min(_timed(lambda: model.prefill(ids, mask, cache))[0] for _ in range(3))
    del cache

    if variants is None:
        variants = {"ours": {}}
    runs = {"hf_generate (dynamic cache)": lambda: _hf_generate(hf, ids, mask, N, 1)}
    with torch.no_grad():
        _hf_generate(hf, ids, mask, 4, 0)  # warm-up
    for label, kw in variants.items():
        try:
            # warm at the timed length: Triton compiles and autotunes per cache-length bucket (the decode kernel's
            # key), and a reused graph cache captures per rounded length; none of it may land in the timed runs.
            # A variant without a graph cache still captures inside each timed call: that is its real cost.
            _ours(model, ids, mask, N, 0, **kw)
            runs[label] = lambda kw=kw: _ours(model, ids, mask, N, 1, **kw)
        except Exception as e:  # noqa: BLE001 - report and go on with the other variants
            print(f"{shape} {label}: FAILED {type(e).__name__}: {e}")
    results: dict[str, tuple] = {}
    for _ in range(reps):  # interleaved, best of reps: a shared machine's noise hits both sides alike
        for label, fn in runs.items():
            with torch.no_grad():
                r = _timed(fn)
            if label not in results or r[0] < results[label][0]:
                results[label] = r
    del hf

    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_step = B * (P + N / 2) * kv_bytes_per_token(cfg, model.dtype)
    copy_tbps = COPY_TBPS if device.type == "cuda" else cpu_copy_tbps()  # the CPU's own copy rate on a CPU
    floor_step_ms = (param_bytes + kv_step) / (copy_tbps * 1e12) * 1e3
    base_s = results["hf_generate (dynamic cache)"][0]
    for label, (sec, peak, out) in results.items():
        tok_s = B * N / sec
        step_ms = (sec - (prefill_s if label.startswith("ours") else 0.0)) / N * 1e3
        rows.append({"op": "generate", "shape": shape, "impl": label, "ms": sec * 1e3, "metric": "new_tok_s",
                     "value": tok_s, "unit": "tok/s", "peak_mb": peak, "vs_baseline": base_s / sec,
                     "ms_per_step": step_ms})
    rows.append({"op": "generate", "shape": shape, "impl": f"floor (weights + KV at {copy_tbps:.3g} TB/s)",
                 "ms": floor_step_ms * N, "metric": "new_tok_s", "value": B * N / (floor_step_ms * N / 1e3),
                 "unit": "tok/s", "ms_per_step": floor_step_ms})
    print(f"{shape}: prefill {prefill_s * 1e3:.2f} ms (ours); floor per decode step {floor_step_ms:.3f} ms "
          f"(weights {param_bytes / 1e6:.0f} MB + KV {kv_step / 1e6:.0f} MB)")
    for r in rows:
        print(f"  {r['impl']:<48} {r['value']:>10.0f} tok/s  {r['ms_per_step']:>8.3f} ms/step"
              + (f"  x{r['vs_baseline']:.2f} vs HF" if "vs_baseline" in r else ""))
    if on_rows is not None:
        on_rows(rows)
    if profile_step:  # a diagnostic: never at the cost of the rows above
        if time_left() < 20:
            print(f"{shape}: decode-step profile skipped ({time_left():.0f} s left)")
        else:
            try:
                graph = [r["ms_per_step"] for r in rows if r["impl"] == "ours (triton, cuda graph reused across calls)"]
                n_lo, n_hi = (1, 3) if smoke() else (8, 24)
                paths = {"RLHF_ENGINE_DECODE_FUSED_WRITE": "1", "RLHF_ENGINE_DECODE_NORM_GEMM": "0",
                         "RLHF_ENGINE_DECODE_GEMM_WS": "0"}  # the default
                with mock.patch.dict(os.environ, paths):
                    per = decode_step_profile(model, ids, mask, n_lo, n_hi)
                print_step_profile(shape, per, graph[0] if graph else None)
                norm_gemm = [r["ms_per_step"] for r in rows  # (the smoke run's eager row: its path, not its time)
                             if r["impl"] in ("ours (triton, cuda graph reused, norms in GEMMs)",
                                              "ours (triton, eager, norms in GEMMs)")]
                if norm_gemm and time_left() >= 20:  # the opt-in split-K decode GEMM path's step, kernel by kernel
                    with mock.patch.dict(os.environ, {**paths, "RLHF_ENGINE_DECODE_NORM_GEMM": "1"}):
                        per = decode_step_profile(model, ids, mask, n_lo, n_hi)
                    print_step_profile(f"{shape} [norms in GEMMs, split-K]", per,
                                       norm_gemm[0] if device.type == "cuda" else None)
                gluon = [r["ms_per_step"] for r in rows
                         if r["impl"] == "ours (triton, cuda graph reused, Gluon GEMMs, norms in GEMMs)"]
                if gluon and time_left() >= 20:  # the opt-in Gluon decode GEMMs with the norms fused in
                    with mock.patch.dict(os.environ, {**paths, "RLHF_ENGINE_DECODE_NORM_GEMM": "1",
                                                      "RLHF_ENGINE_DECODE_GEMM_WS": "1"}):
                        per = decode_step_profile(model, ids, mask, n_lo, n_hi)
                    print_step_profile(f"{shape} [Gluon GEMMs, norms in GEMMs]", per, gluon[0])
            except Exception as e:  # noqa: BLE001 - report and keep the measured rows
                print(f"{shape}: decode-step profile FAILED {type(e).__name__}: {e}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="CPU comparison: SmolLM2-135M, B=4, 16 new tokens")
    ap.add_argument("--cases", default="qwen2-0.5b,smollm2-135m", help="GPU presets to run (comma separated)")
    ap.add_argument("--new-tokens", type=int, default=None)
    args = ap.parse_args(argv if argv is not None else [])
    rows: list[dict] = []
    if smoke() and not torch.cuda.is_available():  # the script's path on a tiny model; no CUDA graph on a CPU
        variants = {"ours (triton, eager)": {"attn_backend": "triton", "use_cuda_graph": False, "fused_write": True,
                                             "norm_gemm": False},
                    "ours (triton, eager, separate cache write)": {"attn_backend": "triton", "use_cuda_graph": False,
                                                                   "fused_write": False, "norm_gemm": False},
                    "ours (triton, eager, norms in GEMMs)": {"attn_backend": "triton", "use_cuda_graph": False,
                                                             "fused_write": True, "norm_gemm": True},
                    "ours (sdpa, eager)": {"attn_backend": "torch", "use_cuda_graph": False}}
        rows += run_case("tiny-qwen2", 2, 8, 4, torch.device("cpu"), torch.float32, variants=variants,
                         profile_step=True)
    elif args.cpu:
        real = None
        try:
            from rlhf_engine.model.loading import smollm2_135m_instruct

            real, _ = smollm2_135m_instruct()
        except (FileNotFoundError, ImportError) as e:
            print(f"real SmolLM2 weights unavailable ({e}); using random weights")
        variants = {"ours": {}, "ours (batch_invariant=False)": {"batch_invariant": False}}
        rows += run_case("smollm2-135m", 4, 16, args.new_tokens or 16, torch.device("cpu"), torch.float32,
                         real_model=real, reps=3, variants=variants)
    elif not torch.cuda.is_available():
        print("bench_generate: needs a CUDA device (or --cpu for a small CPU comparison); skipped.")
        return []
    else:
        wanted = args.cases.split(",")
        cases = [("tiny-qwen2", 4, 16, 8)] if smoke() else GPU_CASES
        wanted += ["tiny-qwen2"] if smoke() else []
        for name, B, P, N in cases:
            if name in wanted:
                # fused_write / norm_gemm set: the same path whatever the environment says (the A/B is explicit).
                # The default since the H200 run of 1f4b6a6: the decode attention kernel writes the KV cache.
                variants = {"ours (triton, cuda graph)": {"fused_write": True, "norm_gemm": False},
                            "ours (triton, cuda graph reused across calls)": {"graph_cache": DecodeGraphCache(),
                                                                              "fused_write": True,
                                                                              "norm_gemm": False},
                            # RLHF_ENGINE_DECODE_FUSED_WRITE=0: the cache write as its own kernel (one more a layer)
                            "ours (triton, cuda graph reused, separate cache write)": {
                                "graph_cache": DecodeGraphCache(), "fused_write": False, "norm_gemm": False},
                            # opt-in: each norm inside the GEMM after it, silu * up in the gate/up GEMM (3 fewer a
                            # layer: 5 kernels a layer instead of 8)
                            "ours (triton, cuda graph reused, norms in GEMMs)": {
                                "graph_cache": DecodeGraphCache(), "fused_write": True, "norm_gemm": True},
                            "ours (sdpa, cuda graph)": {"attn_backend": "torch"},
                            "ours (triton, eager)": {"use_cuda_graph": False, "fused_write": True,
                                                     "norm_gemm": False}}
                if decode_gemm_ws.on_hopper(torch.device("cuda")):  # opt-in: the Gluon decode GEMMs (last: a hang
                    # would lose no other row)
                    variants["ours (triton, cuda graph reused, Gluon GEMMs)"] = {
                        "graph_cache": DecodeGraphCache(), "fused_write": True, "norm_gemm": False, "gemm_ws": True}
                    variants["ours (triton, cuda graph reused, Gluon GEMMs, norms in GEMMs)"] = {
                        "graph_cache": DecodeGraphCache(), "fused_write": True, "norm_gemm": True, "gemm_ws": True}
                if decode_gemm_ws.on_hopper(torch.device("cuda")) and os.environ.get(
                        "RLHF_ENGINE_LM_HEAD_SAMPLE_BROKEN") not in ("1", "notrun"):  # (else generate would draw from
                    # the logits under these rows' names) the tokens drawn in the LM head's epilogue
                    # (kernels/lm_head_sample.py): on the default path, and with everything above
                    variants["ours (triton, cuda graph reused, sampling in the LM head)"] = {
                        "graph_cache": DecodeGraphCache(), "fused_write": True, "norm_gemm": False,
                        "lm_head_sample": True}
                    everything = "ours (triton, cuda graph reused, Gluon GEMMs, norms in GEMMs, sampling in the LM head)"
                    variants[everything] = {"graph_cache": DecodeGraphCache(), "fused_write": True, "norm_gemm": True,
                                            "gemm_ws": True, "lm_head_sample": True}
                # recorded case by case, before the profile: a run cut short by its timeout keeps what it measured
                case_rows = run_case(name, B, P, args.new_tokens or N, torch.device("cuda"), torch.bfloat16,
                                     variants=variants, profile_step=True, on_rows=record)
                rows += case_rows
                torch.cuda.empty_cache()
    print_table(rows)
    print("vs_baseline = HF generate time / ours (same B, P, N, weights); floor row: ms for N steps at the floor.")
    if not torch.cuda.is_available():  # the CPU runs (the GPU cases were recorded one by one)
        record(rows)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
