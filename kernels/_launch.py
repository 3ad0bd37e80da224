"""Launch geometry shared by the kernels' host code.

``cdiv`` and ``next_pow2`` are plain Python: ``triton.cdiv`` and ``triton.next_power_of_2`` are
``ConstexprFunction`` objects whose call costs ~3 us on the host, several times per launch, and the
small RL ops (GAE, PPO loss) are bound by exactly that host time.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, (int(x) - 1).bit_length())


@functools.lru_cache(maxsize=256)
def row_launch_config(B: int, T: int, block_t: Optional[int], max_block_t: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_T, num_warps) for kernels that walk (B, T) rows in chunks of BLOCK_T tokens:
    chunks of up to ``max_block_t`` tokens, short rows packed several per program (up to 2048
    tokens a program), and more warps for bigger tiles."""
    if block_t is None:
        block_t = min(max_block_t, next_pow2(max(T, 16)))
    if block_t < 2 or block_t & (block_t - 1):
        raise ValueError(f"block_t: expected a power of two >= 2, got {block_t}")
    rows = max(1, min(next_pow2(max(B, 1)), 2048 // block_t))
    size = rows * block_t
    num_warps = 8 if size >= 2048 else 4 if size >= 512 else 2
    return rows, block_t, num_warps


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device, default: int = 4) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM); ``default`` elsewhere (the interpreter)."""
    if device.type != "cuda":
        return default
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
