"""The PPO loss metrics of the ``ppo_loss_with_grads`` functions: a read-only mapping over one device buffer.

The fused ops write their seven metrics into one (7,) tensor. Splitting it into seven 0-dim views (``unbind``)
costs ~4 us of host time here, more than a tenth of a whole ``ppo_loss_with_grads`` call; :class:`PPOMetrics`
makes those views only when a metric is first read (a logging step reads them, most steps need not).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

METRIC_KEYS = ("pg_loss", "clip_frac", "approx_kl", "vf_loss", "vf_clip_frac", "entropy", "kl")  # buffer order

def metric_keys(has_values: bool, has_entropy: bool, has_ref: bool) -> tuple[str, ...]:
    """The metrics a call defines: pg_loss, clip_frac, approx_kl, plus vf_loss and vf_clip_frac with values,
    entropy with entropy, kl with ref_logp (the keys of ``ppo_loss_reference``'s metrics)."""
    return ("pg_loss", "clip_frac", "approx_kl") + (("vf_loss", "vf_clip_frac") if has_values else ()) \
        + (("entropy",) if has_entropy else ()) + (("kl",) if has_ref else ())


class PPOMetrics(Mapping):
    """Read-only mapping name -> detached 0-dim tensor: views of ``buffer[offset:offset + 7]`` (order
    :data:`METRIC_KEYS`) made on first access. ``dict(metrics)`` gives a plain dict; iteration follows
    :func:`metric_keys`."""

    __slots__ = ("_buffer", "_offset", "_keys", "_views")

    def __init__(self, buffer: torch.Tensor, keys: tuple[str, ...], offset: int = 0):
        self._buffer = buffer
        self._offset = offset
        self._keys = keys
        self._views: dict[str, torch.Tensor] | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        if self._views is None:
            self._views = dict(zip(METRIC_KEYS, self._buffer[self._offset:self._offset + len(METRIC_KEYS)].unbind()))
        return self._views[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keys

    def __repr__(self) -> str:
        return f"PPOMetrics({dict(self)!r})"
