"""Decoder-layer ops of the training forward, forward + backward: residual add + RMSNorm, and SwiGLU's
silu(gate) * up, eager PyTorch (the torch backend's definition) vs the fused Triton kernels with their backward.

Shape: one PPO training micro-batch of the Qwen2-0.5B shape, N = 16 x 384 = 6144 tokens, H = 896, I = 4864,
bf16, with a grad_output on every output (the norm's s output is the residual stream, which the next layer uses).
Floors (each tensor read or written once, 3.0 TB/s):
  add + RMSNorm: forward reads x, r and writes out, s; backward reads d out, d s, s and writes d x:
      8 x N x H x 2 B = 88 MB -> 29 us;
  SwiGLU: forward reads gate, up and writes out; backward reads d out, gate, up and writes d gate, d up:
      8 x N x I x 2 B = 478 MB -> 159 us.
The eager ops make several passes each (the norm in bf16 casts to fp32 and back, ~14 passes of N x I for the
SwiGLU pair) and keep more for the backward (an fp32 copy of s and the bf16 normalized y per norm; silu(gate) per
MLP): the peak column, which includes what the forward saves, shows that.
Then the same kernels, with the fused LM-head loss, through ``integrations.hf_kernels.apply_kernels`` on a stock
HF Qwen2ForCausalLM (Qwen2-0.5B widths and vocabulary, 4 layers, B=4, T=1024, one training step's forward and
backward of the causal-LM loss) against HF's own forward with SDPA and full logits. Last, our actor's training
forward + backward with recomputed layers (one PPO micro-batch of the Qwen2-0.5B shape): the model's
``checkpoint_layer`` against ``torch.utils.checkpoint``.

    python benchmarks/bench_layer_ops.py             # needs CUDA; exits cleanly without it
    python benchmarks/bench_layer_ops.py --cpu-tiny  # tiny shape under the Triton interpreter (smoke run)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=16 * 384)
    p.add_argument("--H", type=int, default=896)
    p.add_argument("--I", type=int, default=4864)
    p.add_argument("--cpu-tiny", action="store_true", help="no CUDA: N=64, H=96, I=160 under the Triton interpreter")
    args = p.parse_args(argv)

    import torch
    if os.environ.get("RLHF_BENCH_SMOKE", "") == "1":  # run_all.py --smoke (triton not yet imported)
        args.cpu_tiny = True
    if not torch.cuda.is_available():
        if not args.cpu_tiny:
            print("bench_layer_ops: CUDA is not available; nothing to measure (use --cpu-tiny for a smoke run)")
            return []
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (the kernels import it)
        args.N, args.H, args.I = 64, 96, 160

    import torch.nn.functional as F
    from common import COPY_TBPS, bench, kernel_ms, peak_mem_mb, print_table, record

    from rlhf_engine.kernels.reference.norm import rms_norm_reference
    from rlhf_engine.kernels.rmsnorm import rms_norm
    from rlhf_engine.kernels.swiglu import silu_mul

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    N, H, I = args.N, args.H, args.I
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    w_ours, rep_ours = (1, 3) if device == "cpu" else (10, 50)

    def fwd_bwd(fn, leaves, grads):
        def run():
            return torch.autograd.grad(fn(*leaves), leaves, grads)
        return run

    x, r = rnd(N, H).requires_grad_(), rnd(N, H).requires_grad_()
    w = (1 + 0.1 * rnd(H).float()).to(dtype).requires_grad_()
    dy, ds = rnd(N, H), rnd(N, H)
    gate, up, dout = (rnd(N, I) * 2).requires_grad_(), rnd(N, I).requires_grad_(), rnd(N, I)
    cases = {
        "add+rmsnorm fwd+bwd": (f"N={N},H={H},{str(dtype)[6:]}", 8 * N * H * dtype.itemsize, {
            "eager (rms_norm_reference)": fwd_bwd(lambda x, r, w: rms_norm_reference(x, w, 1e-6, r), [x, r, w],
                                                  [dy, ds]),
            "ours triton (rms_norm, residual)": fwd_bwd(
                lambda x, r, w: rms_norm(x, w, 1e-6, residual=r, backend="triton"), [x, r, w], [dy, ds]),
        }),
        "swiglu fwd+bwd": (f"N={N},I={I},{str(dtype)[6:]}", 8 * N * I * dtype.itemsize, {
            "eager (F.silu(gate) * up)": fwd_bwd(lambda a, b: F.silu(a) * b, [gate, up], dout),
            "ours triton (silu_mul)": fwd_bwd(lambda a, b: silu_mul(a, b, backend="triton"), [gate, up], dout),
        }),
    }

    rows = []
    for op, (shape, nbytes, impls) in cases.items():
        (base_name, base_fn), (our_name, our_fn) = impls.items()
        tol = 0.05 if dtype == torch.bfloat16 else 1e-4  # bf16: one rounding apart, relative to the largest
        for a, b in zip(our_fn(), base_fn()):  # correctness first
            err = (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-6)
            assert err < tol, f"{op}: {our_name} disagrees with {base_name}: max rel err {err:.3g}"
        base_ms = None
        for name, fn in impls.items():
            ms = bench(fn, warmup=w_ours, rep=rep_ours)
            base_ms = ms if base_ms is None else base_ms
            rows.append(dict(op=op, shape=shape, impl=name, ms=ms, metric="bandwidth",
                             value=nbytes / (ms * 1e-3) / 1e9, unit="GB/s", peak_mb=peak_mem_mb(fn),
                             kernel_ms=kernel_ms(fn), vs_baseline=base_ms / ms))
        floor_ms = nbytes / (COPY_TBPS * 1e12) * 1e3
        rows.append(dict(op=op, shape=shape, impl=f"floor (each tensor once at {COPY_TBPS} TB/s)", ms=floor_ms,
                         metric="bandwidth", value=nbytes / (floor_ms * 1e-3) / 1e9, unit="GB/s",
                         peak_mb=float("nan"), vs_baseline=base_ms / floor_ms))
    rows += _hf_trunk_rows(device, dtype, w_ours, rep_ours, args.cpu_tiny)
    rows += _checkpoint_rows(device, dtype, w_ours, rep_ours, args.cpu_tiny)
    print_table(rows)
    record(rows)
    return rows


def _hf_trunk_rows(device: str, dtype, warmup: int, rep: int, tiny: bool) -> list[dict]:
    """A stock HF Qwen2ForCausalLM (Qwen2-0.5B widths and vocabulary, 4 layers, B=4, T=1024), one training step's
    forward + backward of the causal-LM loss: as HF runs it (SDPA attention, full logits) against
    ``integrations.hf_kernels.apply_kernels`` (norms, MLP activation and the fused LM-head loss; then attention
    too). What a Hugging Face / TRL user gets from the kernels, Liger-style."""
    import torch

    try:
        from transformers import Qwen2Config, Qwen2ForCausalLM
    except ImportError as e:  # transformers is a dependency, but keep the kernel rows if it is broken
        print(f"bench_layer_ops: HF model not measured ({e})")
        return []
    from common import bench, peak_mem_mb

    from rlhf_engine.integrations.hf_kernels import apply_kernels, remove_kernels

    if tiny:
        cfg = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=256)
        B, T, L, backend = 2, 8, 1, "triton"  # the interpreter: seconds a step
    else:
        cfg = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                   vocab_size=151936)
        B, T, L, backend = 4, 1024, 4, "auto"
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=L, use_sliding_window=False, tie_word_embeddings=True,
                                         attn_implementation="sdpa", **cfg)).to(device, dtype).train()
    ids = torch.randint(0, cfg["vocab_size"], (B, T), device=device)
    labels = ids.clone()
    labels[:, : T // 4] = -100  # a prompt part that is not scored
    params = [p for p in model.parameters()]

    def step():  # one forward: the loss and its gradients
        loss = model(input_ids=ids, labels=labels).loss
        return (loss.detach(), *torch.autograd.grad(loss, params))

    shape = f"Qwen2 x{L} layers,V={cfg['vocab_size']},B={B},T={T},{str(dtype)[6:]}"
    ref = step()
    rows, base_ms = [], None
    for name, kw in (("HF eager (SDPA attention, full logits)", None),
                     ("ours (apply_kernels: norms + MLP + LM-head loss)", dict(attention=False)),
                     ("ours (apply_kernels: all, our attention too)", dict(attention=True))):
        if kw is not None:
            remove_kernels(model)
            apply_kernels(model, backend=backend, **kw)
            got = step()
            err = max((a.float() - b.float()).norm().item() / max(b.float().norm().item(), 1e-12)
                      for a, b in zip(got, ref))
            tol = 0.05 if dtype == torch.bfloat16 else 1e-4  # relative L2 of the loss and each gradient
            if err > tol:
                print(f"bench_layer_ops: WARNING {name} differs from HF: relative L2 {err:.3g}")
                name += f" MISMATCH vs HF ({err:.2g})"
        ms = bench(step, warmup=warmup, rep=max(3, rep // 5))
        base_ms = ms if base_ms is None else base_ms
        rows.append(dict(op="hf qwen2 train step fwd+bwd", shape=shape, impl=name, ms=ms, metric="time", value=ms,
                         unit="ms", peak_mb=peak_mem_mb(step), vs_baseline=base_ms / ms))
    remove_kernels(model)
    return rows


def _checkpoint_rows(device: str, dtype, warmup: int, rep: int, tiny: bool) -> list[dict]:
    """Our actor's training forward + backward (``policy_forward``: trunk + fused LM-head log-probs) on one PPO
    micro-batch of the Qwen2-0.5B shape (24 layers, 16 x 384 tokens, 256 response tokens each) with every layer
    recomputed in the backward, as ``bench_ppo_step.py`` trains: the model's ``checkpoint_layer`` against
    ``torch.utils.checkpoint`` (non-reentrant, what it used before), same run. The CPU measured the host side alone
    (``benchmarks/host_train.py``: 90-105 -> 54-63 ms for 24 layers); this row says what a GPU step sees. Then each
    recomputed layer as one autograd node (``model/fused_layer.py``, the default since the fourteenth session;
    host_train.py: -34% host time against ``checkpoint_layer``), and that with every Triton launch through Triton's
    own path (``kernels/_fastlaunch.py`` off)."""
    import os

    import torch
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    from common import bench, kernel_ms, peak_mem_mb

    import rlhf_engine.model.llama as llama
    from rlhf_engine.kernels import _fastlaunch as fastlaunch
    from rlhf_engine.model import CausalLM, preset
    from rlhf_engine.trainer.actor_critic import policy_forward

    if tiny:
        cfg = preset("tiny-qwen2", num_layers=2, attn_backend="triton")
        B, P, N = 2, 4, 4
    else:
        cfg = preset("qwen2-0.5b", attn_backend="triton")
        B, P, N = 16, 128, 256
    torch.manual_seed(0)
    lm = CausalLM(cfg).to(device, dtype).train()
    lm.gradient_checkpointing = True
    ids = torch.randint(3, cfg.vocab_size, (B, P + N), device=device)
    am = torch.ones_like(ids)
    rid, rm = ids[:, P:], torch.ones(B, N, dtype=torch.long, device=device)
    params = [p for p in lm.parameters() if p.requires_grad]

    def step():
        loss = policy_forward(lm, ids, am, rid, rm, temperature=1.0)["logp"].sum()
        loss.backward()
        for p in params:
            p.grad = None

    def torch_ckpt(fn, *a, torch_fallback=False):  # noqa: ARG001 - the previous call
        return torch_checkpoint(fn, *a, use_reentrant=False)

    ours = llama.checkpoint_layer
    shape = f"{'tiny-qwen2 x2' if tiny else 'Qwen2-0.5B x24'},B={B},T={P + N},{str(dtype)[6:]},ckpt"
    rows, base_ms = [], None
    cached = fastlaunch.enabled()  # False with RLHF_ENGINE_FAST_LAUNCH=0 (e.g. gpu_check.sh's check failed)
    # (name, the recorded path's checkpoint function, cached launches, one node a layer)
    cases = [("torch.utils.checkpoint (non-reentrant)", torch_ckpt, cached, False),
             ("ours (checkpoint_layer)", ours, cached, False),
             ("ours (one node a layer, the default)", ours, cached, True)]
    if cached:
        cases.append(("ours, one node, Triton's own launch path (no cached launches)", ours, False, True))
    node_env = os.environ.get("RLHF_ENGINE_FUSED_LAYER_NODE")
    for name, impl, on, node in cases:
        llama.checkpoint_layer = impl
        fastlaunch.set_enabled(on)
        os.environ["RLHF_ENGINE_FUSED_LAYER_NODE"] = "1" if node else "0"
        try:
            ms = bench(step, warmup=warmup, rep=max(3, rep // 5))
            peak = peak_mem_mb(step)
            k_ms = kernel_ms(step, calls=1)  # the kernels' own time: wall - kernel time is what the host adds
        finally:
            llama.checkpoint_layer = ours
            fastlaunch.set_enabled(cached)
            if node_env is None:
                os.environ.pop("RLHF_ENGINE_FUSED_LAYER_NODE", None)
            else:
                os.environ["RLHF_ENGINE_FUSED_LAYER_NODE"] = node_env
        base_ms = ms if base_ms is None else base_ms
        rows.append(dict(op="actor train fwd+bwd, recomputed layers", shape=shape, impl=name, ms=ms, metric="time",
                         value=ms, unit="ms", peak_mb=peak, vs_baseline=base_ms / ms, kernel_ms=k_ms))
    del lm
    return rows


if __name__ == "__main__":
    main()
