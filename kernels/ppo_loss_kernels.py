"""The PPO objective fused, kernels and launch functions: loss, metrics AND gradients in one pass over (B, T).

Per token (notation of ``rlhf_engine.algo.losses``; all derivatives are those autograd takes of
``ppo_loss_reference``, including at the non-smooth points):

  policy:  x = logp - old_logp,  rho = exp(clamp(x, -20, 20)),  rc = clamp(rho, 1 - eps_low, 1 + eps_high)
           pg1 = -A rho,  pg2 = -A rc,  pg = max(pg1, pg2)
           d pg1/d logp = -A rho [-20 <= x <= 20]            (clamp passes the gradient on [lo, hi], ends included)
           d pg2/d logp = -A rho [-20 <= x <= 20] [1 - eps_low <= rho <= 1 + eps_high]
           d max(p, q) = dp if p > q, dq if q > p, (dp + dq) / 2 on a tie (as torch.maximum)
           dual clip (c):  lower = -c A;  pg <- lower where A < 0 and pg > lower (there d pg = 0)
           clipped = pg2 > pg1 (or the dual clip fired)
  value:   e = V - G,  vc = V_old + clamp(V - V_old, -eps_v, eps_v) (V itself where in range),  ec = vc - G
           vf = 1/2 max(e^2, ec^2);   d(e^2/2)/dV = e,   d(ec^2/2)/dV = ec [-eps_v <= V - V_old <= eps_v]
           tie e^2 == ec^2 (every token in range): half to each branch, as torch.maximum (both are e there)
           unclipped (value_clip None): vf = e^2 / 2, d vf/dV = e
  entropy: H (the given per-token entropy), d/dH = 1
  KL:      y = logp - ref_logp (kl_estimate, clamp 10):
           k1 = clamp(y, -10, 10)                     dk/dlogp = [-10 <= y <= 10]
           k2 = clamp(y^2/2, -10, 10)                 dk/dlogp = y [y^2/2 <= 10]
           k3 = clamp(e^-yc - 1 + yc, -10, 10), yc = clamp(y, -20, 20)
                                                      dk/dlogp = (1 - e^-yc) [-20 <= y <= 20] [k3 raw <= 10]

The objective is loss = agg(pg) + vf_coef agg(vf) - ent_coef agg(H) + kl_coef agg(k), where
agg(l) = sum_{b,t} w_bt l_bt with w = m * s_b / N (``loss_weights``): s_b = 1 / max(n_b, 1) for
"seq-mean-token-mean" (n_b the row's token count) and 1 otherwise; N = N_tokens ("token-mean"),
N_seqs ("seq-mean-token-mean", "seq-mean-token-sum"), N_seqs * T_max ("seq-mean-token-sum-norm").
N is global: N_tokens = num_tokens or max(sum m, 1), N_seqs = num_seqs or max(#non-empty rows, 1).

Kernel 1 (one program per ROWS rows, looping over T) writes per token the gradients of the
*un-normalized* objective, u = m s_b (d pg + kl_coef dk) for logp, m s_b vf_coef d vf for V and
-m s_b ent_coef for H, and per row 8 partial sums (token count, then the sums of pg, clipped,
x^2/2, vf, vclipped, H, k; the loss terms times s_b). Kernel 2 (one program) adds the partials in a
fixed order (deterministic, no atomics), derives N on the device (no host sync), and writes the
loss, the metrics and 1/N. The autograd backward is then d input = u * (grad_output / N): no second
pass over the inputs. Masked tokens (m = 0) contribute nothing, whatever their values.

Metrics (fixed order in the op's ``metrics`` tensor): pg_loss, clip_frac, approx_kl, vf_loss,
vf_clip_frac, entropy, kl. The loss terms use the loss weights; clip_frac, approx_kl and
vf_clip_frac are sums over valid tokens divided by N_tokens (as the reference).

The mask is read as 0/1 (nonzero = valid; the reference multiplies by the mask value, the same for
0/1 masks). Inputs fp32/fp16/bf16, math in fp32; loss and metrics in the dtype of logp, gradients in
each input's dtype. old_logp, advantages, old_values, returns and ref_logp are constants (no gradient).

This module holds the kernels and their launch functions (``ppo_loss_forward`` / ``ppo_loss_backward``);
``kernels/ppo_loss.py`` builds the autograd Function, the custom op and the public functions on them.

``ppo_loss_with_grads`` returns the loss, the metrics and the final gradients with no autograd node, in two
launches: kernel 1 as above, then ``_ppo_loss_finalize_grads_kernel``, whose every program reduces the
(8, B) partials itself (same order, same N everywhere) and scales its slice of u by grad_scale / N, program
0 also writing the loss and metrics. The loss is launch-bound (a few MB of traffic, ~3 us at HBM speed), so
its cost is host overhead: one Python call and two launches, against the autograd path's Function, two
launches, the engine and three elementwise ops.
"""
import functools
import numbers
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._fastlaunch import launch
from ._launch import cdiv, next_pow2, row_launch_config

