"""Token log-probs (+ entropy) from logits: one read of the logits forward, one read + write backward.

For each row of logits x (V entries) with target y and temperature T, z = x / T:
    lse     = log Σ_j e^{z_j}                  (online: one pass, running max m and sums)
    logp    = z_y − lse
    entropy = lse − Σ_j p_j z_j,   p = softmax(z)
Backward, with upstream grads g (for logp) and g_H (for entropy):
    dlogp/dz_j = [j = y] − p_j
    dH/dz_j    = −p_j (z_j − Σ_k p_k z_k)
    dx_j       = (g ([j = y] − p_j) − g_H p_j (z_j − Σ_k p_k z_k)) / T
The forward saves lse and Σ p z per row (fp32, N each), so the backward is one more pass.
No (N, V) fp32 buffer is ever allocated; ``inplace_backward=True`` even writes dlogits into
the logits buffer (the trainer must own the logits: they are destroyed).

Layers: ``_logprob_fwd_kernel`` / ``_logprob_bwd_kernel`` → ``token_logprobs_forward`` /
``token_logprobs_backward`` → ``TokenLogprobsFunction`` and the custom ops
``rlhf_engine::token_logprobs`` (+ ``_backward``) → ``token_logprobs``.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._args import real_value
from ._fastlaunch import launch
from ._launch import next_pow2
from .reference.logprob import logprobs_reference

_LOG2E = 1.4426950408889634  # 1 / ln 2: e^x = 2^(x · log2 e)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int64, torch.int32)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _logprob_fwd_kernel(
    x_ptr,                          # logits; row r starts at (r // rows_inner)·stride_xb + (r % rows_inner)·stride_xt
    tgt_ptr,                        # (N,) int32/int64 targets
    logp_ptr, ent_ptr, lse_ptr, pz_ptr,  # (N,) fp32 outputs (ent/pz untouched without WITH_ENTROPY)
    V, rows_inner, stride_xb, stride_xt,
    scale2,                         # log2(e) / T: z2 = x · scale2 is z in base-2 units
    ignore_index,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row · stride overflows int32 for N·V > 2^31
    tgt = tl.load(tgt_ptr + row).to(tl.int64)
    if tgt == ignore_index:              # skipped row: no read of its logits at all
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if WITH_ENTROPY:
            tl.store(ent_ptr + row, 0.0)
            tl.store(pz_ptr + row, 0.0)
        return
    x_row = x_ptr + (row // rows_inner) * stride_xb + (row % rows_inner) * stride_xt
    offs = tl.arange(0, BLOCK_V)
    # Online log-sum-exp in base 2 (exp2 is the native instruction), with z2 = z · log2 e:
    #   m = max z2 so far,  s = Σ 2^(z2 − m),  t = Σ 2^(z2 − m) · (z2 − m).
    # When the max moves m → m', every term is scaled by α = 2^(m − m'), and (z2 − m') = (z2 − m) + (m − m'):
    #   s' = α s,  t' = α (t + (m − m') s).
    # m starts at a finite −3e38 (not −inf) so that (m − m')·s = (−3e38)·0 = 0 on the first chunk, never NaN.
    m = -3.0e38
    s = 0.0
    t = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        z2 = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * scale2
        m_new = tl.maximum(m, tl.max(z2, axis=0))
        alpha = tl.exp2(m - m_new)
        e = tl.exp2(z2 - m_new)
        if WITH_ENTROPY:
            # e = 0 on masked lanes and −inf logits, where e · (z2 − m') would be 0 · (−inf) = NaN.
            eu = e * tl.where(e > 0.0, z2 - m_new, 0.0)
            t = (t + (m - m_new) * s) * alpha + tl.sum(eu, axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    ln2 = 0.6931471805599453
    log2_s = tl.log2(s)
    lse2 = m + log2_s                                   # lse in base-2 units
    valid = (tgt >= 0) & (tgt < V)                      # an out-of-range target gives NaN, not a wild read
    x_t = tl.load(x_row + tgt, mask=valid, other=float("nan")).to(tl.float32)
    tl.store(logp_ptr + row, (x_t * scale2 - lse2) * ln2)
    tl.store(lse_ptr + row, lse2 * ln2)
    if WITH_ENTROPY:
        # Σ e^{z−m_e}(z − m_e) = ln2 · t  ⇒  H = ln s_e − Σ p (z − m_e) = ln2 · (log2 s − t / s),
        # Σ p z = lse − H = ln2 · (m + t / s).
        tl.store(ent_ptr + row, (log2_s - t / s) * ln2)
        tl.store(pz_ptr + row, (m + t / s) * ln2)


@triton.jit
def _logprob_bwd_kernel(
    x_ptr, dx_ptr,                  # logits in, dlogits out (may be the same buffer: in-place)
    tgt_ptr, lse_ptr, pz_ptr,       # (N,) targets, saved lse and Σ p z (fp32)
    g_ptr, ge_ptr,                  # (N,) upstream grads of logp and entropy (fp32)
    V,                              # columns in this block of logits
    col_offset,                     # vocab id of column 0 (the fused LM head passes vocab chunks)
    rows_inner, stride_xb, stride_xt, stride_db, stride_dt,
    inv_t, scale2,                  # 1 / T and log2(e) / T
    ignore_index,
    HAS_G: tl.constexpr, HAS_GE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tgt = tl.load(tgt_ptr + row).to(tl.int64)
    b = row // rows_inner
    r = row % rows_inner
    x_row = x_ptr + b * stride_xb + r * stride_xt
    dx_row = dx_ptr + b * stride_db + r * stride_dt
    offs = tl.arange(0, BLOCK_V)
    if tgt == ignore_index:              # skipped row: zero gradient
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            tl.store(dx_row + cols, tl.zeros([BLOCK_V], dtype=dx_ptr.dtype.element_ty), mask=cols < V)
        return
    tgt_col = (tgt - col_offset).to(tl.int32)           # target column inside this block (may be outside it)
    lse2 = tl.load(lse_ptr + row) * 1.4426950408889634  # lse in base-2 units
    if HAS_G:
        g = tl.load(g_ptr + row).to(tl.float32)
    else:
        g = 0.0
    if HAS_GE:
        ge = tl.load(ge_ptr + row).to(tl.float32)
        pz = tl.load(pz_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp2(x * scale2 - lse2)                   # softmax(z)_j = e^{z_j − lse}
        coef = -g                                        # g · (−p_j)
        if HAS_GE:
            coef = coef - ge * (x * inv_t - pz)          # − g_H · p_j (z_j − Σ p z)
        dz = p * coef
        if HAS_G:
            dz = tl.where(cols == tgt_col, dz + g, dz)    # + g · [j = y]
        tl.store(dx_row + cols, (dz * inv_t).to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch functions
def _row_layout(x: torch.Tensor) -> tuple[int, int, int]:
    """(rows_inner, stride_b, stride_t) addressing row r of a 2-D (N, V) or 3-D (B, T, V) tensor."""
    if x.stride(-1) != 1:
        raise ValueError(f"logits: expected the vocab dim to be contiguous (stride 1), got strides {tuple(x.stride())}")
    if x.dim() == 2:
        return max(x.shape[0], 1), 0, x.stride(0)
    if x.dim() == 3:
        return max(x.shape[1], 1), x.stride(0), x.stride(1)
    raise ValueError(f"logits: expected 2-D (N, V) or 3-D (B, T, V), got shape {tuple(x.shape)}")


def _launch_config(V: int, block_v: Optional[int]) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 4096-wide chunks (8 KB of bf16 per load round) over 8 warps by default."""
    if block_v is None:
        block_v = min(4096, next_pow2(max(V, 16)))
    num_warps = 8 if block_v >= 4096 else 4 if block_v >= 1024 else 2
    return block_v, num_warps


