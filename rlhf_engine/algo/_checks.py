"""Argument checks shared by the RL functions: clear errors that name the argument."""
from __future__ import annotations

import torch


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
