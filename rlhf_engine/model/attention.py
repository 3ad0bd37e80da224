"""Attention dispatch for the model: PyTorch SDPA ("torch") or the Triton kernels ("triton").

The backend is always chosen explicitly (``resolve_backend``): "auto" means Triton for
CUDA tensors and PyTorch elsewhere. The "torch" path runs anywhere, including the CPU,
and accepts any 0/1 attention mask; the "triton" path needs each sequence's valid
tokens to be one contiguous run ``[kv_start, kv_end)`` (left padding, right padding or
both), which is what batches of prompts + responses look like.

Conventions (all tensors in the model's (B, T, H, D) layout):
  q: (B, T, Hq, D); k, v: (B, T, Hkv, D); query head h reads KV head h // (Hq // Hkv).
  Full-sequence attention is causal: query i sees key j iff j <= i and j is valid.
  A query row with no valid key (a left-padding position) attends to itself only, so
  its output stays finite; its value is meaningless and must be masked downstream.
  Decode: the cache holds (B, L, Hkv, D) per layer; sequence b's valid slots are
  [cache_start[b], cache_lens[b]) and its Tn new queries sit at slots
  cache_lens[b] - Tn + i (cache_lens already counts the new tokens).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .config import ATTN_BACKENDS


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "triton" on CUDA, else "torch"; "torch"/"triton" are returned as given."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend: expected one of {ATTN_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


@dataclass
class AttnMeta:
    """Per-forward attention inputs shared by every layer (built once by the model).

    mode: "full" (no cache), "prefill" (full attention, then K/V written to cache
      slots [0, T)) or "decode" (new tokens written at slot ``write_pos`` and attention
      over the cache).
    attention_mask: (B, T) bool or None — torch path, full/prefill: valid keys.
    kv_start, kv_end: (B,) int32 or None — triton path, full/prefill: valid run.
    cache: object with per-layer lists ``k``/``v`` of (B, L, Hkv, D) tensors, or None.
    write_pos: (B,) int32 or int64 — decode: slot of the first new token of each sequence.
    cache_lens: (B,) int32 — decode: valid length including the new tokens.
    cache_start: (B,) int32 — decode: first valid slot (left padding of the prompt).
    kv_len: host int bound on the used cache length (torch decode only; None = all L).
    fused_ops: the triton backend, every mode: the decoder layers run the fused kernels (residual add + RMSNorm,
      silu(gate) * up; differentiable) on half RoPE tables; without autograd (generation, scoring) q/k/v and
      gate/up run as packed GEMMs, and decode rotates K inside the cache write and q inside the decode
      attention kernel.
    rope_rows: (B,) int32 — decode with fused_ops: row of sequence b's first new token in the (B * Tn, D)
      cos/sin tables (b * Tn).
    fuse_cache_write: decode with fused_ops: the attention kernel writes the new K/V itself (``kv_write``); set
      once per step when ``decode_fused_write_enabled()`` and the attention runs one split.
    rope_table: decode with fused_ops: the model's (L, D) [cos | sin] half table (``RotaryEmbedding.half_table``);
      the step gathers its rows at the position ids (int32) instead of computing them.
    fuse_norm_gemm: decode with fused_ops: the projections on the split-K decode GEMM with the norms, silu * up and
      the residual adds fused in (``kernels/norm_linear.py``); set once per step when ``decode_norm_gemm_enabled()``.
    gemm_ws: decode with fused_ops: the projections on the Gluon decode GEMM for Hopper (``kernels/decode_gemm_ws.py``,
      silu * up in the gate/up one), the norms on their kernel; with ``fuse_norm_gemm`` too, that path's fused GEMMs
      on the Gluon kernel; set once per step when ``decode_gemm_ws_enabled()`` on an sm_90 GPU (the layers whose
      weights it cannot take run the usual path).
    batch_invariant: torch backend, fp32 on the CPU: the attention accumulated in fp64 (``_sdpa``); the model's
      ``ModelConfig.batch_invariant``.
    """

    backend: str
    mode: str = "full"
    attention_mask: torch.Tensor | None = None
    kv_start: torch.Tensor | None = None
    kv_end: torch.Tensor | None = None
    cache: Any = None
    write_pos: torch.Tensor | None = None
    cache_lens: torch.Tensor | None = None
    cache_start: torch.Tensor | None = None
    kv_len: int | None = None
    fused_ops: bool = False
    rope_rows: torch.Tensor | None = None
    fuse_cache_write: bool = False
    rope_table: torch.Tensor | None = None
    fuse_norm_gemm: bool = False
    gemm_ws: bool = False
    batch_invariant: bool = True


def mask_to_kv_range(attention_mask: torch.Tensor, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) 0/1 mask -> kv_start, kv_end (B,) int32 with mask[b] == 1 exactly on [kv_start, kv_end).

    An all-zero row gives kv_start = kv_end = 0. ``validate`` checks that every row is one
    contiguous run (one host sync) and raises ValueError otherwise; under torch.compile the check is an
    asynchronous assert in the graph (a RuntimeError, or a device-side assert on a GPU).
    """
    B, T = attention_mask.shape
    m = attention_mask.bool()
    any_valid = m.any(dim=1)
    first = torch.argmax(m.to(torch.uint8), dim=1)  # first 1
    last_from_end = torch.argmax(m.flip(1).to(torch.uint8), dim=1)  # first 1 from the right
    kv_start = torch.where(any_valid, first, torch.zeros_like(first)).to(torch.int32)
    kv_end = torch.where(any_valid, T - last_from_end, torch.zeros_like(first)).to(torch.int32)
    if validate:
        j = torch.arange(T, device=m.device)
        expected = (j[None, :] >= kv_start[:, None]) & (j[None, :] < kv_end[:, None])
        if torch.compiler.is_compiling():  # no host branch on data in a graph: an assert that runs with it
            torch._assert_async((expected == m).all(), "attention_mask: the triton attention backend needs each "
                                "row's valid tokens to be one contiguous run; got a mask with holes")
        elif not bool(torch.equal(expected, m)):
            raise ValueError("attention_mask: the triton attention backend needs each row's valid tokens to be one "
                             "contiguous run (left and/or right padding); got a mask with holes. Use "
                             "attn_backend='torch' for arbitrary masks.")
    return kv_start, kv_end


