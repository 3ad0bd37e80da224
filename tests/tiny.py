"""A tiny random model for fast CPU tests of the engine (pairs with the byte-level tokenizer
``rlhf_engine.data.toy_tokenizer.byte_tokenizer``: 263 tokens, pad/bos/eos = 0/1/2)."""
from __future__ import annotations

import torch

from rlhf_engine.data.toy_tokenizer import byte_tokenizer  # noqa: F401 - re-exported for the tests


def tiny_model(seed: int = 0, **overrides):
    from rlhf_engine.model.config import preset
    from rlhf_engine.model.llama import CausalLM

    torch.manual_seed(seed)
    cfg = preset("tiny-llama", vocab_size=263, attn_backend="torch", eos_token_id=2, pad_token_id=0, bos_token_id=1,
                 **overrides)
    return CausalLM(cfg)
