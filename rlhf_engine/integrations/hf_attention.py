"""Run Hugging Face transformers models (5.x) on our attention kernels.

    from rlhf_engine.integrations.hf_attention import register_hf_attention
    register_hf_attention()                                    # registers "rlhf_engine"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="rlhf_engine")
    # or: model.set_attn_implementation("rlhf_engine")

HF calls ``attention_fn(module, query, key, value, attention_mask, dropout=, scaling=, **kwargs)`` with
query (B, Hq, Tq, D), key/value (B, Hkv, Tk, D) (the whole cache when there is one) and expects
(attn_output (B, Tq, Hq, D), attn_weights or None). We also register HF's ``sdpa_mask`` as the mask builder for our
name (without it HF would hand a custom implementation no mask at all), so attention_mask is either None (plain
causal, no padding: HF skipped building it) or a 4D bool mask (B, 1, Tq, Tk) with True = attend.

How a 4D mask becomes kernel arguments (``mask_to_kv_range``): per sequence the attended keys must be one range
[kv_start, kv_end) intersected with a causal limit j <= i + offset shared by the batch (offset = position of query 0
in the key array). That covers left padding, right padding, DynamicCache and StaticCache (unwritten slots are
masked: we cut the key array at Tq + offset so our bottom-right causal alignment matches). The mask is rebuilt
from these numbers and compared with HF's: anything else (sliding window, packed sequences, custom masks) falls
back to HF's own SDPA path, with a one-time warning naming the reason. Padding query rows (no valid key) output
zeros in our path; HF's backends output arbitrary values there (they are never used).

Routing: few new tokens without autograd (decoding) and every sequence ending at the last query -> the split-KV
``decode_attention`` kernel (reads HF's (B, Hkv, L, D) cache through a transposed view, no copy); everything else
-> ``flash_attention``. Deriving the ranges reads the mask on the host once per mask object (cached for the
following layers of the same forward), so this integration targets eager execution, not ``torch.compile``. A
forward without a mask pays one host sync too: HF always passes ``position_ids``, and positions restarting inside
a row (packed sequences) must run on a block-diagonal mask (``packed_causal_mask``).
"""
import logging
import weakref
from typing import Optional

import torch

from ..kernels.attention import flash_attention
from ..kernels.decode_attention import decode_attention

logger = logging.getLogger(__name__)
_WARNED: set[str] = set()
DECODE_MAX_NEW_TOKENS = 8


class _MaskRanges:
    """kv_start/kv_end (B,) int32 on the mask's device, offset of query 0, and two host-side facts."""

    def __init__(self, kv_start, kv_end, offset: int, max_end: int, ends_at_query: bool):
        self.kv_start, self.kv_end, self.offset = kv_start, kv_end, offset
        self.max_end, self.ends_at_query = max_end, ends_at_query


_last_mask: dict = {"ref": None, "version": -1, "shape": None, "ranges": None}
_last_packed: dict = {"ref": None, "version": -1, "shape": None, "mask": None}
MASK_BLOCK_ELEMENTS = 1 << 24  # query rows per block of mask_to_kv_range's (B, rows, Tk) temporaries


def _version(t: torch.Tensor) -> int:
    """The version counter, or -1 for an inference tensor (it has none; HF builds a new mask per forward, and a
    mask edited in place inside ``torch.inference_mode`` between two forwards is not noticed)."""
    return -1 if t.is_inference() else t._version


