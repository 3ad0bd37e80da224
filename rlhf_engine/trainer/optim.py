"""Optimizer with fp32 master weights, and the learning-rate schedule.

On a GPU the model's parameters are bf16 and are used as they are by both generation and
training. The optimizer keeps an fp32 master copy of each low-precision parameter, applies
AdamW to the master, and writes the result back *in place* into the model's parameter, so the
tensors that generation reads never move (same ``data_ptr``) and no copy of the model is made
per rollout. fp32 parameters (the CPU case) are their own masters: no copy at all.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


class MasterWeightAdamW:
    """AdamW over fp32 masters of the given parameters (see the module docstring).

    Args:
        params: iterable of parameters (those with ``requires_grad`` are optimized).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
    """

    def __init__(self, params, *, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params: expected at least one trainable parameter")
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_()
                        for p in self.params]
        # Bias, norm and (most) 1-D parameters get no weight decay.
        decay = [m for p, m in zip(self.params, self.masters) if p.dim() >= 2]
        no_decay = [m for p, m in zip(self.params, self.masters) if p.dim() < 2]
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        self.inner = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=True)

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self) -> None:
        for p, m in zip(self.params, self.masters):
            p.grad = None
            if m is not p:
                m.grad = None

    def clip_grad_norm_(self, max_norm: float | None) -> torch.Tensor:
        """Total gradient norm (a 0-dim tensor, no host sync); clips in place when ``max_norm`` is set."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.params[0].device)
        if max_norm is None:
            return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        return torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], max_norm,
                                              foreach=True)

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m)  # in place: generation keeps reading the same tensor

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(),
                "masters": [None if m is p else m.detach() for p, m in zip(self.params, self.masters)]}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        with torch.no_grad():
            for p, m, saved in zip(self.params, self.masters, state["masters"]):
                if m is not p and saved is not None:
                    m.copy_(saved)
                    p.copy_(saved)


def lr_schedule(optimizer: MasterWeightAdamW, *, schedule: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup then "constant", "linear" decay to 0, or "cosine" decay to 0."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"schedule: expected 'constant', 'linear' or 'cosine', got {schedule!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected >= 0, got {warmup_steps}")
    total = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer.inner, factor)
