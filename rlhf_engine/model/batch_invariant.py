"""A linear layer whose fp32 CPU result for a row does not depend on how many rows come with it.

Generation computes a token's log-prob in a decode step (B rows per GEMM); the training forward recomputes it over
the whole sequence (B * T rows). On the CPU, MKL's fp32 GEMM rounds a row differently in the two: below 16 rows it
runs another kernel, and with more than one thread it splits long reductions (K > ~768 here) across the threads
depending on the shape. Over a 30-layer model that puts ~1e-5 between the two log-probs of a token (SmolLM2-135M,
fp32), where the issue asks for parity within 1e-5.

``linear`` removes both causes: fewer than 16 rows are padded to 16, and K is cut into chunks of at most 640 with
up to 4 threads and 320 with more (``max_k_chunk``: MKL's split of the reduction depends on the shape and the thread
count, not monotonically: with 8 to 128 threads it is seen at K = 384 and not at 512; none was seen up to 640 with 1
to 7 threads, nor up to 320 with 8 to 128, for N from 8 to 49152 and M from 16 to 4096), each chunk's product summed
into the output by an elementwise add in a fixed order (not ``addmm_``, whose beta = 1 adds C after MKL's first K
block: an order that the packed GEMM below does not share). The sum per output element is then the same sequence of
fp32 operations whatever M is, so a row's result is bit for bit the same in a decode step and in the training
forward (``tests/test_batch_invariant.py``, at 1, 2, 3 and 12 threads). Elsewhere (CUDA, other dtypes,
torch.compile) it is ``F.linear``: on a GPU the log-prob parity is measured, not bitwise (bf16, cuBLAS).

The cost of the padding, and what takes it back in generation. Padded to 16 rows, a decode step's GEMM at B = 4
costs ~2-3x the unpadded one on this CPU (MKL repacks the weights every call, and computes 16 rows). Inside
``packed_gemms()`` (which ``generate`` enters) a GEMM of at most ``PACKED_MAX_ROWS`` rows runs instead on MKL's
packed GEMM (``torch.ops.mkl._mkl_linear``, the op inductor's CPU freezing uses), on the weights packed once per
call for exactly that row count (at least 2): its rows are the padded GEMM's bit for bit, on every shape and thread
count tried, and it reads weights already laid out for the kernel. Each (N, K, rows, threads) is checked against the
padded GEMM, bit for bit on a fixed input, the first time it is seen in a process: where MKL rounds otherwise, that
shape keeps the padded GEMM. The packs live until the context exits (a full copy of the weights:
540 MB for SmolLM2-135M in fp32), one row count at a time.
SmolLM2-135M, B = 4, fp32 (``bench_generate.py --cpu``): RESULTS.md, "CPU". ``ModelConfig.batch_invariant = False``
when a model is built, or ``CausalLM.batch_invariant = False`` on a built one, turns the padding, the chunks and the
fp64 attention (model/attention.py ``_sdpa``) off.

``logsumexp`` does the same for the log-sum-exp of a log-prob: ATen splits one row's sum across threads, and
several rows' by row.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 16  # MKL's fp32 GEMM takes another kernel below this many rows
# K per GEMM, below the widths at which MKL splits the reduction across threads (by shape: seen from K = 704 with 3
# threads, 800 with 1-2 and 4-7, 384 with 8 to 128; none up to 640 with 1-7 threads, none up to 320 with 8-128)
MAX_K_CHUNK = 640  # with up to FEW_THREADS threads
FEW_THREADS = 4
MAX_K_CHUNK_MANY_THREADS = 320
PACKED_MAX_ROWS = 64  # packed GEMMs inside ``packed_gemms()`` up to this many rows (a decode step's)


def applies(x: torch.Tensor) -> bool:
    """Whether ``linear`` takes the batch-invariant path for input x: fp32 on the CPU, outside torch.compile and
    CPU autocast (whose casts are F.linear's)."""
    if x.is_cuda:  # first: the cheapest check, and a GPU call's only one
        return False
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu"))


def max_k_chunk(threads: int | None = None) -> int:
    """The widest K chunk whose GEMM MKL does not split across ``threads`` (default: torch's current count)."""
    threads = torch.get_num_threads() if threads is None else threads
    return MAX_K_CHUNK if threads <= FEW_THREADS else MAX_K_CHUNK_MANY_THREADS


def k_chunks(K: int, max_chunk: int | None = None) -> list[tuple[int, int]]:
    """[k0, k1) ranges cutting K into ceil(K / max_chunk) near-equal chunks (multiples of 16 but the last);
    ``max_chunk`` defaults to ``max_k_chunk()``."""
    max_chunk = max_k_chunk() if max_chunk is None else max_chunk
    n = max(1, -(-K // max_chunk))
    size = -(-K // n)
    size = -(-size // 16) * 16  # still <= max_chunk (a multiple of 16), a multiple of 16
    return [(k0, min(K, k0 + size)) for k0 in range(0, K, size)]


def _sum_in_order(parts) -> torch.Tensor:
    """The K chunks' products summed into the first, one elementwise add each, in chunk order (both GEMM paths)."""
    parts = iter(parts)
    out = next(parts)
    for part in parts:
        out.add_(part)
    return out


def _padded_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The reference order: M < 16 padded to 16 rows, one GEMM per K chunk, summed in chunk order, then the bias."""
    M, K = x.shape
    if M < MIN_ROWS:  # padded to the GEMM kernel the larger batches take
        x = torch.cat([x, x.new_zeros(MIN_ROWS - M, K)])
    out = _sum_in_order(torch.mm(x[:, k0:k1], weight[:, k0:k1].t()) for k0, k1 in k_chunks(K))
    if bias is not None:
        out.add_(bias)
    return out[:M].clone() if M < MIN_ROWS else out  # a tensor of its own, not a view: callers may write in place


class _Packs(threading.local):
    """The packed weights of the ``packed_gemms()`` scope this thread is in (``cache`` None outside one)."""
    cache: dict | None = None
    rows: int = 0


_PACKS = _Packs()
_CHECKED: dict[tuple, bool] = {}  # (N, K, rows, threads) -> the packed GEMM rounds as the padded one


@functools.cache
def packed_available() -> bool:
    """Whether this torch has MKL's packed GEMM ops (x86 builds with MKL and oneDNN)."""
    return (torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkl, "_mkl_linear") and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"))


@contextlib.contextmanager
def packed_gemms(enabled: bool = True):
    """A scope (per thread) inside which batch-invariant GEMMs of up to ``PACKED_MAX_ROWS`` rows run on weights
    packed once for their row count (module docstring): for a loop of decode steps over weights that do not change
    meanwhile. A weight written in place through autograd-visible ops (an optimizer step) is packed again; writes
    that bypass its version counter (``p.data.mul_(...)``, a write through another tensor sharing its storage) are
    not seen, so do not make them inside a scope. Nested scopes share the outermost one's packs, which are dropped
    when it exits; ``enabled=False`` opens no scope of its own (an enclosing one still applies)."""
    outer = _PACKS.cache is not None or not enabled or not packed_available()
    if not outer:
        _PACKS.cache, _PACKS.rows = {}, 0
    try:
        yield
    finally:
        if not outer:
            _PACKS.cache, _PACKS.rows = None, 0


def _pack_key(weight: torch.Tensor, chunks: list[tuple[int, int]]) -> tuple:
    """A weight's packs: its storage, layout and K chunking (the first chunk's end fixes the rest for its K)."""
    return weight.data_ptr(), tuple(weight.shape), weight.stride(), chunks[0][1]


def _packed_mm(x: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """x (rows, K) @ weight (N, K)ᵀ on the packed weights (packed now if need be), or None where they cannot be."""
    cache = _PACKS.cache
    if rows != _PACKS.rows:  # compaction only shrinks the batch: the other count's packs are not needed again
        cache.clear()
        _PACKS.rows = rows
    chunks = k_chunks(x.shape[1])
    key = _pack_key(weight, chunks)
    version = None if weight.is_inference() else weight._version  # inference tensors keep no version counter
    hit = cache.get(key)
    if hit is None or hit[0] != version:  # new, or written in place since: packed again (the old pack goes)
        try:
            packs = [(torch.ops.mkl._mkl_reorder_linear_weight(weight[:, k0:k1], rows), weight[:, k0:k1], k0, k1)
                     for k0, k1 in chunks]
        except RuntimeError:  # e.g. a layout MKL's packing refuses: the padded GEMM
            cache.pop(key, None)
            return None
        hit = cache[key] = (version, packs)
    return _sum_in_order(torch.ops.mkl._mkl_linear(x[:, k0:k1], pw, w, None, rows) for pw, w, k0, k1 in hit[1])


def _packed_rounds_as_padded(weight: torch.Tensor, rows: int) -> bool:
    """The first-use check of a shape: the packed GEMM's rows against the padded GEMM's, bit for bit, on a fixed
    finite input of ``rows`` rows (not the caller's, which may hold NaN or inf)."""
    g = torch.Generator().manual_seed(rows)
    probe = torch.randn(rows, weight.shape[1], generator=g, dtype=weight.dtype, device=weight.device)
    out = _packed_mm(probe, weight, rows)
    if out is None:
        return False
    same = torch.equal(out.view(torch.int32), _padded_mm(probe, weight, None).view(torch.int32))
    if not same:  # the pack will not be used: not kept either
        _PACKS.cache.pop(_pack_key(weight, k_chunks(weight.shape[1])), None)
    return same


def invariant_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)ᵀ (+ bias (N,)) -> (M, N), each row computed as in any other M (no autograd)."""
    M, K = x.shape
    if _PACKS.cache is None or M > PACKED_MAX_ROWS or weight.dtype != torch.float32:
        return _padded_mm(x, weight, bias)
    rows = max(M, 2)  # one row is not: its packed GEMM rounds otherwise
    check = (weight.shape[0], K, rows, torch.get_num_threads())
    if check not in _CHECKED:  # first time in this process: used only where it rounds as the padded GEMM
        _CHECKED[check] = _packed_rounds_as_padded(weight, rows)
    out = None
    if _CHECKED[check]:
        out = _packed_mm(torch.cat([x, x.new_zeros(rows - M, K)]) if rows > M else x, weight, rows)
    if out is None:
        return _padded_mm(x, weight, bias)
    if bias is not None:
        out.add_(bias)
    return out[:M].clone() if rows > M else out  # not a view (as _padded_mm's)


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
