"""Generalized Advantage Estimation in one launch: a parallel scan per row (forward and backward).

Notation as ``rlhf_engine.algo.gae`` (the reference, ``gae_reference``): per row, tokens t = 0..T-1,
rewards r_t, values v_t, mask m_t in {0, 1}, bootstrap value lv (0 without ``last_value``).

GAE is the first-order linear recurrence, run right to left,

    A_t = a_t * A_{t+1} + b_t,        A_T = 0,

i.e. A_t = f_t(A_{t+1}) for the affine map f_t(x) = a_t x + b_t. Affine maps compose associatively:

    f_t o f_{t+1} : x -> a_t (a_{t+1} x + b_{t+1}) + b_t = (a_t a_{t+1}) x + (a_t b_{t+1} + b_t),

so every A_t comes out of one ``tl.associative_scan(..., reverse=True)`` over the pairs (a_t, b_t).
With Triton's scan convention combine(acc, new) (``acc`` the maps already folded in, from the right
in a reverse scan, ``new`` the next one to the left) this is :func:`_affine_combine`:
(a1, b1), (a2, b2) -> (a1 a2, b1 a2 + b2)  =  "apply (a1, b1) first, then (a2, b2)".
The scan of a block gives per position the composed map (P_t, Q_t) of positions t..end of the block,
so A_t = P_t * A_in + Q_t with A_in the state entering from the right (the carry between chunks).

Let N_t be "the value after t": the value of the nearest *valid* token s > t, or lv if there is none.
N is itself an affine recurrence with a in {0, 1}, on the stream shifted by one:

    N_t = (1 - m_{t+1}) N_{t+1} + m_{t+1} vv_{t+1},    N_{T-1} = lv   (the initial carry),

with vv = v in "carry" mode and vv = 0 in "zero" mode (then N_t = lv exactly when no valid token
follows t, which at a valid t means t is the row's last valid token). Then, both modes:

    carry:  a_t = m_t ? gamma*lam : 1     b_t = m_t (r_t - v_t + gamma N_t)
    zero:   a_t = gamma*lam               b_t = m_t (r_t - v_t + gamma N_t) + gamma m_{t+1} v_{t+1}

(in "zero" mode r and v are zeroed outside the mask and lv enters at the last valid token; in
"carry" mode masked tokens pass A and N through unchanged), and the outputs are

    advantages_t = m_t A_t,      returns_t = m_t (A_t + v_t).

Backward. A = L b with L upper triangular, L[t, s] = prod_{k=t}^{s-1} a_k (s >= t), so with
g_t = dLoss/dA_t = m_t (dadv_t + dret_t), G = L^T g obeys the transposed, left-to-right recurrence

    G_s = a_{s-1} G_{s-1} + g_s,       G_{-1} = 0.

"zero" mode: X_t := G_t, i.e. X_t = alpha_t X_{t-1} + g_t with alpha_t = gamma*lam.
"carry" mode: a_{s-1} = 1 and g_s = 0 on masked s, so take X_t := G at the nearest valid token <= t
(0 if none); it obeys X_t = alpha_t X_{t-1} + g_t with alpha_t = m_t ? gamma*lam : 1, and equals G_t
at every valid t. In both modes, since b_{t-1} (zero) or b_{p(t)} (carry, p(t) the previous valid
token, whose N is v_t) holds gamma m_t v_t:

    d rewards_t = m_t X_t
    d values_t  = m_t (dret_t - X_t + gamma X_{t-1})        (X_{-1} = 0)
    d lv        = gamma X_L                                (L the last valid token; 0 for an empty row)

X_{t-1} is the scan of the stream shifted by one (elements (alpha_{t-1}, g_{t-1})), and then
X_t = alpha_t X_{t-1} + g_t elementwise: one forward scan per chunk.

Dtypes: inputs fp32/fp16/bf16 (the mask bool/int/float, nonzero = valid), math in fp32, outputs
(advantages, returns) in the dtype of ``rewards``; gradients in the dtype of each input.
Layers: ``_gae_fwd_kernel`` / ``_gae_bwd_kernel`` -> ``gae_forward`` / ``gae_backward`` ->
``GAEFunction`` and the custom ops ``rlhf_engine::gae`` (+ ``gae_backward``) -> ``gae_triton``
(eager: the Function; under ``torch.compile``: the custom op; with nothing requiring grad, the usual
case for advantages: the launch function alone).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._fastlaunch import launch
from ._launch import cdiv, row_launch_config

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # (a1, b1): the maps folded so far; (a2, b2): the next one.  x -> a2 (a1 x + b1) + b2.
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _gae_fwd_kernel(
    r_ptr, v_ptr, m_ptr, lv_ptr,    # (B, T) rewards, values, mask (contiguous); (B,) last_value
    adv_ptr, ret_ptr,               # (B, T) outputs
    B, T,
    gamma, gamma_lam,
    HAS_LV: tl.constexpr, CARRY: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)            # (ROWS,)
    row_ok = rows < B
    row_off = rows.to(tl.int64)[:, None] * T                       # (ROWS, 1)
    cols = tl.arange(0, BLOCK_T)                                   # (BLOCK_T,)
    if HAS_LV:
        carry_n = tl.load(lv_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)  # N_{T-1} = lv
    else:
        carry_n = tl.zeros([ROWS], dtype=tl.float32)
    carry_a = tl.zeros([ROWS], dtype=tl.float32)                   # A_T = 0
    n_chunks = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_chunks):                                   # chunks from the right
        t = (n_chunks - 1 - i) * BLOCK_T + cols
        ok = row_ok[:, None] & (t < T)[None, :]                    # (ROWS, BLOCK_T)
        ok1 = row_ok[:, None] & (t + 1 < T)[None, :]
        offs = row_off + t[None, :]
        m = tl.load(m_ptr + offs, mask=ok, other=0) != 0
        r = tl.load(r_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        m1 = tl.load(m_ptr + offs + 1, mask=ok1, other=0) != 0     # m_{t+1}, v_{t+1}: 0 past the end
        v1 = tl.load(v_ptr + offs + 1, mask=ok1, other=0.0).to(tl.float32)

        # N_t = (1 - m_{t+1}) N_{t+1} + m_{t+1} vv_{t+1}; identity (1, 0) past the end.
        na = tl.where(m1, 0.0, 1.0)
        if CARRY:
            nb = tl.where(m1, v1, 0.0)
        else:
            nb = tl.zeros_like(na)
        pa, pb = tl.associative_scan((na, nb), axis=1, combine_fn=_affine_combine, reverse=True)
        nxt = pa * carry_n[:, None] + pb                           # N_t
        carry_n = tl.sum(tl.where(cols[None, :] == 0, nxt, 0.0), axis=1)  # N at the chunk's first column

        # A_t = a_t A_{t+1} + b_t.
        b = tl.where(m, r - v + gamma * nxt, 0.0)
        if CARRY:
            a = tl.where(m, gamma_lam, 1.0)
        else:
            b += gamma * tl.where(m1, v1, 0.0)
            a = tl.where(ok, gamma_lam, 1.0)                       # identity on padding lanes
        pa, pb = tl.associative_scan((a, b), axis=1, combine_fn=_affine_combine, reverse=True)
        adv = pa * carry_a[:, None] + pb                           # A_t
        carry_a = tl.sum(tl.where(cols[None, :] == 0, adv, 0.0), axis=1)

        tl.store(adv_ptr + offs, tl.where(m, adv, 0.0), mask=ok)
        tl.store(ret_ptr + offs, tl.where(m, adv + v, 0.0), mask=ok)


@triton.jit
def _gae_bwd_kernel(
    ga_ptr, gr_ptr, m_ptr,          # (B, T) d advantages, d returns, mask
    dr_ptr, dv_ptr, dlv_ptr,        # (B, T) d rewards, d values; (B,) d last_value
    B, T,
    gamma, gamma_lam,
    HAS_GA: tl.constexpr, HAS_GR: tl.constexpr, HAS_LV: tl.constexpr, CARRY: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    row_off = rows.to(tl.int64)[:, None] * T
    cols = tl.arange(0, BLOCK_T)
    n_chunks = tl.cdiv(T, BLOCK_T)
    if HAS_LV:  # L = last valid index per row (-1 for an empty row): a cheap pass over the mask
        last = tl.full([ROWS], -1, dtype=tl.int32)
        for c in range(0, n_chunks):
            t = c * BLOCK_T + cols
            ok = row_ok[:, None] & (t < T)[None, :]
            m = tl.load(m_ptr + row_off + t[None, :], mask=ok, other=0) != 0
            last = tl.maximum(last, tl.max(tl.where(m, t[None, :], -1), axis=1))
        dlv = tl.zeros([ROWS], dtype=tl.float32)
    carry = tl.zeros([ROWS], dtype=tl.float32)                     # X'_{c0-1} = X_{c0-2}; 0 at the start
    for c in range(0, n_chunks):                                   # chunks from the left
        t = c * BLOCK_T + cols
        ok = row_ok[:, None] & (t < T)[None, :]
        okp = row_ok[:, None] & (t >= 1)[None, :] & (t - 1 < T)[None, :]
        offs = row_off + t[None, :]
        m = tl.load(m_ptr + offs, mask=ok, other=0) != 0
        mp = tl.load(m_ptr + offs - 1, mask=okp, other=0) != 0     # m_{t-1}
        g = tl.zeros([ROWS, BLOCK_T], dtype=tl.float32)
        gp = tl.zeros([ROWS, BLOCK_T], dtype=tl.float32)
        gr = tl.zeros([ROWS, BLOCK_T], dtype=tl.float32)
        if HAS_GA:
            g += tl.load(ga_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            gp += tl.load(ga_ptr + offs - 1, mask=okp, other=0.0).to(tl.float32)
        if HAS_GR:
            gr = tl.load(gr_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            g += gr
            gp += tl.load(gr_ptr + offs - 1, mask=okp, other=0.0).to(tl.float32)
        g = tl.where(m, g, 0.0)                                    # g_t = m_t (dadv_t + dret_t)
        gp = tl.where(mp, gp, 0.0)                                 # g_{t-1}
        if CARRY:
            alpha = tl.where(m, gamma_lam, 1.0)
            alpha_p = tl.where(mp, gamma_lam, 1.0)
        else:
            alpha = tl.zeros([ROWS, BLOCK_T], dtype=tl.float32) + gamma_lam
            alpha_p = tl.where(okp, gamma_lam, 1.0)                # identity at t = 0
        # X'_t = X_{t-1} = alpha_{t-1} X'_{t-1} + g_{t-1}: forward scan of the shifted stream.
        pa, pb = tl.associative_scan((alpha_p, gp), axis=1, combine_fn=_affine_combine)
        x_prev = pa * carry[:, None] + pb                          # X_{t-1}
        x = alpha * x_prev + g                                     # X_t
        carry = tl.sum(tl.where(cols[None, :] == BLOCK_T - 1, x_prev, 0.0), axis=1)
        tl.store(dr_ptr + offs, tl.where(m, x, 0.0), mask=ok)
        tl.store(dv_ptr + offs, tl.where(m, gr - x + gamma * x_prev, 0.0), mask=ok)
        if HAS_LV:
            dlv += tl.sum(tl.where(t[None, :] == last[:, None], x, 0.0), axis=1)
    if HAS_LV:
        tl.store(dlv_ptr + rows, gamma * dlv, mask=row_ok)


# ----------------------------------------------------------------------------- launch functions
def _launch_config(B: int, T: int, block_t: Optional[int]) -> tuple[int, int, int]:
    return row_launch_config(B, T, block_t, 2048)


def _mask_arg(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def gae_forward(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                last_value: Optional[torch.Tensor] = None, *, gamma: float, lam: float, carry: bool,
                block_t: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel (no checks: see :func:`gae_triton`).

    Args:
        rewards, values: (B, T) fp32/fp16/bf16. mask: (B, T) bool/int/float (nonzero = valid).
        last_value: optional (B,) float bootstrap value.
        block_t: tokens per chunk (power of two); default min(2048, next_pow2(T)).
    Returns:
        advantages, returns: (B, T) in ``rewards.dtype``, zero outside the mask.
    """
    B, T = rewards.shape
    adv = torch.empty((B, T), dtype=rewards.dtype, device=rewards.device)
    ret = torch.empty_like(adv)
    if B == 0 or T == 0:
        return adv, ret
    r, v, m = rewards.contiguous(), values.contiguous(), _mask_arg(mask)
    lv = last_value.contiguous() if last_value is not None else r
    ROWS, BLOCK_T, num_warps = _launch_config(B, T, block_t)
    launch(_gae_fwd_kernel, (cdiv(B, ROWS),),
        r, v, m, lv, adv, ret, B, T, float(gamma), float(gamma) * float(lam),
        HAS_LV=last_value is not None, CARRY=bool(carry), ROWS=ROWS, BLOCK_T=BLOCK_T, num_warps=num_warps,
    )
    return adv, ret


