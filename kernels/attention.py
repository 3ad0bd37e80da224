"""GQA FlashAttention (training forward + backward, prefill) with per-sequence padding, in Triton.

Public API: ``flash_attention(q, k, v, *, causal, kv_start, kv_end, softmax_scale, backend)``.

Conventions (as flash-attn's ``flash_attn_func``):
* q: (B, Tq, Hq, D), k/v: (B, Tk, Hkv, D) ("bshd"); GQA: query head h reads KV head h // (Hq // Hkv).
  K/V are never expanded: the backward sums the dK/dV of a group's query heads inside the kernel.
* Padding as per-sequence key ranges, int32 (B,): keys j with kv_start[b] <= j < kv_end[b] are valid.
  Right padding (valid tokens [0, len)): kv_start = 0, kv_end = len. Left padding (valid tokens [T - len, T), what
  generation produces): kv_start = T - len, kv_end = T. ``kv_range_from_lengths`` builds both.
* Causal mask, bottom-right aligned: query i sits at key position i + (Tk - Tq) and sees keys j <= i + Tk - Tq.
  For Tq == Tk (training, prefill) this is j <= i, where bottom-right and top-left alignment coincide.
* A query row with no valid key (a left-padding row) outputs zeros, never NaN, and receives zero gradient.
* Head dims up to 256; non powers of two (80, 96) are padded to the next power of two inside the tile with masks.
  Dtypes bf16/fp16 (GPU) and fp32; accumulation is fp32. The forward saves lse (B, Hq, Tq) fp32 for the backward.

Layers: kernels in ``attention_fwd.py`` / ``attention_bwd.py`` -> launch functions ``attention_forward`` /
``attention_backward`` -> ``FlashAttentionFunction`` (autograd, eager path) and the ``rlhf_engine::flash_attention``
custom op (with fake impl and registered autograd, used under ``torch.compile``) -> ``flash_attention``.
"""
import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .attention_bwd import attention_backward
from .attention_fwd import attention_forward
from .reference.attention import attention_reference

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BACKENDS = ("auto", "triton", "torch")


def kv_range_from_lengths(
    lengths: torch.Tensor, seq_len: int, *, padding_side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_start, kv_end), both (B,) int32, for sequences of ``lengths`` (B,) padded to ``seq_len`` tokens.

    padding_side="right": valid tokens [0, len); "left": valid tokens [seq_len - len, seq_len).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
    lengths = lengths.to(torch.int32)
    full = torch.full_like(lengths, seq_len)
    if padding_side == "right":
        return torch.zeros_like(lengths), lengths
    return full - lengths, full


