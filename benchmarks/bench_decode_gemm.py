"""The GEMMs of a decode step at batch 64, bf16: cuBLAS (``F.linear``) against the split-K decode GEMM
(``kernels/norm_linear.py`` ``decode_linear``), one projection at a time and as a decode layer's four projections
with the norms, SwiGLU and residual adds they carry.

Floor: each projection reads its weight once, N x K x 2 bytes at the card's copy ceiling (Qwen2-0.5B: q/k/v 2.1 MB,
o 1.6 MB, gate/up 17.4 MB, down 8.7 MB: 29.8 MB a layer, 6.9 us on an H200 at 4.3 TB/s); the rows (64 x K) are
noise. The H200 profile of the decode step measured cuBLAS at 4.2-7.6 us a projection (24.3 us a layer with the
split-K reduce: 1.2 TB/s).
Rows:
- "cuBLAS" / "ours": the projection alone (F.linear against decode_linear with no fusion; the same math).
- "usual layer (7 kernels)": the generation path's kernels of a layer but the attention: add + norm, q/k/v GEMM,
  o GEMM, add + norm, gate/up GEMM, silu * up, down GEMM (the last add rides in the next layer's norm).
- "ours: split-K layer (4 kernels)": norm + q/k/v, o + add (+ sums of squares), norm + gate/up + SwiGLU, down + add,
  each launched with programmatic dependent launch on Hopper (its first weight block read while the previous kernel
  finishes); "no PDL": the same launched the usual way (pdl=False).
- On an sm_90 GPU, the Gluon decode GEMM (``kernels/decode_gemm_ws.py``, opt-in ``RLHF_ENGINE_DECODE_GEMM_WS=1``):
  "ours (Gluon, swap-AB)" each projection; "gate/up + SwiGLU": cuBLAS then the silu * up kernel against the Gluon
  GEMM with its SwiGLU epilogue; "ours: Gluon GEMM layer (6 kernels)": the usual layer with the Gluon GEMMs (the
  norms on their kernel, silu * up in the gate/up GEMM); "ours: Gluon split-K layer (4 kernels)": the split-K
  layer's fusions (norms from partial sums of squares, residual adds) on the Gluon GEMM (``decode_linear(backend=
  "gluon")``, both switches set), "no PDL" the same without programmatic dependent launch (the other Gluon rows
  are PDL launches, as in the model); "LM head + sampling": cuBLAS's logits then the Triton sampler against the Gluon
  LM head with the sampler in its epilogue (``kernels/lm_head_sample.py``). Timed last within a model; a row that
  raises is reported and skipped, and each model's rows are recorded once it is done (a hang cut by the runner's
  timeout loses only the model it hit).
Each row is timed as a CUDA-graph replay, 10 back to back a sample (a decode step replays its kernels so).
Run: python benchmarks/bench_decode_gemm.py   (needs a CUDA device; RLHF_BENCH_SMOKE=1 TRITON_INTERPRET=1 runs a
tiny fp32 shape on the CPU without graphs)
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import COPY_TBPS, autotune_report, bench, device, graphed, print_table, record, smoke  # noqa: E402

from rlhf_engine.kernels import decode_gemm_ws as dg  # noqa: E402
from rlhf_engine.kernels.lm_head_sample import lm_head_sample  # noqa: E402
from rlhf_engine.kernels.norm_linear import decode_linear  # noqa: E402
from rlhf_engine.kernels.rmsnorm import rms_norm  # noqa: E402
from rlhf_engine.kernels.sample import sample_logits_forward  # noqa: E402
from rlhf_engine.kernels.swiglu import silu_mul  # noqa: E402

MODELS = {  # name: (hidden, q size, kv size, intermediate, q/k/v bias, vocabulary)
    "Qwen2-0.5B": (896, 896, 128, 4864, True, 151936),
    "SmolLM2-135M": (576, 576, 192, 1536, False, 49152),
}
SMOKE_MODELS = {"tiny": (64, 64, 32, 96, True, 256)}


def _weights(H, Dq, Dkv, I, bias, dev, dt):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s, scale: (torch.randn(*s, generator=g) * scale).to(dev, dt)  # noqa: E731
    return dict(qkv=rnd(Dq + 2 * Dkv, H, scale=H ** -0.5), qkv_b=rnd(Dq + 2 * Dkv, scale=0.1) if bias else None,
                o=rnd(H, Dq, scale=Dq ** -0.5), gu=rnd(2 * I, H, scale=H ** -0.5), down=rnd(H, I, scale=I ** -0.5),
                n1=(1 + 0.1 * torch.randn(H, generator=g)).to(dev, dt), n2=(1 + 0.1 * torch.randn(H, generator=g)).to(
                    dev, dt))


def main() -> list[dict]:
    if not torch.cuda.is_available() and not smoke():
        print("bench_decode_gemm: needs a CUDA device; skipped.")
        return []
    dev = torch.device(device())
    cuda = dev.type == "cuda"
    dt = torch.bfloat16 if cuda else torch.float32  # the interpreter's bf16 tl.dot is wrong
    reps = dict(warmup=10, rep=50, inner=10) if cuda else dict(warmup=0, rep=1)
    B = 64 if cuda else 4
    rows = []
    for model, (H, Dq, Dkv, I, bias, vocab) in (MODELS if cuda else SMOKE_MODELS).items():
        w = _weights(H, Dq, Dkv, I, bias, dev, dt)
        x, d = torch.randn(B, H, device=dev, dtype=dt), torch.randn(B, H, device=dev, dtype=dt)
        y, act = torch.randn(B, Dq, device=dev, dtype=dt), torch.randn(B, I, device=dev, dtype=dt)
        # the state a layer starts from: the usual path carries x and the pending addend d; the split-K path the
        # stream x + d and its rows' sums of squares (here one partial, computed in torch: setup, not timed)
        s0 = x + d
        s0_sq = s0.float().pow(2).sum(-1)[None].contiguous()
        projections = {  # name: (weight bytes, cuBLAS, ours: the same GEMM)
            "q/k/v": (w["qkv"], lambda: F.linear(x, w["qkv"], w["qkv_b"]),
                      lambda: decode_linear(x, w["qkv"], w["qkv_b"], backend="triton", pdl=True)),
            "o": (w["o"], lambda: F.linear(y, w["o"]), lambda: decode_linear(y, w["o"], backend="triton", pdl=True)),
            "gate/up": (w["gu"], lambda: F.linear(x, w["gu"]),
                        lambda: decode_linear(x, w["gu"], backend="triton", pdl=True)),
            "down": (w["down"], lambda: F.linear(act, w["down"]),
                     lambda: decode_linear(act, w["down"], backend="triton", pdl=True)),
        }

        def usual():
            h, s = rms_norm(d, w["n1"], 1e-6, residual=x, backend="triton")
            attn_in = F.linear(h, w["qkv"], w["qkv_b"])[:, :Dq]  # stands in for attention's output
            h2, s2 = rms_norm(F.linear(attn_in, w["o"]), w["n2"], 1e-6, residual=s, backend="triton")
            gate, up = F.linear(h2, w["gu"]).chunk(2, dim=-1)
            return s2, F.linear(silu_mul(gate, up, backend="triton"), w["down"])

        def split_k(pdl=True, backend="triton"):  # pdl=False: the same kernels launched without programmatic
            # dependent launch; backend="gluon": the same fusions on the Gluon decode GEMM
            kw = dict(backend=backend, pdl=pdl)
            attn_in = decode_linear(s0, w["qkv"], w["qkv_b"], norm_weight=w["n1"], row_sumsq=s0_sq, **kw).out[:, :Dq]
            h = decode_linear(attn_in, w["o"], out_residual=s0, return_sumsq=True, **kw)
            a = decode_linear(h.out, w["gu"], norm_weight=w["n2"], row_sumsq=h.sumsq, swiglu=True, **kw).out
            return decode_linear(a, w["down"], out_residual=h.out, return_sumsq=True, **kw)

        def gluon_layer():  # the Gluon GEMMs (RLHF_ENGINE_DECODE_GEMM_WS=1): the usual layer, silu * up in gate/up
            h, s = rms_norm(d, w["n1"], 1e-6, residual=x, backend="triton")
            attn_in = dg.decode_gemm_ws(h, w["qkv"], w["qkv_b"], pdl=True)[:, :Dq]
            h2, s2 = rms_norm(dg.decode_gemm_ws(attn_in, w["o"], pdl=True), w["n2"], 1e-6, residual=s,
                              backend="triton")
            return s2, dg.decode_gemm_ws(dg.decode_gemm_ws(h2, w["gu"], swiglu=True, pdl=True), w["down"], pdl=True)

        def cublas_swiglu():
            gate, up = F.linear(x, w["gu"]).chunk(2, dim=-1)
            return silu_mul(gate, up, backend="triton")

        gluon = dg.eligible(x, w["qkv"])  # an sm_90 GPU
        layer_bytes = sum(t.numel() * t.element_size() for t in (w["qkv"], w["o"], w["gu"], w["down"]))
        cases = [(p, "cuBLAS", wt, base) for p, (wt, base, _) in projections.items()]
        cases += [(p, "ours (split-K)", wt, ours) for p, (wt, _, ours) in projections.items()]
        cases += [("layer", "usual layer (7 kernels)", layer_bytes, usual),
                  ("layer", "ours: split-K layer (4 kernels)", layer_bytes, split_k),
                  ("layer", "ours: split-K layer (4 kernels), no PDL", layer_bytes, lambda: split_k(pdl=False))]
        if gluon:  # last: a hang here (a wrong barrier phase) loses no other row
            cases += [("gate/up + SwiGLU", "cuBLAS + silu*up kernel", w["gu"], cublas_swiglu),
                      ("gate/up + SwiGLU", "ours (Gluon, SwiGLU epilogue)", w["gu"],
                       lambda: dg.decode_gemm_ws(x, w["gu"], swiglu=True, pdl=True))]
            operands = {"q/k/v": (x, w["qkv"], w["qkv_b"]), "o": (y, w["o"], None), "gate/up": (x, w["gu"], None),
                        "down": (act, w["down"], None)}
            cases += [(p, "ours (Gluon, swap-AB)", args[1], (lambda a, b, c: lambda: dg.decode_gemm_ws(a, b, c, pdl=True))(*args))
                      for p, args in operands.items()]
            cases += [("layer", "ours: Gluon GEMM layer (6 kernels)", layer_bytes, gluon_layer),
                      ("layer", "ours: Gluon split-K layer (4 kernels)", layer_bytes,
                       lambda: split_k(backend="gluon")),
                      ("layer", "ours: Gluon split-K layer (4 kernels), no PDL", layer_bytes,
                       lambda: split_k(pdl=False, backend="gluon"))]
        if gluon and os.environ.get("RLHF_ENGINE_LM_HEAD_SAMPLE_BROKEN") not in ("1", "notrun"):  # ws_probe.py
            # --lm-head failed, or gpu_check.sh had no time to probe it
            # the LM head and the sampler: cuBLAS's logits then the Triton sampler, against the Gluon LM head with the
            # sampler in its epilogue (kernels/lm_head_sample.py: no logits written), the same draw
            lm_w = (torch.randn(vocab, H, device=dev) * H ** -0.5).to(dt)
            seed = torch.tensor([12345], device=dev)
            cases += [("LM head + sampling", "cuBLAS LM head + Triton sampler", lm_w,
                       lambda: sample_logits_forward(F.linear(x, lm_w), seed, 1.0, False)),
                      ("LM head + sampling", "ours (Gluon LM head, sampler in its epilogue)", lm_w,
                       lambda: lm_head_sample(x, lm_w, seed=seed, pdl=True))]
        base_ms, new = {}, []
        with torch.no_grad():
            for what, impl, wt, fn in cases:
                nbytes = wt if isinstance(wt, int) else wt.numel() * wt.element_size()
                try:
                    ms = bench(graphed(fn) if cuda else fn, **reps)
                except Exception as e:  # noqa: BLE001 - one row that cannot run is reported, not fatal
                    print(f"{model} {what} {impl} failed: {e!r}")
                    continue
                if impl.startswith(("cuBLAS", "usual")):
                    base_ms[what] = ms
                floor_us = nbytes / (COPY_TBPS * 1e12) * 1e6
                new.append({"op": "decode_gemm", "shape": f"{model} {what} M={B}", "impl": impl, "ms": ms,
                            "metric": "TB/s", "value": nbytes / ms / 1e9, "unit": "TB/s", "us": ms * 1e3,
                            "floor_ms": floor_us / 1e3, "vs_baseline": base_ms[what] / ms if what in base_ms
                            else float("nan")})
            record(new)  # model by model: a run cut short keeps what it measured
            rows += new
            # correctness: the split-K layer against the usual one (same math, other roundings)
            s_ref, d_ref = usual()
            want = (s_ref.float() + d_ref.float())
            got = split_k().out.float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            print(f"{model}: split-K layer vs usual layer, max rel err {err:.3g}"
                  + ("" if err < 2e-2 else "  MISMATCH"))
            if gluon:
                try:
                    s_g, d_g = gluon_layer()
                    err = ((s_g.float() + d_g.float() - want).abs().max() / want.abs().max()).item()
                    print(f"{model}: Gluon GEMM layer vs usual layer, max rel err {err:.3g}"
                          + ("" if err < 2e-2 else "  MISMATCH"))
                    got = split_k(backend="gluon").out.float()
                    err = ((got - want).abs().max() / want.abs().max()).item()
                    print(f"{model}: Gluon split-K layer vs usual layer, max rel err {err:.3g}"
                          + ("" if err < 2e-2 else "  MISMATCH"))
                except Exception as e:  # noqa: BLE001
                    print(f"{model}: Gluon layer check failed: {e!r}")
    from rlhf_engine.kernels import norm_linear as nl
    print("\n".join(autotune_report({"decode_linear": nl._decode_linear_kernel_tuned})))
    print_table(rows)
    print("vs_baseline = speedup over cuBLAS (projections) or over the usual layer's 7 kernels (layer), graph "
          f"replays, 10 back to back a sample; floor: weight bytes at {COPY_TBPS} TB/s")
    return rows


if __name__ == "__main__":
    main()
