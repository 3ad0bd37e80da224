"""A recomputed decoder layer as ONE autograd node: the training path's host time cut where it is spent.

The H200 run of ``147c714`` put the PPO step's training phase at 0.777 s of wall time against 0.399 s of kernels:
half of it the host (Python, PyTorch's dispatch and the autograd engine) keeping the GPU waiting. With activation
checkpointing (``checkpointing.checkpoint_layer``) a decoder layer's backward re-runs its forward *with autograd*,
recording ~8 nodes (two norms, two packed GEMMs, RoPE + attention, SwiGLU, two GEMMs, each an
``autograd.Function`` with its context and saved tensors), then lets the engine walk them back. Here the layer is
one ``autograd.Function``: its forward is ``DecoderLayer.forward_fused`` without autograd (the values scoring
computes, bit for bit), and its backward re-runs the same kernels keeping the intermediates in local variables
and calls the backward kernels directly, in the order the engine would: no graph is recorded, no engine
dispatch per node. Each gradient is the same operation on the same operands as on the recorded path, so on the
CPU the gradients equal its bit for bit (``tests/test_fused_layer_node.py``). The launches are its launches but
one: the recomputation stops before the down projection, whose output the backward does not read (35 kernels a
checkpointed bf16 layer instead of 36, one GEMM of 16 fewer).

Two differences from the recorded path. The node saves the layer's parameters for autograd's version check, so a
parameter changed in place between the forward and the backward raises (the recorded path would recompute with
the new values and return gradients of a forward that never ran). And it returns the layer's parameter gradients
together when it ends, where the engine hands each on as soon as it is computed: the backward's peak can hold one
layer's parameter gradients more (~26 MB at Qwen2-0.5B, bf16), while skipping the down projection's output saves
a (tokens, hidden) tensor.

It covers the common training configuration: the triton backend, a whole-sequence ("full") forward, the model's
own layer classes, q/k/v and gate/up packed (``model/packing.py``), plain linear layers (no ``LoRALinear``, even
with its adapters off), no bias in the MLP, no module hooks, one dtype. Anything else (``applies`` is False)
keeps ``checkpoint_layer``: slower on the host, never wrong.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .batch_invariant import Linear
from .packing import _one_gemm_may_stand_in, _packed_base

_QKV = ("q_proj", "k_proj", "v_proj")


def enabled() -> bool:
    """``RLHF_ENGINE_FUSED_LAYER_NODE=0`` turns the one-node layer off (``checkpoint_layer`` everywhere)."""
    return os.environ.get("RLHF_ENGINE_FUSED_LAYER_NODE", "1") != "0"


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def applies(layer: nn.Module, x: torch.Tensor, meta) -> bool:
    """Whether ``fused_layer_forward`` may stand in for ``checkpoint_layer(layer.forward_fused, ...)``: a training
    forward over whole sequences on the triton backend; the model's own layer classes and plain linear layers (no
    LoRA), q/k/v and gate/up packed, no bias in the MLP; no hooks, module or global (the node would skip them);
    every parameter in x's dtype and on its device; no autocast; not under torch.compile."""
    if (meta.mode != "full" or meta.backend != "triton" or not meta.fused_ops or meta.fuse_norm_gemm
            or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type)):
        return False
    from .llama import MLP, Attention, DecoderLayer, RMSNorm  # here: llama imports this module

    attn, mlp = layer.self_attn, layer.mlp
    qkv = [getattr(attn, n) for n in _QKV]
    gu = [mlp.gate_proj, mlp.up_proj]
    linears = (*qkv, attn.o_proj, *gu, mlp.down_proj)
    # the exact classes: a subclass may change a forward that the node's backward would not follow
    if (type(layer) is not DecoderLayer or type(attn) is not Attention or type(mlp) is not MLP
            or type(layer.input_layernorm) is not RMSNorm or type(layer.post_attention_layernorm) is not RMSNorm
            or any(type(m) not in (nn.Linear, Linear) for m in linears)
            or not _one_gemm_may_stand_in(linears, backward=True)  # their hooks, and global module hooks
            or any(_hooked(m) for m in (layer, attn, mlp, layer.input_layernorm, layer.post_attention_layernorm))
            or any(m.bias is not None for m in (*gu, mlp.down_proj))
            or _packed_base(qkv) is None or _packed_base(gu) is None):
        return False
    return all(p.dtype == x.dtype and p.device == x.device for p in layer.parameters())