def gae_backward(grad_adv: Optional[torch.Tensor], grad_ret: Optional[torch.Tensor], mask: torch.Tensor, *,
                 gamma: float, lam: float, carry: bool, has_last_value: bool,
                 dtype: torch.dtype = torch.float32, block_t: Optional[int] = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Launch the backward kernel: gradients w.r.t. rewards, values and last_value.

    Args:
        grad_adv, grad_ret: (B, T) upstream grads of advantages / returns, or None (zero).
        mask: (B, T) as in the forward.
        dtype: dtype of the returned d_rewards / d_values.
    Returns:
        d_rewards (B, T), d_values (B, T) in ``dtype``; d_last_value (B,) fp32, or None without ``has_last_value``.
    """
    B, T = mask.shape
    dev = mask.device
    dr = torch.empty((B, T), dtype=dtype, device=dev)
    dv = torch.empty((B, T), dtype=dtype, device=dev)
    # the kernel writes every row's d last_value (0 for an empty row): no zero-fill launch
    dlv = torch.empty((B,), dtype=torch.float32, device=dev) if has_last_value else None
    if B == 0 or T == 0:
        return dr.zero_(), dv.zero_(), dlv.zero_() if dlv is not None else None
    m = _mask_arg(mask)
    ga = grad_adv.contiguous() if grad_adv is not None else None
    gr = grad_ret.contiguous() if grad_ret is not None else None
    ROWS, BLOCK_T, num_warps = _launch_config(B, T, block_t)
    launch(_gae_bwd_kernel, (cdiv(B, ROWS),),
        ga if ga is not None else dr, gr if gr is not None else dr, m, dr, dv, dlv if dlv is not None else dr,
        B, T, float(gamma), float(gamma) * float(lam),
        HAS_GA=ga is not None, HAS_GR=gr is not None, HAS_LV=bool(has_last_value), CARRY=bool(carry),
        ROWS=ROWS, BLOCK_T=BLOCK_T, num_warps=num_warps,
    )
    return dr, dv, dlv


# ----------------------------------------------------------------------------- autograd
class GAEFunction(torch.autograd.Function):
    """Thin autograd wrapper over the launch functions: the eager path of :func:`gae_triton`.

    Under ``torch.compile`` :func:`gae_triton` calls the custom op ``rlhf_engine::gae`` instead.
    """

    @staticmethod
    def forward(ctx, rewards, values, mask, last_value, gamma, lam, carry):
        adv, ret = gae_forward(rewards, values, mask, last_value, gamma=gamma, lam=lam, carry=carry)
        ctx.set_materialize_grads(False)  # an unused output's grad stays None: its loads are skipped
        ctx.save_for_backward(mask)  # the map (rewards, values, lv) -> outputs is linear: nothing else needed
        ctx.args = (gamma, lam, carry, last_value is not None, rewards.dtype, values.dtype,
                    last_value.dtype if last_value is not None else None)
        return adv, ret

    @staticmethod
    def backward(ctx, grad_adv, grad_ret):
        (mask,) = ctx.saved_tensors
        gamma, lam, carry, has_lv, r_dtype, v_dtype, lv_dtype = ctx.args
        dr, dv, dlv = gae_backward(grad_adv, grad_ret, mask, gamma=gamma, lam=lam, carry=carry,
                                   has_last_value=has_lv, dtype=r_dtype)
        return dr, dv.to(v_dtype), None, dlv.to(lv_dtype) if has_lv else None, None, None, None


@torch.library.custom_op("rlhf_engine::gae", mutates_args=())
def _gae_op(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, last_value: Optional[torch.Tensor],
            gamma: float, lam: float, carry: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns); see :func:`gae_forward`."""
    return gae_forward(rewards, values, mask, last_value, gamma=gamma, lam=lam, carry=carry)


@_gae_op.register_fake
def _(rewards, values, mask, last_value, gamma, lam, carry):
    return torch.empty_like(rewards, memory_format=torch.contiguous_format), \
        torch.empty_like(rewards, memory_format=torch.contiguous_format)


@torch.library.custom_op("rlhf_engine::gae_backward", mutates_args=())
def _gae_backward_op(grad_adv: Optional[torch.Tensor], grad_ret: Optional[torch.Tensor], mask: torch.Tensor,
                     gamma: float, lam: float, carry: bool, has_last_value: bool,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_rewards, d_values) (B, T) in ``dtype`` and d_last_value (B,) fp32 ((0,) without ``has_last_value``)."""
    dr, dv, dlv = gae_backward(grad_adv, grad_ret, mask, gamma=gamma, lam=lam, carry=carry,
                               has_last_value=has_last_value, dtype=dtype)
    return dr, dv, dlv if dlv is not None else mask.new_empty((0,), dtype=torch.float32)


@_gae_backward_op.register_fake
def _(grad_adv, grad_ret, mask, gamma, lam, carry, has_last_value, dtype):
    B, T = mask.shape
    return (mask.new_empty((B, T), dtype=dtype), mask.new_empty((B, T), dtype=dtype),
            mask.new_empty((B if has_last_value else 0,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    rewards, values, mask, last_value, gamma, lam, carry = inputs
    ctx.save_for_backward(mask)
    ctx.args = (gamma, lam, carry, last_value is not None, rewards.dtype, values.dtype,
                last_value.dtype if last_value is not None else None)


def _backward(ctx, grad_adv, grad_ret):
    (mask,) = ctx.saved_tensors
    gamma, lam, carry, has_lv, r_dtype, v_dtype, lv_dtype = ctx.args
    dr, dv, dlv = _gae_backward_op(grad_adv, grad_ret, mask, gamma, lam, carry, has_lv, r_dtype)
    return dr, dv.to(v_dtype), None, dlv.to(lv_dtype) if has_lv else None, None, None, None


_gae_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def _check(rewards, values, mask, last_value, gamma, lam) -> None:
    for name, x in (("rewards", rewards), ("values", values), ("mask", mask)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name}: expected a (B, T) tensor, got shape {tuple(x.shape)}")
        if x.shape != rewards.shape:
            raise ValueError(f"{name}: expected shape {tuple(rewards.shape)} (as rewards), got {tuple(x.shape)}")
        if x.device != rewards.device:
            raise ValueError(f"{name}: expected device {rewards.device} (as rewards), got {x.device}")
    for name, x in (("rewards", rewards), ("values", values)):
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: expected float32, float16 or bfloat16, got {x.dtype}")
    if last_value is not None:
        if not isinstance(last_value, torch.Tensor) or last_value.shape != (rewards.shape[0],):
            got = tuple(last_value.shape) if isinstance(last_value, torch.Tensor) else type(last_value).__name__
            raise ValueError(f"last_value: expected shape ({rewards.shape[0]},), got {got}")
        if last_value.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"last_value: expected float32, float16 or bfloat16, got {last_value.dtype}")
        if last_value.device != rewards.device:
            raise ValueError(f"last_value: expected device {rewards.device} (as rewards), got {last_value.device}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma: expected a value in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam: expected a value in [0, 1], got {lam}")


def gae_triton(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
               last_value: Optional[torch.Tensor] = None, *, gamma: float = 1.0, lam: float = 0.95,
               carry: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns with the Triton kernels (one launch forward, one backward).

    Same semantics as ``rlhf_engine.algo.gae_reference`` (module docstring of ``rlhf_engine.algo.gae``).

    Args:
        rewards: (B, T) fp32/fp16/bf16 per-token rewards.
        values: (B, T) fp32/fp16/bf16 critic values V_t.
        mask: (B, T) bool/int/float response mask (nonzero = valid token).
        last_value: optional (B,) float bootstrap value after each row's last valid token (0 if None).
        gamma, lam: discount and GAE lambda, in [0, 1].
        carry: False for the "zero" mask mode, True for "carry" (masked tokens are skipped).
    Returns:
        advantages (B, T), returns (B, T) = advantages + values, both in ``rewards.dtype`` (computed
        in fp32) and zero outside the mask. Differentiable w.r.t. rewards, values and last_value.
    """
    _check(rewards, values, mask, last_value, gamma, lam)
    if not isinstance(carry, bool):  # bool("no") is True
        raise TypeError(f"carry: expected True or False, got {carry!r}")
    args = (float(gamma), float(lam), carry)
    if torch.compiler.is_compiling():
        return _gae_op(rewards, values, mask, last_value, *args)
    if torch.is_grad_enabled() and (rewards.requires_grad or values.requires_grad
                                    or (last_value is not None and last_value.requires_grad)):
        return GAEFunction.apply(rewards, values, mask, last_value, *args)
    # no autograd graph needed (the usual case: advantages are computed without grad): skip the Function
    return gae_forward(rewards, values, mask, last_value, gamma=args[0], lam=args[1], carry=args[2])