def _expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv * n_rep, L, D) with head h reading KV head h // n_rep."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch_invariant: bool, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; with ``batch_invariant``, fp32 on the CPU: computed in fp64 and rounded
    once to fp32.

    A query row's fp32 result would otherwise depend on the shapes around it (7e-7 seen at T = 97, D = 64): the
    numbers of query rows and keys differ between a decode step (G·Tn rows over the cache) and the training forward
    (T rows over T keys), and over 30 layers that put ~1e-5 between a token's log-prob in generation and in the
    training forward (SmolLM2-135M). In fp64 the order of the sums moves a result by ~1e-16 relative, which the
    rounding to fp32 absorbs unless the result lies that close to a rounding boundary: both paths give the same
    fp32 attention but for such rare elements (none seen), and a more accurate one. Costs +2% on a SmolLM2 generation
    of B = 8 here, and in training twice the memory the attention saves for the backward."""
    if batch_invariant and q.dtype == torch.float32 and q.device.type == "cpu" and not torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kwargs).float()
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None,
                    batch_invariant: bool = True) -> torch.Tensor:
    """Causal GQA attention with SDPA. q (B,T,Hq,D), k/v (B,T,Hkv,D), mask (B,T) or None -> (B,T,Hq,D).
    batch_invariant: fp32 on the CPU, accumulated in fp64 (``_sdpa``)."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    if attention_mask is None:
        out = _sdpa(q, k, v, batch_invariant, is_causal=True, enable_gqa=Hq != Hkv)
    else:
        idx = torch.arange(T, device=q.device)
        causal = idx[None, :] <= idx[:, None]  # (T, T): key j <= query i
        allowed = causal[None] & attention_mask.bool()[:, None, :]  # (B, T, T)
        allowed = allowed | (idx[None, :] == idx[:, None])[None]  # rows with no valid key see themselves
        k, v = _expand_kv(k, Hq // Hkv), _expand_kv(v, Hq // Hkv)  # (B, Hq, T, D)
        out = _sdpa(q, k, v, batch_invariant, attn_mask=allowed[:, None])
    return out.transpose(1, 2)  # (B, T, Hq, D)


def torch_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
                           cache_start: torch.Tensor, kv_len: int | None = None,
                           batch_invariant: bool = True) -> torch.Tensor:
    """Attention of Tn new queries over the cache. q (B,Tn,Hq,D), caches (B,L,Hkv,D) -> (B,Tn,Hq,D).
    batch_invariant: fp32 on the CPU, accumulated in fp64 (``_sdpa``), so a row equals ``torch_attention``'s.

    The G = Hq/Hkv query heads of a KV head are packed as G·Tn query rows of that head, so
    the cache is read in place, never expanded to Hq heads.
    """
    B, Tn, Hq, D = q.shape
    if kv_len is not None:
        k_cache, v_cache = k_cache[:, :kv_len], v_cache[:, :kv_len]
    L, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    j = torch.arange(L, device=q.device)
    q_slot = cache_lens[:, None].long() - Tn + torch.arange(Tn, device=q.device)  # (B, Tn)
    allowed = (j[None, None, :] <= q_slot[:, :, None]) & (j[None, None, :] >= cache_start[:, None, None].long())
    allowed = allowed[:, None].expand(B, G, Tn, L).reshape(B, 1, G * Tn, L)  # row g*Tn + t
    qh = q.view(B, Tn, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Tn, D)  # head h = kv*G + g
    kh, vh = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # (B, Hkv, L, D) views
    out = _sdpa(qh, kh, vh, batch_invariant, attn_mask=allowed)  # (B, Hkv, G*Tn, D)
    return out.view(B, Hkv, G, Tn, D).permute(0, 3, 1, 2, 4).reshape(B, Tn, Hq, D)


