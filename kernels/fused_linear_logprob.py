"""Fused LM head + token log-probs: never materializes the (N, V) logits.

    logits = hidden @ weight.T (+ bias),  z = logits / T
    logp   = z_y − logsumexp(z),   entropy = logsumexp(z) − Σ softmax(z)·z

Design (chunked; the only implementation today, and the default):
  forward  — rows in chunks of R = chunk_size // V:  Z = h[rows] @ Wᵀ (+ b)  (R × V, cuBLAS, compute dtype),
             then the op-1 forward kernel (kernels/logprob.py) reduces each row to logp, entropy, lse, Σ p z.
             Saved for the backward: hidden, weight, bias, targets and the per-row lse, Σ p z (fp32, N each).
  backward — vocab in chunks of C = chunk_size // N:  Z_v = h @ W[v]ᵀ (+ b[v])  (N × C), turned IN PLACE into
             dZ_v = (g (onehot − p) − g_H p (z − Σ p z)) / T by the op-1 backward kernel (p needs only the saved
             lse, so vocab chunks are independent), then
                 dW[v] = dZ_vᵀ @ h         one cuBLAS call, fp32 accumulation over all N, written once
                 db[v] = Σ_rows dZ_v       fp32 sum
                 dH   += dZ_v @ W[v]       fp32 (N, H) accumulator, chunks in a fixed order
  Chunking the backward over the vocab (not over rows, as Liger does) makes each dW slice complete in one
  matmul: no (V, H) fp32 accumulator (544 MB at V=151936, H=896), no per-chunk rounding of dW, no atomics —
  the result is deterministic (bitwise equal run to run on the same device).
  Why recompute in the backward instead of computing gradients in the forward: the gradients depend on the
  per-row upstream grads g and g_H, unknown until the backward (the output is per token, not a scalar loss).
  The alternative — saving dlogp/dZ per row — would need the (N, V) matrix. So the FLOPs are 8·N·H·V
  (forward 2, backward 6) against 6·N·H·V for eager, which pays for it by storing the logits.
Extra memory: one logits chunk (``chunk_size`` elements of the compute dtype: 256 MB in bf16 by default), an
(N, H) fp32 accumulator and O(N) fp32 per-row statistics.
A fully fused Triton kernel (logits tiles kept in registers, dlogits fed straight into the grad matmuls)
is NOT implemented yet: it would save the logits-chunk round trips through HBM (~5 passes of N·V·2 bytes).

Layers: ``fused_linear_logprobs_forward`` / ``_backward`` (launch functions: cuBLAS + op-1 kernels) →
``FusedLinearLogprobsFunction`` and the custom ops ``rlhf_engine::fused_linear_logprobs`` (+ ``_backward``) →
``fused_linear_logprobs``.
"""
import functools
from typing import Optional

import torch

from .logprob import _check_backend, _check_common, _check_targets, token_logprobs_backward, token_logprobs_forward
from .reference.logprob import linear_logprobs_reference

DEFAULT_CHUNK_SIZE = 2**27  # logits elements per chunk: 256 MB in bf16


