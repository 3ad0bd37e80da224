"""Low-rank adapters (LoRA) on the model's linear layers, sharing the frozen base weights.

``apply_lora`` swaps each targeted ``nn.Linear`` for a ``LoRALinear`` that holds the
*same* weight/bias Parameter objects (no copy) plus two small trainable matrices:

    y = x Wᵀ + b + (α / r) · dropout(x) Aᵀ Bᵀ,   A: (r, in) Kaiming-uniform, B: (out, r) zeros,

so the adapted model starts equal to the base model. ``disable_adapters(model)`` turns
the adapters off inside a ``with`` block: the same module then computes the base model,
which is the PPO reference policy without a second copy of the weights.

State-dict keys stay HF-compatible for the base weights (``...q_proj.weight``) and add
``...q_proj.lora_A`` / ``...q_proj.lora_B``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .batch_invariant import Linear, applies, linear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A linear layer y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ over a shared, frozen (W, b).

    x: (..., in_features) -> y: (..., out_features) in x's dtype. The LoRA product is
    computed in the dtype of A/B (e.g. fp32 adapters over a bf16 base).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank: expected > 0, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: shared with the base model, not copied
        self.bias = base.bias
        dtype = dtype or base.weight.dtype
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapters_enabled = True
        self.batch_invariant = getattr(base, "batch_invariant", False)  # the base Linear's (batch_invariant.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias, batch_invariant=self.batch_invariant)
        if not self.adapters_enabled:
            return y
        h = self.dropout(x).to(self.lora_A.dtype)
        if self._one_gemm(y):
            # y + scaling · (h Aᵀ) Bᵀ with the second GEMM accumulating into y (addmm): 3 kernels instead of 5
            # (h Aᵀ, then Bᵀ, the scale and the add), the low-rank term rounded once. The same op with and
            # without autograd, so a no-grad scoring forward equals the training forward bit for bit; in place
            # (no new buffer) when nothing needs a gradient. fp32 on the CPU with batch_invariant: (h Aᵀ) Bᵀ as a
            # batch-invariant GEMM of its own, then one add (batch_invariant.py), again the same with and without.
            low = linear(h, self.lora_A, batch_invariant=self.batch_invariant).reshape(-1, self.rank)
            y2 = y.reshape(-1, self.out_features)
            grad = torch.is_grad_enabled() and (y.requires_grad or low.requires_grad or self.lora_B.requires_grad)
            if self.batch_invariant and applies(y):  # fp32 CPU: the low-rank GEMM batch-invariant too, then the add
                delta = linear(low, self.lora_B)
                return (torch.add(y2, delta, alpha=self.scaling) if grad
                        else y2.add_(delta, alpha=self.scaling)).view(y.shape)
            if grad:
                return torch.addmm(y2, low, self.lora_B.t(), alpha=self.scaling).view(y.shape)
            return y2.addmm_(low, self.lora_B.t(), alpha=self.scaling).view(y.shape)
        delta = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling  # (..., out)
        return y + delta.to(y.dtype)

    def _one_gemm(self, y: torch.Tensor) -> bool:
        """Adapters in the output's dtype, no autocast (whose casts the general path leaves to F.linear)."""
        return (self.lora_A.dtype == self.lora_B.dtype == y.dtype
                and not torch.is_autocast_enabled(y.device.type))

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, (out, in) fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _iter_targets(model: nn.Module, target_modules: Sequence[str]) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in target_modules:
                yield parent, name, child


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0,
               target_modules: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0, *,
               freeze_base: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` child named in ``target_modules`` by a ``LoRALinear`` (in place).

    freeze_base: set requires_grad=False on every parameter of ``model`` except the new
    adapters. dtype: adapter dtype (default: the base weight's). Returns ``model``.
    """
    if rank <= 0:
        raise ValueError(f"rank: expected > 0, got {rank}")
    if "lm_head" in target_modules or "embed_tokens" in target_modules:
        raise ValueError("target_modules: LoRA on lm_head/embed_tokens is not supported (the fused LM-head "
                         "log-prob reads model.lm_head_weight directly)")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    n = 0
    for parent, name, child in _iter_targets(model, target_modules):
        if isinstance(child, LoRALinear):
            raise ValueError(f"apply_lora: {name} already has an adapter")
        if not isinstance(child, nn.Linear):
            raise TypeError(f"target_modules: {name!r} is a {type(child).__name__}, expected nn.Linear")
        setattr(parent, name, LoRALinear(child, rank, alpha, dropout, dtype))
        n += 1
    if n == 0:
        raise ValueError(f"target_modules: no nn.Linear named any of {tuple(target_modules)} in the model")
    return model


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter matrices (A and B of every LoRALinear), in module order."""
    return [p for m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block every LoRALinear computes the base layer only (the reference model).

    Note: a CUDA graph captured with adapters on keeps them on; run the reference eagerly.
    """
    mods = lora_modules(model)
    saved = [m.adapters_enabled for m in mods]
    try:
        for m in mods:
            m.adapters_enabled = False
        yield model
    finally:
        for m, s in zip(mods, saved):
            m.adapters_enabled = s


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scaling·B A, in place) and put plain
    ``nn.Linear`` modules back (sharing the same W/b Parameters). Returns ``model``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.weight.add_(child.delta_weight().to(child.weight.dtype))
                lin = Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta",
                             batch_invariant=child.batch_invariant)
                lin.weight = child.weight
                lin.bias = child.bias
                setattr(parent, name, lin)
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with adapters folded into the weights and lora_* keys dropped
    (the model itself is not changed)."""
    sd = dict(model.state_dict())
    for mname, m in model.named_modules():
        if isinstance(m, LoRALinear):
            prefix = f"{mname}." if mname else ""
            w = sd[prefix + "weight"]
            sd[prefix + "weight"] = (w.float() + m.delta_weight()).to(w.dtype)
            sd.pop(prefix + "lora_A")
            sd.pop(prefix + "lora_B")
    return sd