def _check_range(name: str, t: Optional[torch.Tensor], batch: int, device: torch.device) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a (B,) integer tensor, got {type(t).__name__}")
    if t.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},), got {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_name: str = "k",
              v_name: str = "v") -> tuple[int, int, int, int]:
    """Shapes, dtypes and devices of q (B, Tq, Hq, D) against k, v (B, Tk, Hkv, D) (or a KV cache,
    named ``k_name`` / ``v_name`` in the errors). Returns (B, Tq, Hq, D)."""
    for name, t in (("q", q), (k_name, k), (v_name, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims (B, T, H, D), got shape {tuple(t.shape)}")
    B, Tq, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{v_name}: expected the shape of {k_name} {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{k_name}: expected shape ({B}, T, Hkv, {D}), got {tuple(k.shape)}")
    Hkv = k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{k_name}: expected a number of KV heads dividing Hq={Hq}, got Hkv={Hkv}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{k_name}, {v_name}: expected the dtype of q ({q.dtype}), got {k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{k_name}, {v_name}: expected the device of q ({q.device}), got {k.device} and {v.device}")
    if D > 256:
        raise ValueError(f"q: expected head dim <= 256, got {D}")
    return B, Tq, Hq, D


def check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_start: Optional[torch.Tensor], kv_end: Optional[torch.Tensor],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Validate shapes/dtypes/devices; return (kv_start, kv_end) as int32 (both set, or both None)."""
    return _kv_ranges(kv_start, kv_end, check_qkv(q, k, v)[0], k.shape[1], q.device)


def _kv_ranges(kv_start: Optional[torch.Tensor], kv_end: Optional[torch.Tensor], B: int, Tk: int,
               device: torch.device) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(kv_start, kv_end) checked and as int32, both set (the missing one: 0 or Tk) or both None."""
    kv_start = _check_range("kv_start", kv_start, B, device)
    kv_end = _check_range("kv_end", kv_end, B, device)
    if kv_start is None and kv_end is not None:
        kv_start = torch.zeros_like(kv_end)
    if kv_end is None and kv_start is not None:
        kv_end = torch.full_like(kv_start, Tk)
    return kv_start, kv_end


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- autograd (eager path)
class FlashAttentionFunction(torch.autograd.Function):
    """Thin autograd wrapper over the launch functions; inputs validated by ``flash_attention``."""

    @staticmethod
    def forward(ctx, q, k, v, kv_start, kv_end, causal: bool, softmax_scale: float):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        o, lse = attention_forward(q, k, v, causal=causal, kv_start=kv_start, kv_end=kv_end,
                                   softmax_scale=softmax_scale)
        ctx.save_for_backward(q, k, v, o, lse, kv_start, kv_end)
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kv_start, kv_end = ctx.saved_tensors
        dq, dk, dv = attention_backward(_unit_last(do), q, k, v, o, lse, causal=ctx.causal, kv_start=kv_start,
                                        kv_end=kv_end, softmax_scale=ctx.softmax_scale)
        return dq, dk, dv, None, None, None, None


class RopeAttentionPackedFunction(torch.autograd.Function):
    """The training path's RoPE + attention on the packed q/k/v GEMM output, as one autograd node: forward rotates
    q and k in one launch (``kv_cache.rope_forward``) and runs the attention; backward runs the attention backward
    with dV written straight into the v columns of one (B, T, Hq + 2 Hkv, D) gradient and the RoPE backward of dQ,
    dK into its q|k columns: the gradient the packed GEMM's backward takes, where separate nodes left autograd to
    join dQK and dV with a copy (``torch.cat``). The same launches as the separate path, bit for bit."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_q: int, n_kv: int, kv_start, kv_end, softmax_scale: float):
        from .kv_cache import rope_forward

        qk, v = qkv[:, :, :n_q + n_kv], qkv[:, :, n_q + n_kv:]
        y = rope_forward(qk, cos, sin)
        q, k = y[:, :, :n_q], y[:, :, n_q:]
        o, lse = attention_forward(q, k, v, causal=True, kv_start=kv_start, kv_end=kv_end,
                                   softmax_scale=softmax_scale)
        ctx.save_for_backward(q, k, v, o, lse, kv_start, kv_end, cos, sin)
        ctx.n_q, ctx.scale = n_q, softmax_scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        from .kv_cache import rope_forward

        q, k, v, o, lse, kv_start, kv_end, cos, sin = ctx.saved_tensors
        B, T, n_kv, D = k.shape
        n_q = ctx.n_q
        dqkv = torch.empty((B, T, n_q + 2 * n_kv, D), dtype=q.dtype, device=q.device)
        dq, dk, _ = attention_backward(_unit_last(do), q, k, v, o, lse, causal=True, kv_start=kv_start,
                                       kv_end=kv_end, softmax_scale=ctx.scale, dv_out=dqkv[:, :, n_q + n_kv:])
        rope_forward(dq, cos, sin, sin_sign=-1.0, x2=dk, out=dqkv[:, :, :n_q + n_kv])
        return dqkv, None, None, None, None, None, None, None


def rope_attention_packed(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int, n_kv: int, *,
                          kv_start: Optional[torch.Tensor] = None, kv_end: Optional[torch.Tensor] = None,
                          softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Causal GQA attention of q, k rotated by (cos, sin) and v, all three read from the packed (B, T, Hq + 2 Hkv,
    D) q/k/v GEMM output, for a training forward on the Triton kernels (``RopeAttentionPackedFunction``: one
    (B, T, Hq + 2 Hkv, D) gradient). cos/sin: (B, T, D / 2) half tables (or D), as ``apply_rope_qk``; kv_start,
    kv_end: as ``flash_attention``. For the model's internal use: shapes are checked only as far as the launches
    need. Returns o (B, T, Hq, D)."""
    B, T, H, D = qkv.shape
    if H != n_q + 2 * n_kv or n_q % n_kv or qkv.stride(-1) != 1:
        raise ValueError(f"qkv: expected (B, T, {n_q} + 2 * {n_kv}, D) with unit stride on D, got "
                         f"{tuple(qkv.shape)} strides {qkv.stride()}")
    if qkv.dtype not in _DTYPES:
        raise TypeError(f"qkv: expected one of {_DTYPES}, got {qkv.dtype}")
    from .kv_cache import _check_rope_args, _kernel_rope_args

    kv_start, kv_end = _kv_ranges(kv_start, kv_end, B, T, qkv.device)
    qk = qkv[:, :, :n_q + n_kv]
    _check_rope_args(qk, cos, sin)
    _, cos, sin = _kernel_rope_args(qk, cos, sin)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    return RopeAttentionPackedFunction.apply(qkv, cos, sin, n_q, n_kv, kv_start, kv_end, scale)


# ----------------------------------------------------------------------------- custom op (torch.compile path)
@torch.library.custom_op("rlhf_engine::flash_attention", mutates_args=())
def flash_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_start: Optional[torch.Tensor], kv_end: Optional[torch.Tensor],
    causal: bool, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o (B, Tq, Hq, D), lse (B, Hq, Tq) fp32) = attention_forward(...). Gradients flow through o only."""
    return attention_forward(_unit_last(q), _unit_last(k), _unit_last(v), causal=causal, kv_start=kv_start,
                             kv_end=kv_end, softmax_scale=softmax_scale)


@flash_attention_op.register_fake
def _flash_attention_fake(q, k, v, kv_start, kv_end, causal, softmax_scale):
    B, Tq, Hq, D = q.shape
    return q.new_empty((B, Tq, Hq, D)), q.new_empty((B, Hq, Tq), dtype=torch.float32)


@torch.library.custom_op("rlhf_engine::flash_attention_backward", mutates_args=())
def flash_attention_backward_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    kv_start: Optional[torch.Tensor], kv_end: Optional[torch.Tensor],
    causal: bool, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) = attention_backward(...), shapes of q, k, v."""
    return attention_backward(_unit_last(do), _unit_last(q), _unit_last(k), _unit_last(v), o, lse, causal=causal,
                              kv_start=kv_start, kv_end=kv_end, softmax_scale=softmax_scale)


@flash_attention_backward_op.register_fake
def _flash_attention_backward_fake(do, q, k, v, o, lse, kv_start, kv_end, causal, softmax_scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _op_setup_context(ctx, inputs, output):
    q, k, v, kv_start, kv_end, causal, softmax_scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, kv_start, kv_end)
    ctx.causal, ctx.softmax_scale = causal, softmax_scale


def _op_backward(ctx, do, dlse):
    # dlse is ignored: lse is an auxiliary output (it is not differentiated through).
    q, k, v, o, lse, kv_start, kv_end = ctx.saved_tensors
    dq, dk, dv = flash_attention_backward_op(do, q, k, v, o, lse, kv_start, kv_end, ctx.causal, ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None


flash_attention_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ----------------------------------------------------------------------------- public API
def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    kv_start: Optional[torch.Tensor] = None,
    kv_end: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(softmax_scale * q k^T + mask) v with GQA and per-sequence key ranges; differentiable in q, k, v.

    Args:
        q: (B, Tq, Hq, D) bf16/fp16/fp32 (fp32 runs exact fp32 dots, not TF32).
        k, v: (B, Tk, Hkv, D), dtype and device of q; Hq % Hkv == 0.
        causal: bottom-right aligned causal mask, query i sees keys j <= i + Tk - Tq (j <= i when Tq == Tk).
        kv_start: optional (B,) int, first valid key per sequence (> 0 for left padding). Default 0.
        kv_end: optional (B,) int, one past the last valid key per sequence (< Tk for right padding). Default Tk.
        softmax_scale: default 1 / sqrt(D).
        backend: "auto" (Triton on CUDA, else the PyTorch reference), "triton" (on the CPU only under
            TRITON_INTERPRET=1), "torch" (reference, fp32 math).
    Returns:
        o: (B, Tq, Hq, D) in q.dtype; rows without a valid key are zeros.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    kv_start, kv_end = check_attention_inputs(q, k, v, kv_start, kv_end)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not torch.compiler.is_compiling() and not (math.isfinite(scale) and scale > 0):  # (symbolic when compiling)
        raise ValueError(f"softmax_scale: expected a finite number > 0 or None, got {softmax_scale!r}")
    use_triton = backend == "triton" or (backend == "auto" and q.is_cuda)
    if not use_triton:
        return attention_reference(q, k, v, causal=causal, kv_start=kv_start, kv_end=kv_end, softmax_scale=scale)
    if q.dtype not in _DTYPES:
        raise TypeError(f"q: expected one of {_DTYPES} for the Triton backend, got {q.dtype}")
    if torch.compiler.is_compiling():
        return flash_attention_op(q, k, v, kv_start, kv_end, causal, scale)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return FlashAttentionFunction.apply(q, k, v, kv_start, kv_end, causal, scale)
    # no autograd (generation's prefill, scoring, a checkpointed layer's first pass): the launch without the Function
    return attention_forward(_unit_last(q), _unit_last(k), _unit_last(v), causal=causal, kv_start=kv_start,
                             kv_end=kv_end, softmax_scale=scale)[0]
