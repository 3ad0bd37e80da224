"""A static KV cache: fixed-shape buffers allocated once, passed explicitly to the model.

All layers live in two tensors ``k_all`` / ``v_all`` of shape (n_layers, B, L, Hkv, D);
``k[i]`` / ``v[i]`` are (B, L, Hkv, D) views of layer i. Sequences advance in lockstep:
slot s of row b holds the token at sequence column s, the prompt is left-padded so row
b's valid slots are [start[b], lengths[b]). Static shapes let the decode step be
captured in a CUDA graph (gpt-fast / nano-vllm style).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhf_engine.model.config import ModelConfig


@dataclass
class KVCache:
    """Per-layer K/V buffers plus per-sequence bookkeeping.

    k_all, v_all: (n_layers, B, L, Hkv, D) in the cache dtype.
    lengths: (B,) int32 — number of slots written (the next token goes to slot lengths[b]).
    start: (B,) int32 — first valid slot (number of left-padding columns of the prompt).
    """

    k_all: torch.Tensor
    v_all: torch.Tensor
    lengths: torch.Tensor
    start: torch.Tensor
    k: list[torch.Tensor] = field(init=False, repr=False)
    v: list[torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self):
        if self.k_all.dim() != 5 or self.k_all.shape != self.v_all.shape:
            raise ValueError(f"KVCache: expected k_all and v_all of equal shape (n_layers, B, L, Hkv, D), got "
                             f"{tuple(self.k_all.shape)} and {tuple(self.v_all.shape)}")
        B = self.k_all.shape[1]
        for name in ("lengths", "start"):
            t = getattr(self, name)
            if t.shape != (B,) or t.dtype != torch.int32:
                raise ValueError(f"KVCache.{name}: expected ({B},) int32, got {tuple(t.shape)} {t.dtype}")
        self.k = list(self.k_all.unbind(0))
        self.v = list(self.v_all.unbind(0))

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> "KVCache":
        """Zero-filled cache for ``batch`` sequences of up to ``max_len`` tokens (prompt + new)."""
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"KVCache.allocate: expected batch > 0 and max_len > 0, got {batch} and {max_len}")
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        return cls(k_all=torch.zeros(shape, dtype=dtype, device=device),
                   v_all=torch.zeros(shape, dtype=dtype, device=device),
                   lengths=torch.zeros(batch, dtype=torch.int32, device=device),
                   start=torch.zeros(batch, dtype=torch.int32, device=device))

    @property
    def batch_size(self) -> int:
        return self.k_all.shape[1]

    @property
    def max_len(self) -> int:
        return self.k_all.shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self.k_all.numel() * self.k_all.element_size()

    def reset(self) -> None:
        """Forget all sequences (K/V contents are left as they are: slots beyond lengths are never read)."""
        self.lengths.zero_()
        self.start.zero_()

    def head(self, n: int) -> "KVCache":
        """A view of the first ``n`` rows (K/V, lengths and start share this cache's memory): writes through it,
        e.g. a prefill of n sequences, land in this cache."""
        return KVCache(k_all=self.k_all[:, :n], v_all=self.v_all[:, :n], lengths=self.lengths[:n],
                       start=self.start[:n])

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A new, smaller cache holding the given rows (int64 (B',) on the cache device), e.g. to drop finished ones."""
        return KVCache(k_all=self.k_all.index_select(1, rows), v_all=self.v_all.index_select(1, rows),
                       lengths=self.lengths.index_select(0, rows), start=self.start.index_select(0, rows))


    def copy_rows_to(self, rows: torch.Tensor, dst: "KVCache") -> None:
        """dst[i] = self[rows[i]] for K/V, lengths and start; dst has len(rows) rows and the same L."""
        if dst.k_all.shape[2:] != self.k_all.shape[2:] or dst.batch_size != rows.numel():
            raise ValueError(f"dst: expected a cache of shape (n_layers, {rows.numel()}, "
                             f"{', '.join(map(str, self.k_all.shape[2:]))}), got {tuple(dst.k_all.shape)}")
        torch.index_select(self.k_all, 1, rows, out=dst.k_all)
        torch.index_select(self.v_all, 1, rows, out=dst.v_all)
        torch.index_select(self.lengths, 0, rows, out=dst.lengths)
        torch.index_select(self.start, 0, rows, out=dst.start)


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V over all layers for one token."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize


def step_bytes_per_sequence(config: ModelConfig, prefill_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Transient bytes one sequence adds during generation, besides its KV cache: the prefill's largest live
    set in a layer (residual, normed input, q/k/v, attention output, gate and up and their product, all
    ``prefill_len`` tokens long) and the last position's logits (in ``dtype``, with room for fp32 copies: the
    samplers read the LM head's output as it is, an upper bound)."""
    es = dtype.itemsize
    H, I, D = config.hidden_size, config.intermediate_size, config.head_dim
    qkv = (config.num_heads + 2 * config.num_kv_heads) * D
    per_token = (3 * H + qkv + config.num_heads * D + 3 * I) * es
    return prefill_len * per_token + config.vocab_size * (es + 8)


def max_batch_from_free_memory(config: ModelConfig, max_len: int, dtype: torch.dtype = torch.bfloat16,
                               device: torch.device | str = "cuda", fraction: float = 0.9,
                               reserve_bytes: int = 0, prefill_len: int | None = None) -> int:
    """Largest batch whose cache of ``max_len`` tokens, plus the transient memory of its generation step
    (``step_bytes_per_sequence`` with ``prefill_len`` prompt tokens; default ``max_len``), fits in ``fraction``
    of the memory this process can still use on ``device`` minus ``reserve_bytes``. Usable memory is the free
    device memory plus what PyTorch's caching allocator holds but no tensor uses (right after a training step
    that is most of it, and ``mem_get_info`` does not count it as free; free blocks of CUDA-graph private pools
    count too, though only their graphs can reuse them: keep ``fraction`` below 1)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"max_batch_from_free_memory: expected a CUDA device, got {device}")
    if max_len <= 0:
        raise ValueError(f"max_len: expected > 0, got {max_len}")
    prefill_len = max_len if prefill_len is None else prefill_len
    if not 0 < prefill_len <= max_len:
        raise ValueError(f"prefill_len: expected in [1, max_len={max_len}], got {prefill_len}")
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    budget = int((free + cached) * fraction) - reserve_bytes
    per_seq = kv_bytes_per_token(config, dtype) * max_len + step_bytes_per_sequence(config, prefill_len, dtype)
    return max(0, budget // per_seq)