def mask_to_kv_range(mask: torch.Tensor, batch: int, tq: int, tk: int) -> Optional[_MaskRanges]:
    """Represent a 4D HF mask (B|1, 1, Tq, Tk) (bool: True = attend; float: 0 = attend, very negative = blocked)
    as kv_start <= j < kv_end and j <= i + offset; None if it is not of that form. One host sync."""
    if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != (tq, tk) or mask.shape[0] not in (1, batch):
        return None
    m = mask[:, 0].expand(batch, tq, tk)
    if m.dtype == torch.bool:
        allowed = m
    else:
        allowed = m == 0
        blocked = m <= torch.finfo(m.dtype).min / 2
        if not bool((allowed | blocked).all()):  # an additive bias, not a mask
            return None
    dev = allowed.device
    j = torch.arange(tk, device=dev, dtype=torch.int32)
    i = torch.arange(tq, device=dev, dtype=torch.int32)
    cols = allowed.any(1)  # (B, Tk) keys attended by some query
    kv_start = torch.where(cols, j, tk).amin(-1)  # (B,), tk when nothing is attended
    kv_end = torch.where(cols, j + 1, 0).amax(-1)  # (B,), 0 when nothing is attended
    # (B, Tq, Tk) temporaries in blocks of query rows: a whole int32 one would be 4 bytes per mask entry (4 GB
    # at B = 8, T = 8192), on top of the mask itself
    rows = max(1, MASK_BLOCK_ELEMENTS // max(1, batch * tk))
    row_last = torch.cat([torch.where(allowed[:, r:r + rows], j, -1).amax(-1)  # last attended key per row, -1: none
                          for r in range(0, tq, rows)], dim=1)
    nonempty = row_last >= 0
    offset = torch.where(nonempty, row_last - i, -(2 * tk + tq)).amax()
    offset = torch.where(nonempty.any(), offset, tk - tq)
    same = torch.ones((), dtype=torch.bool, device=dev)
    for r in range(0, tq, rows):  # the mask rebuilt from (kv_start, kv_end, offset) must be the mask
        rebuilt = ((j >= kv_start[:, None, None]) & (j < kv_end[:, None, None])
                   & (j <= i[r:r + rows, None] + offset))
        same &= (rebuilt == allowed[:, r:r + rows]).all()
    same, off, max_end, at_query = torch.stack(
        [same.long(), offset.long(), kv_end.max().long(), (kv_end == tq + offset).all().long()]).tolist()
    if not same:
        return None
    return _MaskRanges(kv_start.to(torch.int32), kv_end.to(torch.int32), int(off), int(max_end), bool(at_query))


def _ranges_cached(mask: torch.Tensor, batch: int, tq: int, tk: int) -> Optional[_MaskRanges]:
    """All layers of one forward get the same mask object: derive the ranges once."""
    c = _last_mask
    key = (batch, tq, tk)
    if c["ref"] is not None and c["ref"]() is mask and c["version"] == _version(mask) and c["shape"] == key:
        return c["ranges"]
    ranges = mask_to_kv_range(mask, batch, tq, tk)
    c.update(ref=weakref.ref(mask), version=_version(mask), shape=key, ranges=ranges)
    return ranges


def packed_causal_mask(position_ids: Optional[torch.Tensor], cu_seq_lens: Optional[torch.Tensor], batch: int,
                       t: int) -> Optional[torch.Tensor]:
    """A (B, 1, T, T) bool block-diagonal causal mask when the rows hold packed sequences, else None.

    Packing without a mask (transformers skips it when it detects packing, e.g. ``DataCollatorWithFlattening``)
    shows as ``position_ids`` that restart inside a row, or as ``cu_seq_lens_q`` (cumulative lengths over one
    flattened row). A new sequence starts where the position is not the previous one + 1. One host sync per
    position tensor (cached for the following layers of the same forward)."""
    src = position_ids if position_ids is not None else cu_seq_lens
    if src is None:
        return None
    c = _last_packed
    if c["ref"] is not None and c["ref"]() is src and c["version"] == _version(src) and c["shape"] == (batch, t):
        return c["mask"]
    seg = None  # (B, T) segment id of each token, when the rows are packed
    if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[1] == t and t > 1:
        pos = position_ids.expand(batch, t)
        starts = torch.ones_like(pos, dtype=torch.bool)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        if bool(starts[:, 1:].any()):
            seg = starts.cumsum(1)
    elif cu_seq_lens is not None and batch == 1 and cu_seq_lens.numel() > 2:
        tok = torch.arange(t, device=cu_seq_lens.device)
        seg = torch.searchsorted(cu_seq_lens[1:].to(tok.dtype), tok, right=True)[None]
    mask = None
    if seg is not None:
        causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
        mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]

    def drop(ref):  # the entry (and its (B, 1, T, T) mask) goes with the position tensor, i.e. with its forward
        if c["ref"] is ref:
            c.update(ref=None, mask=None)

    c.update(ref=weakref.ref(src, drop), version=_version(src), shape=(batch, t), mask=mask)
    return mask


