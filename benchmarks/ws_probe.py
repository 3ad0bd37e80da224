"""First launch of the Gluon kernels on a GPU, guarded: the warp-specialized attention
(kernels/attention_{fwd,bwd}_ws.py) and the decode GEMM (kernels/decode_gemm_ws.py, ``--gemm``).

No interpreter runs Gluon, so a GPU run is the first place where these kernels execute, and a wrong barrier phase
would hang them rather than fail. ``gpu_check.sh`` runs this script under a timeout before the benchmarks and the
tests. It launches the forward and the backward once for each specialization the GPU tests compile (head dim,
causal, key ranges; small shapes, one of them the left-padding case where both dK/dV consumers skip a block) and
compares them with the PyTorch reference in fp32 on the same device: no Triton kernel is compiled here, so the
time goes to the Gluon compiles (a few seconds each) and a timeout means a hang or a very slow compile. Each launch
prints a flushed "launching" line first: ``ws_probe.txt`` shows where a hang stopped.
Two runs, each under its own timeout: ``--simple`` (the forward without FA3's intra-warpgroup overlap, and the
backward) and ``--pipelined`` (the forward's default, with it). gpu_check sets RLHF_ENGINE_ATTN_WS_BROKEN=1 when
the first fails, RLHF_ENGINE_ATTN_WS_PIPELINE_BROKEN=1 (the forward then runs without the overlap, and the
benchmark drops the overlap's rows) when only the second does.
``--pingpong`` (after ``--pipelined`` passed, and after ``--atomic``): FA3's ping-pong between the consumers
(``RLHF_ENGINE_ATTN_WS_PINGPONG=1``): the pipelined forward (also with Tq != Tk), and the backward in both dQ forms
(the atomic one only if ``--atomic`` passed); gpu_check sets RLHF_ENGINE_ATTN_WS_PINGPONG_BROKEN=1 when it fails.
``--atomic``: the backward's atomic-dQ form (5 products) on the same shapes; gpu_check sets
RLHF_ENGINE_ATTN_WS_ATOMIC_BROKEN=1 when it fails (dq_mode="atomic" then stays on the Triton kernels).
``--gemm``: the decode GEMM on Qwen2-0.5B's four projections at batch 64 (split-K on o and down, the SwiGLU epilogue
on gate/up) and at 1 and 100 rows, against the fp32 product; gpu_check sets RLHF_ENGINE_DECODE_GEMM_WS_BROKEN=1
(the kernel is then never eligible) when it fails. The tests (``tests/test_gluon_emu.py`` and the files it names) run
all these kernels' own code on the CPU first, through an emulator that reports hangs as deadlocks.
``--lm-head`` (after ``--gemm`` passed): the LM head with the sampler in its epilogue against the Triton sampler;
gpu_check sets RLHF_ENGINE_LM_HEAD_SAMPLE_BROKEN=1 when it fails (generate then draws from the logits).
Run: python benchmarks/ws_probe.py --simple | --pipelined | --pingpong | --atomic | --gemm | --lm-head
Exit: 0 agrees; 1 disagrees; 2 no sm_90 device (not run); 3 an sm_90 device on which the kernels are not eligible
(e.g. no Gluon in this Triton): a failure too; 4 an exception (a compile error, a failed launch: its traceback).
"""
from __future__ import annotations

import os
import sys
import traceback

import torch

# (B, T, Hq, Hkv, D, causal, padding): one shape per specialization the GPU tests compile, and the skip case
SHAPES = [(1, 64, 2, 1, 64, True, "none"), (2, 200, 14, 2, 64, True, "left-skip"), (3, 97, 9, 3, 64, False, "left"),
          (2, 130, 4, 4, 128, True, "none"), (2, 257, 8, 8, 128, True, "right"), (2, 70, 4, 4, 128, False, "right")]


# --pingpong only, (B, Tq, Tk, Hq, Hkv, D): causal with Tq != Tk, the shapes in which a program's two tiles own
# different block counts (tile 0 passes tile 1's extra turns); the same specializations as the causal shapes above
PINGPONG_SHAPES = [(2, 200, 264, 4, 2, 64), (2, 300, 70, 4, 2, 128)]


