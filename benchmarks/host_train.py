"""Host time of the training forward + backward, the part of a GPU training step that a CPU-only machine can
measure: the model's Python, PyTorch's dispatch and the autograd engine, with every Triton launch stubbed out.

Why: the first H100 run's PPO training phase took 1.55 s where its FLOPs take 0.16 s, on a host measured 3-4x
slower than this one at dispatch, so the launches and the Python around them are a candidate for most of it.

Setup: the Qwen2-0.5B layer structure (24 layers, q/k/v bias, tied embeddings, 14/2 heads' ratio kept at 4/2)
at tiny widths (``tiny-qwen2``: hidden 48, so the CPU GEMMs cost ~1 us each), B=2 sequences of 4 prompt + 4
response tokens, the actor's training forward (``policy_forward``: trunk + fused LM-head log-probs) and its
backward, one thread. The triton backend runs under the interpreter with ``kernel[grid](...)`` replaced by a
no-op, so outputs are garbage and only host work is timed. Rows: no checkpointing; each recomputed layer as one
autograd node (model/fused_layer.py, the default since the fourteenth session); this project's ``checkpoint_layer``
(model/checkpointing.py: the layer's graph recorded again in the backward); ``torch.utils.checkpoint``
(non-reentrant, what the model used before); the forward without autograd (scoring). The cases run interleaved,
in rounds; the minimum over all repetitions is reported (this VM is noisy; the minimum is the least disturbed
run).

    python benchmarks/host_train.py [--rounds 4] [--reps 10] [--layers 24]

Not a run_all benchmark (no bench_ prefix): RESULTS.md quotes it as a CPU measurement.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--layers", type=int, default=24)
    args = ap.parse_args(argv)

    import torch
    import triton.runtime.interpreter as interpreter
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    import rlhf_engine.model.llama as llama
    from rlhf_engine.model import CausalLM, preset
    from rlhf_engine.trainer.actor_critic import policy_forward

    torch.set_num_threads(1)
    interpreter.InterpretedFunction.__getitem__ = lambda self, grid: (lambda *a, **k: None)  # launches stubbed

    torch.manual_seed(0)
    # batch_invariant=False: the GEMMs as on a GPU (F.linear), not the CPU's batch-invariant ones
    lm = CausalLM(preset("tiny-qwen2", num_layers=args.layers, attn_backend="triton", batch_invariant=False)).train()
    B, P, N = 2, 4, 4
    ids = torch.randint(3, lm.config.vocab_size, (B, P + N))
    am = torch.ones(B, P + N, dtype=torch.long)
    rid, rm = ids[:, P:], torch.ones(B, N, dtype=torch.long)

    def train():
        policy_forward(lm, ids, am, rid, rm, temperature=1.0)["logp"].sum().backward()

    def score():
        with torch.no_grad():
            policy_forward(lm, ids, am, rid, rm, temperature=1.0)

    ours = llama.checkpoint_layer

    def torch_ckpt(fn, *a, torch_fallback=False):  # noqa: ARG001 - the model's previous call
        return torch_checkpoint(fn, *a, use_reentrant=False)

    # (name, checkpointing, the recorded path's checkpoint function, the one-node layer on, what runs)
    cases = [("training fwd+bwd, no checkpointing", False, ours, False, train),
             ("training fwd+bwd, one node a recomputed layer (the default)", True, ours, True, train),
             ("training fwd+bwd, checkpoint_layer (ours)", True, ours, False, train),
             ("training fwd+bwd, torch.utils.checkpoint (non-reentrant)", True, torch_ckpt, False, train),
             ("scoring fwd (no autograd)", False, ours, False, score)]
    times: dict[str, list[float]] = {name: [] for name, *_ in cases}
    node_env = os.environ.get("RLHF_ENGINE_FUSED_LAYER_NODE")
    for _ in range(args.rounds):  # the cases interleaved, so that a slow spell of the VM hits them alike
        for name, ckpt, impl, node, fn in cases:
            lm.gradient_checkpointing = ckpt
            llama.checkpoint_layer = impl
            os.environ["RLHF_ENGINE_FUSED_LAYER_NODE"] = "1" if node else "0"  # model/fused_layer.py
            try:
                fn()  # warm-up
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            finally:
                llama.checkpoint_layer = ours
                if node_env is None:
                    os.environ.pop("RLHF_ENGINE_FUSED_LAYER_NODE", None)
                else:
                    os.environ["RLHF_ENGINE_FUSED_LAYER_NODE"] = node_env
    out = {}
    for name, ts in times.items():
        out[name] = min(ts) * 1e3
        print(f"{name:58s} min {min(ts) * 1e3:7.2f} ms (median {statistics.median(ts) * 1e3:7.2f}), "
              f"{min(ts) * 1e6 / args.layers:6.0f} us a layer")
    return out


if __name__ == "__main__":
    main()
