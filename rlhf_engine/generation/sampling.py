"""Token sampling without host syncs: temperature, top-k, top-p (nucleus), greedy.

All functions take logits (B, V) in any float dtype and work in fp32. Sampling uses
the exponential-race trick (argmax p_i / E_i with E_i ~ Exp(1) is a draw from p), which
needs no host sync and takes an explicit ``torch.Generator``.
"""
from __future__ import annotations

import torch

from rlhf_engine.model.batch_invariant import logsumexp


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf. (B, V) -> (B, V); k <= 0 or k >= V: unchanged."""
    V = logits.shape[-1]
    if top_k <= 0 or top_k >= V:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches ``top_p``.

    A token (in order of decreasing probability) is kept iff the mass of the tokens before
    it is < top_p, so the top token is always kept. (B, V) -> (B, V); top_p >= 1: unchanged.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V)
    remove_sorted = mass_before >= top_p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sampling_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0) -> torch.Tensor:
    """The fp32 logits the sampler draws from: logits / T, then top-k, then top-p (HF order). (B, V)."""
    z = logits.float() / temperature
    z = apply_top_k(z, top_k)
    return apply_top_p(z, top_p)


LOGPROB_DISTS = ("tempered", "sampled")


def sample_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  greedy: bool = False, generator: torch.Generator | None = None, backend: str = "auto",
                  logprob_dist: str = "tempered") -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row and return its log-probability.

    logits: (B, V) any float dtype. Returns tokens (B,) int64 and logprobs (B,) fp32:
      logprob_dist="tempered" (default): log softmax(logits / temperature)[token], the *untruncated* tempered
        distribution, i.e. what a training forward at the same temperature recomputes (PPO's old log-probs).
        With top_k/top_p active the token is drawn from the truncated distribution but this log-prob is not
        of that distribution;
      logprob_dist="sampled": the log-prob under the distribution the token was drawn from, log softmax of
        ``sampling_logits`` (tempered, then top-k, then top-p, renormalized over the kept tokens); equal to
        "tempered" when neither truncation is active.
    greedy: argmax of the logits (temperature, top_k, top_p then only shape the returned log-prob).
    backend: "triton" draws greedy and plain temperature samples (no top-k/top-p) with one Triton kernel
    (``rlhf_engine.kernels.sample``: one pass over the logits, Gumbel-max on a Philox stream seeded from
    ``generator``); "torch" always uses the ops below; "auto": triton on CUDA. The two backends draw from the
    same distribution with different random streams.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits: expected (B, V), got {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected in (0, 1], got {top_p}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    if logprob_dist not in LOGPROB_DISTS:
        raise ValueError(f"logprob_dist: expected one of {LOGPROB_DISTS}, got {logprob_dist!r}")
    plain = top_p >= 1.0 and (top_k <= 0 or top_k >= logits.shape[-1])
    fits = logits.numel() < 2**31  # the kernel's random-stream offsets are int32
    kernel_logprob = plain or logprob_dist == "tempered"  # the kernel returns the untruncated tempered log-prob
    on_kernel = backend == "triton" or (backend == "auto" and logits.is_cuda)
    if (greedy or plain) and fits and kernel_logprob and on_kernel:
        from rlhf_engine.kernels.sample import sample_logits

        return sample_logits(logits, temperature=temperature, greedy=greedy, generator=generator)
    z = logits.float() / temperature  # (B, V)
    zt = apply_top_p(apply_top_k(z, top_k), top_p) if not greedy or (logprob_dist == "sampled" and not plain) else z
    if greedy:
        tokens = torch.argmax(z, dim=-1)
    else:
        probs = torch.softmax(zt, dim=-1)  # (B, V); 0 outside the kept set
        e = torch.empty_like(probs).exponential_(1.0, generator=generator)  # E ~ Exp(1)
        e.clamp_(min=torch.finfo(torch.float32).tiny)  # E = 0 would give 0/0 = NaN for a removed token
        tokens = torch.argmax(probs / e, dim=-1)  # exponential race: P(i wins) = p_i
    zl = zt if logprob_dist == "sampled" else z
    # (B,) log softmax; the log-sum-exp computed as the training forward's (one row as several, on the CPU)
    return tokens, zl.gather(-1, tokens[:, None]).squeeze(-1) - logsumexp(zl)
