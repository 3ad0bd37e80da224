"""Log-probs of response tokens under the model, without materializing all (B, T, V) logits.

The trunk runs over the whole sequence; the LM head + log-softmax runs only on the
positions that predict response tokens (logits at position t predict token t+1), through
the fused LM-head kernel (``rlhf_engine.kernels.fused_linear_logprob``) on CUDA or a
chunked PyTorch computation elsewhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .batch_invariant import linear, logsumexp

IGNORE_INDEX = -100


def _chunk_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                    with_entropy: bool, batch_invariant: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """h (n, H), weight (V, H), targets (n,) -> logp (n,), entropy (n,) fp32 (entropy empty when not asked)."""
    # (n, V); with batch_invariant, in fp32 on the CPU each row as generation's decode step computes it
    z = linear(h, weight, batch_invariant=batch_invariant).float() / temperature
    # z[target] - logsumexp(z), the sampler's formula (generation/sampling.py): on the CPU, torch.log_softmax sums
    # its exponentials less accurately (up to 2e-5 off in fp32 at V = 151936 against fp64, logsumexp 2e-6), and
    # generation's log-probs and these must agree to 1e-5
    lse = logsumexp(z)  # (n,): one row as several (a chunk of one row, a decode step of one sequence)
    ignore = targets == IGNORE_INDEX
    logp = (z.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1) - lse).masked_fill(ignore, 0.0)
    if not with_entropy:
        return logp, logp.new_empty(0)
    logp_all = z - lse[:, None]
    entropy = -(logp_all.exp() * logp_all).sum(-1).masked_fill(ignore, 0.0)  # H = -Σ p log p
    return logp, entropy


def linear_logprobs_torch(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          temperature: float = 1.0, with_entropy: bool = False, chunk_rows: int = 1024,
                          batch_invariant: bool = True):
    """PyTorch LM head + log-prob in row chunks (each chunk recomputed in the backward).

    hidden: (N, H); weight: (V, H); targets: (N,) int64 with IGNORE_INDEX rows giving 0.
    Returns logp (N,) fp32 (and entropy (N,) fp32 with ``with_entropy``). At most
    chunk_rows × V logits exist at a time, in the forward and in the backward.
    batch_invariant: the LM-head GEMM batch-invariant in fp32 on the CPU (model/batch_invariant.py).
    """
    N = hidden.shape[0]
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    lps, ents = [], []
    for i in range(0, N, chunk_rows):
        args = (hidden[i:i + chunk_rows], weight, targets[i:i + chunk_rows], temperature, with_entropy,
                batch_invariant)
        lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False) if need_grad else _chunk_logprobs(*args)
        lps.append(lp)
        ents.append(ent)
    logp = torch.cat(lps) if lps else hidden.new_zeros(0, dtype=torch.float32)
    if not with_entropy:
        return logp
    return logp, (torch.cat(ents) if ents else hidden.new_zeros(0, dtype=torch.float32))


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                    with_entropy: bool = False, backend: str = "auto", batch_invariant: bool = True):
    """Dispatch: "auto" -> fused Triton kernel on CUDA, chunked PyTorch elsewhere. Shapes and ``batch_invariant``
    (the PyTorch path's) as linear_logprobs_torch."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch" or (backend == "auto" and not hidden.is_cuda):
        return linear_logprobs_torch(hidden, weight, targets, temperature=temperature, with_entropy=with_entropy,
                                     batch_invariant=batch_invariant)
    from rlhf_engine.kernels.fused_linear_logprob import fused_linear_logprobs

    return fused_linear_logprobs(hidden, weight, targets, temperature=temperature, ignore_index=IGNORE_INDEX,
                                 with_entropy=with_entropy, backend="triton")


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
                      start: int | torch.Tensor, response_mask: torch.Tensor | None = None,
                      temperature: float = 1.0, with_entropy: bool = False, backend: str = "auto",
                      attn_backend: str | None = None):
    """Log-prob (and entropy) of each response token under softmax(logits / temperature).

    model: a CausalLM. input_ids: (B, T) int64; attention_mask: (B, T) 0/1 or None.
    start: either
      * an int s (1 <= s < T): the response is columns [s, T) -> results (B, T - s), column j
        for token input_ids[:, s + j] (as ``GenerationOutput``: start = prompt_len); or
      * a (B, T) 0/1 tensor marking response tokens -> results (B, T) aligned with
        input_ids (column 0 and unmarked columns are 0).
    response_mask: with an int start, optional (B, T - s) 0/1 selecting which response
      tokens to score (default: attention_mask[:, s:]); unscored positions give 0.
    A token is scored only if the position predicting it is valid too (attention_mask = 1),
    so a sequence's first token never is.
    backend: LM-head log-prob backend ("auto": fused Triton on CUDA, chunked torch on CPU).
    attn_backend: attention backend for the trunk (None: the model config's).
    Returns logp fp32, or (logp, entropy) fp32 with ``with_entropy``; differentiable.
    """
    B, T = input_ids.shape
    hidden = model.hidden_states(input_ids, attention_mask, attn_backend=attn_backend)  # (B, T, H)
    H = hidden.shape[-1]
    if isinstance(start, torch.Tensor):
        if tuple(start.shape) != (B, T):
            raise ValueError(f"start: expected an int or a (B, T) = {(B, T)} response mask, got {tuple(start.shape)}")
        if response_mask is not None:
            raise ValueError("response_mask: only used with an int start")
        score = start[:, 1:].bool()  # (B, T-1): token t+1 is scored from position t
        if attention_mask is not None:  # both the token and the position predicting it must be valid
            score = score & attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        h = hidden[:, :-1]  # (B, T-1, H)
        targets = input_ids[:, 1:].masked_fill(~score, IGNORE_INDEX)  # (B, T-1)
    else:
        s = int(start)
        if not 1 <= s < T:
            raise ValueError(f"start: expected 1 <= start < T = {T}, got {s}")
        if response_mask is None:
            response_mask = attention_mask[:, s:] if attention_mask is not None else None
        elif tuple(response_mask.shape) != (B, T - s):
            raise ValueError(f"response_mask: expected shape {(B, T - s)}, got {tuple(response_mask.shape)}")
        h = hidden[:, s - 1:T - 1]  # (B, N, H)
        targets = input_ids[:, s:]  # (B, N)
        score = response_mask.bool() if response_mask is not None else None
        if attention_mask is not None:  # a token predicted from a padding position is not scored
            pred_ok = attention_mask[:, s - 1:T - 1].bool()
            score = pred_ok if score is None else score & pred_ok
        if score is not None:
            targets = targets.masked_fill(~score, IGNORE_INDEX)
    N = targets.shape[1]
    out = linear_logprobs(h.reshape(B * N, H), model.lm_head_weight, targets.reshape(B * N).long(),
                          temperature=temperature, with_entropy=with_entropy, backend=backend,
                          batch_invariant=model.config.batch_invariant)
    if with_entropy:
        logp, ent = out[0].view(B, N), out[1].view(B, N)
    else:
        logp, ent = out.view(B, N), None
    if isinstance(start, torch.Tensor):  # re-align to input_ids: column 0 has no prediction
        logp = F.pad(logp, (1, 0))
        ent = F.pad(ent, (1, 0)) if ent is not None else None
    return (logp, ent) if with_entropy else logp
