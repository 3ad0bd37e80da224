"""SwiGLU's activation, silu(gate) * up, in one Triton kernel (inference: no backward).

For gate, up of one shape and dtype ``dt``, with the rounding of the eager pair of ops:
    a   = (g / (1 + exp(-g))).to(dt)      silu in fp32, rounded as F.silu's output
    out = (a * up).to(dt)                 the product in fp32, rounded as the eager multiply
One read of each input and one write, instead of two kernels and an (N, I) intermediate: the MLP of a decode
step is gate GEMM, up GEMM, this, down GEMM. The GPU's exp and divide are approximate to an fp32 ulp or so,
so a value next to a rounding boundary of ``dt`` can land one ``dt`` ulp from eager (two after the product).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv

_BACKENDS = ("auto", "triton", "torch")
_BLOCK = 2048


@triton.jit
def _silu_mul_kernel(G, U, O, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(O.dtype.element_ty)
    tl.store(O + offs, (a.to(tl.float32) * u).to(O.dtype.element_ty), mask=m)


def silu_mul_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch ``_silu_mul_kernel`` on contiguous gate, up of one shape and dtype."""
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _silu_mul_kernel[(cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK, num_warps=4)
    return out


@torch.library.custom_op("rlhf_engine::silu_mul", mutates_args=())
def silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu_mul`` for torch.compile."""
    return silu_mul_forward(gate, up)


@silu_mul_op.register_fake
def _silu_mul_fake(gate, up):
    return torch.empty_like(gate)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up, in gate's dtype; no gradient.

    gate, up: float tensors of one shape, dtype and device. backend: "triton", "torch" (F.silu(gate) * up)
    or "auto" (triton on CUDA). Raises ValueError on mismatched inputs and RuntimeError when autograd would
    need a gradient (the training forward uses the eager ops).
    """
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor, got {t!r:.80}")
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(f"up: expected {tuple(gate.shape)} {gate.dtype} on {gate.device} like gate, got "
                         f"{tuple(up.shape)} {up.dtype} on {up.device}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not gate.is_cuda):
        return torch.nn.functional.silu(gate) * up
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        raise RuntimeError("silu_mul (triton): inference only, it has no backward; call it under torch.no_grad()")
    gate, up = gate.contiguous(), up.contiguous()
    if torch.compiler.is_compiling():
        return silu_mul_op(gate, up)
    return silu_mul_forward(gate, up)
