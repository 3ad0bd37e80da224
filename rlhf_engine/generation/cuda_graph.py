"""The decode step captured in a CUDA graph (static input buffer, static KV cache).

One graph replays ``model.decode_step`` for a fixed cache (hence a fixed batch size and
cache length): embedding, every layer's K/V write + decode attention, the final norm and
the LM head, as one launch. Inputs are copied into a static (B, 1) buffer; the logits
come back in a static (B, 1, V) buffer that the next replay overwrites.

Capture rules followed here: the step never syncs with the host (decode_step reads its
positions from ``cache.lengths`` on the device), Triton autotuning and lazy imports happen
in the warm-up call before capture (``warm_up_decode``, over a full cache), and the warm-up's
effect on the cache (K/V written at the last slot, ``lengths += 1``) is undone by restoring
``lengths`` and ``start`` — the slot it wrote is overwritten before a real step reads it.

``DecodeGraphCache`` keeps caches + graphs between ``generate`` calls (one per batch-size
bucket and rounded cache length), so a training loop captures each bucket once. A graph
reads the parameters at the addresses it was captured with: optimizer steps update them in
place and are seen by the next replay; anything that swaps parameter tensors (``.to()``,
``load_state_dict(assign=True)``, ``merge_lora``) or toggles LoRA adapters is detected by a
fingerprint and triggers a new capture.
"""
from __future__ import annotations

import math

import torch

from ..kernels._launch import pdl_enabled
from ..model.attention import decode_fused_write_enabled, decode_gemm_ws_enabled, decode_norm_gemm_enabled
from .cache import KVCache


def warm_up_decode(model, cache: KVCache, ids: torch.Tensor, *, attn_backend: str, steps: int = 1,
                   step=None) -> None:
    """Run ``steps`` decode steps before a capture (Triton compiles and autotunes, lazy imports, cuBLAS
    workspaces), on a FULL cache: every row's valid range set to [0, max_len - 1), so that the decode
    attention kernel is autotuned on the longest walk over the cache it will make, not on the empty cache a
    graph is built for before its prefill (the tuned config is cached by shape bucket and then used at every
    length). ``lengths`` and ``start`` are restored afterwards; the K/V written at slot max_len - 1 is
    overwritten before any real step reads that slot. ``step``: the step to run instead of ``model.decode_step``
    (a callable of ids: ``CudaGraphDecoder``'s, with its head)."""
    saved_lengths, saved_start = cache.lengths.clone(), cache.start.clone()
    try:
        for _ in range(steps):
            cache.lengths.fill_(cache.max_len - 1)
            cache.start.zero_()
            if step is None:
                model.decode_step(ids, cache, attn_backend=attn_backend)
            else:
                step(ids)
    finally:
        cache.lengths.copy_(saved_lengths)
        cache.start.copy_(saved_start)


class CudaGraphDecoder:
    """Callable ids (B, 1) int64 -> logits (B, 1, V) that replays a captured decode step.

    model: a CausalLM on CUDA; cache: the KVCache the graph is bound to (the same tensors
    must stay alive and be updated in place); attn_backend: resolved backend name.
    capture=False runs the same step eagerly instead (any device; for debugging and tests). head="hidden": the step
    ends at the final norm and returns (B, 1, H); ``sample_head_name(temperature, greedy)``: it ends with the LM head
    fused with the sampler (``kernels.lm_head_sample``) and returns (tokens (B,), log-probs (B,)), drawn from the
    seed ``draw_seed`` put in ``static_seed`` before the replay.
    """

    def __init__(self, model, cache: KVCache, *, attn_backend: str, warmup: int = 1, capture: bool = True,
                 head: str = "logits"):
        device = cache.k_all.device
        self.cache = cache
        self.graph = None
        self.head = head
        sample = sample_head(head)
        # a sampling head draws from the seed in this buffer: the caller fills it before each step (``draw_seed``)
        self.static_seed = torch.zeros(1, dtype=torch.long, device=device) if sample is not None else None

        def step(ids):
            out = model.decode_step(ids, cache, attn_backend=attn_backend, head="hidden" if sample else head)
            if sample is None:
                return out
            from rlhf_engine.kernels._launch import use_pdl
            from rlhf_engine.kernels.lm_head_sample import lm_head_sample

            return lm_head_sample(out[:, 0], model.lm_head_weight, temperature=sample[0], greedy=sample[1],
                                  seed=self.static_seed, pdl=use_pdl(device))

        if not capture:
            self._eager = step
            return
        if device.type != "cuda":
            raise ValueError(f"CudaGraphDecoder: expected a CUDA cache, got device {device}")
        # The cache's device made current: torch.cuda.graph captures on the current device's stream, and Triton
        # launches on it too (a model on cuda:1 with cuda:0 current would otherwise escape the capture).
        with torch.cuda.device(device):
            self.static_ids = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
            saved_lengths = cache.lengths.clone()
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                # (the whole step: with a sampling head, the LM head + sampler's kernels compiled before the capture)
                warm_up_decode(model, cache, self.static_ids, attn_backend=attn_backend, steps=warmup, step=step)
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_logits = step(self.static_ids)
            cache.lengths.copy_(saved_lengths)  # capture does not execute, but keep the invariant explicit
        self.device = device

    def draw_seed(self, generator: torch.Generator | None) -> None:
        """A sampling head's seed for the next step: one 62-bit draw from ``generator`` (None: the device's default
        one), as ``kernels.sample.sample_logits`` draws it; nothing for greedy."""
        if self.static_seed is not None and not sample_head(self.head)[1]:
            from rlhf_engine.kernels.sample import sample_seed

            sample_seed(self.static_seed.device, False, generator, out=self.static_seed)

    def __call__(self, input_ids: torch.Tensor):
        if self.graph is None:
            return self._eager(input_ids)
        self.static_ids.copy_(input_ids)
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.static_logits