def torch_write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                   write_pos: torch.Tensor) -> None:
    """k_cache[b, write_pos[b] + i] = k_new[b, i] (same for v). caches (B,L,Hkv,D), new (B,Tn,Hkv,D)."""
    B, Tn, Hkv, D = k_new.shape
    slots = write_pos.long()[:, None] + torch.arange(Tn, device=k_new.device)  # (B, Tn)
    idx = slots[:, :, None, None].expand(B, Tn, Hkv, D)
    k_cache.scatter_(1, idx, k_new.to(k_cache.dtype))
    v_cache.scatter_(1, idx, v_new.to(v_cache.dtype))


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
    """Causal attention over the sequence itself (training forward and prefill): (B,T,Hq,D)."""
    if meta.backend == "torch":
        return torch_attention(q, k, v, meta.attention_mask, meta.batch_invariant)
    from rlhf_engine.kernels.attention import flash_attention  # lazy: Triton is optional

    return flash_attention(q, k, v, causal=True, kv_start=meta.kv_start, kv_end=meta.kv_end, backend="triton")


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
             meta: AttnMeta) -> None:
    """Write the new tokens' K/V (B,Tn,Hkv,D) into the cache at ``meta.write_pos`` (decode)."""
    if meta.backend == "torch":
        torch_write_kv(k_cache, v_cache, k_new, v_new, meta.write_pos)
        return
    from rlhf_engine.kernels.kv_cache import write_kv_cache

    write_kv_cache(k_cache, v_cache, k_new, v_new, meta.write_pos, backend="triton")


def decode_fused_write_enabled() -> bool:
    """Whether the triton decode step hands its cache write to the attention kernel (``kv_write``): on by default,
    off with ``RLHF_ENGINE_DECODE_FUSED_WRITE=0`` (or false/off/no). One launch fewer per layer (24 a Qwen2-0.5B
    step); the H200 run of 1f4b6a6 measured decode steps 4.8% (Qwen2-0.5B) and 6.8% (SmolLM2-135M) faster with it
    (benchmarks/RESULTS.md, "Generation"), and the CPU tests check it against the separate write, bit for bit. Read
    once per decode step; ``DecodeGraphCache`` keys its graphs on it."""
    return os.environ.get("RLHF_ENGINE_DECODE_FUSED_WRITE", "1").strip().lower() not in ("0", "false", "off", "no")


