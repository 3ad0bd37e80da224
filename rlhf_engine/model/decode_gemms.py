"""The decode step's opt-in layer paths on other GEMMs than cuBLAS (``DecoderLayer.forward_fused`` calls them when
the step's ``AttnMeta`` says so): the split-K GEMMs with the norms fused in (``decode_norm_gemm_layer``,
``RLHF_ENGINE_DECODE_NORM_GEMM=1``: 5 kernels a layer; on the Gluon decode GEMM where it applies when
``RLHF_ENGINE_DECODE_GEMM_WS=1`` is set too, on the Triton one otherwise) and the usual layer with the Gluon decode GEMM
in place of cuBLAS (``decode_gemm_ws_layer``, ``RLHF_ENGINE_DECODE_GEMM_WS=1`` alone: 7 kernels a layer). Each returns
None where it does not apply, and the layer runs its usual path."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .attention import AttnMeta
from .packing import _one_gemm_may_stand_in, packed_weights


class RowSumSq(NamedTuple):
    """What a decode layer on the split-K GEMM path hands the next in place of an addend: its output is the whole
    residual stream, and ``sumsq`` (P, rows) fp32 the partial sums of squares of its rows (the next norm's rstd)."""
    sumsq: torch.Tensor


def decode_norm_gemm_layer(layer, x: torch.Tensor, d, cos: torch.Tensor, sin: torch.Tensor,
                           meta: AttnMeta) -> tuple[torch.Tensor, RowSumSq] | None:
    """``forward_fused`` of a decode step on the split-K decode GEMMs (``kernels/norm_linear.py``), 5 kernels a
    layer where ``forward_fused`` runs 8: norm+q/k/v, attention (+ cache write), o + residual add, norm+gate/up
    +silu*up, down + residual add. The o and down GEMMs add the residual stream in their epilogue and leave
    the per-row sums of squares of the sum, from which the next GEMM's norm takes its rstd: so the layer
    returns (x', RowSumSq), x' the whole residual stream. None when it does not apply (a group not packed,
    e.g. a LoRA adapter on; hooks on the attention, the MLP or a projection; weights of another dtype): the
    caller runs the usual path."""
    from rlhf_engine.kernels.norm_linear import decode_linear
    from rlhf_engine.kernels.rmsnorm import rms_norm

    attn, mlp = layer.self_attn, layer.mlp
    n1, n2, o, down = layer.input_layernorm, layer.post_attention_layernorm, attn.o_proj, mlp.down_proj
    if any(m._forward_hooks or m._forward_pre_hooks for m in (attn, mlp)) \
            or not _one_gemm_may_stand_in((o, down)):
        return None  # mlp and the projections are not called and attn gets no x: their hooks would be skipped
    wq = packed_weights((attn.q_proj, attn.k_proj, attn.v_proj))
    wg = packed_weights((mlp.gate_proj, mlp.up_proj))
    if wq is None or wg is None or wg[1] is not None or any(
            t is not None and t.dtype != x.dtype
            for t in (n1.weight, n2.weight, *wq, wg[0], o.weight, o.bias, down.weight, down.bias)):
        return None
    # PDL on Hopper: each GEMM reads its first weights before waiting for the kernel before it (parameters); with
    # RLHF_ENGINE_DECODE_GEMM_WS=1 too, the Gluon decode GEMM where it applies (not after a usual-path layer, whose
    # residual add rides in the prologue)
    kw = dict(backend="gluon" if meta.gemm_ws else "triton", pdl=True)
    if isinstance(d, RowSumSq):  # x is the whole stream, its rows' sums of squares computed by the last GEMM
        qkv = decode_linear(x, *wq, norm_weight=n1.weight, eps=n1.eps, row_sumsq=d.sumsq, **kw).out
    elif d is None:  # the first layer: no GEMM before it left the sums; the norm kernel, not a walk over the
        # full rows in each of the GEMM's ~250 programs
        qkv = decode_linear(rms_norm(x, n1.weight, n1.eps, backend="triton"), *wq, **kw).out
    else:  # after a layer of the usual path: the residual add in the prologue
        qkv, x, _ = decode_linear(d, *wq, norm_weight=n1.weight, eps=n1.eps, residual=x, **kw)
    y = attn(None, cos, sin, meta, qkv=qkv, project=False, pdl=True)  # PDL after the q/k/v GEMM
    h = decode_linear(y, o.weight, o.bias, out_residual=x, return_sumsq=True, **kw)
    act = decode_linear(h.out, wg[0], norm_weight=n2.weight, eps=n2.eps, row_sumsq=h.sumsq, swiglu=True, **kw).out
    out = decode_linear(act, down.weight, down.bias, out_residual=h.out, return_sumsq=True, **kw)
    return out.out, RowSumSq(out.sumsq)


def decode_gemm_ws_layer(layer, x: torch.Tensor, d, cos: torch.Tensor, sin: torch.Tensor,
                         meta: AttnMeta) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``forward_fused`` of a decode step with its four projections on the Gluon decode GEMM for Hopper
    (``kernels/decode_gemm_ws.py``): norm (+ residual add), q/k/v (+ bias), attention, o, norm + residual add,
    gate/up with silu * up in its epilogue, down; 7 kernels a layer where ``forward_fused`` runs 8, and no
    cuBLAS. The same (x', d') contract. None when it does not apply (a group not packed, a LoRA adapter on,
    hooks on the attention, the MLP or a projection, weights the kernel cannot read): the usual path runs."""
    from rlhf_engine.kernels import decode_gemm_ws as dg
    from rlhf_engine.kernels.rmsnorm import rms_norm

    attn, mlp = layer.self_attn, layer.mlp
    n1, n2, o, down = layer.input_layernorm, layer.post_attention_layernorm, attn.o_proj, mlp.down_proj
    if isinstance(d, RowSumSq) or any(m._forward_hooks or m._forward_pre_hooks for m in (attn, mlp)) \
            or not _one_gemm_may_stand_in((o, down)):
        return None
    wq = packed_weights((attn.q_proj, attn.k_proj, attn.v_proj))
    wg = packed_weights((mlp.gate_proj, mlp.up_proj))
    if wq is None or wg is None or wg[1] is not None or not all(
            w.dtype == x.dtype and dg.weight_ok(w, b)
            for w, b in (wq, (o.weight, o.bias), (wg[0], None), (down.weight, down.bias))):
        return None
    B, T = x.shape[:2]

    def linear(t, w, b=None, swiglu=False):  # (B, T, K) -> (B, T, N) on the Gluon GEMM, a PDL launch on Hopper
        # (its first weight blocks read while the kernel before it finishes: parameters, which no kernel of the step
        # writes)
        return dg.decode_gemm_ws(t.reshape(B * T, t.shape[-1]), w, b, swiglu=swiglu, pdl=True).view(B, T, -1)

    if d is None:
        h = rms_norm(x, n1.weight, n1.eps, backend="triton")
    else:
        h, x = rms_norm(d, n1.weight, n1.eps, residual=x, backend="triton")
    y = attn(None, cos, sin, meta, qkv=linear(h, *wq), project=False)
    h, x = rms_norm(linear(y, o.weight, o.bias), n2.weight, n2.eps, residual=x, backend="triton")
    return x, linear(linear(h, wg[0], swiglu=True), down.weight, down.bias)