def _ranges(pad: str, B: int, T: int):
    from rlhf_engine.kernels.attention import kv_range_from_lengths

    if pad == "none":
        return None, None
    # left-skip: the second sequence's first key is 101, where both consumers of the dK/dV kernel's first key pair
    # skip a query block (a slot both release unread); the others: odd lengths, the last one empty when B > 2
    lens = torch.tensor([T - 1 - (100 if pad == "left-skip" else 3) * i for i in range(B)])
    if B > 2:
        lens[-1] = 0
    side = "left" if pad.startswith("left") else "right"
    return [t.cuda() for t in kv_range_from_lengths(lens, T, padding_side=side)]


def gemm() -> int:
    os.environ.pop("RLHF_ENGINE_DECODE_GEMM_WS_BROKEN", None)
    from rlhf_engine.kernels import decode_gemm_ws as dg

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("ws_probe: needs an sm_90 GPU; not run")
        return 2
    ok = True
    # (M, N, K, bias, swiglu): Qwen2-0.5B's q/k/v, o, gate/up and down at batch 64; one row; 100 rows (two tiles)
    for M, N, K, bias, swiglu in [(64, 1152, 896, True, False), (64, 896, 896, False, False),
                                  (64, 4864, 896, False, True), (64, 896, 4864, False, False),
                                  (1, 896, 896, True, False), (100, 4864, 896, False, True)]:
        torch.manual_seed(0)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(2 * N if swiglu else N, K, device="cuda") * K ** -0.5).to(torch.bfloat16)
        b = torch.randn(N, device="cuda", dtype=torch.bfloat16) if bias else None
        if not dg.eligible(x, w):
            print(f"ws_probe: decode GEMM M={M} N={N} K={K}: not eligible on this sm_90 device")
            return 3
        print(f"ws_probe: launching the decode GEMM, M={M} N={N} K={K} bias={bias} swiglu={swiglu} "
              f"(tiles {dg.tiles(M, N, K, swiglu, torch.cuda.get_device_properties(0).multi_processor_count)})",
              flush=True)
        y = dg.decode_gemm_ws(x, w, b, swiglu=swiglu)
        torch.cuda.synchronize()
        ref = dg.decode_gemm_reference(x, w, b, swiglu=swiglu).float()
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        good = err < 2e-2  # the same fp32 product summed in another order, one bf16 rounding (NaN fails too)
        ok &= good
        print(f"ws_probe: decode GEMM: max relative |y - fp32 product| {err:.3g}: {'ok' if good else 'WRONG'}",
              flush=True)
    # the split-K layer's fusions: o + residual add + its rows' sums of squares, then norm (from them) + gate/up
    from rlhf_engine.kernels.norm_linear import decode_linear_reference

    torch.manual_seed(1)
    y, s = (torch.randn(100, 896, device="cuda", dtype=torch.bfloat16) for _ in range(2))  # 100 rows: two tiles
    wo = (torch.randn(896, 896, device="cuda") * 896 ** -0.5).to(torch.bfloat16)
    wgu = (torch.randn(2 * 4864, 896, device="cuda") * 896 ** -0.5).to(torch.bfloat16)
    g = (1 + 0.1 * torch.randn(896, device="cuda")).to(torch.bfloat16)
    for pdl in (False, True):  # the model's layers launch them with programmatic dependent launch (Hopper)
        print(f"ws_probe: launching the decode GEMM's fused forms (o + residual + sums of squares; norm + gate/up), "
              f"pdl={pdl}", flush=True)
        h, sq = dg.decode_gemm_ws(y, wo, out_residual=s, return_sumsq=True, pdl=pdl)
        act = dg.decode_gemm_ws(h, wgu, swiglu=True, norm_weight=g, eps=1e-6, row_sumsq=sq, pdl=pdl)
        torch.cuda.synchronize()
        h_ref = decode_linear_reference(y.float(), wo.float(), out_residual=s.float()).out
        act_ref = decode_linear_reference(h.float(), wgu.float(), norm_weight=g.float(), eps=1e-6, swiglu=True).out
        for name, got, ref in (("o + residual", h, h_ref), ("norm + gate/up", act, act_ref)):
            err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
            good = err < 2e-2
            ok &= good
            print(f"ws_probe: decode GEMM {name} (pdl={pdl}): max relative error {err:.3g}: "
                  f"{'ok' if good else 'WRONG'}", flush=True)
    return 0 if ok else 1


