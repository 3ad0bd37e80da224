"""Projections that read the same input, packed back to back in one tensor: q/k/v, and gate/up.

Each layer's ``q_proj``, ``k_proj``, ``v_proj`` (and ``gate_proj``, ``up_proj``) stay separate ``nn.Parameter``
objects with their HF names, so training, the optimizer, LoRA and checkpoints see nothing new. What changes is
where their data live: consecutive rows of one (sum of out_features, in_features) tensor (``pack_linears``).
The fused (triton) path can then run each group as ONE GEMM over that tensor, 5 GEMMs -> 2 per layer: without
autograd as ``F.linear`` over a view (``packed_weights``), with autograd through ``PackedLinearFunction`` (one
GEMM for the input's gradient and one for the packed weights', split into each parameter's rows: 10 GEMMs and 3
adds -> 4 GEMMs per layer in the backward). At batch 64 a decode step's GEMMs are small and launch-bound, and a
training step on a slow host is bound by its launches too, so the count matters.

Nothing is copied per call: the packed weight is a view of the parameters' own storage, and an optimizer step
(in place) shows up in the next call. Some operations give the parameters new tensors:
- ``.to()``, ``.cuda()``, ``.half()`` and deepcopy repack on their own (see ``Transformer``);
- ``load_state_dict(assign=True)`` and ``param.data = ...`` need a ``pack_projections()`` call after them.
Without it, and while a LoRA adapter on one of the layers is on, ``packed_weights`` returns None and the caller
runs the layers one by one: slower, never wrong.
"""
from __future__ import annotations

import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .batch_invariant import Linear
from .lora import LoRALinear