def decode_norm_gemm_enabled() -> bool:
    """``RLHF_ENGINE_DECODE_NORM_GEMM=1``: the triton decode step runs its four projections on the split-K decode GEMM
    (``kernels/norm_linear.py``): each norm inside the GEMM after it, silu * up in the gate/up GEMM, the residual
    adds in the o and down GEMMs (3 kernels fewer a layer, 71 a Qwen2-0.5B step, layer 0 keeping its norm; and no
    cuBLAS). Off by default until a GPU run measures it against cuBLAS plus the separate kernels. Read once per decode
    step; ``DecodeGraphCache`` keys its graphs on it."""
    return os.environ.get("RLHF_ENGINE_DECODE_NORM_GEMM", "0") == "1"


def decode_gemm_ws_enabled() -> bool:
    """``RLHF_ENGINE_DECODE_GEMM_WS=1``: on an sm_90 GPU the triton decode step runs its four projections on the
    Gluon decode GEMM (``kernels/decode_gemm_ws.py``: TMA-fed, swap-AB wgmma, split-K where N is small; silu * up in
    the gate/up GEMM, one kernel a layer fewer) instead of cuBLAS; with ``RLHF_ENGINE_DECODE_NORM_GEMM=1`` too, that
    path's fused GEMMs (the norms from partial sums of squares, the residual adds: 5 kernels a layer) run on it. Off
    by default until a GPU run measures it against cuBLAS. Read once per decode step; ``DecodeGraphCache`` keys its
    graphs on it."""
    return os.environ.get("RLHF_ENGINE_DECODE_GEMM_WS", "0") == "1"


def lm_head_sample_enabled() -> bool:
    """``RLHF_ENGINE_LM_HEAD_SAMPLE=1``: on an sm_90 GPU ``generate`` draws each decode step's tokens in the LM head's
    epilogue (``kernels/lm_head_sample.py``: the Gluon decode GEMM, no logits written; the same draw as the Triton
    sampler on the same logits) where the sampling is plain (no top-k / top-p). Off by default until a GPU run
    measures it; never after ``benchmarks/ws_probe.py --lm-head`` saw it fail or was not run
    (``RLHF_ENGINE_LM_HEAD_SAMPLE_BROKEN``). ``DecodeGraphCache`` keys its graphs on the step's output (on this
    path they end with the draw, their seed an input filled before each replay)."""
    if os.environ.get("RLHF_ENGINE_LM_HEAD_SAMPLE_BROKEN") in ("1", "notrun"):
        return False
    return os.environ.get("RLHF_ENGINE_LM_HEAD_SAMPLE", "0") == "1"


def cache_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta,
                    q_rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                    kv_write: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    pdl: bool = False) -> torch.Tensor:
    """Decode attention of q (B,Tn,Hq,D) over the cache (B,L,Hkv,D) -> (B,Tn,Hq,D).

    q_rope: (cos, sin) (B, Tn, D) or their first halves (B, Tn, D/2) when q is not rotated yet: the triton
    kernel rotates it (fused decode path).
    kv_write: (k_new, v_new, write_pos), triton backend only: written into the cache first, K rotated with
    q_rope, by the attention kernel itself where it runs one split (``decode_attention(kv_write=...)``).
    pdl: the kernel before is the split-K q/k/v GEMM (triggers early): launch with PDL on Hopper (``decode_attention``).
    """
    if kv_write is not None and meta.backend != "triton":
        raise ValueError("kv_write: only on the triton backend")
    if meta.backend == "torch":
        if q_rope is not None:
            from rlhf_engine.kernels.kv_cache import apply_rope

            q = apply_rope(q, *q_rope, backend="torch")  # fp32, rounded once, as the kernel does
        return torch_decode_attention(q, k_cache, v_cache, meta.cache_lens, meta.cache_start, meta.kv_len,
                                      meta.batch_invariant)
    from rlhf_engine.kernels.decode_attention import decode_attention

    q_cos, q_sin = q_rope if q_rope is not None else (None, None)
    return decode_attention(q, k_cache, v_cache, meta.cache_lens, cache_start=meta.cache_start, q_cos=q_cos,
                            q_sin=q_sin, kv_write=kv_write, backend="triton", pdl=pdl)
