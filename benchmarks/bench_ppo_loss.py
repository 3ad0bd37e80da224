"""PPO loss forward + backward: eager PyTorch (``ppo_loss_reference``) vs the fused Triton kernels
(and the native CUDA op when it is built).

Shape B=256, T=1024, fp32: clipped surrogate + clipped value loss (eps_v 0.2) + k3 KL in the loss
(kl_coef 0.1) + token-mean; gradients w.r.t. logp and values.
Floor: read logp, old_logp, advantages, values, old_values, returns, ref_logp (4 B each) and the
bool mask (1 B), write d logp and d values (4 B each): 37 B/token x 262,144 = 9.7 MB, 3.2 us at
3.0 TB/s; the real floor is one or two launches (~5 us each). Target: >= 20x eager (1.87 ms on H100).

    python benchmarks/bench_ppo_loss.py             # needs CUDA; exits cleanly without it
    python benchmarks/bench_ppo_loss.py --cpu-tiny  # tiny shape under the Triton interpreter (smoke run)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

KW = dict(value_clip=0.2, vf_coef=0.5, kl_coef=0.1, kl_kind="k3", agg="token-mean")


def _inputs(B, T, device):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    n = lambda: torch.randn(B, T, generator=g)  # noqa: E731
    logp = -torch.rand(B, T, generator=g) * 3
    values = n()
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    t = dict(logp=logp, old_logp=logp + 0.1 * n(), advantages=n(),
             mask=torch.arange(T)[None, :] < lengths[:, None], values=values, old_values=values + 0.1 * n(),
             returns=n(), ref_logp=logp + 0.1 * n())
    return {k: v.to(device) for k, v in t.items()}


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
            print("bench_ppo_loss: CUDA is not available; nothing to measure (use --cpu-tiny for an interpreter "
                  "smoke run)")
            return []
        os.environ["TRITON_INTERPRET"] = "1"   # before triton is first imported (the kernels import it)
        args.B, args.T = 4, 64

    from common import COPY_TBPS, bench, kernel_ms, peak_mem_mb, print_table, record

    from rlhf_engine.algo import ppo_loss_reference
    from rlhf_engine.kernels import _fastlaunch as fastlaunch
    from rlhf_engine.kernels.ppo_loss import ppo_loss_triton, ppo_loss_with_grads

    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, T = args.B, args.T
    t = _inputs(B, T, device)
    logp = t.pop("logp").requires_grad_()
    values = t.pop("values").requires_grad_()
    shape = f"B={B},T={T},fp32"
    nbytes = B * T * (7 * 4 + 1 + 2 * 4)
    gbps = lambda ms: nbytes / (ms * 1e-3) / 1e9  # noqa: E731

    def fwd_bwd(fn):
        def run():
            loss, _ = fn(logp, t["old_logp"], t["advantages"], t["mask"], values=values,
                         old_values=t["old_values"], returns=t["returns"], ref_logp=t["ref_logp"], **KW)
            return torch.autograd.grad(loss, (logp, values))
        return run

    def fused():  # loss + gradients, two launches, no autograd node: the gradients are the output
        _, _, g = ppo_loss_with_grads(logp, t["old_logp"], t["advantages"], t["mask"], values=values,
                                      old_values=t["old_values"], returns=t["returns"], ref_logp=t["ref_logp"], **KW)
        return g["logp"], g["values"]

    def fused_triton_launch():  # A/B: the same call through Triton's own launch path (kernels/_fastlaunch.py off)
        fastlaunch.set_enabled(False)
        try:
            return fused()
        finally:
            fastlaunch.set_enabled(True)

    impls = {"eager PyTorch (ppo_loss_reference)": fwd_bwd(ppo_loss_reference),
             "ours triton (ppo_loss_triton)": fwd_bwd(ppo_loss_triton),
             "ours triton, loss + grads in 2 launches (ppo_loss_with_grads)": fused}
    if fastlaunch.enabled():  # else (RLHF_ENGINE_FAST_LAUNCH=0, e.g. gpu_check.sh's check failed) the row above is it
        impls["ours triton, ppo_loss_with_grads through Triton's own launch path"] = fused_triton_launch
    try:
        from rlhf_engine.kernels import native

        if device == "cuda" and native.cuda_available():
            impls["ours native CUDA (kernels.native.ppo_loss)"] = fwd_bwd(native.ppo_loss)

            def native_fused():  # both launches from one C++ call; hyperparameters checked once, cached
                _, _, g = native.ppo_loss_with_grads(logp, t["old_logp"], t["advantages"], t["mask"], values=values,
                                                     old_values=t["old_values"], returns=t["returns"],
                                                     ref_logp=t["ref_logp"], **KW)
                return g["logp"], g["values"]

            impls["ours native CUDA, loss + grads in 2 launches (native.ppo_loss_with_grads)"] = native_fused
    except Exception as e:  # noqa: BLE001 - the native op is optional (another build target)
        print(f"bench_ppo_loss: native op not measured ({type(e).__name__}: {e})")

    # correctness first: the fused gradients must match eager autograd
    ref = impls["eager PyTorch (ppo_loss_reference)"]()
    for name in list(impls)[1:]:
        for a, b, what in zip(impls[name](), ref, ("d logp", "d values")):
            err = ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
            assert err < 1e-4, f"{name}: {what} disagrees with eager: relative err {err}"

    rows = []
    base_ms = None
    for name, fn in impls.items():
        ms = bench(fn, warmup=10, rep=100 if device == "cuda" else 5)
        base_ms = ms if base_ms is None else base_ms
        rows.append(dict(op="ppo_loss fwd+bwd", shape=shape, impl=name, ms=ms, metric="bandwidth", value=gbps(ms),
                         unit="GB/s", peak_mb=peak_mem_mb(fn), vs_baseline=base_ms / ms, kernel_ms=kernel_ms(fn)))
    floor_ms = max(nbytes / (COPY_TBPS * 1e12) * 1e3, 0.005)
    rows.append(dict(op="ppo_loss fwd+bwd", shape=shape, impl=f"floor (max(bytes / {COPY_TBPS} TB/s, one launch 5 us))",
                     ms=floor_ms, metric="bandwidth", value=gbps(floor_ms), unit="GB/s", peak_mb=float("nan"),
                     vs_baseline=base_ms / floor_ms))
    if device == "cpu":
        print("bench_ppo_loss: Triton interpreter timings (CPU smoke run): not comparable to GPU numbers")
    print_table(rows)
    if device == "cuda":
        record(rows)
    return rows


if __name__ == "__main__":
    main()
