"""SwiGLU's activation, silu(gate) * up, in one Triton kernel, with its backward.

For gate, up of one shape and dtype ``dt``, with the rounding of the eager pair of ops:
    a   = (g / (1 + exp(-g))).to(dt)      silu in fp32, rounded as F.silu's output
    out = (a * up).to(dt)                 the product in fp32, rounded as the eager multiply
One read of each input and one write, instead of two kernels and an (N, I) intermediate: the MLP of a decode
step is gate GEMM, up GEMM, this, down GEMM. The GPU's exp and divide are approximate to an fp32 ulp or so,
so a value next to a rounding boundary of ``dt`` can land one ``dt`` ulp from eager (two after the product).

Backward, in fp32 with one rounding per output (σ = sigmoid(g), recomputed from g):
    dgate = dout · up · σ · (1 + g · (1 − σ))
    dup   = dout · g · σ
It saves gate and up only; the eager pair saves gate, silu(gate) and up (the (N, I) activations of a training
forward's MLP are its largest: 2 of them a layer instead of 3), and reads dout once for both gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._fastlaunch import launch
from ._launch import cdiv

_BACKENDS = ("auto", "triton", "torch")
_BLOCK = 1024


@triton.jit
def silu_mul_rounded(g, u, OUT_T: tl.constexpr):
    """silu(g) * u from fp32 g, u with the eager pair's roundings to OUT_T (also the epilogue of
    ``norm_linear``'s gate/up GEMM)."""
    a = (g / (1.0 + tl.exp(-g))).to(OUT_T)
    return (a.to(tl.float32) * u).to(OUT_T)