def _rows(ts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One tensor over ``ts`` when they are consecutive contiguous row blocks of one storage, else None.

    Checked with data pointers (each block starts where the previous one ends) and one storage lookup (the span
    lies inside the first tensor's storage, hence so do the others): ~2 us where asking every tensor for its
    storage cost ~20 (this runs in every packed GEMM's forward)."""
    t0 = ts[0]
    es, dev, ptr = t0.element_size(), t0.device, t0.data_ptr()
    for t in ts:
        if (t.dtype != t0.dtype or t.device != dev or t.shape[1:] != t0.shape[1:] or not t.is_contiguous()
                or t.data_ptr() != ptr):
            return None
        ptr += t.numel() * es
    storage = t0.untyped_storage()
    if ptr - storage.data_ptr() > storage.nbytes():
        return None
    # detach: the view is for no-grad use; as_strided may span past t0 because the storage holds the rest
    return t0.detach().as_strided((sum(t.shape[0] for t in ts), *t0.shape[1:]), t0.stride())


def global_hooks(backward: bool = False) -> bool:
    """Global module hooks (``register_module_forward_hook`` and kin; with ``backward``, the backward ones too):
    ``Module.__call__`` would run them for each layer, a path that calls kernels or GEMMs directly does not."""
    from torch.nn.modules import module as _module

    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks or (backward and (
        _module._global_backward_hooks or _module._global_backward_pre_hooks)))


def _one_gemm_may_stand_in(linears: Sequence[nn.Module], backward: bool = False) -> bool:
    """Whether one GEMM over the packed weights may replace the layers' own calls: each a plain ``nn.Linear`` (a
    LoRALinear counts while its adapter is off) with no forward hooks, module or global, which the GEMM would skip
    (with ``backward``: no backward hooks either)."""
    if global_hooks(backward):
        return False
    for m in linears:
        plain = not m.adapters_enabled if isinstance(m, LoRALinear) else type(m) in (nn.Linear, Linear)
        if not plain or m._forward_hooks or m._forward_pre_hooks \
                or (backward and (m._backward_hooks or m._backward_pre_hooks)):
            return False
    return True


# Per group (keyed by its first layer, weakly): the parameters' (data_ptr, shape, dtype, device, contiguity) when the
# packed views were last built, and those views (packed groups only; ``pack_linears`` drops the entry). Building
# them (``_rows`` twice) costs ~25 us of host time, the key ~3: this runs in every packed GEMM, 2 a layer in each
# forward. The key changes whenever a parameter gets another tensor (``param.data = ...``, ``.to()``, loading), and a
# cached view keeps its storage alive, so no new tensor can appear at its address meanwhile; in-place updates (an
# optimizer step) keep the key and the view sees them.
_PACKED_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _packed_base(linears: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(W, b): views over the layers' weights and biases (b None when no layer has one); None unless they are
    packed rows of one tensor each and the biases are all there or all absent. Cached per group (above)."""
    key = tuple(None if t is None else (t.data_ptr(), t.shape, t.dtype, t.device, t.is_contiguous())
                for m in linears for t in (m.weight, m.bias))
    hit = _PACKED_CACHE.get(linears[0])
    if hit is not None and hit[0] == key:
        return hit[1]
    base = _build_packed_base(linears)
    if base is None:  # not packed: nothing cached (a cached view would pin memory; a cached None could outlive it)
        _PACKED_CACHE.pop(linears[0], None)
    else:
        _PACKED_CACHE[linears[0]] = (key, base)
    return base


def _build_packed_base(linears: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    w = _rows([m.weight for m in linears])
    bs = [m.bias for m in linears]
    if w is None:
        return None
    if all(b is None for b in bs):
        return w, None
    b = None if any(b is None for b in bs) else _rows(bs)
    return None if b is None else (w, b)


def packed_weights(linears: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(W, b) with W (sum of out_features, in_features) over the layers' weights and b their biases (None when
    no layer has one), both views of the parameters' storage, such that ``F.linear(x, W, b)`` is the layers'
    outputs concatenated on the last dim. None when the parameters are not packed; when a layer is not a plain
    ``nn.Linear`` (a LoRALinear counts while its adapter is off), or has forward hooks, which one GEMM would
    skip; or when autograd would need a gradient for a weight or bias (a view of the storage would not carry
    it to the separate parameters)."""
    if not _one_gemm_may_stand_in(linears):
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for m in linears for t in (m.weight, m.bias)):
        return None
    return _packed_base(linears)


def packed_lora(linears: Sequence[nn.Module]):
    """For a group of ``LoRALinear`` layers with their adapters on, in generation (no autograd):
    (W, b, A, Bs, scaling) such that ``lora_group_linear(x, ...)`` is the layers' outputs concatenated, with W, b
    the packed base weights (views, as in ``packed_weights``), A (sum of ranks, in_features) the adapters' A
    matrices stacked (one small new tensor a call: tens of KB a layer at rank 8), Bs their B matrices and the
    common scaling. None when not every layer is such a LoRALinear (adapters in the base dtype, dropout
    inactive, one scaling), a layer has hooks, autograd needs a gradient, or the base weights are not packed."""
    if not all(isinstance(m, LoRALinear) and m.adapters_enabled for m in linears) or global_hooks():
        return None
    m0 = linears[0]
    dt = m0.weight.dtype
    for m in linears:
        if (m._forward_hooks or m._forward_pre_hooks or m.scaling != m0.scaling
                or m.lora_A.dtype != dt or m.lora_B.dtype != dt
                or (m.dropout.training and not isinstance(m.dropout, nn.Identity))):  # the dropout's own mode
            return None
    params = [t for m in linears for t in (m.weight, m.bias, m.lora_A, m.lora_B) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in params):
        return None
    if torch.is_autocast_enabled(m0.weight.device.type):
        return None
    base = _packed_base(linears)
    if base is None:
        return None
    return (*base, torch.cat([m.lora_A for m in linears]), [m.lora_B for m in linears], m0.scaling)


def lora_group_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, a: torch.Tensor,
                      bs: Sequence[torch.Tensor], scaling: float) -> torch.Tensor:
    """x (..., in) -> (..., sum of out_features): one GEMM over the packed base weights, one over the stacked A
    matrices, and each B's low-rank term accumulated into its columns (addmm, as ``LoRALinear`` does): 2 + n
    kernels for n layers instead of 3 n."""
    y = F.linear(x, w, b)
    y2 = y.view(-1, y.shape[-1])
    low = F.linear(x, a).reshape(-1, a.shape[0])
    col = r0 = 0
    for bm in bs:
        n, r = bm.shape
        y2[:, col:col + n].addmm_(low[:, r0:r0 + r], bm.t(), alpha=scaling)
        col, r0 = col + n, r0 + r
    return y


class PackedLinearFunction(torch.autograd.Function):
    """``F.linear`` over the packed rows of n layers' weights (and biases), differentiable in x and in each layer's
    own parameters: inputs (x, n, packed weight or None, packed bias or None, w_1 .. w_n, b_1 .. b_n or none).

    Forward one GEMM (plus the bias); backward one GEMM for dx (where the layers one by one take n GEMMs and n - 1
    adds), one for the packed dW, split into each weight's rows, and one column sum for the biases. Each weight's
    gradient is a row block of one tensor: the parameters' ``.grad`` share a storage, in disjoint blocks (in-place
    ops on them are fine; ``resize_``/``set_`` on one would not be). Saves x and the weights (the packed view is
    rebuilt in the backward, so an in-place update of any weight in between is caught by autograd's version check;
    weights that are not row blocks of one storage, e.g. copies saved under ``save_on_cpu``, are concatenated).
    The backward is differentiable (``create_graph=True``: double backward works, through ``torch.cat`` of the
    weights)."""

    @staticmethod
    def forward(ctx, x, n, w, b, *params):
        """x; n layers; w, b: the packed weight and bias (views without grad, or None to build them here); params:
        the layers' weights, then their biases (if any), whose gradients the backward returns."""
        ws, bs = params[:n], params[n:]
        w = _rows_or_cat(ws) if w is None else w
        b = (_rows_or_cat(bs) if bs else None) if b is None else b
        ctx.n, ctx.has_bias = n, bool(bs)
        ctx.save_for_backward(x, w, *ws)  # ws: for autograd's version check of every parameter
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w, *ws = ctx.saved_tensors
        n = ctx.n
        need = ctx.needs_input_grad[4:]  # of the parameters; [0]: x
        need_w, need_b = any(need[:n]), ctx.has_bias and any(need[n:])
        if torch.is_grad_enabled():  # the backward is differentiated: w built from the weights themselves
            w = torch.cat(ws)
        dx = dy.matmul(w) if ctx.needs_input_grad[0] else None
        dy2 = dy.reshape(-1, dy.shape[-1])
        sizes = [t.shape[0] for t in ws]
        dws = (dy2.t().mm(x.reshape(-1, x.shape[-1])).split(sizes) if need_w else (None,) * n)
        dbs = (dy2.sum(0).split(sizes) if need_b else (None,) * n) if ctx.has_bias else ()
        return (dx, None, None, None, *(g if need[i] else None for i, g in enumerate(dws)),
                *(g if need[n + i] else None for i, g in enumerate(dbs)))


def _rows_or_cat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The packed view over ``ts`` (no copy), or, when they are not row blocks of one storage (saved-tensor hooks
    returned copies, a direct call on separate tensors), one new tensor made of them."""
    rows = _rows(ts)
    return torch.cat(ts) if rows is None else rows


def _trainable_group(x: torch.Tensor, linears: Sequence[nn.Module]) -> tuple | None:
    """The (weights, biases) to hand ``PackedLinearFunction`` when autograd needs the layers' gradients: plain
    ``nn.Linear`` layers (a LoRALinear counts while its adapter is off) without module or global hooks (forward or
    backward: one GEMM would skip them), packed rows of one tensor (biases: all or none), x in their dtype, no
    autocast; else None (the caller runs the layers one by one)."""
    if torch.is_autocast_enabled(x.device.type) or not _one_gemm_may_stand_in(linears, backward=True):
        return None
    base = _packed_base(linears)
    if base is None or x.dtype != linears[0].weight.dtype:
        return None
    ws = tuple(m.weight for m in linears)
    bs = tuple(m.bias for m in linears) if linears[0].bias is not None else ()
    return base, ws, bs


def group_linear(x: torch.Tensor, linears: Sequence[nn.Module], lora: bool = True) -> torch.Tensor | None:
    """The layers' outputs on x concatenated on the last dim, as one GEMM over their packed weights (plus, with
    ``lora``, the LoRA terms when adapters are on: ``packed_lora``, for generation only: a scoring forward must
    run the adapters as the training forward does, one layer at a time, to give its log-probs bit for bit); with
    autograd on and a gradient needed for a weight or a bias, through ``PackedLinearFunction`` (one GEMM forward,
    three kernels backward). None when none of these applies: the caller runs the layers one by one, as it does
    under torch.compile (the packing checks compare data pointers, which do not trace)."""
    if torch.compiler.is_compiling():
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for m in linears for t in (m.weight, m.bias)):
        group = _trainable_group(x, linears)
        if group is None:
            return None
        (w, b), ws, bs = group
        return PackedLinearFunction.apply(x, len(linears), w, b, *ws, *bs)
    pw = packed_weights(linears)
    if pw is not None:
        return F.linear(x, *pw)
    lo = packed_lora(linears) if lora else None
    return None if lo is None else lora_group_linear(x, *lo)


def _packable(ts: Sequence[torch.Tensor]) -> bool:
    """Whether ``ts`` can be rows of one tensor: one dtype and device (not meta), the same trailing shape."""
    t0 = ts[0]
    return t0.device.type != "meta" and all(
        t.dtype == t0.dtype and t.device == t0.device and t.shape[1:] == t0.shape[1:] for t in ts)


def _concat_rows(ts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Views of one new tensor (sum of the row counts, ...), one per input, holding the inputs' values."""
    return torch.cat([t.detach() for t in ts]).split([t.shape[0] for t in ts])


