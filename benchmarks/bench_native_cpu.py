"""Benchmark of the native ops (rlhf_engine._C): GAE and the fused PPO loss, B=256, T=1024, fp32.

CPU mode (default when there is no GPU): the C++ ops (OpenMP over rows) against the references
as users write them: the Python loop over reversed time for GAE (``gae_reference``, as TRL,
OpenRLHF and verl do) and the eager PyTorch PPO loss forward + backward (``ppo_loss_reference``).
GPU mode (``--device cuda``, the default when CUDA and the CUDA ops are there): the CUDA ops
against the same baselines on the GPU (../shared/BASELINES.md on an H100: 81.6 ms and 1.87 ms).

The PPO configuration is the baseline's: ratio clip + value clip + k3 KL in the loss + token-mean.
Bytes moved (the floor of these launch-bound ops): GAE reads r, V (4 B each) and the mask (1 B)
and writes A and G: 17 B/token. PPO fwd+bwd reads 7 fp32 inputs + the mask, writes and rereads the
logp / value gradients and writes the final ones: 45 B/token.

Run: python benchmarks/bench_native_cpu.py [--device cpu|cuda] [--threads N] [--rep N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CARD, COPY_TBPS, bench, print_table, record, smoke  # noqa: E402

from rlhf_engine.algo import gae_reference, ppo_loss_reference  # noqa: E402
from rlhf_engine.kernels import native  # noqa: E402

B, T = 256, 1024
GAE_BYTES_PER_TOKEN = 17
PPO_BYTES_PER_TOKEN = 45
H100_BASELINE_MS = {"gae": 81.6, "ppo_loss_fwd_bwd": 1.87}  # ../shared/BASELINES.md


def _inputs(device: str):
    g = torch.Generator().manual_seed(0)
    rn = lambda: torch.randn(B, T, generator=g)  # noqa: E731
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # right padding
    logp = -rn().abs()
    values = rn()
    d = dict(rewards=rn() * 0.1, values=values, last_value=rn()[:, 0], mask=mask, logp=logp,
             old_logp=logp + 0.2 * rn(), advantages=rn(), old_values=values + 0.2 * rn(), returns=rn(),
             ref_logp=logp + 0.3 * rn())
    return {k: v.to(device) for k, v in d.items()}


def _rows(device: str, rep: int) -> list[dict]:
    x = _inputs(device)
    shape = f"B={B},T={T},fp32"
    tokens = B * T
    rows = []
    cuda = device == "cuda"  # CPU ops on a GPU machine are timed by the wall clock, not by CUDA events

    # GAE (forward, no grad: advantages are computed from detached rollout data).
    def gae_ref():
        return gae_reference(x["rewards"], x["values"], x["mask"], gamma=1.0, lam=0.95, last_value=x["last_value"])

    def gae_native():
        return native.gae(x["rewards"], x["values"], x["mask"], x["last_value"], gamma=1.0, lam=0.95)

    with torch.no_grad():
        torch.testing.assert_close(gae_native(), gae_ref(), rtol=1e-4, atol=1e-4)
        ms_ref = bench(gae_ref, warmup=1, rep=max(3, rep // 4), cuda=cuda)
        ms_nat = bench(gae_native, warmup=3, rep=rep, cuda=cuda)
    impl = "C++ (OpenMP)" if device == "cpu" else "CUDA (block scan)"
    rows.append(dict(op="gae", shape=shape, impl="python loop (gae_reference)", ms=ms_ref, vs_baseline=1.0))
    rows.append(dict(op="gae", shape=shape, impl=impl, ms=ms_nat, metric="bandwidth",
                     value=tokens * GAE_BYTES_PER_TOKEN / ms_nat / 1e6, unit="GB/s", vs_baseline=ms_ref / ms_nat))

    # PPO loss forward + backward.
    logp = x["logp"].clone().requires_grad_()
    values = x["values"].clone().requires_grad_()
    kw = dict(values=values, old_values=x["old_values"], returns=x["returns"], ref_logp=x["ref_logp"],
              clip_low=0.2, value_clip=0.2, kl_coef=0.05, kl_kind="k3", agg="token-mean")

    def step(fn):
        def run():
            loss, _ = fn(logp, x["old_logp"], x["advantages"], x["mask"], **kw)
            torch.autograd.grad(loss, (logp, values))  # as bench_ppo_loss: no .grad accumulation in the timing
        return run

    ms_ref = bench(step(ppo_loss_reference), warmup=2, rep=rep, cuda=cuda)
    ms_nat = bench(step(native.ppo_loss), warmup=3, rep=rep, cuda=cuda)
    impl = "C++ fused (OpenMP)" if device == "cpu" else "CUDA fused (2+1 launches)"
    rows.append(dict(op="ppo_loss_fwd_bwd", shape=shape, impl="eager (ppo_loss_reference)", ms=ms_ref,
                     vs_baseline=1.0))
    rows.append(dict(op="ppo_loss_fwd_bwd", shape=shape, impl=impl, ms=ms_nat, metric="bandwidth",
                     value=tokens * PPO_BYTES_PER_TOKEN / ms_nat / 1e6, unit="GB/s", vs_baseline=ms_ref / ms_nat))

    def with_grads():  # the loss and its gradients from one native call, no autograd node
        return native.ppo_loss_with_grads(logp, x["old_logp"], x["advantages"], x["mask"], **kw)[2]

    ms_wg = bench(with_grads, warmup=3, rep=rep, cuda=cuda)
    impl = "C++ loss + grads (ppo_loss_with_grads)" if device == "cpu" else "CUDA loss + grads, 2 launches"
    rows.append(dict(op="ppo_loss_fwd_bwd", shape=shape, impl=impl, ms=ms_wg, metric="bandwidth",
                     value=tokens * PPO_BYTES_PER_TOKEN / ms_wg / 1e6, unit="GB/s", vs_baseline=ms_ref / ms_wg))
    if device == "cuda":
        for op, bytes_per_token in (("gae", GAE_BYTES_PER_TOKEN), ("ppo_loss_fwd_bwd", PPO_BYTES_PER_TOKEN)):
            floor_ms = tokens * bytes_per_token / (COPY_TBPS * 1e9)
            rows.append(dict(op=op, shape=shape, impl=f"floor (bytes at {CARD} copy bandwidth)", ms=floor_ms))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when usable, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads on the CPU (default: torch's)")
    p.add_argument("--rep", type=int, default=20)
    args = p.parse_args(argv)
    if smoke():
        args.rep = 2
    if not native.available():
        print("rlhf_engine._C is not built: run `pip install -e . --no-build-isolation`; nothing to benchmark")
        return []
    device = args.device or ("cuda" if torch.cuda.is_available() and native.cuda_available() else "cpu")
    if device == "cuda" and not (torch.cuda.is_available() and native.cuda_available()):
        print("CUDA benchmark requested but CUDA or the CUDA ops are not available; nothing to benchmark")
        return []
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"device={device}  threads={torch.get_num_threads()}  openmp={native._C.with_openmp}")
    rows = _rows(device, args.rep)
    print_table(rows)
    if device == "cuda":
        print("H100 baselines from ../shared/BASELINES.md (other run): "
              + ", ".join(f"{k} {v} ms" for k, v in H100_BASELINE_MS.items()))
    record(rows)
    return rows


if __name__ == "__main__":
    main()