def sample_head(head: str) -> tuple[float, bool] | None:
    """(temperature, greedy) of a decode step that draws its tokens in the LM head (``sample_head_name``), else
    None (the step returns logits or the final norm's output)."""
    if not head.startswith("sample:"):
        return None
    _, temperature, greedy = head.split(":")
    return float(temperature), greedy == "1"


def sample_head_name(temperature: float, greedy: bool) -> str:
    """The ``head`` of a decode step (and graph) that ends with ``kernels.lm_head_sample``: the draw's settings are
    part of what the graph replays, so of its cache key."""
    return f"sample:{float(temperature)!r}:{int(bool(greedy))}"


def model_fingerprint(model) -> tuple:
    """What a captured graph depends on: parameter addresses/shapes/dtypes and LoRA adapter switches."""
    params = tuple((p.data_ptr(), p.dtype, tuple(p.shape)) for p in model.parameters())
    switches = tuple(m.adapters_enabled for m in model.modules() if hasattr(m, "adapters_enabled"))
    return (id(model), params, switches)


class DecodeGraphCache:
    """Static KV caches and their captured decode graphs, reused across ``generate`` calls.

    Keyed by (batch, cache length rounded up to ``len_multiple``, backend, capture, the decode path's switches, and
    the step's output: logits, or the tokens the LM head fused with the sampler draws at given settings, which plain
    sampling takes under ``RLHF_ENGINE_LM_HEAD_SAMPLE=1`` and top-k / top-p do not: a loop alternating the two, or
    two temperatures, keeps a cache and a graph for each); pass the same
    object to every ``generate(..., graph_cache=...)`` call of a training loop. ``generate`` runs a batch of B
    rows in its bucket ``batch_bucket(B)`` (powers of two up to ``batch_multiple``, then multiples of it), so batch
    sizes that vary from call to call share graphs. Holds the
    cache memory of every bucket it keeps (``nbytes``): at most ``max_entries`` of them (16: compaction alone
    uses up to four batch buckets per cache length), the least recently used dropped first. A model's entries
    whose fingerprint went stale (swapped parameter tensors, LoRA switched) are dropped at its next ``get`` that
    allocates (a replay of theirs would need a new capture). ``clear()`` frees them all.
    """

    def __init__(self, len_multiple: int = 256, max_entries: int = 16, batch_multiple: int = 8):
        if len_multiple <= 0:
            raise ValueError(f"len_multiple: expected > 0, got {len_multiple}")
        if max_entries <= 0:
            raise ValueError(f"max_entries: expected > 0, got {max_entries}")
        if batch_multiple <= 0 or batch_multiple & (batch_multiple - 1):
            raise ValueError(f"batch_multiple: expected a power of two, got {batch_multiple}")
        self.len_multiple = len_multiple
        self.max_entries = max_entries
        self.batch_multiple = batch_multiple
        self._entries: dict[tuple, tuple[tuple, KVCache, CudaGraphDecoder]] = {}  # oldest use first

    def cache_len(self, min_len: int) -> int:
        return math.ceil(min_len / self.len_multiple) * self.len_multiple

    def batch_bucket(self, batch: int) -> int:
        """The batch size ``batch`` rows run at: the next power of two up to ``batch_multiple``, else the next
        multiple of it (compaction's power-of-two buckets are among them)."""
        if batch <= self.batch_multiple:
            return 1 << max(0, batch - 1).bit_length()
        return math.ceil(batch / self.batch_multiple) * self.batch_multiple

    def get(self, model, batch: int, min_len: int, attn_backend: str,
            capture: bool = True, head: str = "logits") -> tuple[KVCache, CudaGraphDecoder]:
        """(cache, decoder) for ``batch`` rows and at least ``min_len`` slots; captured on first use
        (``capture=False``: an eager decoder over a reused static cache, on any device); ``head``: what the step
        returns (``CausalLM.decode_step``)."""
        L = self.cache_len(min_len)
        # the decode step's path is part of the key: a graph replays the kernels it was captured with
        key = (batch, L, attn_backend, capture, decode_fused_write_enabled(), decode_norm_gemm_enabled(),
               decode_gemm_ws_enabled(), pdl_enabled(), head)
        fp = model_fingerprint(model)
        entry = self._entries.pop(key, None)
        if entry is not None and entry[0] == fp:
            self._entries[key] = entry  # most recently used last
            return entry[1], entry[2]
        del entry
        # this model's stale entries (its parameters moved or its adapters switched since their capture) and the
        # least recently used beyond max_entries - 1 go before the new cache is allocated
        for k in [k for k, e in self._entries.items() if e[0][0] == fp[0] and e[0] != fp]:
            del self._entries[k]
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
        cache = KVCache.allocate(model.config, batch, L, dtype=model.dtype, device=model.device)
        decoder = CudaGraphDecoder(model, cache, attn_backend=attn_backend, capture=capture, head=head)
        self._entries[key] = (fp, cache, decoder)
        return cache, decoder

    @property
    def nbytes(self) -> int:
        return sum(e[1].nbytes for e in self._entries.values())

    def clear(self) -> None:
        self._entries.clear()
