"""GQA causal attention, bf16, forward and forward+backward: ours vs SDPA (default, FLASH forced) vs FlexAttention.

FLOP counts (causal: half of the T x T score matrix is computed):
    forward  = 2 matmuls (Q K^T, P V) = 2 * (2 * B * Hq * T * T * D) / 2 = 4 * B * Hq * T^2 * D / 2
    backward = 5 matmuls (Q K^T recompute, dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q) = 2.5 x forward
    (the convention of FlashAttention's benchmarks; our default "split" backward recomputes Q K^T and dO V^T in
    its dQ kernel, 7 matmuls; the "ours (atomic dQ)" row runs dq_mode="atomic", 5 matmuls and fp32 atomics;
    the "ours (TMA loads)" row runs the opt-in forward with tensor-descriptor tile moves, attention_fwd_tma.py;
    the "ours (warp-specialized ...)" rows the opt-in Gluon kernels for Hopper, attention_fwd_ws.py and
    attention_bwd_ws.py: forward, dK/dV and dQ; the 7 backward matmuls of the split scheme, or 5 and fp32 atomics
    in the "..., atomic dQ" row; "..., ping-pong": each kernel's two consumers issuing their products in turn,
    in both dQ forms)
    forward + backward = 3.5 x forward
Floor: the bf16 dense matmul ceiling of the card (764 TFLOP/s on an H100, ../shared/BASELINES.md).
Run: python benchmarks/bench_attention.py [--no-flex]   (needs a CUDA device; exits with a message otherwise;
RLHF_BENCH_SMOKE=1 TRITON_INTERPRET=1 runs it on a tiny fp32 shape on the CPU, without FlexAttention)
"""
from __future__ import annotations

import contextlib
import os
import sys
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (BF16_TFLOPS, CARD, autotune_report, bench, device, peak_mem_mb, print_table,  # noqa: E402
                    record, smoke, time_left)

from rlhf_engine.kernels.attention import flash_attention  # noqa: E402

SHAPES = [  # (B, Hq, Hkv, T, D): Qwen2.5-0.5B-like, Llama-3-8B-like
    (8, 14, 2, 2048, 64),
    (2, 32, 8, 4096, 128),
]
SMOKE_SHAPES = [(1, 4, 2, 40, 64)]  # D = 64: the TMA row runs its own kernel too