@torch.no_grad()
def pack_linears(linears: Sequence[nn.Module]) -> bool:
    """Move the weights (and the biases, when every layer has one) of ``linears`` into one new tensor each and
    point the parameters at their rows (``param.data = rows``: the Parameter objects and their values stay).

    A no-op when they already are packed. Returns whether they are packed afterwards; False, with nothing
    changed, when the layers differ in dtype, device or in_features, only some of them have a bias, or the
    weights are on the meta device (a model built there gets its tensors assigned later).
    """
    ws = [m.weight for m in linears]
    bs = [m.bias for m in linears]
    with_bias = all(b is not None for b in bs)
    if (not with_bias and any(b is not None for b in bs)) or not _packable(ws) or (with_bias and not _packable(bs)):
        return False
    _PACKED_CACHE.pop(linears[0], None)  # views of the old tensors go with them
    for group in (ws, bs) if with_bias else (ws,):
        if _rows(group) is None:
            for t, rows in zip(group, _concat_rows(group)):
                t.data = rows
    return True


# The groups of one decoder layer that read the same input, by module path (model.layers.{i}.<path>).
PROJECTION_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


@torch.no_grad()
def pack_state_dict(state_dict: dict[str, torch.Tensor], num_layers: int) -> None:
    """In place, on an HF-keyed state dict: each layer's q/k/v weights (and biases) and gate/up weights become
    views of one new tensor per group, the separate tensors dropped one group at a time. A model then loaded
    with ``load_state_dict(assign=True)`` is packed and holds one copy of its weights (packing after the
    assign would keep both copies until the dict goes). Groups with missing keys or mixed dtypes, devices or
    widths are left as they are."""
    for i in range(num_layers):
        for names in PROJECTION_GROUPS:
            for suffix in ("weight", "bias"):
                keys = [f"model.layers.{i}.{n}.{suffix}" for n in names]
                if not all(k in state_dict for k in keys):
                    continue
                ts = [state_dict.pop(k) for k in keys]
                views = _concat_rows(ts) if _packable(ts) and _rows(ts) is None else ts
                del ts  # the separate tensors go now, unless the caller holds them
                state_dict.update(zip(keys, views))
