"""Tiny models and a character tokenizer for fast CPU tests of the engine."""
from __future__ import annotations

import torch


class CharTokenizer:
    """Bytes 0..255 -> ids 3..258; 0 = pad, 1 = bos, 2 = eos. Enough of the HF tokenizer
    interface (encode / decode / eos_token_id / pad_token_id) for the trainers."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def __call__(self, text, add_special_tokens: bool = False, **_):
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in text]}


def tiny_model(seed: int = 0, **overrides):
    from rlhf_engine.model.config import preset
    from rlhf_engine.model.llama import CausalLM

    torch.manual_seed(seed)
    cfg = preset("tiny-llama", vocab_size=259, attn_backend="torch", eos_token_id=2, pad_token_id=0, bos_token_id=1,
                 **overrides)
    return CausalLM(cfg)