def lm_head() -> int:
    """The LM head with the sampler in its epilogue (kernels/lm_head_sample.py): Qwen2-0.5B's vocabulary at 64, 20
    and 1 rows (the 64-, 32- and 16-token tiles), sampled and greedy, with and without PDL, against the Triton
    sampler on the logits the same GEMM writes (the same uniforms: the same tokens)."""
    os.environ.pop("RLHF_ENGINE_LM_HEAD_SAMPLE_BROKEN", None)
    from rlhf_engine.kernels import decode_gemm_ws as dg
    from rlhf_engine.kernels.lm_head_sample import lm_head_sample
    from rlhf_engine.kernels.sample import sample_logits_forward

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("ws_probe: needs an sm_90 GPU; not run")
        return 2
    ok = True
    torch.manual_seed(2)
    w = (torch.randn(151936, 896, device="cuda") * 2 * 896 ** -0.5).to(torch.bfloat16)
    seed = torch.tensor([123456789], device="cuda")
    for M, greedy, pdl in ((64, False, False), (64, True, True), (20, False, True), (1, True, False)):
        x = torch.randn(M, 896, device="cuda", dtype=torch.bfloat16)
        if not dg.eligible(x, w):
            print(f"ws_probe: LM head M={M}: not eligible on this sm_90 device")
            return 3
        print(f"ws_probe: launching the LM head + sampler, M={M} greedy={greedy} pdl={pdl}", flush=True)
        tok, lp = lm_head_sample(x, w, temperature=0.8, greedy=greedy, seed=seed, pdl=pdl)
        torch.cuda.synchronize()
        tok_ref, lp_ref = sample_logits_forward(dg.decode_gemm_ws(x, w), seed, 0.8, greedy)
        eq = tok == tok_ref
        err = (lp - lp_ref)[eq].abs().max().item() if eq.any() else float("nan")
        good = int(eq.sum()) >= M - 1 and err < 1e-3  # a near tie may flip a row (fp32 keys scaled by other maxima)
        ok &= good
        print(f"ws_probe: LM head + sampler (M={M}, greedy={greedy}, pdl={pdl}): tokens equal on {int(eq.sum())} of "
              f"{M} rows, max |logp - the sampler's| {err:.3g}: {'ok' if good else 'WRONG'}", flush=True)
    return 0 if ok else 1


