"""First launch of the warp-specialized Gluon attention kernels (kernels/attention_{fwd,bwd}_ws.py) on a GPU, guarded.

No interpreter runs Gluon, so a GPU run is the first place where this kernel executes, and a wrong barrier phase
would hang it rather than fail. ``gpu_check.sh`` runs this script under a timeout before the benchmarks and the
tests: it launches the forward and the backward on the shapes of the tests and compares them with the Triton
kernels. If it hangs, crashes or
disagrees, gpu_check sets RLHF_ENGINE_ATTN_WS_BROKEN=1 for the rest of the run: the benchmark drops its
warp-specialized rows and the GPU tests of the kernel fail at once with that reason instead of hanging.
Two runs, each under its own timeout: ``--simple`` (the forward without FA3's intra-warpgroup overlap, and the
backward) and ``--pipelined`` (the forward's default, with it). gpu_check sets RLHF_ENGINE_ATTN_WS_BROKEN=1 when
the first fails, RLHF_ENGINE_ATTN_WS_PIPELINE_BROKEN=1 (the forward then runs without the overlap, and the
benchmark drops the overlap's rows) when only the second does.
Run: python benchmarks/ws_probe.py --simple | --pipelined   (exit 0: agrees; 1: disagrees; 2: not runnable here)
"""
from __future__ import annotations

import os
import sys

import torch


def main(pipelined: bool) -> int:
    os.environ["RLHF_ENGINE_ATTN_WS_PIPELINE"] = "1" if pipelined else "0"
    os.environ.setdefault("RLHF_ENGINE_AUTOTUNE", "0")  # the Triton references on fixed tiles: no autotuning here
    from rlhf_engine.kernels.attention import kv_range_from_lengths
    from rlhf_engine.kernels.attention_bwd import attention_backward
    from rlhf_engine.kernels.attention_bwd_ws import ws_backward
    from rlhf_engine.kernels.attention_fwd import attention_forward
    from rlhf_engine.kernels.attention_fwd_ws import attention_forward_ws, ws_eligible

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("ws_probe: needs an sm_90 GPU; not run")
        return 2
    ok = True
    # every shape of tests/test_attention_ws.py (a hang there would stall the GPU tests), then a shape where left
    # padding puts the second sequence's first key at 101: both consumers of the dK/dV kernel's first key pair skip
    # a query block (a slot both release unread)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from test_attention_ws import GPU_CASES
    from tiny import key_ranges

    for B, T, Hq, Hkv, D, causal, pad in [(1, 64, 2, 1, 64, True, "none"), *GPU_CASES,
                                          (2, 200, 14, 2, 64, True, "left-skip")]:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
        if pad == "left-skip":
            lens = torch.tensor([T - 1 - 100 * i for i in range(B)])
            ks, ke = (t.cuda() for t in kv_range_from_lengths(lens, T, padding_side="left"))
        else:
            ks, ke = key_ranges(pad, B, T, "cuda")
        if not ws_eligible(q, k, v):
            print(f"ws_probe: B={B} T={T} {Hq}/{Hkv} D={D}: not eligible")
            return 2
        o, lse = attention_forward_ws(q, k, v, causal=causal, kv_start=ks, kv_end=ke, softmax_scale=D ** -0.5)
        torch.cuda.synchronize()
        o_t, lse_t = attention_forward(q, k, v, causal=causal, kv_start=ks, kv_end=ke, softmax_scale=D ** -0.5)
        err = (o.float() - o_t.float()).abs().max().item()
        fin = torch.isfinite(lse_t)
        lerr = (lse[fin] - lse_t[fin]).abs().max().item() if fin.any() else 0.0
        same_empty = torch.equal(torch.isinf(lse), torch.isinf(lse_t))
        good = err < 2e-2 and lerr < 1e-2 and same_empty and not torch.isnan(o).any()
        ok &= good
        print(f"ws_probe: forward ({'pipelined' if pipelined else 'simple'}) B={B} T={T} Hq/Hkv={Hq}/{Hkv} D={D} "
              f"causal={causal} padding={pad}: max |o - triton| {err:.3g}, max |lse - triton| {lerr:.3g}, same "
              f"empty rows {same_empty}: {'ok' if good else 'WRONG'}", flush=True)
        if pipelined:  # the backward has no variant: checked by the --simple run
            continue
        do = torch.randn_like(q)
        grads_t = attention_backward(do, q, k, v, o_t, lse_t, causal=causal, kv_start=ks, kv_end=ke,
                                     softmax_scale=D ** -0.5, dq_mode="split")
        delta = (do.float() * o_t.float()).sum(-1).transpose(1, 2).contiguous()
        grads = [torch.empty_like(t) for t in (q, k, v)]
        ws_backward(do, q, k, v, lse_t, delta, *grads, causal=causal, kv_start=ks, kv_end=ke, softmax_scale=D ** -0.5)
        torch.cuda.synchronize()
        errs = [((g.float() - gt.float()).abs().max() / gt.float().abs().max().clamp(min=1e-6)).item()
                for g, gt in zip(grads, grads_t)]
        good = all(e < 2e-2 for e in errs)  # NaN fails too
        ok &= good
        print(f"ws_probe: backward, the same shape: max relative |d{{q,k,v}} - triton| "
              f"{', '.join(f'{e:.3g}' for e in errs)}: {'ok' if good else 'WRONG'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("--simple", "--pipelined"):
        sys.exit("usage: python benchmarks/ws_probe.py --simple | --pipelined")
    sys.exit(main(sys.argv[1] == "--pipelined"))