def token_logprobs_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    *,
    out: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    block_v: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        logits: (N, V) or (B, T, V) with N = B·T, fp32/fp16/bf16, vocab dim contiguous (other strides free).
        targets: (N,) int64/int32, contiguous.
        out: optional (logp, entropy, lse, pz) buffers to write into (shapes as returned).
        block_v: vocab chunk per loop iteration (power of two); default 4096.

    Returns:
        logp (N,) fp32; entropy (N,) fp32 (shape (0,) without ``with_entropy``); lse (N,) fp32;
        pz = Σ p z (N,) fp32 (shape (0,) without ``with_entropy``). Ignored rows give 0 everywhere.
    """
    V = logits.shape[-1]
    N = targets.numel()
    rows_inner, sxb, sxt = _row_layout(logits)
    if out is None:
        new = lambda n: torch.empty(n, dtype=torch.float32, device=logits.device)  # noqa: E731
        out = (new(N), new(N if with_entropy else 0), new(N), new(N if with_entropy else 0))
    logp, entropy, lse, pz = out
    if N == 0:
        return logp, entropy, lse, pz
    BLOCK_V, num_warps = _launch_config(V, block_v)
    launch(_logprob_fwd_kernel, (N,),
        logits, targets, logp, entropy if with_entropy else logp, lse, pz if with_entropy else lse,
        V, rows_inner, sxb, sxt, _LOG2E / temperature, ignore_index,
        WITH_ENTROPY=with_entropy, BLOCK_V=BLOCK_V, num_warps=num_warps,
    )
    return logp, entropy, lse, pz


def token_logprobs_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    pz: Optional[torch.Tensor],
    grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    temperature: float = 1.0,
    ignore_index: int = -100,
    *,
    out: Optional[torch.Tensor] = None,
    col_offset: int = 0,
    block_v: Optional[int] = None,
) -> torch.Tensor:
    """Launch the backward kernel: dlogits = (g (onehot − p) − g_H p (z − Σ p z)) / T.

    Args:
        logits: (N, V) or (B, T, V), as in the forward (or a block of vocab columns of it).
        targets, lse: (N,) as in the forward; pz: (N,) fp32, needed only with ``grad_entropy``.
        grad_logp, grad_entropy: (N,) upstream grads or None (then treated as zero).
        out: where to write dlogits, same shape as ``logits``; may be ``logits`` itself (in-place).
        col_offset: vocab id of column 0 of ``logits`` (the one-hot compares ``col + col_offset`` to the target).

    Returns:
        dlogits: same shape and dtype as ``logits`` (``out`` when given).
    """
    V = logits.shape[-1]
    N = targets.numel()
    rows_inner, sxb, sxt = _row_layout(logits)
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if out.shape != logits.shape:
        raise ValueError(f"out: expected shape {tuple(logits.shape)}, got {tuple(out.shape)}")
    _, sdb, sdt = _row_layout(out)
    if N == 0 or V == 0:
        return out
    has_g = grad_logp is not None
    has_ge = grad_entropy is not None
    if has_ge and (pz is None or pz.numel() != N):
        raise ValueError("pz: the entropy gradient needs Σ p z from a forward run with with_entropy=True")
    g = grad_logp.reshape(-1).float().contiguous() if has_g else lse
    ge = grad_entropy.reshape(-1).float().contiguous() if has_ge else lse
    BLOCK_V, num_warps = _launch_config(V, block_v)
    launch(_logprob_bwd_kernel, (N,),
        logits, out, targets, lse, pz if has_ge else lse, g, ge,
        V, col_offset, rows_inner, sxb, sxt, sdb, sdt,
        1.0 / temperature, _LOG2E / temperature, ignore_index,
        HAS_G=has_g, HAS_GE=has_ge, BLOCK_V=BLOCK_V, num_warps=num_warps,
    )
    return out


# ----------------------------------------------------------------------------- autograd
class TokenLogprobsFunction(torch.autograd.Function):
    """Thin autograd wrapper over the launch functions: the eager path of :func:`token_logprobs`.

    Under ``torch.compile`` the public API calls the custom op ``rlhf_engine::token_logprobs`` instead.
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, with_entropy, inplace_backward):
        logp, entropy, lse, pz = token_logprobs_forward(logits, targets, temperature, ignore_index, with_entropy)
        ctx.save_for_backward(logits, targets, lse, pz)
        ctx.args = (temperature, ignore_index, with_entropy, inplace_backward)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse, pz = ctx.saved_tensors
        temperature, ignore_index, with_entropy, inplace_backward = ctx.args
        dlogits = token_logprobs_backward(
            logits, targets, lse, pz, grad_logp, grad_entropy if with_entropy else None,
            temperature, ignore_index, out=logits if inplace_backward else None,
        )
        return dlogits, None, None, None, None, None