def main(mode: str) -> int:
    """mode: "simple" (the forward without the overlap, and the backward), "pipelined" (the forward with it),
    "pingpong" (the pipelined forward with ping-pong turns) or "atomic" (the simple forward again, and the
    backward's atomic-dQ form)."""
    pipelined, atomic = mode in ("pipelined", "pingpong"), mode == "atomic"
    # --pingpong: the atomic-dQ form with the turns only where --atomic passed it alone (run before this one)
    atomic_ok = os.environ.get("RLHF_ENGINE_ATTN_WS_ATOMIC_BROKEN") not in ("1", "notrun")
    for var in ("RLHF_ENGINE_ATTN_WS_BROKEN", "RLHF_ENGINE_ATTN_WS_PIPELINE_BROKEN",
                "RLHF_ENGINE_ATTN_WS_ATOMIC_BROKEN", "RLHF_ENGINE_ATTN_WS_PINGPONG_BROKEN"):
        os.environ.pop(var, None)
    os.environ["RLHF_ENGINE_ATTN_WS_PIPELINE"] = "1" if pipelined else "0"
    os.environ["RLHF_ENGINE_ATTN_WS_PINGPONG"] = "1" if mode == "pingpong" else "0"
    from rlhf_engine.kernels.attention_bwd_ws import ws_backward
    from rlhf_engine.kernels.attention_fwd_ws import attention_forward_ws, ws_eligible
    from rlhf_engine.kernels.reference.attention import attention_reference

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("ws_probe: needs an sm_90 GPU; not run")
        return 2
    ok = True
    variant = "ping-pong" if mode == "pingpong" else "pipelined" if pipelined else "simple"
    for B, T, Hq, Hkv, D, causal, pad in SHAPES:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
        ks, ke = _ranges(pad, B, T)
        shape = f"B={B} T={T} Hq/Hkv={Hq}/{Hkv} D={D} causal={causal} padding={pad}"
        if not ws_eligible(q, k, v):
            print(f"ws_probe: {shape}: not eligible on this sm_90 device")
            return 3
        scale = D ** -0.5
        q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
        ref = attention_reference(q32, k32, v32, causal=causal, kv_start=ks, kv_end=ke, softmax_scale=scale)
        print(f"ws_probe: launching the {variant} forward, {shape}", flush=True)
        o, lse = attention_forward_ws(q, k, v, causal=causal, kv_start=ks, kv_end=ke, softmax_scale=scale)
        torch.cuda.synchronize()
        err = (o.float() - ref).abs().max().item()
        good = err < 3e-2  # bf16 inputs and output, values of order 1: a few roundings
        ok &= good
        print(f"ws_probe: forward ({variant}): max |o - fp32 reference| {err:.3g}: {'ok' if good else 'WRONG'}",
              flush=True)
        if mode == "pipelined":  # the backward has no variant but ping-pong: checked by the --simple run
            continue
        do = torch.randn_like(q)
        refs = torch.autograd.grad(ref, (q32, k32, v32), do.float())
        delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
        # --pingpong: both dQ forms with the turns (the backward kernels follow the same switch)
        for atomic_dq in ((False, True) if atomic_ok else (False,)) if mode == "pingpong" else (atomic,):
            what = f"{'atomic-dQ ' if atomic_dq else ''}backward{' (ping-pong)' if mode == 'pingpong' else ''}"
            grads = [torch.zeros(q.shape, device="cuda") if atomic_dq else torch.empty_like(q), torch.empty_like(k),
                     torch.empty_like(v)]  # (atomic: an fp32 dQ buffer to add into)
            print(f"ws_probe: launching the {what}, {shape}", flush=True)
            ws_backward(do, q, k, v, lse, delta, *grads, causal=causal, kv_start=ks, kv_end=ke, softmax_scale=scale,
                        atomic_dq=atomic_dq)
            torch.cuda.synchronize()
            errs = [((g.float() - r).abs().max() / r.abs().max().clamp(min=1e-6)).item()
                    for g, r in zip(grads, refs)]
            good = all(e < 3e-2 for e in errs)  # NaN fails too
            ok &= good
            print(f"ws_probe: {what}: max relative |d{{q,k,v}} - fp32 reference| "
                  f"{', '.join(f'{e:.3g}' for e in errs)}: {'ok' if good else 'WRONG'}", flush=True)
    if mode == "pingpong":
        for B, Tq, Tk, Hq, Hkv, D in PINGPONG_SHAPES:
            torch.manual_seed(0)
            q = torch.randn(B, Tq, Hq, D, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(B, Tk, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            print(f"ws_probe: launching the ping-pong forward, B={B} Tq={Tq} Tk={Tk} Hq/Hkv={Hq}/{Hkv} D={D} causal",
                  flush=True)
            o, _ = attention_forward_ws(q, k, v, causal=True, kv_start=None, kv_end=None, softmax_scale=D ** -0.5)
            torch.cuda.synchronize()
            ref = attention_reference(q.float(), k.float(), v.float(), causal=True, softmax_scale=D ** -0.5)
            err = (o.float() - ref).abs().max().item()  # rows without a key: 0 in both
            good = err < 3e-2  # NaN fails too
            ok &= good
            print(f"ws_probe: forward (ping-pong, Tq != Tk): max |o - fp32 reference| {err:.3g}: "
                  f"{'ok' if good else 'WRONG'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    modes = ("--simple", "--pipelined", "--pingpong", "--atomic", "--gemm", "--lm-head")
    if len(sys.argv) != 2 or sys.argv[1] not in modes:
        sys.exit(f"usage: python benchmarks/ws_probe.py {' | '.join(modes)}")
    mode = sys.argv[1]
    try:
        sys.exit(gemm() if mode == "--gemm" else lm_head() if mode == "--lm-head" else main(mode[2:]))
    except Exception:  # a compile error or a launch failure, not a wrong number: its own exit status
        traceback.print_exc()
        sys.exit(4)
