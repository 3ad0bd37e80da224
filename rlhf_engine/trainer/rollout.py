"""Rollout data: the prompt sampler (resumable) and the batch of experience PPO trains on."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


class PromptSampler:
    """Yields batches of prompts in a seeded random order, epoch after epoch.

    Its state (epoch, position) is saved in checkpoints so a resumed run sees the same prompts
    in the same order as an uninterrupted one.
    """

    def __init__(self, prompts: list, batch_size: int, seed: int):
        if len(prompts) == 0:
            raise ValueError("prompts: expected at least one prompt, got an empty list")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.prompts, self.batch_size, self.seed = list(prompts), batch_size, seed
        self.epoch, self.pos = 0, 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def next_batch(self) -> list:
        out = []
        while len(out) < self.batch_size:
            order = self._order()
            take = order[self.pos:self.pos + self.batch_size - len(out)]
            out += [self.prompts[i] for i in take]
            self.pos += len(take)
            if self.pos >= len(order):
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


@dataclass
class Rollout:
    """One batch of experience. B rows = prompts x samples_per_prompt (a prompt's samples are
    consecutive); P = prompt width (left-padded), N = response width (right-padded).

    input_ids, attention_mask: (B, P + N); response_ids, response_mask: (B, N);
    old_logp, ref_logp, kl, rewards, advantages, returns: (B, N) fp32;
    values: (B, N) fp32 or None (critic-free estimators); scores: (B,) fp32.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor
    values: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor) -> "Rollout":
        """Rows ``idx`` (a 1-D index tensor) of every field."""
        return Rollout(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx])
                          for f in dataclasses.fields(self)})
