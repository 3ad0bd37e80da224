"""The trainable roles around a ``CausalLM``: log-probs of response tokens through the fused
LM-head kernel (no (N, V) logits on the GPU), and values from a scalar head.

Sequence layout used throughout the trainer: a left-padded prompt of width P followed by a
right-padded response of width N, so ``input_ids`` is (B, P + N) and its attention mask is one
contiguous block per row. The hidden state at position P - 1 + t predicts response token t
(logits at position t predict token t + 1), and the critic's V_t is read at that same position.
"""
from __future__ import annotations

import torch
from rlhf_engine.model.heads import ScalarHead, ScalarModel
from rlhf_engine.model.logprobs import IGNORE_INDEX, linear_logprobs


class ValueHead(ScalarHead):
    """The critic's scalar head, kept in fp32 whatever the trunk's dtype, and zero-initialised so
    a fresh critic predicts 0 everywhere and its first updates follow the returns alone."""

    def __init__(self, hidden_size: int, device=None):
        super().__init__(hidden_size, bias=True, init_std=0.0, device=device, dtype=torch.float32)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden.to(self.weight.dtype))


def response_targets(response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) response ids with IGNORE_INDEX where the mask is 0 (no log-prob computed there)."""
    return torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, IGNORE_INDEX))


def policy_forward(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor,
                   response_mask: torch.Tensor, *, temperature: float, with_entropy: bool = False,
                   value_head: ValueHead | None = None, with_bootstrap_value: bool = False,
                   with_logp: bool = True):
    """One trunk forward giving response log-probs (and entropy, and values from a shared head).

    Args:
        lm: a CausalLM (``hidden_states`` + ``lm_head_weight``).
        input_ids: (B, P + N) prompt (left-padded) + response (right-padded).
        attention_mask: (B, P + N) 0/1.
        response_ids, response_mask: (B, N).
        temperature: log-probs are taken under softmax(logits / temperature).
        with_entropy: also return the per-token entropy (B, N).
        value_head: when given, values V_t (B, N) are read at the positions predicting each token,
            and, with ``with_bootstrap_value``, the value after the last column (B,) too.
    Returns:
        dict with "logp" (B, N) fp32 (0 where masked), optionally "entropy" (B, N), "values" (B, N),
        "last_value" (B,).
    """
    B, N = response_ids.shape
    P = input_ids.shape[1] - N
    if P < 1:
        raise ValueError(f"input_ids: expected at least one prompt token before the {N} response tokens, "
                         f"got width {input_ids.shape[1]}")
    # The layout is one contiguous block per row by construction: skip the mask check (a host sync).
    hidden = lm.hidden_states(input_ids, attention_mask, validate_mask=False)  # (B, P + N, H)
    H = hidden.shape[-1]
    result = {}
    if with_logp:
        h_resp = hidden[:, P - 1:P + N - 1]  # (B, N, H): position P-1+t predicts response token t
        targets = response_targets(response_ids, response_mask).reshape(-1)  # (B*N,)
        out = linear_logprobs(h_resp.reshape(B * N, H), lm.lm_head_weight, targets, temperature=temperature,
                              with_entropy=with_entropy, batch_invariant=lm.config.batch_invariant)
        logp, ent = out if with_entropy else (out, None)
        result["logp"] = logp.view(B, N)
        if with_entropy:
            result["entropy"] = ent.view(B, N)
    if value_head is not None:
        stop = P + N if with_bootstrap_value else P + N - 1
        values = value_head(hidden[:, P - 1:stop])  # (B, N [+1])
        result["values"] = values[:, :N]
        if with_bootstrap_value:
            result["last_value"] = values[:, N]
    return result


def separate_critic(lm, head: torch.nn.Linear | None = None) -> ScalarModel:
    """A critic with its own trunk (``lm``'s transformer, not copied; its LM head is dropped) and a
    ValueHead, zero-initialised or copied from ``head`` (e.g. a reward model's score head)."""
    w = lm.model.embed_tokens.weight
    value_head = ValueHead(lm.config.hidden_size, device=w.device)
    if head is not None:
        with torch.no_grad():
            value_head.weight.copy_(head.weight)
            value_head.bias.copy_(head.bias)
    return ScalarModel(lm.model, value_head)


def critic_forward(critic: ScalarModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int,
                   with_bootstrap_value: bool = False) -> dict:
    """Values of a separate critic at the positions predicting each response token (layout as
    :func:`policy_forward`): "values" (B, N) and, optionally, "last_value" (B,)."""
    P = input_ids.shape[1] - n_response
    if P < 1:
        raise ValueError(f"input_ids: expected at least one prompt token before the {n_response} response tokens, "
                         f"got width {input_ids.shape[1]}")
    stop = P + n_response if with_bootstrap_value else P + n_response - 1
    hidden = critic.model(input_ids, attention_mask, validate_mask=False)  # (B, P + N, H)
    values = critic.score(hidden[:, P - 1:stop])  # (B, N [+1]): the head only on the positions used
    out = {"values": values[:, :n_response]}
    if with_bootstrap_value:
        out["last_value"] = values[:, n_response]
    return out