@triton.jit
def _silu_mul_kernel(G, U, O, n_cols, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
    # one (row, column block) per program; rows may be strided (gate and up as halves of one packed GEMM output)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(O + row * stride_o + cols, silu_mul_rounded(g, u, O.dtype.element_ty), mask=m)


@triton.jit
def _silu_mul_bwd_kernel(DO, G, U, DG, DU, n_cols, stride_do, stride_g, stride_u, stride_dg, stride_du,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n_cols
    do = tl.load(DO + row * stride_do + cols, mask=m, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=m, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    tl.store(DG + row * stride_dg + cols, (do * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=m)
    tl.store(DU + row * stride_du + cols, (do * g * sig).to(DU.dtype.element_ty), mask=m)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., I) -> (rows, I) with unit column stride: a view when the layout allows it (e.g. a column slice of a
    wider tensor), else a copy."""
    t = t.reshape(-1, t.shape[-1] if t.dim() else 1) if t.dim() != 2 else t
    return t if t.stride(-1) == 1 else t.contiguous()


def silu_mul_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch ``_silu_mul_kernel`` on gate, up of one shape and dtype (any row strides; copied if the columns
    are not unit-stride). Returns a new contiguous tensor of gate's shape."""
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        g, u = _as_rows(gate), _as_rows(up)
        n_rows, n_cols = g.shape
        launch(_silu_mul_kernel, (n_rows, cdiv(n_cols, _BLOCK)), g, u, out, n_cols, g.stride(0), u.stride(0),
               n_cols, BLOCK=_BLOCK, num_warps=4)
    return out


def silu_mul_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                      packed_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch ``_silu_mul_bwd_kernel``: (dgate, dup), new contiguous tensors of gate's shape and dtype; with
    ``packed_out`` (a contiguous (..., 2 I) tensor) the two halves of it instead, written in place."""
    n = gate.shape[-1] if gate.dim() else 1
    if packed_out is None:
        dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        du = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    else:
        dg, du = packed_out.chunk(2, dim=-1)
    if dg.numel():
        if packed_out is None:
            dg2, du2 = dg.view(-1, n), du.view(-1, n)
        else:
            dg2, du2 = packed_out.view(-1, 2 * n).chunk(2, dim=-1)  # (rows, I) views with row stride 2 I
        do, g, u = _as_rows(dout), _as_rows(gate), _as_rows(up)
        launch(_silu_mul_bwd_kernel, (g.shape[0], cdiv(n, _BLOCK)),
            do, g, u, dg2, du2, n, do.stride(0), g.stride(0), u.stride(0), dg2.stride(0), du2.stride(0),
            BLOCK=_BLOCK, num_warps=4)
    return dg, du


class SiluMulFunction(torch.autograd.Function):
    """Eager autograd for ``silu_mul``."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return silu_mul_forward(gate, up)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        return silu_mul_backward(dout, gate, up)


class SiluMulPackedFunction(torch.autograd.Function):
    """Eager autograd for ``silu_mul_packed``: the gradient of the packed (..., 2 I) input comes out of the kernel
    as one tensor, where the two halves' gradients would be joined by a copy (autograd's backward of the split)."""

    @staticmethod
    def forward(ctx, gu):
        ctx.save_for_backward(gu)
        return silu_mul_forward(*gu.chunk(2, dim=-1))

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        (gu,) = ctx.saved_tensors
        dgu = torch.empty(gu.shape, dtype=gu.dtype, device=gu.device)
        silu_mul_backward(dout, *gu.chunk(2, dim=-1), packed_out=dgu)
        return dgu


@torch.library.custom_op("rlhf_engine::silu_mul", mutates_args=())
def silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu_mul`` for torch.compile."""
    return silu_mul_forward(gate, up)


@silu_mul_op.register_fake
def _silu_mul_fake(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("rlhf_engine::silu_mul_backward", mutates_args=())
def silu_mul_backward_op(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) of ``silu_mul``, for torch.compile."""
    return silu_mul_backward(dout, gate, up)


@silu_mul_backward_op.register_fake
def _silu_mul_backward_fake(dout, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    return silu_mul_backward_op(dout, *ctx.saved_tensors)


silu_mul_op.register_autograd(_backward, setup_context=_setup_context)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up, in gate's dtype; differentiable in both.

    gate, up: float tensors of one shape (..., I), dtype and device, any layout (e.g. the two halves of one
    (..., 2 I) GEMM output: read in place). Returns a contiguous (..., I) tensor.
    backend: "triton", "torch" (F.silu(gate) * up) or "auto" (triton on CUDA). Raises ValueError on mismatched
    inputs.
    """
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor, got "
                            f"{f'a {t.dtype} tensor' if isinstance(t, torch.Tensor) else type(t).__name__}")
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(f"up: expected {tuple(gate.shape)} {gate.dtype} on {gate.device} like gate, got "
                         f"{tuple(up.shape)} {up.dtype} on {up.device}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not gate.is_cuda):
        return torch.nn.functional.silu(gate) * up
    if torch.compiler.is_compiling():
        return silu_mul_op(gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SiluMulFunction.apply(gate, up)
    return silu_mul_forward(gate, up)


def silu_mul_packed(gu: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu_mul(gate, up)`` of ``gate, up = gu.chunk(2, dim=-1)``, the output of one GEMM over the packed gate and
    up weights: the same values, and in the backward one (..., 2 I) gradient written by the kernel (no join of the
    two halves' gradients: a copy of 2 I elements a row and a launch fewer). gu: a float (..., 2 I) tensor."""
    if not isinstance(gu, torch.Tensor) or not gu.dtype.is_floating_point or gu.dim() < 1 or gu.shape[-1] % 2:
        raise ValueError(f"gu: expected a floating-point (..., 2 I) tensor, got {gu!r:.80}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    if (backend == "auto" and not gu.is_cuda) or backend == "torch" or torch.compiler.is_compiling() \
            or not (torch.is_grad_enabled() and gu.requires_grad):
        return silu_mul(*gu.chunk(2, dim=-1), backend=backend)
    return SiluMulPackedFunction.apply(gu)
