"""Hyperparameter checks shared by the fused PPO losses (Triton and native), and a cache for their result.

Every bad value raises a TypeError or ValueError that names the argument. The ``*_with_grads`` entry points
are host-bound, so they check and normalize a configuration once (:class:`ConfigCache`) and look it up after.
"""
from __future__ import annotations

import math
import numbers

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3")


def as_float(name: str, x) -> float:
    """``float(x)`` for a real number (Python, NumPy or a one-element tensor), finite; else a TypeError (not a
    number, a bool) or ValueError (NaN, infinite) naming ``name``."""
    if isinstance(x, (bool, str, bytes)):
        raise TypeError(f"{name}: expected a number, got {x!r}")
    try:
        v = float(x)
    except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: a tensor of several elements
        raise TypeError(f"{name}: expected a number, got {type(x).__name__}") from e
    except OverflowError as e:
        raise ValueError(f"{name}: expected a finite number, got {x!r:.40}") from e
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v}")
    return v


def real_value(x) -> float | None:
    """``float(x)`` for a real number (Python, NumPy or a one-element tensor); None for anything else, bools
    included."""
    if isinstance(x, bool):
        return None
    if isinstance(x, numbers.Real):
        return float(x)
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_complex() and x.dtype != torch.bool:
        return float(x)
    return None


def int_value(x) -> int | None:
    """``int(x)`` for an integer (Python, NumPy or a one-element integer tensor); None for anything else, bools
    included."""
    if isinstance(x, bool):
        return None
    if isinstance(x, numbers.Integral):
        return int(x)
    if (isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_floating_point() and not x.is_complex()
            and x.dtype != torch.bool):
        return int(x)
    return None


def check_counts(num_tokens, num_seqs) -> None:
    """``num_tokens`` / ``num_seqs`` given as numbers (or CPU tensors, read without a device sync) must be positive
    and finite: 0 gives NaN, a negative count flips the objective's sign. A CUDA tensor is the kernel's to read."""
    if torch.compiler.is_compiling():  # a Python count is a symbolic value there: no branch on it
        return
    for name, x in (("num_tokens", num_tokens), ("num_seqs", num_seqs)):
        if x is None or (isinstance(x, torch.Tensor) and (x.device.type != "cpu" or x.numel() != 1)):
            continue  # (a tensor of several elements: the callers' own checks name it)
        if isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x > 0:
            continue  # the common case, before any tensor method
        v = as_float(name, x)
        if v <= 0:
            raise ValueError(f"{name}: expected a positive finite count, got {v}")


def grad_scale_value(x) -> float:
    """The ``grad_scale`` of a ``*_with_grads`` call as a float: a finite Python int or float, else a TypeError
    naming it (NaN and infinities included: the gradients would be meaningless)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"grad_scale: expected a finite Python number, got {x!r:.40}")
    try:
        v = float(x)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v):
        raise TypeError(f"grad_scale: expected a finite Python number, got {x!r:.40}")
    return v


def ppo_hyperparameters(clip_low, clip_high, dual_clip, value_clip, vf_coef, ent_coef, kl_coef, kl_kind, agg,
                        max_len) -> tuple:
    """(clip_low, clip_high, dual_clip | None, value_clip | None, vf_coef, ent_coef, kl_coef, kl_kind, agg,
    max_len | None) as floats / an int, clip_high defaulting to clip_low, after checking every value: clips > 0,
    dual_clip > 1, max_len > 0, kl_kind in :data:`KL_KINDS`, agg in :data:`AGG_MODES`, coefficients finite."""
    lo = as_float("clip_low", clip_low)
    hi = lo if clip_high is None else as_float("clip_high", clip_high)
    if not lo > 0 or not hi > 0:
        raise ValueError(f"clip_low, clip_high: expected > 0, got {lo}, {hi}")
    dual = None if dual_clip is None else as_float("dual_clip", dual_clip)
    if dual is not None and not dual > 1:
        raise ValueError(f"dual_clip: expected > 1 or None, got {dual}")
    vclip = None if value_clip is None else as_float("value_clip", value_clip)
    if vclip is not None and not vclip > 0:
        raise ValueError(f"value_clip: expected > 0 or None, got {vclip}")
    coefs = tuple(as_float(n, c) for n, c in (("vf_coef", vf_coef), ("ent_coef", ent_coef), ("kl_coef", kl_coef)))
    if kl_kind not in KL_KINDS:
        raise ValueError(f"kl_kind: expected one of {KL_KINDS}, got {kl_kind!r}")
    if agg not in AGG_MODES:
        raise ValueError(f"agg: expected one of {AGG_MODES}, got {agg!r}")
    if max_len is not None:
        if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral):
            raise TypeError(f"max_len: expected an int or None, got {max_len!r}")
        if not max_len > 0:
            raise ValueError(f"max_len: expected > 0 or None, got {max_len}")
        max_len = int(max_len)
    return (lo, hi, dual, vclip, *coefs, kl_kind, agg, max_len)


_PLAIN = (int, float, str, type(None))


class ConfigCache:
    """``build(*key)`` memoized on keys made of plain Python values only (a key holding a tensor or a NumPy
    scalar is built every time: a tensor hashes by identity and may change in place). Bounded: past ``maxsize``
    entries new keys are built and not stored."""

    def __init__(self, build, maxsize: int = 256):
        self.build, self.maxsize, self._store = build, maxsize, {}

    def __call__(self, *key):
        try:
            hit = self._store.get(key)
        except (TypeError, RuntimeError):  # unhashable; or a hash collision compared a tensor of several elements
            hit = None
        if hit is not None:
            return hit
        value = self.build(*key)
        if len(self._store) < self.maxsize and all(type(k) in _PLAIN for k in key):
            self._store[key] = value
        return value
