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


def pad_rollout(ro: Rollout, multiple: int, pad_id: int, max_prompt: int | None = None,
                max_response: int | None = None) -> Rollout:
    """``ro`` with its prompt width P and response width N each padded up to a multiple of ``multiple``, but not
    past ``max_prompt`` / ``max_response`` (the widest a rollout can be: that width recurs too): new prompt
    columns on the left, new response columns on the right, all masked (attention 0, response mask 0, per-token
    tensors 0, ids ``pad_id``). The layout (one contiguous valid block per row) and every valid token's position
    (counted from the mask) are unchanged, so is the loss: it reads only masked-in tokens and its normalizers are
    mask sums. What it buys: widths that recur across steps, so that a CUDA graph of the training micro-batch
    (``ppo.train_cuda_graph``) can be replayed although responses are trimmed to their longest."""
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple: expected an int >= 1, got {multiple!r}")
    B, T = ro.input_ids.shape
    N = ro.response_ids.shape[1]
    P = T - N

    def target(width, limit):
        up = width + (-width % multiple)
        return up if limit is None else max(width, min(up, limit))

    dp, dn = target(P, max_prompt) - P, target(N, max_response) - N
    if dp == 0 and dn == 0:
        return ro

    def right(t, value):  # (B, N) -> (B, N + dn)
        return torch.nn.functional.pad(t, (0, dn), value=value)

    def both(t, value):  # (B, P + N) -> (B, dp + P + N + dn)
        return torch.nn.functional.pad(t, (dp, dn), value=value)

    fields = {}
    for f in dataclasses.fields(ro):
        t = getattr(ro, f.name)
        if t is None or f.name == "scores":
            fields[f.name] = t
        elif f.name == "input_ids":
            fields[f.name] = both(t, pad_id)
        elif f.name == "attention_mask":
            fields[f.name] = both(t, 0)
        elif f.name == "response_ids":
            fields[f.name] = right(t, pad_id)
        else:  # response_mask and the per-token fp32 tensors
            fields[f.name] = right(t, 0)
    return Rollout(**fields)
