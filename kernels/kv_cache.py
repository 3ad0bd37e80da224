"""KV-cache write (optionally fused with RoPE on K) and a RoPE kernel for q/k, in Triton.

RoPE, HF/Llama "rotate_half" convention, with the two halves x1 = x[:D/2], x2 = x[D/2:] and per-position tables
cos, sin whose halves are duplicated (cos[..., :D/2] == cos[..., D/2:], as HF builds them; only the first half is
read, so tables of width D/2 work too):
    rope(x) = x * cos + rotate_half(x) * sin,  rotate_half(x) = (-x2, x1)
    i.e.  y1 = x1 * c - x2 * s,   y2 = x2 * c + x1 * s          (computed in fp32)
Its transpose (the backward) is the same rotation with -sin.

``write_kv_cache`` writes new K/V rows (B, Tn, Hkv, D) into a static cache (B, L, Hkv, D) at per-sequence start
positions, in place: one program per (b, t) moves all Hkv heads; positions outside [0, L) are dropped (no host
sync to check them). With cos/sin given, K is rotated on the way (rotation row = rope_positions[b] + t).
"""
from typing import Optional

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from ._fastlaunch import launch
from .attention_fwd import next_pow2
from .reference.attention import apply_rope_reference, write_kv_cache_reference

_BACKENDS = ("auto", "triton", "torch")


