"""GAE: the Python loop over reversed time (as TRL / OpenRLHF / verl write it; ``gae_reference``)
vs the Triton scan kernel (and the native CUDA op when it is built).

Shape B=256, T=1024, fp32, "zero" mask mode with a bootstrap value (the TRL layout).
Floor: the kernel reads rewards, values (4 B each) and the bool mask (1 B), and writes advantages
and returns (4 B each): 17 B/token x 262,144 tokens = 4.5 MB, 1.5 us at 3.0 TB/s; one kernel
launch costs ~5 us, so the real floor is one launch. Target: >= 1000x the loop (81.6 ms on H100).

    python benchmarks/bench_gae.py                 # needs CUDA; exits cleanly without it
    python benchmarks/bench_gae.py --cpu-tiny      # tiny shape under the Triton interpreter (smoke run)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _inputs(B, T, device):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    r = torch.randn(B, T, generator=g).to(device)
    v = torch.randn(B, T, generator=g).to(device)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)   # right padding
    lv = torch.randn(B, generator=g).to(device)
    return r, v, mask, lv


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--cpu-tiny", action="store_true", help="no CUDA: time B=4, T=64 under the Triton interpreter")
    args = p.parse_args(argv)

    import torch
    if os.environ.get("RLHF_BENCH_SMOKE", "") == "1":  # run_all.py --smoke (common.smoke(); triton not yet imported)
        args.cpu_tiny = True
    if not torch.cuda.is_available():
        if not args.cpu_tiny:
            print("bench_gae: CUDA is not available; nothing to measure (use --cpu-tiny for an interpreter smoke run)")
            return []
        os.environ["TRITON_INTERPRET"] = "1"   # before triton is first imported (the kernels import it)
        args.B, args.T = 4, 64

    from common import COPY_TBPS, bench, kernel_ms, peak_mem_mb, print_table, record

    from rlhf_engine.algo import gae_reference
    from rlhf_engine.kernels.gae import gae_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, T = args.B, args.T
    r, v, mask, lv = _inputs(B, T, device)
    shape = f"B={B},T={T},fp32"
    nbytes = B * T * (4 + 4 + 1 + 4 + 4)
    rep_loop = 5 if device == "cpu" else 20
    w_ours, rep_ours = (1, 3) if device == "cpu" else (10, 100)  # the interpreter: ~0.1 s per call

    impls = {
        "python loop (gae_reference)": lambda: gae_reference(r, v, mask, gamma=0.99, lam=0.95, last_value=lv),
        "ours triton (gae_triton)": lambda: gae_triton(r, v, mask, lv, gamma=0.99, lam=0.95, carry=False),
        "ours triton, carry mode": lambda: gae_triton(r, v, mask, lv, gamma=0.99, lam=0.95, carry=True),
    }
    try:
        from rlhf_engine.kernels import native

        if device == "cuda" and native.cuda_available():
            impls["ours native CUDA (kernels.native.gae)"] = lambda: native.gae(r, v, mask, lv, gamma=0.99,
                                                                                lam=0.95, carry=False)
    except Exception as e:  # noqa: BLE001 - the native op is optional (another build target)
        print(f"bench_gae: native op not measured ({type(e).__name__}: {e})")

    # correctness first: the fast paths must agree with the loop
    ref_adv, _ = impls["python loop (gae_reference)"]()
    for name, fn in impls.items():
        err = (fn()[0] - ref_adv).abs().max().item() if "carry" not in name else 0.0
        assert err < 1e-3, f"{name} disagrees with the loop: max err {err}"

    def row(op, name, ms, nbytes_op, base_ms, peak):
        return dict(op=op, shape=shape, impl=name, ms=ms, metric="bandwidth", value=nbytes_op / (ms * 1e-3) / 1e9,
                    unit="GB/s", peak_mb=peak, vs_baseline=base_ms / ms)

    rows = []
    base_ms = None
    with torch.no_grad():
        for name, fn in impls.items():
            is_loop = name.startswith("python")
            ms = bench(fn, warmup=1 if is_loop else w_ours, rep=rep_loop if is_loop else rep_ours)
            base_ms = ms if is_loop else base_ms
            rows.append(row("gae", name, ms, nbytes, base_ms, peak_mem_mb(fn)) | {"kernel_ms": kernel_ms(fn)})
    floor_ms = max(nbytes / (COPY_TBPS * 1e12) * 1e3, 0.005)
    rows.append(row("gae", f"floor (max(bytes / {COPY_TBPS} TB/s, one launch 5 us))", floor_ms, nbytes, base_ms,
                    float("nan")))

    # forward + backward w.r.t. rewards, values, last_value: the loop through autograd vs the Triton op
    # (its backward is one more scan launch reading d adv, d ret, mask and writing d r, d v: 17 B/token more)
    x = [t.clone().requires_grad_() for t in (r, v, lv)]
    ones = torch.ones_like(r)

    def fwd_bwd(fn):
        def run():
            adv, ret = fn()
            return torch.autograd.grad((adv, ret), x, (ones, ones))
        return run

    fb = {
        "python loop + autograd (gae_reference)": fwd_bwd(lambda: gae_reference(
            x[0], x[1], mask, gamma=0.99, lam=0.95, last_value=x[2])),
        "ours triton (gae_triton)": fwd_bwd(lambda: gae_triton(x[0], x[1], mask, x[2], gamma=0.99, lam=0.95)),
    }
    base_ms = None
    for name, fn in fb.items():
        is_loop = name.startswith("python")
        ms = bench(fn, warmup=1 if is_loop else w_ours, rep=max(3, rep_loop // 4) if is_loop else rep_ours)
        base_ms = ms if is_loop else base_ms
        rows.append(row("gae fwd+bwd", name, ms, 2 * nbytes, base_ms, peak_mem_mb(fn)) | {"kernel_ms": kernel_ms(fn)})
    floor_ms = max(2 * nbytes / (COPY_TBPS * 1e12) * 1e3, 0.010)
    rows.append(row("gae fwd+bwd", f"floor (max(bytes / {COPY_TBPS} TB/s, two launches 10 us))", floor_ms,
                    2 * nbytes, base_ms, float("nan")))

    if device == "cpu":
        print("bench_gae: Triton interpreter timings (CPU smoke run): not comparable to GPU numbers")
    print_table(rows)
    if device == "cuda":
        record(rows)
    return rows


if __name__ == "__main__":
    main()