def _params(layer: nn.Module) -> tuple[list[torch.Tensor], dict]:
    """The layer's parameters in the order ``FusedLayerFunction`` takes them, and which optional biases are among
    them."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = [getattr(attn, n) for n in _QKV]
    ps = [layer.input_layernorm.weight, *(m.weight for m in qkv)]
    has_qkv_bias = qkv[0].bias is not None
    if has_qkv_bias:
        ps += [m.bias for m in qkv]
    ps.append(attn.o_proj.weight)
    has_o_bias = attn.o_proj.bias is not None
    if has_o_bias:
        ps.append(attn.o_proj.bias)
    ps += [layer.post_attention_layernorm.weight, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    return ps, {"qkv_bias": has_qkv_bias, "o_bias": has_o_bias}


def fused_layer_forward(layer: nn.Module, x: torch.Tensor, d: torch.Tensor | None, cos: torch.Tensor,
                        sin: torch.Tensor, meta) -> tuple[torch.Tensor, torch.Tensor]:
    """``checkpoint_layer(layer.forward_fused, x, d, cos, sin, meta)`` as one autograd node (module docstring);
    call it where ``applies(layer, x, meta)``. Returns (x', d') as ``forward_fused``."""
    params, flags = _params(layer)
    if not (x.requires_grad or (d is not None and d.requires_grad) or any(p.requires_grad for p in params)):
        return layer.forward_fused(x, d, cos, sin, meta)
    return FusedLayerFunction.apply(layer, meta, flags, x, d, cos, sin, *params)


class FusedLayerFunction(torch.autograd.Function):
    """(layer, meta, flags, x, d, cos, sin, *params) -> (x', d'); see the module docstring."""

    @staticmethod
    def forward(ctx, layer, meta, flags, x, d, cos, sin, *params):
        ctx.layer, ctx.meta, ctx.flags = layer, meta, flags
        ctx.save_for_backward(x, d, cos, sin, *params)  # params: for autograd's version check (an in-place update)
        ctx.set_materialize_grads(False)
        return layer.forward_fused(x, d, cos, sin, meta)  # under no_grad: the scoring forward's values

    @staticmethod
    def backward(ctx, gx_out, gd_out):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("checkpointed layers: activation checkpointing works with loss.backward(), not with "
                               "torch.autograd.grad or backward(inputs=...); turn gradient_checkpointing off for those")
        if torch.is_grad_enabled():
            raise RuntimeError("checkpointed layers: backward(create_graph=True) (double backward) is not supported; "
                               "turn gradient_checkpointing off for it")
        x, d, cos, sin, *params = ctx.saved_tensors
        grads = _layer_backward(ctx.layer, ctx.meta, ctx.flags, x, d, cos, sin, params, gx_out, gd_out,
                                ctx.needs_input_grad)
        return (None, None, None, *grads)


def _layer_backward(layer, meta, flags, x, d, cos, sin, params, gx_out, gd_out, needs):
    """Recompute the layer's forward keeping its intermediates, then its backward, launch for launch as the
    recorded path (``forward_fused`` under autograd, then the engine). Returns the gradients of
    (x, d, cos, sin, *params)."""
    from rlhf_engine.kernels.attention import _kv_ranges
    from rlhf_engine.kernels.attention_bwd import attention_backward
    from rlhf_engine.kernels.attention_fwd import attention_forward
    from rlhf_engine.kernels.kv_cache import _kernel_rope_args, rope_forward
    from rlhf_engine.kernels.rmsnorm import _unit_rows, rms_norm_backward, rms_norm_forward
    from rlhf_engine.kernels.swiglu import silu_mul_backward, silu_mul_forward

    attn, mlp = layer.self_attn, layer.mlp
    n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
    B, T, H = x.shape
    nq, nkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    Dq, Dkv = nq * D, nkv * D
    # params: w1, the q/k/v weights, [their biases], wo, [bo], w2, the gate/up weights, wd (``_params``); the q/k/v
    # and gate/up GEMMs read the packed views of the same storage (model/packing.py)
    nb = 3 if flags["qkv_bias"] else 0
    i_o = 4 + nb
    i_2 = i_o + (2 if flags["o_bias"] else 1)
    w1, wo, w2, wd = params[0], params[i_o], params[i_2], params[i_2 + 3]
    need = needs[7:]  # of the params (needs: of layer, meta, flags, x, d, cos, sin, *params)
    need_w1, need_wq, need_bq = need[0], need[1:4], (need[4:4 + nb] if nb else (False,) * 3)
    need_wo, need_bo = need[i_o], flags["o_bias"] and need[i_o + 1]
    need_w2, need_wg, need_wu, need_wd = need[i_2:i_2 + 4]
    W_qkv, b_qkv = _packed_base([getattr(attn, n) for n in _QKV])
    W_gu, _ = _packed_base([mlp.gate_proj, mlp.up_proj])

    # ---- recompute (the kernels of forward_fused; kept: every tensor a backward kernel reads)
    x2 = _unit_rows(x.reshape(-1, H))  # as rms_norm hands its kernel the rows, and the weight contiguous
    w1, w2 = w1.contiguous(), w2.contiguous()
    if d is None:
        h1, _ = rms_norm_forward(x2, w1, n1.eps, None)
        s1 = x2
    else:
        h1, s1 = rms_norm_forward(_unit_rows(d.reshape(-1, H)), w1, n1.eps, x2)
    qkv = F.linear(h1.view(B, T, H), W_qkv, b_qkv).view(B, T, nq + 2 * nkv, D)
    kv_start, kv_end = _kv_ranges(meta.kv_start, meta.kv_end, B, T, x.device)
    qk = qkv[:, :, :nq + nkv]
    _, cos_k, sin_k = _kernel_rope_args(qk, cos, sin)
    rot = rope_forward(qk, cos_k, sin_k)
    q, k, v = rot[:, :, :nq], rot[:, :, nq:], qkv[:, :, nq + nkv:]
    scale = 1.0 / math.sqrt(D)
    o, lse = attention_forward(q, k, v, causal=True, kv_start=kv_start, kv_end=kv_end, softmax_scale=scale)
    o2 = o.reshape(B, T, Dq)
    a = attn.o_proj.forward(o2)  # its own GEMM (batch-invariant on the CPU where it is a Linear that is); no hooks
    h2, s2 = rms_norm_forward(a.reshape(-1, H), w2, n2.eps, s1)
    del a  # each intermediate goes after its last use, as the recorded path frees it
    gu = F.linear(h2.view(B, T, H), W_gu)  # (B, T, 2 I)
    I2 = gu.shape[-1]
    gate, up = gu.chunk(2, dim=-1)

    # ---- backward, in the engine's order: MLP, norm 2, o_proj, attention, q/k/v, norm 1
    g_wd = g_wg = g_wu = g_w2 = None
    gx2 = None if gx_out is None else gx_out.reshape(-1, H)
    if gd_out is not None:
        act = silu_mul_forward(gate, up)
        gd2 = gd_out.reshape(-1, H)
        d_act = gd2.mm(wd)  # the down projection's input gradient
        if need_wd:
            g_wd = gd2.t().mm(act.reshape(-1, act.shape[-1]))
        dgu = torch.empty(gu.shape, dtype=gu.dtype, device=gu.device)
        silu_mul_backward(d_act.view(act.shape), gate, up, packed_out=dgu)
        del act, d_act, gu, gate, up
        dh2 = dgu.matmul(W_gu)  # (B, T, H)
        if need_wg or need_wu:
            g_wg, g_wu = dgu.reshape(-1, I2).t().mm(h2).split([I2 // 2, I2 // 2])
        del dgu, h2
        ds2, g_w2 = rms_norm_backward(dh2.reshape(-1, H), gx2, s2, w2, n2.eps, need_w2)
        del dh2
    elif gx2 is not None:  # only x' used: its gradient passes the residual add; the norm's weight gets zeros
        ds2, g_w2 = gx2, (torch.zeros_like(w2) if need_w2 else None)
    else:
        return (None,) * (4 + len(params))
    # o_proj: a = o2 Woᵀ (+ bo); da = ds2
    del s2
    g_wo = ds2.t().mm(o2.reshape(-1, Dq)) if need_wo else None
    g_bo = ds2.sum(0) if need_bo else None
    del o2
    needs_x, needs_d = needs[3], needs[4]
    if not (needs_x or needs_d or need_w1 or any(need_wq) or any(need_bq)):  # nothing upstream: no attention backward
        return (None, None, None, None, *_param_grads(flags, need, g_w1=None, g_wq=(None,) * 3, g_bq=(None,) * 3,
                                                       g_wo=g_wo, g_bo=g_bo, g_w2=g_w2, g_wg=g_wg, g_wu=g_wu,
                                                       g_wd=g_wd))
    d_o = ds2.mm(wo)  # (B * T, Dq): the o projection's input gradient
    dqkv = torch.empty((B, T, nq + 2 * nkv, D), dtype=qkv.dtype, device=qkv.device)
    dq, dk, _ = attention_backward(d_o.view(B, T, nq, D), q, k, v, o, lse, causal=True, kv_start=kv_start,
                                   kv_end=kv_end, softmax_scale=scale, dv_out=dqkv[:, :, nq + nkv:])
    rope_forward(dq, cos_k, sin_k, sin_sign=-1.0, x2=dk, out=dqkv[:, :, :nq + nkv])
    del d_o, dq, dk, q, k, v, o, lse, rot, qkv
    dqkv3 = dqkv.view(B, T, Dq + 2 * Dkv)
    dh1 = dqkv3.matmul(W_qkv)  # (B, T, H)
    sizes = [Dq, Dkv, Dkv]
    dqkv2 = dqkv3.reshape(-1, Dq + 2 * Dkv)
    g_wq = dqkv2.t().mm(h1).split(sizes) if any(need_wq) else (None,) * 3
    g_bq = dqkv2.sum(0).split(sizes) if any(need_bq) else (None,) * 3
    if d is None:  # x fed norm 1 and (as s1) the residual of norm 2
        dn, g_w1 = rms_norm_backward(dh1.reshape(-1, H), None, x2, w1, n1.eps, need_w1)
        g_x, g_d = (dn + ds2).view(B, T, H), None
    else:
        ds1, g_w1 = rms_norm_backward(dh1.reshape(-1, H), ds2, s1, w1, n1.eps, need_w1)
        g_d = ds1.view(B, T, H)
        # x and d get the same gradient: one tensor, unless both need it and one is a leaf, whose .grad could adopt
        # it (and later be added to in place)
        g_x = g_d.clone() if (needs_x and needs_d and (x.is_leaf or d.is_leaf)) else g_d
    return (g_x if needs_x else None, g_d if needs_d else None, None, None,
            *_param_grads(flags, need, g_w1=g_w1, g_wq=g_wq, g_bq=g_bq, g_wo=g_wo, g_bo=g_bo, g_w2=g_w2, g_wg=g_wg,
                          g_wu=g_wu, g_wd=g_wd))


def _param_grads(flags, need, *, g_w1, g_wq, g_bq, g_wo, g_bo, g_w2, g_wg, g_wu, g_wd) -> list:
    """The parameters' gradients in ``_params`` order, None where ``need`` (their needs_input_grad) is False."""
    grads = [g_w1, *g_wq]
    if flags["qkv_bias"]:
        grads += list(g_bq)
    grads.append(g_wo)
    if flags["o_bias"]:
        grads.append(g_bo)
    grads += [g_w2, g_wg, g_wu, g_wd]
    return [g if n else None for g, n in zip(grads, need)]