# ----------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def _mm_out_dtype_ok(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` works for ``dtype`` inputs on this device."""
    try:
        a = torch.ones(16, 16, dtype=dtype, device=device_type)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32: fp16/bf16 inputs keep the fp32 accumulator of the matmul (no rounding to 16 bits)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if not a.is_cuda:                     # CPU (interpreter tests): exact fp32, speed does not matter
        return torch.mm(a.float(), b.float())
    if _mm_out_dtype_ok(a.device.type, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()         # older torch: one 16-bit rounding per vocab chunk


@functools.lru_cache(maxsize=None)
def _addmm_out_dtype_ok(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` (fp32 acc, ``dtype`` a and b) adds in
    place and right on this device (the overload is CUDA-only; checked once against mm_f32 on small matrices)."""
    try:
        g = torch.Generator(device=device_type).manual_seed(0)
        a = torch.randn(32, 48, generator=g, device=device_type).to(dtype)
        b = torch.randn(48, 40, generator=g, device=device_type).to(dtype)
        acc = torch.randn(32, 40, generator=g, device=device_type)
        want = acc + mm_f32(a, b)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return bool(torch.allclose(acc, want, rtol=1e-5, atol=1e-4))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with the matmul's fp32 accumulator, in place where the device can (no (n, m) fp32
    temporary per call), else through ``mm_f32``."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _addmm_out_dtype_ok(a.device.type, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(mm_f32(a, b))


def _logits_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """out (n, c) = hidden (n, H) @ weight (c, H)ᵀ (+ bias (c,)), in the compute dtype."""
    if bias is None:
        torch.mm(hidden, weight.t(), out=out)
    else:
        torch.addmm(bias, hidden, weight.t(), out=out)


def _rows_per_chunk(N: int, V: int, chunk_size: int) -> int:
    return max(1, min(N, chunk_size // max(V, 1)))


def _cols_per_chunk(N: int, V: int, chunk_size: int) -> int:
    cols = max(1, min(V, chunk_size // max(N, 1)))
    return cols if cols == V or cols < 256 else cols // 128 * 128  # keep matmul slices 128-aligned


# ----------------------------------------------------------------------------- launch functions
def fused_linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward over row chunks.

    Args:
        hidden: (N, H); weight: (V, H); bias: (V,) or None — one float dtype; targets: (N,) int64/int32 contiguous.
        chunk_size: logits elements materialized at a time (rows per chunk = chunk_size // V, at least 1).

    Returns:
        logp (N,) fp32, entropy (N,) fp32 (shape (0,) without ``with_entropy``), lse (N,) fp32,
        pz = Σ p z (N,) fp32 (shape (0,) without ``with_entropy``).
    """
    N, _ = hidden.shape
    V = weight.shape[0]
    new = lambda n: torch.empty(n, dtype=torch.float32, device=hidden.device)  # noqa: E731
    logp, entropy, lse, pz = new(N), new(N if with_entropy else 0), new(N), new(N if with_entropy else 0)
    if N == 0:
        return logp, entropy, lse, pz
    rows = _rows_per_chunk(N, V, chunk_size)
    buf = torch.empty(rows * V, dtype=hidden.dtype, device=hidden.device)
    for i0 in range(0, N, rows):
        i1 = min(N, i0 + rows)
        z = buf[: (i1 - i0) * V].view(i1 - i0, V)                  # (n, V) logits of these rows
        _logits_into(z, hidden[i0:i1], weight, bias)
        out = (logp[i0:i1], entropy[i0:i1] if with_entropy else entropy, lse[i0:i1], pz[i0:i1] if with_entropy else pz)
        token_logprobs_forward(z, targets[i0:i1], temperature, ignore_index, with_entropy, out=out)
    return logp, entropy, lse, pz


def fused_linear_logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    lse: torch.Tensor,
    pz: Optional[torch.Tensor],
    grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward over vocab chunks (deterministic; see the module docstring).

    Args:
        hidden, weight, targets, bias: as in the forward. lse, pz: (N,) fp32 from the forward (pz only
        needed with ``grad_entropy``). grad_logp, grad_entropy: (N,) upstream grads or None (zero).
        chunk_size: logits elements materialized at a time (vocab entries per chunk = chunk_size // N).

    Returns:
        dhidden (N, H) in hidden's dtype, dweight (V, H) in weight's dtype, dbias (V,) in bias's dtype;
        each is an empty (0,) tensor when not needed.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    need_bias = need_bias and bias is not None
    dw = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    db = torch.empty_like(bias) if need_bias else hidden.new_empty(0)
    dh_acc = torch.zeros(N, H, dtype=torch.float32, device=hidden.device) if need_hidden else None
    if N == 0 or not (need_hidden or need_weight or need_bias):
        if need_weight:
            dw.zero_()
        if need_bias:
            db.zero_()
        return (dh_acc.to(hidden.dtype) if need_hidden else hidden.new_empty(0)), dw, db
    cols = _cols_per_chunk(N, V, chunk_size)
    buf = torch.empty(N * cols, dtype=hidden.dtype, device=hidden.device)
    for v0 in range(0, V, cols):
        v1 = min(V, v0 + cols)
        w_v = weight[v0:v1]                                         # (c, H)
        z = buf[: N * (v1 - v0)].view(N, v1 - v0)                   # (N, c) logits of this vocab slice
        _logits_into(z, hidden, w_v, None if bias is None else bias[v0:v1])
        token_logprobs_backward(z, targets, lse, pz, grad_logp, grad_entropy, temperature, ignore_index,
                                out=z, col_offset=v0)               # z is now dlogits (N, c)
        if need_hidden:
            addmm_f32_(dh_acc, z, w_v)                              # (N, H) += (N, c) @ (c, H), fp32
        if need_weight:
            torch.mm(z.t(), hidden, out=dw[v0:v1])                  # (c, H) = (c, N) @ (N, H)
        if need_bias:
            db[v0:v1] = z.sum(0, dtype=torch.float32)
    dh = dh_acc.to(hidden.dtype) if need_hidden else hidden.new_empty(0)
    return dh, dw, db


# ----------------------------------------------------------------------------- autograd
class FusedLinearLogprobsFunction(torch.autograd.Function):
    """Thin autograd wrapper over the launch functions (the eager path of the public API)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, temperature, ignore_index, with_entropy, chunk_size):
        logp, entropy, lse, pz = fused_linear_logprobs_forward(
            hidden, weight, targets, bias, temperature, ignore_index, with_entropy, chunk_size)
        ctx.save_for_backward(hidden, weight, targets, bias, lse, pz)
        ctx.args = (temperature, ignore_index, with_entropy, chunk_size)
        # An output nobody differentiates (e.g. an entropy kept only as a metric) arrives as None
        # instead of a zero tensor, so the backward skips its term entirely.
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, bias, lse, pz = ctx.saved_tensors
        temperature, ignore_index, with_entropy, chunk_size = ctx.args
        need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
        dh, dw, db = fused_linear_logprobs_backward(
            hidden, weight, targets, bias, lse, pz if with_entropy else None, grad_logp,
            grad_entropy if with_entropy else None, temperature, ignore_index, chunk_size, need_h, need_w, need_b)
        return (dh if need_h else None, dw if need_w else None, None, db if need_b else None,
                None, None, None, None)


@torch.library.custom_op("rlhf_engine::fused_linear_logprobs", mutates_args=())
def _fused_linear_logprobs_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor],
    temperature: float, ignore_index: int, with_entropy: bool, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse, pz); see :func:`fused_linear_logprobs_forward`."""
    return fused_linear_logprobs_forward(hidden, weight, targets, bias, temperature, ignore_index, with_entropy,
                                         chunk_size)


@_fused_linear_logprobs_op.register_fake
def _(hidden, weight, targets, bias, temperature, ignore_index, with_entropy, chunk_size):
    n = hidden.shape[0]
    new = lambda k: hidden.new_empty((k,), dtype=torch.float32)  # noqa: E731
    return new(n), new(n if with_entropy else 0), new(n), new(n if with_entropy else 0)


@torch.library.custom_op("rlhf_engine::fused_linear_logprobs_backward", mutates_args=())
def _fused_linear_logprobs_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor],
    lse: torch.Tensor, pz: Optional[torch.Tensor], grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor], temperature: float, ignore_index: int, chunk_size: int,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden, dweight, dbias), empty (0,) where not needed; see :func:`fused_linear_logprobs_backward`."""
    return fused_linear_logprobs_backward(hidden, weight, targets, bias, lse, pz, grad_logp, grad_entropy,
                                          temperature, ignore_index, chunk_size, need_hidden, need_weight, need_bias)


@_fused_linear_logprobs_backward_op.register_fake
def _(hidden, weight, targets, bias, lse, pz, grad_logp, grad_entropy, temperature, ignore_index, chunk_size,
      need_hidden, need_weight, need_bias):
    dh = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    db = torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty(0)
    return dh, dw, db


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, temperature, ignore_index, with_entropy, chunk_size = inputs
    _, _, lse, pz = output
    ctx.save_for_backward(hidden, weight, targets, bias, lse, pz)
    ctx.args = (temperature, ignore_index, with_entropy, chunk_size)
    ctx.mark_non_differentiable(lse, pz)


def _backward(ctx, grad_logp, grad_entropy, grad_lse, grad_pz):
    hidden, weight, targets, bias, lse, pz = ctx.saved_tensors
    temperature, ignore_index, with_entropy, chunk_size = ctx.args
    need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
    dh, dw, db = _fused_linear_logprobs_backward_op(
        hidden, weight, targets, bias, lse, pz if with_entropy else None, grad_logp,
        grad_entropy if with_entropy else None, temperature, ignore_index, chunk_size,
        bool(need_h), bool(need_w), bool(need_b and bias is not None))
    return (dh if need_h else None, dw if need_w else None, None, db if need_b else None, None, None, None, None)


_fused_linear_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LM head + log-prob of each target token, without materializing the (N, V) logits.

    logp = log_softmax((hidden @ weight.T + bias) / temperature)[target].

    Args:
        hidden: (..., H) fp32/fp16/bf16 final hidden states (position t predicts token t+1).
        weight: (V, H) same dtype — the LM head, or a tied embedding matrix (its gradient adds up).
        targets: (...) int64/int32, the leading shape of ``hidden``; ids in [0, V) or ``ignore_index``.
        bias: (V,) same dtype, or None.
        temperature: T > 0; the softmax is over logits / T.
        ignore_index: target value of rows to skip (logp = entropy = 0, no gradient).
        with_entropy: also return H = logsumexp(z) − Σ softmax(z)·z, z = logits / T.
        chunk_size: logits elements materialized at a time (default 2^27 = 256 MB in bf16); the forward
            takes chunk_size // V rows at a time, the backward chunk_size // N vocab entries.
        backend: "auto" (chunked Triton path on CUDA, else the PyTorch reference), "triton" or "torch"
            (the reference in fp32: materializes the logits).

    Returns:
        logp: (...) fp32; with ``with_entropy`` (logp, entropy), entropy (...) fp32. Differentiable
        w.r.t. hidden, weight and bias; the weight gradient is deterministic.
    """
    _check_backend(backend)
    _check_common("hidden", hidden, targets, temperature)
    if weight.dim() != 2 or hidden.dim() < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape (V, {hidden.shape[-1] if hidden.dim() else 'H'}), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected dtype {hidden.dtype} (that of hidden), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: expected device {hidden.device}, got {weight.device}")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(f"bias: expected {hidden.dtype} on {hidden.device}, got {bias.dtype} on {bias.device}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets: expected shape {tuple(hidden.shape[:-1])} (hidden.shape[:-1]), got {tuple(targets.shape)}")
    _check_targets(targets, weight.shape[0], ignore_index)
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    if backend == "auto":
        backend = "triton" if hidden.is_cuda else "torch"
    if backend == "torch":
        return linear_logprobs_reference(hidden, weight, targets, bias, temperature, ignore_index, with_entropy,
                                         torch.float32)

    h = hidden.reshape(-1, hidden.shape[-1])                          # (N, H)
    t = targets.reshape(-1).contiguous()                              # (N,)
    args = (float(temperature), int(ignore_index), bool(with_entropy), int(chunk_size))
    if torch.compiler.is_compiling():
        logp, entropy, _, _ = _fused_linear_logprobs_op(h, weight, t, bias, *args)
    else:
        logp, entropy = FusedLinearLogprobsFunction.apply(h, weight, t, bias, *args)
    logp = logp.view(targets.shape)
    if not with_entropy:
        return logp
    return logp, entropy.view(targets.shape)
