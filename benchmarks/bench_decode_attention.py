"""Decode attention (1 new token over a full KV cache), bf16: ours (split-KV) vs SDPA.

Bytes: the kernel must read the whole K and V cache once: 2 * B * L * Hkv * D * 2 bytes
(B=64, L=2048, Hkv=2, D=64: 67.1 MB -> 22.4 us at the 3.0 TB/s copy ceiling of an H100); q and o are negligible.
Reported: microseconds per call and TB/s of KV read, eager and replayed from a CUDA graph (launch overhead removed;
that is how a decode step runs in the generation engine).
Run: python benchmarks/bench_decode_attention.py   (needs a CUDA device; exits with a message otherwise;
RLHF_BENCH_SMOKE=1 TRITON_INTERPRET=1 runs it on a tiny fp32 shape on the CPU, without the CUDA graph)
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (COPY_TBPS, autotune_report, bench, device, graphed, peak_mem_mb, print_table,  # noqa: E402
                    record, smoke)

from rlhf_engine.kernels.decode_attention import decode_attention, default_num_splits  # noqa: E402
from rlhf_engine.kernels.kv_cache import write_kv_cache  # noqa: E402
from rlhf_engine.kernels.reference.attention import apply_rope_reference  # noqa: E402

SHAPES = [  # (B, Hq, Hkv, L, D)
    (64, 14, 2, 2048, 64),
    (64, 32, 8, 2048, 128),
]
SMOKE_SHAPES = [(2, 6, 2, 300, 16)]


def main() -> list[dict]:
    if not torch.cuda.is_available() and not smoke():
        print("bench_decode_attention: needs a CUDA device; skipped.")
        return []
    dev = torch.device(device())
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32  # the interpreter's bf16 tl.dot is wrong
    reps = dict(warmup=1, rep=2) if smoke() else dict(warmup=10, rep=100)
    rows = []
    for B, Hq, Hkv, L, D in SMOKE_SHAPES if smoke() else SHAPES:
        shape = f"B={B} Hq={Hq} Hkv={Hkv} L={L} D={D} Tn=1"
        kv_bytes = 2 * B * L * Hkv * D * 2
        q = torch.randn(B, 1, Hq, D, device=dev, dtype=dt)
        k = torch.randn(B, L, Hkv, D, device=dev, dtype=dt)  # our cache layout (B, L, Hkv, D)
        v = torch.randn(B, L, Hkv, D, device=dev, dtype=dt)
        lens = torch.full((B,), L, device=dev, dtype=torch.int32)
        qh = q.transpose(1, 2).contiguous()  # SDPA layout (B, H, T, D)
        kh = k.transpose(1, 2).contiguous()
        vh = v.transpose(1, 2).contiguous()
        impls = {"sdpa": lambda: F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True)}
        default = default_num_splits(B, Hkv, L, dev)
        impls[f"ours (splits={default})"] = lambda: decode_attention(q, k, v, lens, backend="triton")  # default splits
        # the other side of the split rule: one split when the default splits, else the nearest alternative, 2
        # (a235d55 measured 1 split faster than 5 at 128 and than 2 at 512 (sequence, KV head) programs)
        other = 1 if default > 1 else 2
        impls[f"ours_other_split (splits={other})"] = (
            lambda: decode_attention(q, k, v, lens, num_splits=other, backend="triton"))
        # the model's decode step: q rotated (RoPE) inside the kernel as it is loaded
        ang = torch.rand(B, 1, D // 2, device=dev) * 6.28
        cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)  # (B, 1, D)
        rope_name = f"ours + q RoPE (splits={default})"
        impls[rope_name] = lambda: decode_attention(q, k, v, lens, q_cos=cos, q_sin=sin, backend="triton")
        # the model's whole decode-step attention: the new token's cache write (K rotated) + the attention, as two
        # launches and as one (kv_write, one split). The token written is the cache's own last one (K un-rotated
        # first), so every variant still computes SDPA's output (up to one rounding of that key).
        k_last = apply_rope_reference(k[:, -1:], cos[:, :, None], -sin[:, :, None]).to(dt)  # rope^-1
        new_kv = (k_last, v[:, -1:].clone(), lens - 1)
        rope_rows = torch.arange(B, device=dev, dtype=torch.int32)
        half = (cos[..., : D // 2].reshape(B, -1), sin[..., : D // 2].reshape(B, -1))

        def write_then_attend():
            write_kv_cache(k, v, *new_kv, cos=half[0], sin=half[1], rope_positions=rope_rows, backend="triton")
            return decode_attention(q, k, v, lens, q_cos=cos, q_sin=sin, num_splits=1, backend="triton")

        write_names = ("ours + q RoPE + cache write, 2 launches (splits=1)",
                       "ours + q RoPE + cache write fused, 1 launch (splits=1)",
                       "ours + q RoPE + cache write fused, 1 launch (splits=2, combined in the kernel)",
                       "ours + q RoPE + cache write fused, 1 launch (splits=4, combined in the kernel)")
        impls[write_names[0]] = write_then_attend
        for name, splits in zip(write_names[1:], (1, 2, 4)):  # since the fifteenth session: splits in one launch
            impls[name] = (lambda n=splits: decode_attention(q, k, v, lens, q_cos=cos, q_sin=sin, num_splits=n,
                                                             kv_write=new_kv, backend="triton"))
        # the same as a programmatic dependent launch (decode_attention(pdl=True), the split-K decode path's; Hopper
        # only): alone in its graph it has no kernel before it to overlap, so this row prices the launch's wait
        pdl_name = "ours + q RoPE + cache write fused, 1 launch (splits=1), PDL"
        write_names += (pdl_name,)
        impls[pdl_name] = lambda: decode_attention(q, k, v, lens, q_cos=cos, q_sin=sin, num_splits=1,
                                                   kv_write=new_kv, backend="triton", pdl=True)
        with torch.no_grad():  # correctness first: every variant against SDPA
            want = impls["sdpa"]().transpose(1, 2).float()
            q_rot = apply_rope_reference(q, cos[:, :, None], sin[:, :, None]).transpose(1, 2).contiguous()
            want_rope = F.scaled_dot_product_attention(q_rot, kh, vh, enable_gqa=True).transpose(1, 2).float()
            bad = {}
            for name, fn in impls.items():
                ref = want_rope if name == rope_name or name in write_names else want
                err = ((fn().float() - ref).abs().max() / ref.abs().max()).item() if name != "sdpa" else 0.0
                if not err < 2e-2:  # NaN fails too
                    bad[name] = f" (MISMATCH vs SDPA: rel err {err:.2g})"
                    print(f"WARNING: {name}{bad[name]}")
        base = {}  # SDPA's time per mode: each row is compared with SDPA run the same way
        for name, fn in impls.items():
            with torch.no_grad():
                modes = (("eager", fn), ("graph", graphed(fn))) if dev.type == "cuda" else (("eager", fn),)
                for mode, run in modes:
                    # 10 calls per timed sample, as in a decode loop: a lone ~20 µs call would also time its own
                    # launch latency (5-10 µs for a graph replay), for SDPA and ours alike
                    ms = bench(run, **reps, inner=1 if smoke() else 10)
                    if name == "sdpa":
                        base[mode] = ms
                    impl = f"{name} [{mode}]{bad.get(name, '')}"
                    rows.append({"op": "decode_attention", "shape": shape, "impl": impl, "ms": ms, "mode": mode,
                                 "metric": "TB/s", "value": kv_bytes / ms / 1e9, "unit": "TB/s",
                                 # a replay allocates nothing: its peak says nothing (the graph's pool is static)
                                 "peak_mb": peak_mem_mb(run) if mode == "eager" else float("nan"),
                                 "us": ms * 1e3})
        floor_us = kv_bytes / (COPY_TBPS * 1e12) * 1e6
        rows.append({"op": "decode_attention", "shape": shape, "impl": "floor", "ms": floor_us / 1e3,
                     "metric": "TB/s", "value": COPY_TBPS, "unit": "TB/s", "us": floor_us})
        for r in rows:
            if r["shape"] == shape:
                r["vs_baseline"] = base.get(r.get("mode", "eager"), base["eager"]) / r["ms"]
        print(f"{shape}: KV {kv_bytes / 1e6:.1f} MB, floor {floor_us:.1f} us at {COPY_TBPS} TB/s")
    from rlhf_engine.kernels import decode_attention as da
    print("\n".join(autotune_report({"decode_split": da._decode_split_kernel_tuned})))
    print_table(rows)
    print("vs_baseline = speedup over SDPA (enable_gqa=True) run the same way (eager or graph); medians of 10 "
          "back-to-back calls per sample; target >= 2.4 TB/s of KV read.")
    record(rows)
    return rows


if __name__ == "__main__":
    main()
