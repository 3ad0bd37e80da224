"""A tiny random model for fast CPU tests of the engine (pairs with the byte-level tokenizer
``rlhf_engine.data.toy_tokenizer.byte_tokenizer``: 263 tokens, pad/bos/eos = 0/1/2)."""
from __future__ import annotations

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


def rms_norm_fp64(s: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The RMSNorm definition in fp64: w · s / sqrt(mean(s²) + eps)."""
    s64 = s.double()
    return w.double() * s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + eps)
