"""A linear layer whose fp32 CPU result for a row does not depend on how many rows come with it.

Generation computes a token's log-prob in a decode step (B rows per GEMM); the training forward recomputes it over
the whole sequence (B * T rows). On the CPU, MKL's fp32 GEMM rounds a row differently in the two: below 16 rows it
runs another kernel, and with more than one thread it splits long reductions (K > ~768 here) across the threads
depending on the shape. Over a 30-layer model that puts ~1e-5 between the two log-probs of a token (SmolLM2-135M,
fp32), where the issue asks for parity within 1e-5.

``linear`` removes both causes: fewer than 16 rows are padded to 16, and K is cut into chunks of at most 512
(``MAX_K_CHUNK``: no thread split of the reduction seen up to 768, any N from 8 to 151936, any M from 16, 1 to 4
threads) accumulated in a fixed order (addmm into the output). The sum per output element is then the same
sequence of fp32 operations whatever M is, so a row's result is bit for bit the same in a decode step and in the
training forward (``tests/test_batch_invariant.py``). Elsewhere (CUDA, other dtypes, torch.compile) it is
``F.linear``: on a GPU the log-prob parity is measured, not bitwise (bf16, cuBLAS).

The cost on the CPU: a decode step of B < 16 rows computes 16 (a GEMV becomes a small GEMM: the weights are read
once either way), and K > 512 takes ceil(K / 512) GEMMs into one output. Measured with the fp64 attention
(model/attention.py ``_sdpa``) on SmolLM2-135M: a decode step at B = 4 65.6 -> 94.8 ms, a B = 8 generation +21%, a
scoring forward +9%, a training forward + backward (B = 8, ~42 tokens) within noise (1.18 s). ``ModelConfig.
batch_invariant = False`` when a model is built, or ``CausalLM.batch_invariant = False`` on a built one, turns both off.

``logsumexp`` does the same for the log-sum-exp of a log-prob: ATen splits one row's sum across threads, and
several rows' by row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 16  # MKL's fp32 GEMM takes another kernel below this many rows
MAX_K_CHUNK = 512  # K per GEMM: below MKL's thread split of the reduction (seen from K = 832)


def applies(x: torch.Tensor) -> bool:
    """Whether ``linear`` takes the batch-invariant path for input x: fp32 on the CPU, outside torch.compile and
    CPU autocast (whose casts are F.linear's)."""
    if x.is_cuda:  # first: the cheapest check, and a GPU call's only one
        return False
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu"))


def k_chunks(K: int) -> list[tuple[int, int]]:
    """[k0, k1) ranges cutting K into ceil(K / MAX_K_CHUNK) near-equal chunks (multiples of 16 but the last)."""
    n = max(1, -(-K // MAX_K_CHUNK))
    size = -(-K // n)
    size = -(-size // 16) * 16  # still <= MAX_K_CHUNK, a multiple of 16
    return [(k0, min(K, k0 + size)) for k0 in range(0, K, size)]


def invariant_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)ᵀ (+ bias (N,)) -> (M, N), each row computed as in any other M (no autograd)."""
    M, K = x.shape
    if M < MIN_ROWS:  # padded to the GEMM kernel the larger batches take
        x = torch.cat([x, x.new_zeros(MIN_ROWS - M, K)])
    chunks = k_chunks(K)
    k0, k1 = chunks[0]
    out = (torch.mm(x[:, k0:k1], weight[:, k0:k1].t()) if bias is None
           else torch.addmm(bias, x[:, k0:k1], weight[:, k0:k1].t()))
    for k0, k1 in chunks[1:]:
        out.addmm_(x[:, k0:k1], weight[:, k0:k1].t())
    return out[:M].clone() if M < MIN_ROWS else out  # a tensor of its own, not a view: callers may write in place


class InvariantLinearFunction(torch.autograd.Function):
    """``invariant_mm`` forward; the usual linear backward (dx = dy W, dW = dyᵀ x, db = Σ dy), differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        # only what the gradients asked for need: a frozen weight (the reference policy, a LoRA base) keeps no x
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        return invariant_mm(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dy.mm(weight) if ctx.needs_input_grad[0] else None
        dw = dy.t().mm(x) if ctx.needs_input_grad[1] else None
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           batch_invariant: bool = True) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x (..., K), weight (N, K), bias (N,) or None -> (..., N).

    With ``batch_invariant`` and fp32 on the CPU (``applies``), every row is computed the same way whatever the
    number of rows (module docstring); otherwise, or when the operands' dtypes or devices differ, ``F.linear``.
    """
    if not (batch_invariant and applies(x)):  # first: a GPU call pays one device check
        return F.linear(x, weight, bias)
    if weight.dim() != 2 or any(t is not None and (t.dtype != x.dtype or t.device != x.device) for t in (weight, bias)):
        return F.linear(x, weight, bias)
    lead, K = x.shape[:-1], x.shape[-1]
    if K != weight.shape[1]:
        return F.linear(x, weight, bias)  # F.linear's own shape error
    x2 = x.reshape(-1, K)  # (M, K)
    if x2.shape[0] == 0 or K == 0:
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        y = InvariantLinearFunction.apply(x2, weight, bias)
    else:
        y = invariant_mm(x2, weight, bias)
    return y if x.dim() == 2 else y.view(*lead, weight.shape[0])  # (..., N)


def logsumexp(z: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(z, dim=-1)`` for z (n, V) -> (n,); on the CPU one row is computed beside a row of zeros,
    because ATen splits a single row's sum across its threads (V >= 32768) and sums each row in one thread once
    there are two: without it a decode step of one sequence rounds its log-sum-exp differently from the training
    forward (up to 1e-6 seen). Differentiable."""
    if z.dim() == 2 and z.shape[0] == 1 and not z.is_cuda and not torch.compiler.is_compiling():
        return torch.logsumexp(torch.cat([z, z.new_zeros(z.shape)]), dim=-1)[:1]
    return torch.logsumexp(z, dim=-1)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is ``linear`` (batch-invariant in fp32 on the CPU while ``batch_invariant``);
    same parameters and state-dict keys, so it loads and saves as ``nn.Linear`` does."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 batch_invariant: bool = True):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.batch_invariant = batch_invariant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, batch_invariant=self.batch_invariant)