@triton.jit
def _write_kv_kernel(
    KC, VC, KN, VN, POS, ROPE_POS, COS, SIN,
    stride_kcb, stride_kct, stride_kch,
    stride_vcb, stride_vct, stride_vch,
    stride_knb, stride_knt, stride_knh,
    stride_vnb, stride_vnt, stride_vnh,
    stride_cos, stride_sin,
    Tn, Hkv, L, P,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, HAS_ROPE: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // Tn).to(tl.int64)
    t = pid % Tn
    pos = tl.load(POS + b) + t
    ok = (pos >= 0) & (pos < L)  # writes outside the cache are dropped
    heads = tl.arange(0, BLOCK_H)
    h_ok = (heads < Hkv) & ok
    offs_d = tl.arange(0, BLOCK_D)
    m = h_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    # V: a plain copy.
    v = tl.load(VN + b * stride_vnb + t * stride_vnt + heads[:, None] * stride_vnh + offs_d[None, :], mask=m)
    tl.store(VC + b * stride_vcb + pos * stride_vct + heads[:, None] * stride_vch + offs_d[None, :],
             v.to(VC.dtype.element_ty), mask=m)
    k_src = KN + b * stride_knb + t * stride_knt + heads[:, None] * stride_knh
    k_dst = KC + b * stride_kcb + pos * stride_kct + heads[:, None] * stride_kch
    if HAS_ROPE:
        # y1 = x1 c - x2 s, y2 = x2 c + x1 s on the halves of the head dim (fp32).
        rp = tl.load(ROPE_POS + b) + t
        r_ok = (rp >= 0) & (rp < P)
        offs_h = tl.arange(0, BLOCK_HALF)
        hm = offs_h < HALF
        c = tl.load(COS + rp * stride_cos + offs_h, mask=hm & r_ok, other=1.0).to(tl.float32)
        s = tl.load(SIN + rp * stride_sin + offs_h, mask=hm & r_ok, other=0.0).to(tl.float32)
        mh = h_ok[:, None] & hm[None, :]
        x1 = tl.load(k_src + offs_h[None, :], mask=mh, other=0.0).to(tl.float32)
        x2 = tl.load(k_src + HALF + offs_h[None, :], mask=mh, other=0.0).to(tl.float32)
        y1 = x1 * c[None, :] - x2 * s[None, :]
        y2 = x2 * c[None, :] + x1 * s[None, :]
        tl.store(k_dst + offs_h[None, :], y1.to(KC.dtype.element_ty), mask=mh)
        tl.store(k_dst + HALF + offs_h[None, :], y2.to(KC.dtype.element_ty), mask=mh)
    else:
        k = tl.load(k_src + offs_d[None, :], mask=m)
        tl.store(k_dst + offs_d[None, :], k.to(KC.dtype.element_ty), mask=m)


@triton.jit
def _rope_kernel(
    X, X2, Y, COS, SIN,
    stride_xb, stride_xt, stride_xh,
    stride_x2b, stride_x2t, stride_x2h,
    stride_yb, stride_yt, stride_yh,
    stride_cb, stride_ct, stride_sb, stride_st,
    T, H, H1, sin_sign,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, TWO_INPUTS: tl.constexpr,
):
    # One program per (b, t): all heads, y = x * cos + rotate_half(x) * (sin_sign * sin). With TWO_INPUTS, heads
    # [0, H1) are read from X and heads [H1, H) from X2 (the backward of q and k rotated in one launch).
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = pid % T
    heads = tl.arange(0, BLOCK_H)
    offs_h = tl.arange(0, BLOCK_HALF)
    hm = offs_h < HALF
    m = (heads < H)[:, None] & hm[None, :]
    c = tl.load(COS + b * stride_cb + t * stride_ct + offs_h, mask=hm, other=1.0).to(tl.float32)
    s = tl.load(SIN + b * stride_sb + t * stride_st + offs_h, mask=hm, other=0.0).to(tl.float32) * sin_sign
    if TWO_INPUTS:
        first = (heads < H1)[:, None]
        p1 = X + b * stride_xb + t * stride_xt + heads[:, None] * stride_xh + offs_h[None, :]
        p2 = X2 + b * stride_x2b + t * stride_x2t + (heads[:, None] - H1) * stride_x2h + offs_h[None, :]
        x1 = tl.where(first, tl.load(p1, mask=m & first, other=0.0), tl.load(p2, mask=m & ~first, other=0.0))
        x2 = tl.where(first, tl.load(p1 + HALF, mask=m & first, other=0.0),
                      tl.load(p2 + HALF, mask=m & ~first, other=0.0))
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    else:
        x_ptr = X + b * stride_xb + t * stride_xt + heads[:, None] * stride_xh + offs_h[None, :]
        x1 = tl.load(x_ptr, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + HALF, mask=m, other=0.0).to(tl.float32)
    y_ptr = Y + b * stride_yb + t * stride_yt + heads[:, None] * stride_yh + offs_h[None, :]
    tl.store(y_ptr, (x1 * c[None, :] - x2 * s[None, :]).to(Y.dtype.element_ty), mask=m)
    tl.store(y_ptr + HALF, (x2 * c[None, :] + x1 * s[None, :]).to(Y.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------- launch functions
def write_kv_cache_forward(k_cache, v_cache, k_new, v_new, positions, cos, sin, rope_positions) -> None:
    """Launch ``_write_kv_kernel``; inputs validated by ``write_kv_cache``."""
    B, Tn, Hkv, D = k_new.shape
    if B * Tn == 0:
        return
    has_rope = cos is not None
    half = D // 2
    dummy = positions
    launch(_write_kv_kernel, (B * Tn,),
        k_cache, v_cache, k_new, v_new, positions, rope_positions if has_rope else dummy,
        cos if has_rope else dummy, sin if has_rope else dummy,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2),
        cos.stride(0) if has_rope else 0, sin.stride(0) if has_rope else 0,
        Tn, Hkv, k_cache.shape[1], cos.shape[0] if has_rope else 0,
        HEAD_DIM=D, BLOCK_D=next_pow2(D), HALF=half, BLOCK_HALF=max(1, next_pow2(half)),
        BLOCK_H=next_pow2(Hkv), HAS_ROPE=has_rope, num_warps=1 if Hkv * D <= 512 else 4,
    )


def rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sin_sign: float = 1.0,
                 x2: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y (B, T, H, D) = rope(x); cos/sin (B, T, D or D/2) (broadcast views with stride 0 are fine). With ``x2``
    (B, T, H2, D): y (B, T, H + H2, D) = rope of x's heads followed by x2's, in one launch. ``out``: where to write
    y (a view with unit stride on D, e.g. the q|k columns of a packed q/k/v gradient)."""
    B, T, H1, D = x.shape
    H = H1 + (0 if x2 is None else x2.shape[2])
    y = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device) if out is None else out
    if B * T * H == 0:
        return y
    half = D // 2
    sx, sy, sc, ss = x.stride(), y.stride(), cos.stride(), sin.stride()  # one call each (~0.3 us a call)
    s2 = sx if x2 is None else x2.stride()
    launch(_rope_kernel, (B * T,),
        x, x if x2 is None else x2, y, cos, sin, sx[0], sx[1], sx[2], s2[0], s2[1], s2[2], sy[0], sy[1], sy[2],
        sc[0], sc[1], ss[0], ss[1], T, H, H1, sin_sign,
        HALF=half, BLOCK_HALF=next_pow2(half), BLOCK_H=next_pow2(H), TWO_INPUTS=x2 is not None,
        num_warps=1 if H * D <= 512 else 4,
    )
    return y


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("rlhf_engine::write_kv_cache", mutates_args=("k_cache", "v_cache"))
def write_kv_cache_op(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    positions: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
    rope_positions: Optional[torch.Tensor],
) -> None:
    """In-place cache write (see ``write_kv_cache``)."""
    write_kv_cache_forward(k_cache, v_cache, k_new, v_new, positions, cos, sin, rope_positions)


@write_kv_cache_op.register_fake
def _write_kv_cache_fake(k_cache, v_cache, k_new, v_new, positions, cos, sin, rope_positions) -> None:
    return None


@torch.library.custom_op("rlhf_engine::kv_cache_apply_rope", mutates_args=())
def apply_rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rope(x) for x (B, T, H, D), cos/sin (B, T, D or D/2)."""
    return rope_forward(x, cos, sin)


@apply_rope_op.register_fake
def _apply_rope_fake(x, cos, sin):
    return x.new_empty(x.shape)


def _rope_setup_context(ctx, inputs, output):
    _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _rope_backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    # The rotation is orthogonal: its transpose is the rotation by -angle. The kernel reads unit-stride rows.
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    return apply_rope_backward_op(dy, cos, sin), None, None


@torch.library.custom_op("rlhf_engine::kv_cache_apply_rope_backward", mutates_args=())
def apply_rope_backward_op(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """dx = rope^T(dy): the same rotation with -sin."""
    return rope_forward(dy, cos, sin, sin_sign=-1.0)


@apply_rope_backward_op.register_fake
def _apply_rope_backward_fake(dy, cos, sin):
    return dy.new_empty(dy.shape)


apply_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


class RopeFunction(torch.autograd.Function):
    """Eager autograd for ``apply_rope`` (the custom op above is for torch.compile: its dispatch costs ~50 us of
    host time a call, twice a layer in the forward and again in the backward)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_forward(x, cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        return rope_forward(dy, cos, sin, sin_sign=-1.0), None, None


class RopeQKFunction(torch.autograd.Function):
    """q and k rotated in one launch each way: forward on the (B, T, Hq + Hkv, D) view of the packed q|k columns,
    returning q (B, T, Hq, D) and k (B, T, Hkv, D) as views of one new tensor; backward reads dq and dk (two
    inputs) and writes one (B, T, Hq + Hkv, D) gradient, what the packed GEMM's backward takes."""

    @staticmethod
    def forward(ctx, qk, cos, sin, n_q: int):
        ctx.save_for_backward(cos, sin)
        ctx.n_q, ctx.shape = n_q, qk.shape
        y = rope_forward(qk, cos, sin)
        return y[:, :, :n_q], y[:, :, n_q:]

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        B, T, H, D = ctx.shape
        n_q = ctx.n_q
        dq = torch.zeros((B, T, n_q, D), dtype=cos.dtype if dk is None else dk.dtype, device=cos.device) \
            if dq is None else (dq if dq.stride(-1) == 1 else dq.contiguous())
        dk = torch.zeros((B, T, H - n_q, D), dtype=dq.dtype, device=dq.device) if dk is None else \
            (dk if dk.stride(-1) == 1 else dk.contiguous())
        return rope_forward(dq, cos, sin, sin_sign=-1.0, x2=dk), None, None, None


# ----------------------------------------------------------------------------- public API
def _use_triton(backend: str, t: torch.Tensor) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    return backend == "triton" or (backend == "auto" and t.is_cuda)


def _check_table(name: str, t: torch.Tensor, head_dim: int, device: torch.device) -> None:
    if t.shape[-1] not in (head_dim, head_dim // 2):
        raise ValueError(f"{name}: expected last dim {head_dim} or {head_dim // 2}, got {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: expected unit stride on the last dim, got stride {t.stride()}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")


def write_kv_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: torch.Tensor,
    *,
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    rope_positions: Optional[torch.Tensor] = None,
    backend: str = "auto",
    check_positions: bool = True,
) -> None:
    """Write k_new/v_new into the caches in place: cache[b, positions[b] + t] = new[b, t].

    Args:
        k_cache, v_cache: (B, L, Hkv, D), mutated in place (unit stride on D).
        k_new, v_new: (B, Tn, Hkv, D), any float dtype (cast to the cache dtype).
        positions: (B,) int, first cache position written per sequence; rows landing outside [0, L) are dropped.
        cos, sin: optional RoPE tables (P, D) or (P, D/2) applied to K on the way (rotate_half convention);
            row rope_positions[b] + t must lie in [0, P).
        rope_positions: optional (B,) int rotation start per sequence (default: positions; with left-padded
            prompts pass positions - cache_start so that RoPE positions count valid tokens only).
        backend: "auto" | "triton" | "torch".
        check_positions: with RoPE, check that the table rows exist where the positions are on the CPU (a min and a
            max: two ops); callers that made the positions themselves (the model's decode step) pass False.
    """
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-dim tensor (B, T, Hkv, D), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    B, L, Hkv, D = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if k_new.shape[0] != B or k_new.shape[2:] != (Hkv, D) or v_new.shape != k_new.shape:
        raise ValueError(f"k_new, v_new: expected shape ({B}, Tn, {Hkv}, {D}), got {tuple(k_new.shape)}, "
                         f"{tuple(v_new.shape)}")
    if not isinstance(positions, torch.Tensor) or positions.shape != (B,) or positions.dtype.is_floating_point:
        raise ValueError(f"positions: expected a ({B},) integer tensor, got {positions!r:.80}")
    devs = {t.device for t in (k_cache, v_cache, k_new, v_new, positions)}
    if len(devs) != 1:
        raise ValueError(f"k_cache, v_cache, k_new, v_new, positions: expected one device, got {devs}")
    if (cos is None) != (sin is None):
        raise ValueError("cos, sin: expected both or neither")
    if cos is not None:
        if D % 2:
            raise ValueError(f"k_new: RoPE needs an even head dim, got {D}")
        _check_table("cos", cos, D, k_cache.device)
        _check_table("sin", sin, D, k_cache.device)
        if cos.dim() != 2 or sin.shape[0] != cos.shape[0]:
            raise ValueError(f"cos, sin: expected (P, D) tables, got {tuple(cos.shape)}, {tuple(sin.shape)}")
        rp = positions if rope_positions is None else rope_positions
        if not isinstance(rp, torch.Tensor) or rp.shape != (B,) or rp.dtype.is_floating_point:
            raise ValueError(f"rope_positions: expected a ({B},) integer tensor, got {rp!r:.80}")
        if check_positions and rp.device.type == "cpu" and B and not torch.compiler.is_compiling():  # (no GPU sync)
            lo, hi = int(rp.min()), int(rp.max()) + k_new.shape[1]
            if lo < 0 or hi > cos.shape[0]:
                raise ValueError(f"rope_positions: rows [{lo}, {hi}) of the RoPE tables are needed, the tables have "
                                 f"{cos.shape[0]} (on a GPU, keys outside the tables would be written unrotated)")
    for name, t in (("k_cache", k_cache), ("k_new", k_new), ("v_new", v_new)):
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if not _use_triton(backend, k_cache):
        write_kv_cache_reference(k_cache, v_cache, k_new, v_new, positions, cos=cos, sin=sin,
                                 rope_positions=rope_positions)
        return
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache, v_cache: expected unit stride on the head dim")
    k_new = k_new if k_new.stride(-1) == 1 else k_new.contiguous()
    v_new = v_new if v_new.stride(-1) == 1 else v_new.contiguous()
    positions = positions.to(torch.int32).contiguous()
    if cos is not None:
        rope_positions = positions if rope_positions is None else rope_positions.to(torch.int32).contiguous()
    else:
        rope_positions = None
    if torch.compiler.is_compiling():
        write_kv_cache_op(k_cache, v_cache, k_new, v_new, positions, cos, sin, rope_positions)
    else:
        write_kv_cache_forward(k_cache, v_cache, k_new, v_new, positions, cos, sin, rope_positions)


def _check_rope_args(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x: expected (B, T, H, D) with even D, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    B, T, H, D = x.shape
    for name, t in (("cos", cos), ("sin", sin)):
        _check_table(name, t, D, x.device)
        if t.dim() not in (2, 3) or t.shape[-2] != T or (t.dim() == 3 and t.shape[0] not in (1, B)):
            raise ValueError(f"{name}: expected ({B}, {T}, {D}) or ({T}, {D}), got {tuple(t.shape)}")


def _kernel_rope_args(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(x with unit stride on D, cos and sin as (B, T, ·) views) for ``rope_forward``."""
    B, T = x.shape[:2]
    if cos.dim() != 3 or cos.shape[0] != B:  # (T, D) or (1, T, D): a broadcast view (its batch stride is 0)
        cos = cos.expand(B, T, cos.shape[-1]) if cos.dim() == 3 else cos[None].expand(B, T, cos.shape[-1])
    if sin.dim() != 3 or sin.shape[0] != B:
        sin = sin.expand(B, T, sin.shape[-1]) if sin.dim() == 3 else sin[None].expand(B, T, sin.shape[-1])
    return (x if x.stride(-1) == 1 else x.contiguous()), cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """RoPE (HF rotate_half convention) on x (B, T, H, D); differentiable in x.

    cos, sin: (B, T, D) or (T, D) (HF ``position_embeddings``; duplicated halves, only the first half is read;
    width D/2 works too). Returns (B, T, H, D) in x.dtype, computed in fp32.
    """
    _check_rope_args(x, cos, sin)
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    if not _use_triton(backend, x):
        D = x.shape[-1]
        c, s = cos[..., : D // 2], sin[..., : D // 2]
        c = torch.cat((c, c), -1).unsqueeze(-2)  # (B|1, T, 1, D)
        s = torch.cat((s, s), -1).unsqueeze(-2)
        return apply_rope_reference(x, c if c.dim() == 4 else c[None], s if s.dim() == 4 else s[None])
    x, cos, sin = _kernel_rope_args(x, cos, sin)
    if torch.compiler.is_compiling():
        return apply_rope_op(x, cos, sin)
    if torch.is_grad_enabled() and x.requires_grad:
        return RopeFunction.apply(x, cos, sin)
    return rope_forward(x, cos, sin)


def apply_rope_qk(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  n_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rope`` on q and k given as one (B, T, Hq + Hkv, D) tensor (the packed q|k columns of a layer's
    q/k/v GEMM), in one launch forward and one backward (the triton backend); returns q (B, T, Hq, D) and
    k (B, T, Hkv, D), equal bit for bit to rotating each alone. cos, sin as in ``apply_rope``."""
    if not isinstance(qk, torch.Tensor) or qk.dim() != 4 or not 0 < n_q < qk.shape[2]:
        raise ValueError(f"qk, n_q: expected (B, T, Hq + Hkv, D) and 0 < n_q < Hq + Hkv, got "
                         f"{tuple(qk.shape) if isinstance(qk, torch.Tensor) else type(qk).__name__}, {n_q}")
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and qk.requires_grad):
        y = apply_rope(qk, cos, sin, backend="triton")  # the custom op under compile; one launch without autograd
        return y[:, :, :n_q], y[:, :, n_q:]
    _check_rope_args(qk, cos, sin)
    return RopeQKFunction.apply(*_kernel_rope_args(qk, cos, sin), n_q)