def _flex():
    """A compiled FlexAttention with a causal block mask, or None when it is unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)

        def run(q, k, v, block_mask):
            return compiled(q, k, v, block_mask=block_mask, enable_gqa=True)

        def mask_for(T, device):
            return create_block_mask(lambda b, h, qi, kj: qi >= kj, None, None, T, T, device=device)

        return run, mask_for
    except Exception as e:  # noqa: BLE001 - report and go on without it
        print(f"FlexAttention unavailable: {e!r}")
        return None


def _inputs(B, Hq, Hkv, T, D, dev):
    """(B, H, T, D) leaves for SDPA / flex and (B, T, H, D) leaves for ours, same values, bf16."""
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32  # the interpreter's bf16 tl.dot is wrong
    qb = torch.randn(B, Hq, T, D, device=dev, dtype=dt, requires_grad=True)
    kb = torch.randn(B, Hkv, T, D, device=dev, dtype=dt, requires_grad=True)
    vb = torch.randn(B, Hkv, T, D, device=dev, dtype=dt, requires_grad=True)
    qs, ks, vs = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (qb, kb, vb))
    return (qb, kb, vb), (qs, ks, vs)


def _impls(B, Hq, Hkv, T, D, dev, with_flex: bool, names=None):
    """name -> (forward fn, leaves needing grad). Each impl gets its inputs in its native layout. ``names``:
    only these (default SDPA always, as the reference of the correctness check)."""
    (qb, kb, vb), (qs, ks, vs) = _inputs(B, Hq, Hkv, T, D, dev)
    g = Hq // Hkv
    if with_flex:
        flex = _flex()
        if flex is None:
            return {}
        run, mask_for = flex
        try:
            bm = mask_for(T, dev)
            run(qb, kb, vb, bm)  # compile now; a failure drops the row
        except Exception as e:  # noqa: BLE001
            print(f"FlexAttention failed to compile: {e!r}")
            return {}
        return {"flex_attention": (lambda: run(qb, kb, vb, bm), (qb, kb, vb))}

    def fa2():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # FA2 takes no GQA flag: expand KV inside the timing
            return F.scaled_dot_product_attention(qb, kb.repeat_interleave(g, 1), vb.repeat_interleave(g, 1),
                                                  is_causal=True)

    impls = {
        "sdpa_default": (lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True),
                         (qb, kb, vb)),
        "sdpa_flash_fa2": (fa2, (qb, kb, vb)),
        "ours": (lambda: flash_attention(qs, ks, vs, causal=True, backend="triton"), (qs, ks, vs)),
        # the same forward; the backward adds dQ with fp32 atomics inside the dK/dV kernel (fwd+bwd rows only)
        ATOMIC: (lambda: flash_attention(qs, ks, vs, causal=True, backend="triton"), (qs, ks, vs)),
        # the forward with TMA tile moves (kernels/attention_fwd_tma.py, opt-in), the default backward
        TMA: (lambda: flash_attention(qs, ks, vs, causal=True, backend="triton"), (qs, ks, vs)),
        # the warp-specialized Gluon forward and backward (kernels/attention_{fwd,bwd}_ws.py, opt-in, sm_90)
        WS: (lambda: flash_attention(qs, ks, vs, causal=True, backend="triton"), (qs, ks, vs)),
        WS_SIMPLE: (lambda: flash_attention(qs, ks, vs, causal=True, backend="triton"), (qs, ks, vs)),
        # FA3's ping-pong between each kernel's consumers (RLHF_ENGINE_ATTN_WS_PINGPONG=1), both dQ forms
        WS_PINGPONG: (lambda: flash_attention(qs, ks, vs, causal=True, backend="triton"), (qs, ks, vs)),
        WS_ATOMIC_PINGPONG: (lambda: flash_attention(qs, ks, vs, causal=True, backend="triton"), (qs, ks, vs)),
        # the same forward; the backward's atomic-dQ form (5 products: no dQ kernel; fwd+bwd rows only)
        WS_ATOMIC: (lambda: flash_attention(qs, ks, vs, causal=True, backend="triton"), (qs, ks, vs)),
    }
    from rlhf_engine.kernels.attention_fwd_ws import ws_eligible

    if not ws_eligible(qs, ks, vs):  # not an sm_90 GPU (or ws_probe.py found them broken): no row under their name
        impls = {n: f for n, f in impls.items() if n not in (WS, WS_SIMPLE, WS_ATOMIC, *PINGPONGS)}
    elif os.environ.get("RLHF_ENGINE_ATTN_WS_PIPELINE_BROKEN") in ("1", "notrun"):  # ws_probe.py: the overlap only
        # failed (or was not probed)
        impls = {n: f for n, f in impls.items() if n not in (WS, *PINGPONGS)}
    if os.environ.get("RLHF_ENGINE_ATTN_WS_PINGPONG_BROKEN") in ("1", "notrun"):  # ws_probe.py --pingpong
        impls = {n: f for n, f in impls.items() if n not in PINGPONGS}
    if os.environ.get("RLHF_ENGINE_ATTN_WS_ATOMIC_BROKEN") in ("1", "notrun"):  # ws_probe.py --atomic
        impls = {n: f for n, f in impls.items() if n not in (WS_ATOMIC, WS_ATOMIC_PINGPONG)}
    return {n: f for n, f in impls.items() if names is None or n in names or n == "sdpa_default"}


ATOMIC = "ours (atomic dQ)"
TMA = "ours (TMA loads)"
WS = "ours (warp-specialized)"
WS_SIMPLE = "ours (warp-specialized, no overlap)"  # the forward without FA3's intra-warpgroup overlap
WS_ATOMIC = "ours (warp-specialized, atomic dQ)"
WS_PINGPONG = "ours (warp-specialized, ping-pong)"
WS_ATOMIC_PINGPONG = "ours (warp-specialized, atomic dQ, ping-pong)"
PINGPONGS = (WS_PINGPONG, WS_ATOMIC_PINGPONG)
_ENV = {ATOMIC: {"RLHF_ENGINE_ATTN_DQ": "atomic"}, TMA: {"RLHF_ENGINE_ATTN_TMA": "1"},
        WS: {"RLHF_ENGINE_ATTN_WS": "1"}, WS_ATOMIC: {"RLHF_ENGINE_ATTN_WS": "1", "RLHF_ENGINE_ATTN_DQ": "atomic"},
        WS_SIMPLE: {"RLHF_ENGINE_ATTN_WS": "1", "RLHF_ENGINE_ATTN_WS_PIPELINE": "0"},
        WS_PINGPONG: {"RLHF_ENGINE_ATTN_WS": "1", "RLHF_ENGINE_ATTN_WS_PINGPONG": "1"},
        WS_ATOMIC_PINGPONG: {"RLHF_ENGINE_ATTN_WS": "1", "RLHF_ENGINE_ATTN_DQ": "atomic",
                             "RLHF_ENGINE_ATTN_WS_PINGPONG": "1"}}


def _dq_mode(name: str):
    """The environment of one implementation's calls: RLHF_ENGINE_ATTN_DQ=atomic for the atomic-dQ row,
    RLHF_ENGINE_ATTN_TMA=1 for the TMA row, RLHF_ENGINE_ATTN_WS=1 for the warp-specialized ones, else as it was."""
    if name not in _ENV:
        return contextlib.nullcontext()
    return mock.patch.dict(os.environ, _ENV[name])


def _check(impls) -> str:
    """Each of ours against default SDPA, forward and input gradients (a fast wrong kernel is not a result):
    {name: '' when they agree, else what disagrees} (printed, and put in the name of that row)."""
    if "sdpa_default" not in impls:
        return {}
    outs = {}
    for name, (fn, leaves) in impls.items():
        if name != "sdpa_default" and not name.startswith("ours"):
            continue
        with _dq_mode(name):
            o = fn()
            grads = torch.autograd.grad(o, leaves, torch.ones_like(o) * 0.5)
        if name == "sdpa_default":  # (B, H, T, D) -> ours' (B, T, H, D)
            o, grads = o.transpose(1, 2), [g.transpose(1, 2) for g in grads]
        outs[name] = [o.float(), *(g.float() for g in grads)]
    verdicts = {}
    for name, ours in outs.items():
        if name == "sdpa_default":
            continue
        bad = []
        for what, a, b in zip(("o", "dq", "dk", "dv"), ours, outs["sdpa_default"]):
            err = ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()
            if not err < 2e-2:  # NaN fails too
                bad.append(f"{what} rel err {err:.2g}")
        if bad:
            print(f"WARNING: {name} disagrees with SDPA: {', '.join(bad)}")
        verdicts[name] = ", ".join(bad)
    return verdicts


def _measure(impls, shape, fwd_flops, skip=()) -> list[dict]:
    rows = []
    reps = dict(warmup=1, rep=2) if smoke() else dict(warmup=5, rep=30)
    for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
        for name, (fn, leaves) in impls.items():
            if name in skip or (name in (ATOMIC, WS_ATOMIC, WS_ATOMIC_PINGPONG) and mode == "fwd"):
                continue  # measured in an earlier pass; atomic dQ: the forward is another row's
            if mode == "fwd":
                def step(fn=fn):
                    with torch.no_grad():
                        fn()
            else:
                do = torch.randn_like(fn())

                def step(fn=fn, leaves=leaves, do=do):
                    for t in leaves:
                        t.grad = None
                    fn().backward(do)
            try:
                with _dq_mode(name):
                    ms = bench(step, **reps)  # the first calls also autotune ours
                    for t in leaves:  # the last call's gradients would count as "before" and then be freed
                        t.grad = None
                    mem = peak_mem_mb(step)
            except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
                print(f"{name} {mode} failed: {e!r}")
                continue
            rows.append({"op": f"attention_{mode}", "shape": shape, "impl": name, "ms": ms, "metric": "TFLOP/s",
                         "value": flops / ms / 1e9, "unit": "TFLOP/s", "peak_mb": mem})
    return rows


# Passes, in order: the target rows (ours and both SDPA baselines, both shapes), the warp-specialized kernels (fwd and
# fwd+bwd), then the variants that choose the defaults (atomic dQ, TMA forward), then FlexAttention. A later pass
# starts only with ``need`` seconds left before
# the runner's deadline (common.time_left), so a cold Triton cache (every variant autotunes both head dims) costs
# the optional rows, never the target ones.
PASSES = (("targets", ("sdpa_flash_fa2", "ours"), 0.0), ("warp-specialized", (WS, WS_ATOMIC, *PINGPONGS, WS_SIMPLE), 30.0),
          ("variants", (ATOMIC, TMA), 45.0), ("flex", (), 40.0))


def main(with_flex: bool = True) -> list[dict]:
    if not torch.cuda.is_available() and not smoke():
        print("bench_attention: needs a CUDA device (the Triton kernels only run on the interpreter here); skipped.")
        return []
    dev = torch.device(device())
    with_flex = with_flex and dev.type == "cuda"
    rows = []

    def ratios(new_rows: list[dict]) -> None:  # against the SDPA rows measured in this run for the same shape
        ms_of = {(r["op"], r["shape"], r["impl"]): r["ms"] for r in rows + new_rows}
        for r in new_rows:
            base = ms_of.get((r["op"], r["shape"], "sdpa_default"))
            fa2 = ms_of.get((r["op"], r["shape"], "sdpa_flash_fa2"))
            r["vs_baseline"] = base / r["ms"] if base else float("nan")  # speedup over default SDPA
            r["vs_fa2"] = fa2 / r["ms"] if fa2 else float("nan")

    for pass_name, names, need in PASSES:
        flex_pass = pass_name == "flex"
        if flex_pass and not with_flex:
            continue
        for B, Hq, Hkv, T, D in SMOKE_SHAPES if smoke() else SHAPES:
            if pass_name == "warp-specialized" and os.environ.get("RLHF_ENGINE_ATTN_WS_BROKEN") in ("1", "notrun"):
                print("bench_attention: warp-specialized pass skipped: ws_probe.py found the kernel broken")
                break
            if time_left() < need:
                print(f"bench_attention: pass '{pass_name}' skipped: {time_left():.0f} s left before the deadline")
                break
            shape = f"B={B} Hq={Hq} Hkv={Hkv} T={T} D={D}"
            fwd_flops = 4 * B * Hq * T * T * D / 2
            impls = _impls(B, Hq, Hkv, T, D, dev, flex_pass, names)
            bad = _check(impls)
            # default SDPA is measured once, in the first pass; later passes only use it for the check
            new = _measure(impls, shape, fwd_flops, skip=() if pass_name == "targets" else ("sdpa_default",))
            for r in new:
                if bad.get(r["impl"]):
                    r["impl"] = f"{r['impl']} (MISMATCH vs SDPA: {bad[r['impl']]})"
            if pass_name == "targets":
                for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
                    new.append({"op": f"attention_{mode}", "shape": shape, "impl": "floor",
                                "ms": flops / (BF16_TFLOPS * 1e9), "metric": "TFLOP/s",
                                "value": BF16_TFLOPS, "unit": "TFLOP/s"})
            ratios(new)
            record(new)  # shape by shape: a run cut short by its timeout keeps what it measured
            rows += new
            torch.cuda.empty_cache()
        if not flex_pass:  # the winners so far (gpu_check.sh collects these lines), before a timeout can cut them
            from rlhf_engine.kernels import attention_bwd, attention_fwd, attention_fwd_tma
            print("\n".join(autotune_report({"attn_fwd": attention_fwd._attn_fwd_kernel_tuned,
                                              "attn_fwd_tma": attention_fwd_tma._attn_fwd_tma_kernel_tuned,
                                              "attn_bwd_dkdv": attention_bwd._bwd_dkdv_kernel_tuned,
                                              "attn_bwd_dkdv_atomic_dq": attention_bwd._bwd_dkdv_atomic_dq_tuned,
                                              "attn_bwd_dq": attention_bwd._bwd_dq_kernel_tuned})))
    print_table(rows)
    print(f"floor: {BF16_TFLOPS:.0f} TFLOP/s (bf16 matmul ceiling, {CARD}). vs_baseline = speedup over default "
          "SDPA (>1 is faster); targets: ours >= 0.9x default SDPA and >= 1.3x FA2.")
    for r in rows:
        if r["impl"].startswith("ours"):
            print(f"{r['impl']:<18} {r['op']:<18} {r['shape']:<32} {r['value']:7.1f} TFLOP/s  "
                  f"x{r['vs_baseline']:.2f} vs SDPA default  x{r['vs_fa2']:.2f} vs FA2")
    return rows


if __name__ == "__main__":
    main(with_flex="--no-flex" not in sys.argv)
