"""Kernels per decode step, counted on the CPU: a proxy for the launch-bound part of a GPU decode step.

At batch 64 a Qwen2-0.5B decode step reads ~1 GB of weights (~0.33 ms at 3 TB/s) in ~24 x (7 projections,
4 GEMMs when packed, + the elementwise kernels around them); inside a CUDA graph each kernel still costs a
few microseconds of launch and tail, so the kernel count is the part of the step the floor does not see.
This script runs one decode step of a Qwen2-0.5B-shaped model (1 and 2 layers, narrow widths: the count does
not depend on widths) on the triton backend under the Triton interpreter and counts what would be GPU kernels:
  - Triton launches;
  - ATen ops that compute (views, reshapes and allocations excluded).
It compares the generation path (fused inference kernels) with the same step on unfused ops and with LoRA
adapters on every projection (a LoRA actor's rollouts), and the Triton sampler (``kernels/sample.py``) with the
eager one.

Run: TRITON_INTERPRET=1 python benchmarks/decode_launches.py
"""
from __future__ import annotations

import collections
import contextlib
import os
from unittest import mock

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# metadata-only or allocation ops: no kernel on a GPU
_FREE = {"view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "slice", "select", "unsqueeze",
         "squeeze", "as_strided", "detach", "alias", "empty", "empty_like", "empty_strided", "new_empty",
         "lift_fresh", "_reshape_alias", "split", "split_with_sizes", "chunk", "unbind", "_local_scalar_dense",
         "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "contiguous", "promote_types"}


_IN_TRITON = [0]  # > 0 while the interpreter runs a kernel: its own tensor copies are not kernels


class _CountAten(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # our custom ops (rlhf_engine::*) are counted by their Triton launches
        if not _IN_TRITON[0] and name not in _FREE and func.namespace != "rlhf_engine":
            self.ops[name] = self.ops[name] + 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _count_triton():
    """Counts the interpreter's kernel launches by kernel name, while the context is open."""
    from triton.runtime.interpreter import InterpretedFunction

    counts = collections.Counter()
    run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        counts[getattr(self.fn, "__name__", "?")] += 1
        _IN_TRITON[0] += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            _IN_TRITON[0] -= 1

    InterpretedFunction.run = counting_run
    try:
        yield counts
    finally:
        InterpretedFunction.run = run


def count_decode_step(fused: bool, num_layers: int, lora: bool = False, fused_write: bool = False,
                      norm_gemm: bool = False) -> tuple[collections.Counter, collections.Counter]:
    from rlhf_engine.generation import KVCache
    from rlhf_engine.model import CausalLM, apply_lora, preset
    from rlhf_engine.model import llama

    torch.manual_seed(0)
    cfg = preset("qwen2-0.5b", num_layers=num_layers, hidden_size=64, intermediate_size=128, num_heads=14,
                 num_kv_heads=2, head_dim=16, vocab_size=256, pad_token_id=None, bos_token_id=None, eos_token_id=1,
                 batch_invariant=False)  # the GEMMs as on a GPU, one kernel each (not model/batch_invariant.py's)
    m = CausalLM(cfg).eval()
    if lora:  # adapters on all 7 projections (the default targets), as a LoRA actor's rollouts run
        apply_lora(m, rank=4, alpha=8.0)
    B, P = 4, 5
    ids = torch.randint(0, 256, (B, P))
    cache = KVCache.allocate(cfg, B, P + 3, dtype=torch.float32, device="cpu")
    m.prefill(ids, torch.ones_like(ids), cache, attn_backend="triton")
    # unfused: the same step with the generation path's fusions turned off
    env = {"RLHF_ENGINE_DECODE_FUSED_WRITE": "1" if fused_write else "0",  # the cache write in the kernel (default)
           "RLHF_ENGINE_DECODE_NORM_GEMM": "1" if norm_gemm else "0"}  # the opt-in norms inside the GEMMs
    with mock.patch.object(llama, "_fused_ops", llama._fused_ops if fused else lambda *args: False), \
            mock.patch.dict(os.environ, env):
        # one step first, as a generation loop (and the CUDA-graph warm-up) runs: what a step builds once and
        # keeps (the RoPE table, the rope_rows constant) is not counted
        m.decode_step(ids[:, -1:], cache, attn_backend="triton")
        with _count_triton() as triton_counts, _CountAten() as aten:
            m.decode_step(ids[:, -1:], cache, attn_backend="triton")
    return aten.ops, triton_counts


def count_sampling(backend: str) -> int:
    """Kernels of one ``sample_tokens`` call (plain temperature sampling) on a backend."""
    from rlhf_engine.generation import sample_tokens

    logits = torch.randn(4, 1000)
    g = torch.Generator().manual_seed(0)
    with _count_triton() as triton_counts, _CountAten() as aten:
        sample_tokens(logits, temperature=0.7, generator=g, backend=backend)
    return sum(aten.ops.values()) + sum(triton_counts.values())


def main(num_layers: int = 24) -> list[dict]:
    """Counts for 1 and 2 layers give the per-layer and per-step parts; printed for ``num_layers``."""
    rows = []
    for fused, lora, fused_write, norm_gemm in ((False, False, False, False), (True, False, False, False),
                                                (True, True, False, False), (True, False, True, False),
                                                (True, False, False, True), (True, False, True, True)):
        totals = {}
        for n in (1, 2):
            aten, trit = count_decode_step(fused, n, lora, fused_write, norm_gemm)
            totals[n] = sum(aten.values()) + sum(trit.values())
        per_layer, fixed = totals[2] - totals[1], 2 * totals[1] - totals[2]
        label = ("generation path, LoRA on" if lora else "generation path (fused ops)") if fused else "unfused ops"
        label = "generation path, cache write fused" if fused_write else label
        if norm_gemm:
            label = "norms in the GEMMs" + (" + cache write fused" if fused_write else "")
        print(f"\n{label}: {per_layer} kernels per layer + {fixed} per step; 2 layers: "
              f"ATen {dict(sorted(aten.items()))}, Triton {dict(sorted(trit.items()))}")
        rows.append({"path": label, "per_layer": per_layer, "fixed": fixed, "step": fixed + num_layers * per_layer})
    for r in rows:
        print(f"{r['path']:<40} {r['per_layer']:3d} per layer, {r['fixed']:3d} per step: "
              f"{r['step']} kernels per decode step at {num_layers} layers")
    for r, backend in zip(rows[:2], ("torch", "triton")):
        r["sampling"] = count_sampling(backend)
        print(f"sampling a token ({backend} sampler): {r['sampling']} kernels")
    return rows


if __name__ == "__main__":
    main()
