"""Plain PyTorch references for GQA attention, decode attention over a KV cache, the cache write and RoPE.

Written for clarity, not speed: K/V are expanded to every query head with ``repeat_interleave``, the full
(Tq, Tk) score matrix is materialized, masked, and soft-maxed in fp32 (fp64 when the inputs are fp64). The Triton
kernels in ``kernels/attention*.py``, ``kernels/decode_attention.py`` and ``kernels/kv_cache.py`` are tested against
these functions, and they are the CPU fallback (``backend="torch"``).

Conventions shared with the kernels
-----------------------------------
* Layout "bshd": q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D). GQA: query head h reads KV head h // (Hq // Hkv).
* Per-sequence valid keys: ``kv_start[b] <= j < kv_end[b]`` (int32, shape (B,)). Right padding: kv_start = 0,
  kv_end = length. Left padding (what generation produces): kv_start = T - length, kv_end = T.
* Causal mask, bottom-right aligned: query i sits at key position ``i + (Tk - Tq)`` and sees keys j <= i + Tk - Tq.
  For Tq == Tk (training, prefill) this is the usual j <= i (bottom-right and top-left alignment coincide).
* A query row with no valid key outputs zeros (never NaN) and gets zero gradient; its log-sum-exp is -inf.
"""
from __future__ import annotations

import math

import torch


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def attention_mask_bshd(
    batch: int,
    tq: int,
    tk: int,
    *,
    causal: bool,
    kv_start: torch.Tensor | None,
    kv_end: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Boolean "may attend" mask (B, Tq, Tk) of the convention above (True = attend)."""
    j = torch.arange(tk, device=device)
    allowed = torch.ones(batch, tq, tk, dtype=torch.bool, device=device)
    if kv_start is not None:
        allowed &= (j[None, :] >= kv_start.to(device).long()[:, None])[:, None, :]
    if kv_end is not None:
        allowed &= (j[None, :] < kv_end.to(device).long()[:, None])[:, None, :]
    if causal:
        i = torch.arange(tq, device=device)
        allowed &= (j[None, :] <= i[:, None] + (tk - tq))[None]
    return allowed


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale * q k^T + mask) v with GQA, computed in fp32 (fp64 for fp64 inputs).

    Args:
        q: (B, Tq, Hq, D) float.
        k, v: (B, Tk, Hkv, D), same dtype; Hq % Hkv == 0.
        causal: bottom-right aligned causal mask (query i sees keys j <= i + Tk - Tq).
        kv_start, kv_end: optional (B,) int, valid keys kv_start <= j < kv_end.
        softmax_scale: defaults to 1/sqrt(D).
        return_lse: also return the natural-log log-sum-exp of the masked scaled scores, (B, Hq, Tq) fp32/fp64,
            -inf on rows without a valid key.
    Returns:
        o: (B, Tq, Hq, D) in q.dtype (rows without a valid key are zeros), and lse if asked.
    """
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    cd = _compute_dtype(q)
    qh = q.to(cd).transpose(1, 2)  # (B, Hq, Tq, D)
    kh = k.to(cd).transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Tk, D)
    vh = v.to(cd).transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Tk, D)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    allowed = attention_mask_bshd(B, Tq, Tk, causal=causal, kv_start=kv_start, kv_end=kv_end, device=q.device)
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, Hq, Tq), -inf on empty rows
    empty = torch.isinf(lse) & (lse < 0)
    p = torch.exp(s - torch.where(empty, torch.zeros_like(lse), lse)[..., None])  # empty rows: exp(-inf) = 0
    vh = vh.masked_fill(~allowed.any(1)[:, None, :, None], 0.0)  # never-read keys may hold NaN garbage
    o = torch.matmul(p, vh).transpose(1, 2).to(q.dtype)  # (B, Tq, Hq, D)
    return (o, lse) if return_lse else o


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    *,
    cache_start: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention of Tn new query tokens over a static KV cache that already holds them.

    Args:
        q: (B, Tn, Hq, D); query t of sequence b sits at cache position cache_lens[b] - Tn + t.
        k_cache, v_cache: (B, L, Hkv, D).
        cache_lens: (B,) int, number of valid positions including the Tn new tokens.
        cache_start: optional (B,) int, first valid position (left-padded prompts); default 0.
    Returns:
        o: (B, Tn, Hq, D) in q.dtype. Query t sees cache positions j with cache_start <= j <= cache_lens - Tn + t.
    """
    B, Tn, Hq, D = q.shape
    L = k_cache.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    cd = _compute_dtype(q)
    hkv = k_cache.shape[2]
    qh = q.to(cd).transpose(1, 2)  # (B, Hq, Tn, D)
    kh = k_cache.to(cd).transpose(1, 2).repeat_interleave(Hq // hkv, dim=1)  # (B, Hq, L, D)
    vh = v_cache.to(cd).transpose(1, 2).repeat_interleave(Hq // hkv, dim=1)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (B, Hq, Tn, L)
    j = torch.arange(L, device=q.device)
    pos = cache_lens.to(q.device).long()[:, None] - Tn + torch.arange(Tn, device=q.device)[None, :]  # (B, Tn)
    allowed = j[None, None, :] <= pos[:, :, None]  # (B, Tn, L)
    if cache_start is not None:
        allowed &= j[None, None, :] >= cache_start.to(q.device).long()[:, None, None]
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))
    vh = vh.masked_fill(~allowed.any(1)[:, None, :, None], 0.0)  # unwritten positions may hold NaN garbage
    return torch.matmul(p, vh).transpose(1, 2).to(q.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF/Llama convention: (x1, x2) -> (-x2, x1) on the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin in fp32, for x (B, T, H, D) and cos/sin broadcastable to (B, T, 1, D)."""
    cd = _compute_dtype(x)
    return (x.to(cd) * cos.to(cd) + rotate_half(x.to(cd)) * sin.to(cd)).to(x.dtype)


def write_kv_cache_reference(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: torch.Tensor,
    *,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    rope_positions: torch.Tensor | None = None,
) -> None:
    """In place: k_cache[b, positions[b] + t] = rope(k_new[b, t]), v_cache[b, positions[b] + t] = v_new[b, t].

    k_cache/v_cache (B, L, Hkv, D); k_new/v_new (B, Tn, Hkv, D); positions (B,) int. Writes that would land outside
    [0, L) are dropped. cos/sin: optional tables (P, D) or (P, D/2) (duplicated halves may be given in full); the
    rotation of token t uses row rope_positions[b] + t (default positions[b] + t).
    """
    B, Tn = k_new.shape[:2]
    L = k_cache.shape[1]
    k_rot = k_new
    if cos is not None:
        d = k_new.shape[-1]
        rp = (positions if rope_positions is None else rope_positions).to(k_new.device).long()
        idx = rp[:, None] + torch.arange(Tn, device=k_new.device)[None, :]  # (B, Tn)
        c, s = cos[..., : d // 2], sin[..., : d // 2]
        c = torch.cat((c, c), dim=-1)[idx][:, :, None, :]  # (B, Tn, 1, D)
        s = torch.cat((s, s), dim=-1)[idx][:, :, None, :]
        k_rot = apply_rope_reference(k_new, c, s)
    for b in range(B):
        for t in range(Tn):
            p = int(positions[b]) + t
            if 0 <= p < L:
                k_cache[b, p] = k_rot[b, t].to(k_cache.dtype)
                v_cache[b, p] = v_new[b, t].to(v_cache.dtype)