@torch.library.custom_op("rlhf_engine::token_logprobs", mutates_args=())
def _token_logprobs_op(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse, pz); see :func:`token_logprobs_forward`."""
    return token_logprobs_forward(logits, targets, temperature, ignore_index, with_entropy)


@_token_logprobs_op.register_fake
def _(logits, targets, temperature, ignore_index, with_entropy):
    n = targets.shape[0]
    new = lambda k: logits.new_empty((k,), dtype=torch.float32)  # noqa: E731
    return new(n), new(n if with_entropy else 0), new(n), new(n if with_entropy else 0)


@torch.library.custom_op("rlhf_engine::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, pz: Optional[torch.Tensor],
    grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
    temperature: float, ignore_index: int,
) -> torch.Tensor:
    """dlogits, same shape and dtype as logits; see :func:`token_logprobs_backward`."""
    return token_logprobs_backward(logits, targets, lse, pz, grad_logp, grad_entropy, temperature, ignore_index)


@_token_logprobs_backward_op.register_fake
def _(logits, targets, lse, pz, grad_logp, grad_entropy, temperature, ignore_index):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, targets, temperature, ignore_index, with_entropy = inputs
    _, _, lse, pz = output
    ctx.save_for_backward(logits, targets, lse, pz)
    ctx.args = (temperature, ignore_index, with_entropy)
    ctx.mark_non_differentiable(lse, pz)


def _backward(ctx, grad_logp, grad_entropy, grad_lse, grad_pz):
    logits, targets, lse, pz = ctx.saved_tensors
    temperature, ignore_index, with_entropy = ctx.args
    dlogits = _token_logprobs_backward_op(
        logits, targets, lse, pz if with_entropy else None, grad_logp,
        grad_entropy if with_entropy else None, temperature, ignore_index,
    )
    return dlogits, None, None, None, None


_token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def _check_backend(backend: str) -> None:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")


def _check_common(name: str, x: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32, float16 or bfloat16, got {x.dtype}")
    if targets.dtype not in _INT_DTYPES:
        raise TypeError(f"targets: expected int64 or int32, got {targets.dtype}")
    if targets.device != x.device:
        raise ValueError(f"targets: expected device {x.device} (that of {name}), got {targets.device}")
    if torch.compiler.is_compiling():  # a Python scalar is symbolic there: no branch on its value
        return
    t = real_value(temperature)
    if t is None or not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")


def _check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Targets in [0, V) or ``ignore_index``, checked where that needs no device sync (CPU tensors): the Triton
    path returns NaN for an id outside the vocab (and its backward finite, meaningless gradients)."""
    if vocab < 1:
        raise ValueError(f"vocab: expected V >= 1 entries, got {vocab}")
    if targets.device.type != "cpu" or targets.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if bool(bad.any()):
        raise ValueError(f"targets: expected ids in [0, {vocab}) or ignore_index={ignore_index}, got "
                         f"{int(targets[bad][0])}")


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target under softmax(logits / temperature), optionally with the entropy.

    Args:
        logits: (..., V) fp32/fp16/bf16. A 3-D (B, T, V) view such as ``logits[:, :-1]`` is read in
            place (only the vocab dim must be contiguous); other layouts are reshaped to (N, V).
        targets: (...) int64/int32, the leading shape of ``logits``; ids in [0, V) or ``ignore_index``
            (an id outside [0, V) is a ValueError for CPU tensors; on a GPU, unchecked, it gives NaN).
        temperature: sampling temperature T > 0; the softmax is over logits / T.
        ignore_index: target value of rows to skip: logp = 0, entropy = 0, zero gradient.
        with_entropy: also return H = logsumexp(z) − Σ softmax(z)·z, z = logits / T.
        inplace_backward: Triton path, eager mode only (ignored under torch.compile, whose custom op
            cannot mutate its input): write dlogits into the logits buffer in the
            backward (saves an (N, V) allocation). The logits are DESTROYED by the backward, so use it
            only when nothing else (another loss, a saved activation) still needs them.
        backend: "auto" (Triton on CUDA, else the PyTorch reference), "triton" or "torch".

    Returns:
        logp: (...) fp32; with ``with_entropy`` the tuple (logp, entropy), entropy (...) fp32.
        Differentiable w.r.t. ``logits`` (gradient in the logits dtype).
    """
    _check_backend(backend)
    _check_common("logits", logits, targets, temperature)
    _check_targets(targets, logits.shape[-1] if logits.dim() else 0, ignore_index)
    if logits.dim() < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets: expected shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), got {tuple(targets.shape)}"
        )
    if backend == "auto":
        backend = "triton" if logits.is_cuda else "torch"
    if backend == "torch":
        return logprobs_reference(logits, targets, temperature, ignore_index, with_entropy, torch.float32)

    V = logits.shape[-1]
    x = logits
    if x.dim() not in (2, 3) or x.stride(-1) != 1:
        x = x.reshape(-1, V)                                  # (N, V)
        if x.stride(-1) != 1:
            x = x.contiguous()
    flat_targets = targets.reshape(-1).contiguous()           # (N,)
    args = (float(temperature), int(ignore_index), bool(with_entropy))
    if torch.compiler.is_compiling():  # traceable custom op (in-place backward is an eager-only option)
        logp, entropy, _, _ = _token_logprobs_op(x, flat_targets, *args)
    else:
        logp, entropy = TokenLogprobsFunction.apply(x, flat_targets, *args, bool(inplace_backward))
    logp = logp.view(targets.shape)
    if not with_entropy:
        return logp
    return logp, entropy.view(targets.shape)
