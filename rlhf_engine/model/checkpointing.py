"""Activation checkpointing of a decoder layer, with little host time.

``torch.utils.checkpoint`` (non-reentrant, the recommended mode) runs the layer's forward with autograd on and
drops each saved tensor through a pair of Python hooks, then re-runs the forward in the backward and matches every
re-saved tensor to its slot. For a layer of ~30 small ops that bookkeeping is most of the host time: on this
project's 2-core CPU a 24-layer training forward + backward took 90-105 ms with it against ~40 ms without
checkpointing (kernel launches stubbed, so host time alone; ``benchmarks/host_train.py``), where one more forward
without autograd costs ~12 ms. A step on a GPU whose host is slower than its kernels pays that in full.

``checkpoint_layer`` does what the reentrant mode does, without its per-call RNG bookkeeping: the forward runs
under ``no_grad`` (nothing saved but the inputs), and the backward re-runs it with autograd on over detached
inputs, back-propagates through that fresh graph (parameter gradients accumulate there, as in a normal backward)
and returns the inputs' gradients. It is exact because a layer's forward computes the same values with and
without autograd (the fused path is built that way: scoring = training, bit for bit on the CPU, tested; on a GPU a
library may pick another kernel for a call that needs gradients, e.g. SDPA's backend on the torch backend, which
can change the last bits), and has no randomness. Where that cannot be assumed it defers to
``torch.utils.checkpoint`` (non-reentrant): active dropout (a LoRA adapter's), autocast, or tracing by
torch.compile.

Like any reentrant checkpoint it supports ``loss.backward()`` but not ``torch.autograd.grad``,
``backward(inputs=...)`` or ``backward(create_graph=True)`` through the checkpointed layers: those raise a
``RuntimeError`` that says so. A layer none of whose inputs or parameters needs a gradient is simply run.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint


def needs_torch_checkpoint(module: nn.Module) -> bool:
    """Whether ``module``'s forward may draw random numbers or run under autocast, so that a re-run needs
    ``torch.utils.checkpoint``'s RNG and autocast bookkeeping: a training-mode dropout with p > 0 anywhere inside,
    or autocast on. (Checked once per trunk forward, over every module: a plain walk of the children dicts, ~3x
    cheaper than ``Module.modules()``, ~0.3 ms for a 24-layer trunk here.) Dropout called as a function inside a
    forward is not seen: such a layer must pass ``torch_fallback=True`` itself."""
    if torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"):
        return True
    if not module.training:
        return False
    stack = [module]
    while stack:
        m = stack.pop()
        if isinstance(m, _DROPOUT) and m.training and m.p > 0:
            return True
        stack.extend(c for c in m._modules.values() if c is not None)
    return False


_DROPOUT = (nn.modules.dropout._DropoutNd,)  # Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout


class _Recompute(torch.autograd.Function):
    """(fn, *args) -> fn(*args), run without autograd; the backward re-runs fn with autograd and back-propagates.
    Tensor arguments are saved as they are (no copy); the others are kept on ctx. fn returns a tensor or a tuple
    of tensors (a decoder layer: x, or (x, d))."""

    @staticmethod
    def forward(ctx, fn, *args):
        ctx.fn = fn
        ctx.is_tensor = [isinstance(a, torch.Tensor) for a in args]
        ctx.others = [None if t else a for a, t in zip(args, ctx.is_tensor)]
        ctx.save_for_backward(*(a for a, t in zip(args, ctx.is_tensor) if t))
        ctx.set_materialize_grads(False)  # an output the loss does not use brings None, not a zero tensor
        return fn(*args)  # Function.forward runs under no_grad: nothing is saved for a backward

    @staticmethod
    def backward(ctx, *grads):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("checkpoint_layer: activation checkpointing here works with loss.backward(), not "
                               "with torch.autograd.grad or backward(inputs=...); turn gradient_checkpointing off "
                               "for those")
        if torch.is_grad_enabled():  # the engine enables grad mode exactly for backward(create_graph=True)
            raise RuntimeError("checkpoint_layer: backward(create_graph=True) (double backward) is not supported "
                               "through checkpointed layers; turn gradient_checkpointing off for it")
        saved = iter(ctx.saved_tensors)
        args, leaves = [], []  # leaves: per argument, the detached input whose gradient is returned, or None
        for is_t, other in zip(ctx.is_tensor, ctx.others):
            t = next(saved) if is_t else other
            if is_t and t.requires_grad:
                from_graph = not t.is_leaf
                t = t.detach().requires_grad_()
                # its .grad is read below and handed on: the residual add + RMSNorm may give it the same tensor as
                # the other input's (kernels/rmsnorm.py, no copy), which is safe when it flows into the graph
                # (autograd reads it) but not when a leaf of the caller's would adopt it as its own .grad
                t._grad_read_once = from_graph
                leaves.append(t)
            else:
                leaves.append(None)
            args.append(t)
        with torch.enable_grad():
            out = ctx.fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, *(leaf.grad if leaf is not None else None for leaf in leaves))


def checkpoint_layer(fn, *args, torch_fallback: bool = False):
    """``fn(*args)`` with its activations recomputed in the backward instead of kept (see the module docstring).

    Args:
        fn: the layer's forward (a bound method or a module); deterministic, no dropout (else ``torch_fallback``).
        args: its arguments; tensors among them are saved for the backward (no copy), the rest kept as they are.
        torch_fallback: run ``torch.utils.checkpoint`` (non-reentrant) instead: pass ``needs_torch_checkpoint(m)``.
    Returns:
        what ``fn`` returns: a tensor or a tuple of tensors.
    """
    if torch_fallback or torch.compiler.is_compiling():
        return torch_checkpoint(fn, *args, use_reentrant=False)
    if not torch.is_grad_enabled():
        return fn(*args)
    if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        owner = getattr(fn, "__self__", fn)
        if isinstance(owner, nn.Module) and not any(p.requires_grad for p in owner.parameters()):
            return fn(*args)  # nothing to differentiate: no graph, nothing kept
        # No input needs a gradient (frozen embeddings, LoRA), but the layer's parameters may (or, fn not a module's,
        # might): an input that requires grad makes autograd record the Function, so that its backward runs.
        args = (*args, _GRAD_ANCHOR.get())
        fn = _DropLast(fn)
    return _Recompute.apply(fn, *args)


class _DropLast:
    """fn(*args) with the last argument (the grad anchor) dropped."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args[:-1])


class _Anchor:
    """One empty leaf tensor that requires grad, made on first use (its gradient is always None)."""

    def __init__(self):
        self._t = None

    def get(self) -> torch.Tensor:
        if self._t is None:
            self._t = torch.empty(0, device="cpu", requires_grad=True)
        return self._t


_GRAD_ANCHOR = _Anchor()
