"""Prompt encoding, generation and response decoding for a policy: what rollouts, evaluation
and preference-pair sampling share."""
from __future__ import annotations

import warnings

import torch

from rlhf_engine.generation.cuda_graph import DecodeGraphCache
from rlhf_engine.generation.generate import generate


class PolicySampler:
    """Samples continuations of text prompts from a CausalLM.

    Args:
        model: the policy (its parameters are used as they are: no copy).
        tokenizer: ``encode(text, add_special_tokens=False)``, ``decode(ids, skip_special_tokens=True)``,
            ``eos_token_id`` (int or list) and ``pad_token_id`` (may be None: the first EOS is used).
        generation: a GenerationConfig (max_new_tokens, max_prompt_len, temperature, top_k, top_p).
        device: where prompts are placed.
        generator: the torch.Generator that drives sampling (saved in checkpoints by the trainer).
    """

    def __init__(self, model, tokenizer, generation, device: torch.device, generator: torch.Generator):
        self.model, self.tok, self.cfg, self.device, self.gen = model, tokenizer, generation, device, generator
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("tokenizer: expected an eos_token_id, got None")
        self.eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        # On a GPU the static KV caches and captured decode graphs are kept across rollouts
        # (reused, not reallocated, each step); on the CPU each call allocates its own cache.
        self.graph_cache = DecodeGraphCache() if torch.device(device).type == "cuda" else None

    def check_prompts(self, prompts: list[str], name: str = "prompts") -> None:
        """Before a run: a ValueError naming the first prompt that is not a string or encodes to no tokens, and a
        warning for prompts longer than ``max_prompt_len`` tokens (the model sees their last ``max_prompt_len``
        tokens; a text reward still gets the whole prompt)."""
        limit, long = self.cfg.max_prompt_len, 0
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"{name}[{i}]: expected a string, got {type(p).__name__}")
            n = len(self.tok.encode(p, add_special_tokens=False))
            if n == 0:
                raise ValueError(f"{name}[{i}]: {p!r} encodes to no tokens")
            long += n > limit
        if long:
            warnings.warn(f"{name}: {long} of {len(prompts)} are longer than generation.max_prompt_len = {limit} "
                          f"tokens; the model sees the last {limit} tokens of each (a text reward gets the whole "
                          "prompt)", stacklevel=3)

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (B, P) prompt ids and mask; each prompt keeps its last ``max_prompt_len`` tokens."""
        limit = self.cfg.max_prompt_len
        ids = [self.tok.encode(p, add_special_tokens=False)[-limit:] for p in prompts]
        if any(len(x) == 0 for x in ids):
            raise ValueError("prompts: an empty prompt encodes to no tokens")
        P = max(len(x) for x in ids)
        out = torch.full((len(ids), P), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), P), dtype=torch.long)
        for i, x in enumerate(ids):
            out[i, P - len(x):] = torch.tensor(x)
            mask[i, P - len(x):] = 1
        return out.to(self.device), mask.to(self.device)

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, greedy: bool = False):
        """A GenerationOutput (sequences, attention_mask, response_ids, response_mask, logprobs)."""
        c = self.cfg
        self.model.eval()
        return generate(self.model, prompt_ids, prompt_mask, max_new_tokens=c.max_new_tokens,
                        temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, greedy=greedy,
                        eos_token_ids=self.eos_ids, pad_token_id=self.pad_id, generator=self.gen,
                        graph_cache=self.graph_cache)

    def decode_responses(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        lens = response_mask.sum(1).tolist()
        return [self.tok.decode(r[:n], skip_special_tokens=True) for r, n in zip(response_ids.tolist(), lens)]

    @torch.no_grad()
    def sample_texts(self, prompts: list[str]) -> tuple[list[str], object]:
        """Decoded continuations of ``prompts`` and the raw GenerationOutput."""
        ids, mask = self.encode_prompts(prompts)
        out = self.generate(ids, mask)
        return self.decode_responses(out.response_ids, out.response_mask), out
