"""Scalar heads on the transformer trunk: the PPO critic (a value per token) and reward models.

``ScalarModel(trunk, head)`` maps (B, T) tokens to (B, T) fp32 scalars; a reward model's
score of a sequence is the value at its last valid token (``ScalarModel.score_sequences``).
State-dict keys: ``model.*`` (the trunk, as in a CausalLM) and ``score.weight`` /
``score.bias``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .config import ModelConfig
from .llama import CausalLM, Transformer


class ScalarHead(nn.Linear):
    """Linear(H, 1): hidden (..., H) -> scalar (...) fp32."""

    def __init__(self, hidden_size: int, bias: bool = True, init_std: float | None = None,
                 device=None, dtype=None):
        super().__init__(hidden_size, 1, bias=bias, device=device, dtype=dtype)
        std = init_std if init_std is not None else 1.0 / (hidden_size + 1) ** 0.5
        nn.init.normal_(self.weight, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden).squeeze(-1).float()


def last_valid_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B,) int64 index of the last 1 of each row (0 for an all-zero row)."""
    T = attention_mask.shape[1]
    m = attention_mask.bool()
    idx = T - 1 - torch.argmax(m.flip(1).to(torch.uint8), dim=1)
    return torch.where(m.any(1), idx, torch.zeros_like(idx))


class ScalarModel(nn.Module):
    """A transformer trunk with a scalar head: critic values or reward-model scores.

    forward(input_ids (B, T), attention_mask (B, T) or None) -> values (B, T) fp32; the value
    at position t summarises tokens [0, t]. score_sequences(...) -> (B,) fp32 value at each row's
    last valid token (the reward convention).
    """

    def __init__(self, trunk: Transformer, head: ScalarHead | None = None):
        super().__init__()
        if not isinstance(trunk, Transformer):
            raise TypeError(f"trunk: expected a Transformer (CausalLM.model), got {type(trunk).__name__}")
        self.model = trunk
        self.score = head if head is not None else ScalarHead(
            trunk.config.hidden_size, device=trunk.embed_tokens.weight.device, dtype=trunk.embed_tokens.weight.dtype)

    @classmethod
    def from_config(cls, config: ModelConfig, bias: bool = True) -> "ScalarModel":
        """Random-initialized trunk (no LM head) + head."""
        return cls(CausalLM(config.replace(tie_word_embeddings=True)).model, ScalarHead(config.hidden_size, bias))

    @classmethod
    def from_causal_lm(cls, lm: CausalLM, *, copy_trunk: bool = True, bias: bool = True) -> "ScalarModel":
        """A scalar model on ``lm``'s trunk: a deep copy (critic/reward initialized from the policy),
        or the same modules with ``copy_trunk=False`` (shared trunk). The LM head is not kept."""
        trunk = copy.deepcopy(lm.model) if copy_trunk else lm.model
        w = trunk.embed_tokens.weight
        return cls(trunk, ScalarHead(lm.config.hidden_size, bias, device=w.device, dtype=w.dtype))

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.model.gradient_checkpointing = bool(value)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, attn_backend: str | None = None) -> torch.Tensor:
        hidden = self.model(input_ids, attention_mask, position_ids, attn_backend=attn_backend)  # (B, T, H)
        return self.score(hidden)  # (B, T) fp32

    def score_sequences(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                        attn_backend: str | None = None) -> torch.Tensor:
        """(B,) fp32 value at the last valid token of each row (head applied to those rows only)."""
        B, T = input_ids.shape
        hidden = self.model(input_ids, attention_mask, attn_backend=attn_backend)  # (B, T, H)
        if attention_mask is None:
            last = torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
        else:
            last = last_valid_index(attention_mask)
        h_last = hidden[torch.arange(B, device=hidden.device), last]  # (B, H)
        return self.score(h_last)