def _fallback(reason: str, module, query, key, value, attention_mask, dropout, scaling, kwargs):
    if reason not in _WARNED:
        _WARNED.add(reason)
        logger.warning("rlhf_engine attention: %s; using transformers' SDPA attention for this call", reason)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def rlhf_engine_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    *,
    backend: str = "auto",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF attention function. query (B, Hq, Tq, D), key/value (B, Hkv, Tk, D), attention_mask None or
    (B|1, 1, Tq, Tk). Returns (attn_output (B, Tq, Hq, D) in query.dtype, None)."""
    args = (module, query, key, value, attention_mask, dropout, scaling,
            kwargs if is_causal is None else {**kwargs, "is_causal": is_causal})
    if dropout and module.training:
        return _fallback("attention dropout is not supported", *args)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
        return _fallback("softcap / attention sinks / position bias are not supported", *args)
    if query.shape[-1] != value.shape[-1] or query.shape[-1] != key.shape[-1] or query.shape[-1] > 256:
        return _fallback("head dims of q, k, v differ or exceed 256", *args)
    dev_type = query.device.type
    if torch.is_autocast_enabled(dev_type):  # as HF's SDPA path under autocast: q, k, v in the autocast dtype
        dt = torch.get_autocast_dtype(dev_type)  # (RoPE in fp32 would otherwise leave q, k fp32 and v bf16)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    elif not query.dtype == key.dtype == value.dtype:
        return _fallback("q, k, v have different dtypes", *args)
    B, Hq, Tq, D = query.shape
    Tk = key.shape[2]
    if attention_mask is None and Tq == Tk and Tq > 1:
        packed = packed_causal_mask(kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"), B, Tq)
        if packed is not None:
            return _fallback("packed sequences (positions restarting inside a row) run on a block-diagonal mask",
                             module, query, key, value, packed, dropout, scaling, {**args[-1], "is_causal": False})
    window = kwargs.get("sliding_window")
    if window is not None and Tk > window:
        return _fallback("sliding-window attention is not supported", *args)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    q = query.transpose(1, 2)  # (B, Tq, Hq, D) view
    k = key.transpose(1, 2)  # (B, Tk, Hkv, D) view
    v = value.transpose(1, 2)
    kv_start = kv_end = None
    ends_at_query = True
    if attention_mask is None:
        if causal and 1 < Tq < Tk:
            # HF skips the mask for a prefill into an empty static cache and relies on a top-left aligned
            # is_causal (as its SDPA path does): the keys past Tq are unwritten slots.
            k, v = k[:, :Tq], v[:, :Tq]
    else:
        ranges = _ranges_cached(attention_mask, B, Tq, Tk)
        if ranges is None:
            return _fallback("the attention mask is not a per-sequence key range with a causal limit", *args)
        kv_start, kv_end = ranges.kv_start, ranges.kv_end
        ends_at_query = ranges.ends_at_query
        if ranges.offset >= ranges.max_end - 1:
            causal = False  # the causal limit never binds (single query row, or bidirectional mask)
        elif Tq + ranges.offset <= Tk:
            causal = True
            k, v = k[:, : Tq + ranges.offset], v[:, : Tq + ranges.offset]  # query 0 now sits at Tk' - Tq
        else:
            return _fallback("causal offset beyond the key array", *args)
    decoding = (Tq <= DECODE_MAX_NEW_TOKENS and ends_at_query and (causal or Tq == 1)
                and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                                       or value.requires_grad)))
    if decoding and (backend == "triton" or (backend == "auto" and query.is_cuda)):
        tk = k.shape[1]
        if kv_end is None:
            kv_end = torch.full((B,), tk, dtype=torch.int32, device=query.device)
        o = decode_attention(q, k, v, kv_end, cache_start=kv_start, softmax_scale=scaling, backend=backend)
        return o, None
    o = flash_attention(q, k, v, causal=causal, kv_start=kv_start, kv_end=kv_end, softmax_scale=scaling,
                        backend=backend)
    return o, None


def register_hf_attention(name: str = "rlhf_engine", *, backend: str = "auto") -> str:
    """Register our attention (and HF's SDPA mask builder) under ``name`` in transformers' global interfaces.

    backend: "auto" (Triton on CUDA, the PyTorch reference on CPU), "triton" (CPU only under TRITON_INTERPRET=1),
    "torch". Returns ``name``, to pass as ``attn_implementation``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")

    def attention_fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        return rlhf_engine_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                             scaling=scaling, backend=backend, **kwargs)

    AttentionInterface.register(name, attention_fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
