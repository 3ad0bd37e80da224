"""Argument checks shared by the RL functions: clear errors that name the argument."""
from __future__ import annotations

import math

import torch

from rlhf_engine.kernels._args import real_value


def check_2d(name: str, x: torch.Tensor, shape: tuple[int, int] | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a (B, T) tensor, got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")


def check_same(names_tensors: dict[str, torch.Tensor | None]) -> tuple[int, int]:
    """All given (B, T) tensors must share shape and device; returns (B, T)."""
    ref_name, ref = None, None
    for name, t in names_tensors.items():
        if t is None:
            continue
        check_2d(name, t)
        if ref is None:
            ref_name, ref = name, t
            continue
        if t.shape != ref.shape:
            raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (as {ref_name}), got {tuple(t.shape)}")
        if t.device != ref.device:
            raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {t.device}")
    if ref is None:
        raise ValueError("expected at least one tensor")
    return ref.shape[0], ref.shape[1]


def check_1d(name: str, x: torch.Tensor, n: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or (n is not None and x.shape[0] != n):
        want = f"({n},)" if n is not None else "a 1-D tensor"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(x.shape)}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def valid(mask: torch.Tensor) -> torch.Tensor:
    """A mask as booleans: nonzero is a valid position, as the C++ and Triton kernels read it (a float mask of 0.5
    is not a weight)."""
    return mask if mask.dtype == torch.bool else mask != 0


def valid_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``valid(mask)`` as 0/1 values of ``dtype``."""
    return valid(mask).to(dtype)


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` where the mask is valid, 0 elsewhere: a NaN or inf at a masked position does not leak into sums (a
    product with the mask would turn it into NaN)."""
    return torch.where(valid(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


def check_mask_for(name: str, x: torch.Tensor, mask: torch.Tensor) -> None:
    """``mask`` must have ``x``'s shape (no silent broadcasting) and device."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != x.shape:
        raise ValueError(f"mask: expected shape {tuple(x.shape)} (as {name}), got {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"mask: expected device {x.device} (as {name}), got {mask.device}")


def check_normalizer(name: str, value) -> None:
    """A token or sequence count given by the caller (None: taken from the mask): a positive finite number. A
    tensor is checked where that costs no device sync (on the CPU)."""
    if value is None or torch.compiler.is_compiling():
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a number or a one-element tensor, got shape {tuple(value.shape)}")
        if value.device.type != "cpu":
            return
    v = real_value(value)
    if v is None or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