from ._args import AGG_MODES, KL_KINDS  # noqa: E402 - one definition for the Triton and the native losses
from ._metrics import METRIC_KEYS  # noqa: E402 - the (7,) metrics buffer order, shared with the native op
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_N_PART = 8  # per-row partials: count, pg, clipped, x^2/2, vf, vclipped, H, k
_GRAD_BLOCK = 2048        # tokens per step of the gradient loop of _ppo_loss_finalize_grads_kernel
_GRAD_MAX_PROGRAMS = 512  # its grid (each program re-reduces the (8, B) partials: bounded L2 traffic)
# The (8, B) per-row partials live from PART_OFFSET on in one fp32 buffer ``small`` (16 + 8 B). ppo_loss_with_grads
# also takes its loss (entry 0) and metrics (1..7) from it: one allocation and fewer kernel arguments. The autograd
# path writes its loss, metrics and 1 / N to tensors of their own (outputs of an autograd Function must not be views
# of one buffer: an in-place `loss /= n` would fail).
_PART_OFFSET = 16
PART_OFFSET = tl.constexpr(_PART_OFFSET)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _ppo_loss_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, m_ptr,          # (B, T) contiguous
    v_ptr, vold_ptr, ret_ptr, ref_ptr, ent_ptr,  # (B, T) contiguous, read only with their HAS_* flag
    dlogp_ptr, dv_ptr, dent_ptr,                 # (B, T) fp32 un-normalized gradients (written with STORE_*)
    part_ptr,                                    # ``small``: (8, B) fp32 per-row partial sums from PART_OFFSET
    B, T,
    ratio_lo, ratio_hi,                          # 1 - eps_low, 1 + eps_high
    dual_c, value_clip, vf_coef, ent_coef, kl_coef,
    HAS_V: tl.constexpr, HAS_ENT: tl.constexpr, HAS_REF: tl.constexpr,
    DUAL: tl.constexpr, VCLIP: tl.constexpr, KL_KIND: tl.constexpr, ROW_MEAN: tl.constexpr,
    STORE_DLOGP: tl.constexpr, STORE_DV: tl.constexpr, STORE_DENT: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)            # (ROWS,)
    row_ok = rows < B
    row_off = rows.to(tl.int64)[:, None] * T                       # (ROWS, 1)
    cols = tl.arange(0, BLOCK_T)
    if ROW_MEAN:  # s_b = 1 / max(n_b, 1) is needed before the gradients: count the row's tokens first
        n_row = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, T, BLOCK_T):
            t = start + cols
            ok = row_ok[:, None] & (t < T)[None, :]
            m = tl.load(m_ptr + row_off + t[None, :], mask=ok, other=0) != 0
            n_row += tl.sum(m.to(tl.float32), axis=1)
        s_row = 1.0 / tl.maximum(n_row, 1.0)
    else:
        s_row = tl.full([ROWS], 1.0, dtype=tl.float32)
    acc_n = tl.zeros([ROWS], dtype=tl.float32)
    acc_pg = tl.zeros([ROWS], dtype=tl.float32)
    acc_clip = tl.zeros([ROWS], dtype=tl.float32)
    acc_akl = tl.zeros([ROWS], dtype=tl.float32)
    acc_vf = tl.zeros([ROWS], dtype=tl.float32)
    acc_vclip = tl.zeros([ROWS], dtype=tl.float32)
    acc_ent = tl.zeros([ROWS], dtype=tl.float32)
    acc_kl = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        t = start + cols
        ok = row_ok[:, None] & (t < T)[None, :]                    # (ROWS, BLOCK_T)
        offs = row_off + t[None, :]
        m = tl.load(m_ptr + offs, mask=ok, other=0) != 0
        logp = tl.load(logp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        acc_n += tl.sum(m.to(tl.float32), axis=1)

        # ---- clipped surrogate
        x = logp - old
        in_x = (x >= -20.0) & (x <= 20.0)
        ratio = tl.exp(tl.minimum(tl.maximum(x, -20.0), 20.0))
        in_r = (ratio >= ratio_lo) & (ratio <= ratio_hi)
        pg1 = -adv * ratio
        pg2 = -adv * tl.minimum(tl.maximum(ratio, ratio_lo), ratio_hi)
        d1 = tl.where(in_x, -adv * ratio, 0.0)                     # d pg1 / d logp
        d2 = tl.where(in_r, d1, 0.0)                               # d pg2 / d logp
        pg = tl.maximum(pg1, pg2)
        dpg = tl.where(pg1 > pg2, d1, tl.where(pg2 > pg1, d2, 0.5 * (d1 + d2)))
        clipped = pg2 > pg1
        if DUAL:
            lower = -dual_c * adv
            dual = (adv < 0.0) & (pg > lower)
            pg = tl.where(dual, lower, pg)
            dpg = tl.where(dual, 0.0, dpg)
            clipped = clipped | dual
        acc_pg += tl.sum(tl.where(m, pg, 0.0), axis=1)
        acc_clip += tl.sum(tl.where(m & clipped, 1.0, 0.0), axis=1)
        acc_akl += tl.sum(tl.where(m, 0.5 * x * x, 0.0), axis=1)
        dlogp = dpg

        # ---- KL to the reference
        if HAS_REF:
            ref = tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            y = logp - ref
            if KL_KIND == 1:
                k = tl.minimum(tl.maximum(y, -10.0), 10.0)
                dk = tl.where((y >= -10.0) & (y <= 10.0), 1.0, 0.0)
            elif KL_KIND == 2:
                raw = 0.5 * y * y
                k = tl.minimum(raw, 10.0)                          # raw >= 0: the lower clamp never binds
                dk = tl.where(raw <= 10.0, y, 0.0)
            else:
                yc = tl.minimum(tl.maximum(y, -20.0), 20.0)
                e = tl.exp(-yc)
                raw = e - 1.0 + yc                                 # >= 0: only the upper clamp binds
                k = tl.minimum(raw, 10.0)
                dk = tl.where((y >= -20.0) & (y <= 20.0) & (raw <= 10.0), 1.0 - e, 0.0)
            acc_kl += tl.sum(tl.where(m, k, 0.0), axis=1)
            dlogp += kl_coef * dk
        if STORE_DLOGP:
            tl.store(dlogp_ptr + offs, tl.where(m, dlogp * s_row[:, None], 0.0), mask=ok)

        # ---- value loss
        if HAS_V:
            v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            ret = tl.load(ret_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            err = v - ret
            if VCLIP:
                v_old = tl.load(vold_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                dvv = v - v_old
                in_v = (dvv >= -value_clip) & (dvv <= value_clip)
                # in range the clipped value is v itself, not v_old + dvv (an ulp away: a clip counted by rounding)
                errc = tl.where(in_v, v, v_old + tl.minimum(tl.maximum(dvv, -value_clip), value_clip)) - ret
                e2 = err * err
                ec2 = errc * errc
                vf = 0.5 * tl.maximum(e2, ec2)
                dc = tl.where(in_v, errc, 0.0)
                dvf = tl.where(e2 > ec2, err, tl.where(ec2 > e2, dc, 0.5 * (err + dc)))
                acc_vclip += tl.sum(tl.where(m & (ec2 > e2), 1.0, 0.0), axis=1)
            else:
                vf = 0.5 * err * err
                dvf = err
            acc_vf += tl.sum(tl.where(m, vf, 0.0), axis=1)
            if STORE_DV:
                tl.store(dv_ptr + offs, tl.where(m, (vf_coef * dvf) * s_row[:, None], 0.0), mask=ok)

        # ---- entropy bonus
        if HAS_ENT:
            h = tl.load(ent_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            acc_ent += tl.sum(tl.where(m, h, 0.0), axis=1)
            if STORE_DENT:
                tl.store(dent_ptr + offs, tl.where(m, -ent_coef * s_row[:, None], 0.0), mask=ok)

    p = part_ptr + PART_OFFSET + rows
    tl.store(p + 0 * B, acc_n, mask=row_ok)
    tl.store(p + 1 * B, acc_pg * s_row, mask=row_ok)
    tl.store(p + 2 * B, acc_clip, mask=row_ok)
    tl.store(p + 3 * B, acc_akl, mask=row_ok)
    tl.store(p + 4 * B, acc_vf * s_row, mask=row_ok)
    tl.store(p + 5 * B, acc_vclip, mask=row_ok)
    tl.store(p + 6 * B, acc_ent * s_row, mask=row_ok)
    tl.store(p + 7 * B, acc_kl * s_row, mask=row_ok)


@triton.jit
def _reduce_partials(part_ptr, ntok_ptr, nseq_ptr, B, ntok_value, nseq_value, t_max, vf_coef, ent_coef, kl_coef,
                     NTOK_MODE: tl.constexpr, NSEQ_MODE: tl.constexpr, AGG: tl.constexpr, BLOCK_B: tl.constexpr):
    """(metrics (8,) with entry j + 1 = metric j, loss, N_agg) from the (8, B) partials at ``part_ptr +
    PART_OFFSET``, in a fixed order."""
    k = tl.arange(0, 8)                                            # partial index
    offs = tl.arange(0, BLOCK_B)
    acc = tl.zeros([8, BLOCK_B], dtype=tl.float32)
    nonempty = tl.zeros([BLOCK_B], dtype=tl.float32)
    for start in range(0, B, BLOCK_B):                             # fixed order: deterministic
        rows = start + offs
        tile = tl.load(part_ptr + PART_OFFSET + k[:, None] * B + rows[None, :], mask=(rows < B)[None, :],
                       other=0.0)
        acc += tile
        n_row = tl.sum(tl.where(k[:, None] == 0, tile, 0.0), axis=0)
        nonempty += tl.where(n_row > 0.0, 1.0, 0.0)
    sums = tl.sum(acc, axis=1)                                     # (8,)
    if NTOK_MODE == 0:
        n_tok = tl.maximum(tl.sum(tl.where(k == 0, sums, 0.0), axis=0), 1.0)
    elif NTOK_MODE == 1:
        n_tok = ntok_value
    else:
        n_tok = tl.load(ntok_ptr).to(tl.float32)
    if NSEQ_MODE == 0:
        n_seq = tl.maximum(tl.sum(nonempty, axis=0), 1.0)
    elif NSEQ_MODE == 1:
        n_seq = nseq_value
    else:
        n_seq = tl.load(nseq_ptr).to(tl.float32)
    if AGG == 0:
        n_agg = n_tok
    elif AGG == 3:
        n_agg = n_seq * t_max
    else:
        n_agg = n_seq
    # metrics_j = sums_{j+1} / (N_agg for the loss terms pg, vf, H, k; N_tokens for the fractions and approx_kl)
    is_loss_term = (k == 1) | (k == 4) | (k == 6) | (k == 7)
    vals = sums / tl.where(is_loss_term, n_agg, n_tok)
    coef = tl.where(k == 1, 1.0, tl.where(k == 4, vf_coef, tl.where(k == 6, -ent_coef, tl.where(k == 7, kl_coef, 0.0))))
    loss = tl.sum(coef * vals, axis=0)
    return vals, loss, n_agg


@triton.jit
def _ppo_loss_finalize_kernel(
    part_ptr,                       # (8, B) fp32 partials from the first kernel, from PART_OFFSET on
    loss_ptr, metrics_ptr,          # () and (7,) fp32 outputs
    inv_n_ptr,                      # () fp32 output: 1 / N of the loss aggregation
    ntok_ptr, nseq_ptr,             # 0-dim tensors (modes 2)
    B,
    ntok_value, nseq_value,         # Python numbers (modes 1)
    t_max, vf_coef, ent_coef, kl_coef,
    NTOK_MODE: tl.constexpr, NSEQ_MODE: tl.constexpr,   # 0: from the mask, 1: value, 2: tensor
    AGG: tl.constexpr,              # index into AGG_MODES
    BLOCK_B: tl.constexpr,
):
    vals, loss, n_agg = _reduce_partials(part_ptr, ntok_ptr, nseq_ptr, B, ntok_value, nseq_value, t_max, vf_coef,
                                         ent_coef, kl_coef, NTOK_MODE, NSEQ_MODE, AGG, BLOCK_B)
    k = tl.arange(0, 8)
    tl.store(metrics_ptr + k - 1, vals, mask=k >= 1)
    tl.store(loss_ptr, loss)
    tl.store(inv_n_ptr, 1.0 / n_agg)


@triton.jit
def _ppo_loss_finalize_grads_kernel(
    out_ptr,                        # ``small``: reads the partials, writes the loss (0) and the metrics (1..7)
    ntok_ptr, nseq_ptr,             # as _ppo_loss_finalize_kernel
    B, ntok_value, nseq_value, t_max, vf_coef, ent_coef, kl_coef,
    u0_ptr, u1_ptr, u2_ptr,         # (n,) fp32 un-normalized gradients of logp, values, entropy (kernel 1)
    g0_ptr, g1_ptr, g2_ptr,         # (n,) the gradients, each in its input's dtype (may alias u: in place)
    n, grad_scale,
    NTOK_MODE: tl.constexpr, NSEQ_MODE: tl.constexpr, AGG: tl.constexpr, BLOCK_B: tl.constexpr,
    HAS1: tl.constexpr, HAS2: tl.constexpr, BLOCK: tl.constexpr,
):
    # Every program reduces the (8, B) partials itself (a few KB from L2, the same order everywhere, so the
    # same N in every program): the gradients d = u * grad_scale / N need no third launch. Program 0 writes
    # the loss and the metrics. Grid-stride over the n tokens.
    vals, loss, n_agg = _reduce_partials(out_ptr, ntok_ptr, nseq_ptr, B, ntok_value, nseq_value, t_max, vf_coef,
                                         ent_coef, kl_coef, NTOK_MODE, NSEQ_MODE, AGG, BLOCK_B)
    pid = tl.program_id(0)
    k = tl.arange(0, 8)
    tl.store(out_ptr + k, vals, mask=(k >= 1) & (pid == 0))
    tl.store(out_ptr, loss, mask=pid == 0)
    scale = grad_scale / n_agg
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < n
        u = tl.load(u0_ptr + offs, mask=ok, other=0.0)
        tl.store(g0_ptr + offs, (u * scale).to(g0_ptr.dtype.element_ty), mask=ok)
        if HAS1:
            u = tl.load(u1_ptr + offs, mask=ok, other=0.0)
            tl.store(g1_ptr + offs, (u * scale).to(g1_ptr.dtype.element_ty), mask=ok)
        if HAS2:
            u = tl.load(u2_ptr + offs, mask=ok, other=0.0)
            tl.store(g2_ptr + offs, (u * scale).to(g2_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launch functions
class PPOLossConfig(NamedTuple):
    """The scalar hyperparameters of :func:`ppo_loss_triton` (normalized: clip_high filled in)."""
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None
    value_clip: Optional[float] = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    agg: str = "token-mean"
    max_len: Optional[int] = None


@functools.lru_cache(maxsize=64)
def _cfg_arguments(cfg: PPOLossConfig) -> tuple[tuple, dict, int, tuple]:
    """What the kernels take from a configuration, computed once per configuration (these calls are host-bound):
    the rows kernel's float arguments and configuration constexprs, the aggregation mode, the finalize kernels'
    coefficients."""
    agg = AGG_MODES.index(cfg.agg)
    coefs = (float(cfg.vf_coef), float(cfg.ent_coef), float(cfg.kl_coef))
    rows_args = (1.0 - cfg.clip_low, 1.0 + cfg.clip_high, float(cfg.dual_clip or 0.0), float(cfg.value_clip or 0.0),
                 *coefs)
    rows_meta = dict(DUAL=cfg.dual_clip is not None, VCLIP=cfg.value_clip is not None,
                     KL_KIND=KL_KINDS.index(cfg.kl_kind) + 1, ROW_MEAN=agg == 1)
    return rows_args, rows_meta, agg, coefs


def _launch_config(B: int, T: int, block_t: Optional[int]) -> tuple[int, int, int]:
    return row_launch_config(B, T, block_t, 1024)


def _normalizer(n, name: str, device: torch.device) -> tuple[int, float, Optional[torch.Tensor]]:
    """(mode, value, tensor) for the finalize kernel: 0 from the mask, 1 a Python number, 2 a device tensor."""
    if n is None:
        return 0, 0.0, None
    if isinstance(n, torch.Tensor):
        if n.numel() != 1:
            raise ValueError(f"{name}: expected a number or a 0-dim tensor, got shape {tuple(n.shape)}")
        return 2, 0.0, n.detach().reshape(()).to(device)   # no copy when already on the device
    if isinstance(n, bool) or not isinstance(n, numbers.Real):  # (NumPy scalars are numbers.Real)
        raise TypeError(f"{name}: expected None, a number or a 0-dim tensor, got {type(n).__name__}")
    return 1, float(n), None


def ppo_loss_forward(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                     values: Optional[torch.Tensor] = None, old_values: Optional[torch.Tensor] = None,
                     returns: Optional[torch.Tensor] = None, ref_logp: Optional[torch.Tensor] = None,
                     entropy: Optional[torch.Tensor] = None, cfg: PPOLossConfig = PPOLossConfig(),
                     num_tokens=None, num_seqs=None, need_grads: tuple[bool, bool, bool] = (True, True, True),
                     block_t: Optional[int] = None):
    """Launch the two forward kernels of the autograd path (no argument checks: see :func:`ppo_loss_triton`).

    Args:
        logp, old_logp, advantages: (B, T) fp32/fp16/bf16; mask: (B, T) bool/int/float (nonzero = valid).
        values, old_values, returns, ref_logp, entropy: optional (B, T) floats, as in :func:`ppo_loss_triton`.
        cfg: the scalar hyperparameters. num_tokens, num_seqs: None, a number or a 0-dim tensor.
        need_grads: whether to write the gradients for (logp, values, entropy).
        block_t: tokens per chunk (power of two); default min(1024, next_pow2(T)).
    Returns:
        loss: () in logp.dtype; metrics: (7,) in logp.dtype (order :data:`METRIC_KEYS`, 0 for absent terms);
        u_logp, u_values, u_entropy: (B, T) fp32 gradients of the loss times N (shape (0,) when absent
        or not needed); inv_n: () fp32, 1 / N. The gradient of ``loss`` w.r.t. logp is u_logp * inv_n.
        Each is a tensor of its own (no two share storage).
    """
    small, us, fin_args, fin_meta = _launch_rows(logp, old_logp, advantages, mask, values, old_values, returns,
                                                 ref_logp, entropy, cfg, num_tokens, num_seqs, need_grads, block_t)
    dev = logp.device
    loss = torch.empty((), dtype=torch.float32, device=dev)
    metrics = torch.empty((len(METRIC_KEYS),), dtype=torch.float32, device=dev)
    inv_n = torch.empty((), dtype=torch.float32, device=dev)
    launch(_ppo_loss_finalize_kernel, (1,), small, loss, metrics, inv_n, *fin_args, **fin_meta)
    if logp.dtype != torch.float32:  # rounded by torch (the interpreter truncates fp32 -> bf16 stores)
        loss, metrics = loss.to(logp.dtype), metrics.to(logp.dtype)
    u_logp, u_v, u_ent = (small.new_empty(0) if u is None else u for u in us)
    return loss, metrics, u_logp, u_v, u_ent, inv_n


def ppo_loss_launch_grads(logp, old_logp, advantages, mask, values, old_values, returns, ref_logp, entropy,
                          cfg: PPOLossConfig, num_tokens, num_seqs, grad_scale: float):
    """The two launches of ``ppo_loss_with_grads`` with the fewest host operations: the rows kernel, then
    ``_ppo_loss_finalize_grads_kernel``, which turns u into the final gradients of ``grad_scale * loss``
    (in place for fp32 inputs, else into new contiguous tensors of each input's dtype). Returns ``small``, the
    (16 + 8 B,) fp32 buffer whose entry 0 is the loss and entries 1..7 the metrics, and the three gradients
    (None where the input is absent). No argument checks."""
    small, us, fin_args, fin_meta = _launch_rows(logp, old_logp, advantages, mask, values, old_values, returns,
                                                 ref_logp, entropy, cfg, num_tokens, num_seqs, (True, True, True),
                                                 None)
    B, T = logp.shape
    outs = tuple(u if u is None or x.dtype == torch.float32 else torch.empty(B, T, dtype=x.dtype, device=logp.device)
                 for u, x in zip(us, (logp, values, entropy)))
    n = B * T
    grid = (max(1, min(cdiv(n, _GRAD_BLOCK), _GRAD_MAX_PROGRAMS)),)
    ptr = lambda x: small if x is None else x  # noqa: E731 - absent gradients: any valid pointer
    launch(_ppo_loss_finalize_grads_kernel, grid,
        small, *fin_args, *map(ptr, us), *map(ptr, outs), n, float(grad_scale), **fin_meta,
        HAS1=us[1] is not None, HAS2=us[2] is not None, BLOCK=_GRAD_BLOCK)
    return (small, *outs)


def _launch_rows(logp, old_logp, advantages, mask, values, old_values, returns, ref_logp, entropy, cfg: PPOLossConfig,
                 num_tokens, num_seqs, need_grads: tuple[bool, bool, bool], block_t: Optional[int]):
    """Allocate ``small`` and the fp32 u buffers (None where not stored), launch the rows kernel; returns them with
    the arguments every finalize kernel takes after its output pointers."""
    B, T = logp.shape
    dev = logp.device
    has_v, has_ref, has_ent = values is not None, ref_logp is not None, entropy is not None
    st_logp, st_v, st_ent = need_grads[0], need_grads[1] and has_v, need_grads[2] and has_ent
    new = lambda on: torch.empty(B, T, dtype=torch.float32, device=dev) if on else None  # noqa: E731
    u_logp, u_v, u_ent = new(st_logp), new(st_v), new(st_ent)
    small = torch.empty(_PART_OFFSET + _N_PART * B, dtype=torch.float32, device=dev)
    rows_args, rows_meta, agg, coefs = _cfg_arguments(cfg)
    ntok_mode, ntok_val, ntok_t = _normalizer(num_tokens, "num_tokens", dev)
    nseq_mode, nseq_val, nseq_t = _normalizer(num_seqs, "num_seqs", dev)
    if B > 0:
        ROWS, BLOCK_T, num_warps = _launch_config(B, T, block_t)
        c = lambda x: x.contiguous() if x is not None else logp  # noqa: E731 - absent inputs: any valid pointer
        m = mask.contiguous()
        m = m.view(torch.uint8) if m.dtype == torch.bool else m
        launch(_ppo_loss_fwd_kernel, (cdiv(B, ROWS),),
            c(logp), c(old_logp), c(advantages), m, c(values), c(old_values), c(returns), c(ref_logp), c(entropy),
            small if u_logp is None else u_logp, small if u_v is None else u_v, small if u_ent is None else u_ent,
            small, B, T, *rows_args,
            HAS_V=has_v, HAS_ENT=has_ent, HAS_REF=has_ref, **rows_meta,
            STORE_DLOGP=st_logp, STORE_DV=st_v, STORE_DENT=st_ent,
            ROWS=ROWS, BLOCK_T=BLOCK_T, num_warps=num_warps,
        )
    fin_args = (ntok_t if ntok_t is not None else small, nseq_t if nseq_t is not None else small, B,
                ntok_val, nseq_val, float(T if cfg.max_len is None else cfg.max_len), *coefs)
    fin_meta = dict(NTOK_MODE=ntok_mode, NSEQ_MODE=nseq_mode, AGG=agg,
                    BLOCK_B=min(1024, next_pow2(max(B, 16))), num_warps=4)
    return small, (u_logp, u_v, u_ent), fin_args, fin_meta


def ppo_loss_backward(grad_loss: torch.Tensor, inv_n: torch.Tensor, us: tuple[Optional[torch.Tensor], ...],
                      dtypes: tuple[Optional[torch.dtype], ...]) -> tuple[Optional[torch.Tensor], ...]:
    """d input = u * (grad_loss / N): one elementwise op per input (no pass over the other inputs).

    Args: grad_loss: () upstream gradient; inv_n: () fp32 1 / N; us: (B, T) fp32 saved gradients (or None);
    dtypes: dtype of each returned gradient. Returns one gradient (or None) per entry of ``us``.
    """
    scale = grad_loss * inv_n if grad_loss.dtype == torch.float32 else grad_loss.float() * inv_n   # ()
    out = []
    for u, dt in zip(us, dtypes):
        d = None if u is None else u * scale
        out.append(d if d is None or d.dtype == dt else d.to(dt))
    return tuple(out)
