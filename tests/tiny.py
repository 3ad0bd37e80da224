"""A tiny random model for fast CPU tests of the engine (pairs with the byte-level tokenizer
``rlhf_engine.data.toy_tokenizer.byte_tokenizer``: 263 tokens, pad/bos/eos = 0/1/2)."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from rlhf_engine.data.toy_tokenizer import byte_tokenizer  # noqa: F401 - re-exported for the tests


def tiny_model(seed: int = 0, **overrides):
    from rlhf_engine.model.config import preset
    from rlhf_engine.model.llama import CausalLM

    torch.manual_seed(seed)
    cfg = preset("tiny-llama", vocab_size=263, attn_backend="torch", eos_token_id=2, pad_token_id=0, bos_token_id=1,
                 **overrides)
    return CausalLM(cfg)


# The Triton interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even): bf16 rounding is checked on a GPU.
DTYPES_16 = [pytest.param(torch.bfloat16, marks=pytest.mark.gpu, id="bf16"), pytest.param(torch.float16, id="fp16")]


def key_ranges(kind: str, B: int, T: int, device):
    """(kv_start, kv_end) of the attention kernels for padding 'none', 'right' or 'left': odd lengths, and with
    B > 2 a last sequence with no valid token."""
    from rlhf_engine.kernels.attention import kv_range_from_lengths

    if kind == "none":
        return None, None
    lens = torch.tensor([T - 3 * i - 1 if i % 2 == 0 else T // 2 for i in range(B)])
    lens[-1] = 0 if B > 2 else lens[-1]
    return [t.to(device) for t in kv_range_from_lengths(lens, T, padding_side=kind)]


def rms_norm_fp64(s: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The RMSNorm definition in fp64: w · s / sqrt(mean(s²) + eps)."""
    s64 = s.double()
    return w.double() * s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + eps)


def generation_model(name: str = "tiny-llama", std: float = 0.15, **kw):
    """A preset's model in eval mode, seeded, with initializer_range ``std`` (the generation tests' model)."""
    from rlhf_engine.model import CausalLM, preset

    torch.manual_seed(0)
    return CausalLM(preset(name, initializer_range=std, **kw)).eval()


def left_padded_prompts(vocab: int, lengths=(9, 4, 6), P: int = 9, pad: int = 0):
    """Left-padded prompts (B, P) of the given lengths, tokens avoiding the special ids 0..3."""
    g = torch.Generator().manual_seed(1)
    B = len(lengths)
    ids = torch.full((B, P), pad, dtype=torch.long)
    mask = torch.zeros(B, P, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, P - n:] = torch.randint(4, vocab, (n,), generator=g)
        mask[b, P - n:] = 1
    return ids, mask


def perturbed_model(device, name: str = "tiny-qwen2", backend: str = "triton", dtype=torch.float32, **overrides):
    """A 3-layer preset model in train mode, seeded, every parameter moved off its initial value (norm weights
    other than 1, biases other than 0): the gradient tests' model."""
    from rlhf_engine.model import CausalLM, preset

    torch.manual_seed(0)
    m = CausalLM(preset(name, num_layers=3, attn_backend=backend, **overrides)).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.train()


def padded_batch(m, device):
    """(ids, mask, w) for ``m``: 3 sequences of 13 tokens, one left-padded and one right-padded, and a
    grad_output w (3, 12) that is not all ones."""
    g = torch.Generator().manual_seed(1)
    B, T = 3, 13
    ids = torch.randint(3, m.config.vocab_size, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    w = torch.randn(B, T - 1, generator=g).to(device)
    return ids, mask, w


@contextlib.contextmanager
def reversed_programs():
    """Under TRITON_INTERPRET=1, run each launch's programs in reverse grid order. The interpreter runs them one
    after another in grid order, so a kernel that wrongly relies on that order (a race on a GPU: e.g. "the last
    split finishes last", or one program writing what another reads) still passes; reversed, other programs run
    first. A no-op outside the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    if "set_grid_idx" in vars(builder):  # nested: the order is already reversed
        yield
        return
    forward = type(builder).set_grid_idx

    def reverse(x, y, z):
        nx, ny, nz = builder.grid_dim
        forward(builder, nx - 1 - x, ny - 1 - y, nz - 1 - z)

    builder.set_grid_idx = reverse
    try:
        yield
    finally:
        del builder.set_grid_idx  # the class's method again


def nan_padded_cache(B, L, Hkv, D, dtype, device, lens, start=None):
    """Random caches whose unwritten slots (outside [start, lens)) hold NaN: they must never be read."""
    k = torch.randn(B, L, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(B, L, Hkv, D, device=device, dtype=dtype)
    for b in range(B):
        lo = 0 if start is None else int(start[b])
        for t in (k, v):
            t[b, int(lens[b]):] = float("nan")
            t[b, :lo] = float("nan")
    return k, v


def count_calls(mp, targets) -> dict:
    """Patch each (module, function name, key) of ``targets`` through ``mp`` (a monkeypatch or its context) so that
    it counts its calls in the returned {key: count} and still runs the real function."""
    calls = {key: 0 for _, _, key in targets}
    for mod, fn, key in targets:
        real = getattr(mod, fn)
        mp.setattr(mod, fn, lambda *a, _r=real, _k=key, **k: (calls.__setitem__(_k, calls[_k] + 1), _r(*a, **k))[1])
    return calls


def qwen_decode_case(device="cuda"):
    """The GPU decode-path tests' case: Qwen2-0.5B widths with 2 layers, fp32 and a bf16 copy, 64 prompts of 33
    tokens (every fifth left-padded by 9). Returns (m32, m16, ids, mask)."""
    import copy

    from rlhf_engine.model import CausalLM, preset

    torch.manual_seed(0)
    with torch.device(device):
        m32 = CausalLM(preset("qwen2-0.5b", num_layers=2)).eval()
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    ids = torch.randint(4, m16.config.vocab_size, (64, 33), device=device)
    mask = torch.ones_like(ids)
    mask[::5, :9] = 0  # left padding
    return m32, m16, ids, mask


def decode_step_logits(model, ids, mask):
    """fp32 logits of one triton decode step after prefilling all but the last token."""
    from rlhf_engine.generation import KVCache

    cache = KVCache.allocate(model.config, ids.shape[0], ids.shape[1] + 7, dtype=model.dtype, device=ids.device)
    model.prefill(ids[:, :-1], mask[:, :-1], cache, attn_backend="triton")
    return model.decode_step(ids[:, -1:], cache, attn_backend="triton").float()
