"""Batched autoregressive generation with a static KV cache (prefill + decode loop).

``generate`` runs on the model's own parameter tensors (no copy or cast per rollout), so
a rollout after an optimizer step sees the new weights. Per step it does one decode
forward (a CUDA graph replay on GPU), samples without a host sync, and tracks finished
rows on the device; it looks at the host only every ``check_every`` steps to stop early
and, optionally, to compact the batch so finished rows stop costing compute.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from rlhf_engine.kernels._args import int_value, real_value
from rlhf_engine.model.attention import lm_head_sample_enabled, resolve_backend
from rlhf_engine.model.batch_invariant import packed_gemms

from .cache import KVCache
from .cuda_graph import sample_head_name
from .sampling import LOGPROB_DISTS, sample_tokens


@dataclass
class GenerationOutput:
    """Result of ``generate`` for B prompts of padded length P and N generated columns.

    sequences: (B, P + N) int64 — left-padded prompt followed by the response.
    attention_mask: (B, P + N) int64 — prompt mask followed by response_mask.
    response_ids: (B, N) int64 — generated tokens, ``pad_token_id`` after EOS.
    response_mask: (B, N) int64 — 1 up to and including the EOS token, 0 after.
    logprobs: (B, N) fp32 — log softmax(logits / temperature)[token] of each generated
        token (0 where response_mask is 0). Untruncated by top-k/top-p unless generate(..., logprob_dist="sampled").
    prompt_len: P. num_steps: N (<= max_new_tokens; with trim=True, the columns after the last
        row's EOS are dropped).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    prompt_len: int
    num_steps: int

    @property
    def response_lengths(self) -> torch.Tensor:
        """(B,) int64 number of valid response tokens."""
        return self.response_mask.sum(1)


def _check_prompt(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, vocab_size: int | None = None) -> None:
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids: expected (B, P), got {tuple(prompt_ids.shape)}")
    if prompt_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"prompt_ids: expected int64 or int32, got {prompt_ids.dtype}")
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_mask: expected shape {tuple(prompt_ids.shape)}, got {tuple(prompt_mask.shape)}")
    if prompt_mask.device != prompt_ids.device:
        raise ValueError(f"prompt_mask: expected device {prompt_ids.device}, got {prompt_mask.device}")
    B, P = prompt_ids.shape
    m = prompt_mask.bool()
    n = m.sum(1)
    expected = torch.arange(P, device=m.device)[None, :] >= (P - n)[:, None]
    bad_mask = (expected != m).any() | (n == 0).any()
    bad_ids = (prompt_ids < 0).any() | ((prompt_ids >= vocab_size).any() if vocab_size else False)  # padding too
    flags = torch.stack([bad_mask, bad_ids]).tolist()  # the one host sync of the prompt checks
    if flags[0]:
        raise ValueError("prompt_mask: expected LEFT-padded prompts (each row: zeros then at least one 1)")
    if flags[1]:
        raise ValueError(f"prompt_ids: expected token ids in [0, {vocab_size}) (the model's vocab_size; padding "
                         f"included, it is embedded too), got [{int(prompt_ids.min())}, {int(prompt_ids.max())}]")


def _make_decoder(model, cache: KVCache, backend: str, use_cuda_graph: bool, prompt_len: int, runner=None,
                  head: str = "logits", generator: torch.Generator | None = None):
    """Callable (ids (B,1), step) -> logits (B, V): a given decoder, a new CUDA graph, or an eager step. With a
    sampling head (``cuda_graph.sample_head_name``) -> (tokens (B,), log-probs (B,)) drawn in the LM head, the seed
    drawn from ``generator`` before each step (inside the graph with one, else eagerly)."""
    sampled = head.startswith("sample:")
    if runner is None and (use_cuda_graph or sampled):
        from .cuda_graph import CudaGraphDecoder

        runner = CudaGraphDecoder(model, cache, attn_backend=backend, head=head, capture=use_cuda_graph)
    if sampled:
        return lambda ids, step: (runner.draw_seed(generator), runner(ids))[1]
    if runner is not None:
        return lambda ids, step: runner(ids)[:, 0]
    # Eager: on the torch path, only attend over the slots written so far (host-known).
    return lambda ids, step: model.decode_step(ids, cache, attn_backend=backend,
                                               kv_len=prompt_len + step + 1 if backend == "torch" else None)[:, 0]


def _fused_head(model, device: torch.device, batch: int, *, backend: str, top_k: int, top_p: float, greedy: bool,
                logprob_dist: str, **_ignored) -> bool:
    """Whether the decode steps' tokens are drawn in the LM head's epilogue (``kernels.lm_head_sample``):
    ``RLHF_ENGINE_LM_HEAD_SAMPLE=1``, the triton backend on a device the Gluon GEMM runs on, an LM-head weight it
    reads, a batch it takes, and what the Triton sampler would draw (greedy, or plain temperature sampling; the
    tempered log-prob)."""
    if not lm_head_sample_enabled() or backend != "triton":
        return False
    from rlhf_engine.kernels import decode_gemm_ws
    from rlhf_engine.kernels.lm_head_sample import lm_head_sample_fits

    V = model.lm_head_weight.shape[0]  # (the logits' width sample_tokens would see)
    plain = top_p >= 1.0 and (top_k <= 0 or top_k >= V)
    return ((greedy or plain) and (plain or logprob_dist == "tempered") and batch <= decode_gemm_ws.MAX_ROWS
            and lm_head_sample_fits(batch, V) and decode_gemm_ws.weight_ok(model.lm_head_weight)
            and model.lm_head_weight.device == device)


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None = None, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             eos_token_ids: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, attn_backend: str | None = None,
             use_cuda_graph: bool | None = None, graph_cache=None, check_every: int = 8, compact: bool = True,
             min_compact_batch: int = 8, trim: bool = True, logprob_dist: str = "tempered") -> GenerationOutput:
    """Sample up to ``max_new_tokens`` tokens after each left-padded prompt.

    model: a CausalLM. prompt_ids: (B, P) int64, LEFT-padded. prompt_mask: (B, P) 0/1
    (None: all ones); every row needs at least one prompt token.
    temperature (> 0), top_k (0 = off), top_p (1.0 = off) shape the sampling distribution
    in HF order (logits / T, then top-k, then top-p); greedy takes the argmax.
    Returned ``logprobs`` (logprob_dist="tempered", the default) are log softmax(logits / T) of the chosen token
    WITHOUT the top-k/top-p truncation — what the PPO training forward recomputes at temperature T —
    so with top_k/top_p active they are not the log-probs of the distribution actually
    sampled from; logprob_dist="sampled" returns those instead (renormalized over the kept tokens; the same
    numbers when neither truncation is active). See ``sample_tokens``.
    eos_token_ids: stop tokens (default: the config's); a row is finished after emitting
    one, later positions get ``pad_token_id`` (default: config pad, else the first EOS,
    else 0) with response_mask 0. generator: torch.Generator on the model's device.
    attn_backend: None -> the config's; "triton" also samples with the one-pass Triton sampler (greedy and
    plain temperature sampling; top-k/top-p on the eager ops). use_cuda_graph: None -> True on CUDA.
    graph_cache: a ``DecodeGraphCache`` to reuse static caches and captured graphs across
    calls (capture once per batch bucket and rounded length: the batch runs padded to
    ``graph_cache.batch_bucket(B)`` rows, the padding rows finished from the start and never prefilled; sampled
    tokens then depend on the bucket, as they do on compaction, since the padding rows draw random numbers too;
    with use_cuda_graph=False, e.g. on the CPU, only the caches are reused); None: allocate (and capture) per
    call, and again at each compaction: a capture costs a device sync and tens of ms, so repeated callers should
    pass a cache.
    check_every: steps between host checks (stop when all rows finished; compaction).
    compact: at those checks, when at most half the rows are still running and the batch
    is larger than ``min_compact_batch``, move the running rows into a smaller cache
    (power-of-two bucket) so finished rows stop costing compute. Greedy results are
    unchanged by compaction up to rounding (exactly on the CPU; on a GPU the GEMMs and the decode kernel's
    split count depend on the batch, so a near-tie may flip in bf16); sampled ones use the random stream
    differently.
    trim: drop trailing columns where every row has finished (else N = max_new_tokens always).
    The KV cache has the parameter dtype.
    Never copies or casts the parameters: generation reads the tensors training updates.
    """
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids)
    _check_prompt(prompt_ids, prompt_mask, getattr(getattr(model, "config", None), "vocab_size", None))
    for name, value in (("max_new_tokens", max_new_tokens), ("check_every", check_every)):
        v = int_value(value)
        if v is None or v <= 0:
            raise ValueError(f"{name}: expected an int > 0, got {value!r}")
    max_new_tokens, check_every = int(max_new_tokens), int(check_every)
    k = int_value(top_k)
    if k is None or k < 0:
        raise ValueError(f"top_k: expected an int >= 0 (0: off), got {top_k!r}")
    top_k = k
    t = real_value(temperature)
    if t is None or not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if eos_token_ids is not None:
        one = int_value(eos_token_ids)
        if one is not None:
            ids = [one]
        elif hasattr(eos_token_ids, "__iter__") and not isinstance(eos_token_ids, (str, bytes, dict)):
            ids = [int_value(i) for i in eos_token_ids]  # a list, tuple, range, array or tensor of ids
            if isinstance(eos_token_ids, (set, frozenset)) and None not in ids:
                ids = sorted(ids)  # the first is the default pad id: not the set's iteration order
        else:
            ids = [None]
        if any(i is None for i in ids):
            raise TypeError(f"eos_token_ids: expected an int, a sequence of ints or None, got {eos_token_ids!r}")
        eos_token_ids = tuple(ids)
    if pad_token_id is not None:
        pad = int_value(pad_token_id)
        if pad is None:
            raise TypeError(f"pad_token_id: expected an int or None, got {pad_token_id!r}")
        pad_token_id = pad
    if logprob_dist not in LOGPROB_DISTS:
        raise ValueError(f"logprob_dist: expected one of {LOGPROB_DISTS}, got {logprob_dist!r}")
    config = model.config
    device = prompt_ids.device
    if model.device != device:
        raise ValueError(f"prompt_ids: expected the model's device {model.device}, got {device}")
    backend = resolve_backend(attn_backend or config.attn_backend, device)
    if use_cuda_graph is None:
        use_cuda_graph = device.type == "cuda"
    if use_cuda_graph and device.type != "cuda":
        raise ValueError(f"use_cuda_graph=True needs a CUDA model, got device {device}")
    if eos_token_ids is None:
        eos_token_ids = config.eos_token_ids
    elif isinstance(eos_token_ids, int):
        eos_token_ids = (eos_token_ids,)
    eos_token_ids = tuple(eos_token_ids)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (
            eos_token_ids[0] if eos_token_ids else 0)

    B, P = prompt_ids.shape
    if B == 0:
        raise ValueError("prompt_ids: expected at least one row, got an empty batch")
    N = max_new_tokens
    # the triton backend also samples with one kernel (plain temperature sampling and greedy)
    sample_kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, generator=generator,
                     backend=backend, logprob_dist=logprob_dist)
    eos = torch.tensor(eos_token_ids or [-1], dtype=torch.long, device=device)
    pooled = graph_cache is not None
    # with a graph cache the batch decodes in its bucket (one captured graph per bucket, not per batch size): the
    # rows past B are finished from the start (row 0's lengths, its logits, K/V never read for a kept token) and
    # are never returned; only the B real rows are prefilled
    Bb = graph_cache.batch_bucket(B) if pooled else B
    response = torch.full((Bb, N), pad_token_id, dtype=torch.long, device=device)
    response_mask = torch.zeros((Bb, N), dtype=torch.long, device=device)
    logprobs = torch.zeros((Bb, N), dtype=torch.float32, device=device)

    # with the LM head fused with the sampler each decode step (and its graph) ends with the draw, and "logits" in
    # the loop below holds (tokens, log-probs) after the first token (drawn from the prefill's logits)
    fused = _fused_head(model, device, Bb, **sample_kw)
    head = sample_head_name(temperature, greedy) if fused else "logits"

    was_training = model.training
    model.eval()
    try:
        runner = None
        if pooled:
            cache, runner = graph_cache.get(model, Bb, P + N, backend, capture=use_cuda_graph, head=head)
        else:
            cache = KVCache.allocate(config, B, P + N, dtype=model.dtype, device=device)
        if Bb > B:  # prefill the real rows through a view of the cache's first B rows
            logits = model.prefill(prompt_ids, prompt_mask, cache.head(B), attn_backend=backend)  # (B, V)
            cache.lengths[B:].fill_(P)
            cache.start[B:].copy_(cache.start[:1].expand(Bb - B))
            logits = torch.cat([logits, logits[:1].expand(Bb - B, -1)])  # (Bb, V)
        else:
            logits = model.prefill(prompt_ids, prompt_mask, cache, attn_backend=backend)  # (B, V)
        decode = _make_decoder(model, cache, backend, use_cuda_graph, P, runner, head, generator)
        rows = torch.arange(Bb, device=device)  # original row of each cache row
        finished = rows >= B  # the bucket's padding rows
        steps = N
        # on the CPU the decode steps' batch-invariant GEMMs run on the weights packed once for their batch
        with packed_gemms() if device.type == "cpu" else contextlib.nullcontext():
            for t in range(N):
                if fused and t > 0:  # drawn in the decode step's LM head
                    tok, lp = logits
                else:
                    tok, lp = sample_tokens(logits, **sample_kw)  # (Ba,), (Ba,)
                alive = ~finished
                tok = torch.where(alive, tok, pad_token_id)
                response[rows, t] = tok
                response_mask[rows, t] = alive.long()
                logprobs[rows, t] = torch.where(alive, lp, 0.0)
                finished = finished | torch.isin(tok, eos)
                if t == N - 1:
                    break
                if (t + 1) % check_every == 0:
                    n_alive = int((~finished).sum())  # host sync, once every check_every steps
                    if n_alive == 0:
                        steps = t + 1
                        break
                    Ba = rows.numel()
                    if compact and Ba > min_compact_batch and n_alive <= Ba // 2:
                        Bn = max(min_compact_batch, 1 << (n_alive - 1).bit_length())
                        keep = torch.argsort(finished.to(torch.int8), stable=True)[:Bn]  # running rows first
                        del decode
                        if pooled:
                            small, runner = graph_cache.get(model, Bn, cache.max_len, backend, capture=use_cuda_graph,
                                                            head=head)
                            cache.copy_rows_to(keep, small)
                        else:
                            small, runner = cache.select(keep), None
                        cache = small
                        rows, finished, tok = rows[keep], finished[keep], tok[keep]  # (logits: replaced below)
                        decode = _make_decoder(model, cache, backend, use_cuda_graph, P, runner, head, generator)
                logits = decode(tok[:, None], t)  # (Ba, V)
    finally:
        model.train(was_training)

    response, response_mask, logprobs = response[:B], response_mask[:B], logprobs[:B]
    if trim:
        # Rows stop for good, so the columns where some row is still running form a prefix.
        steps = int(response_mask[:, :steps].any(0).sum())
    else:
        steps = N  # columns after an early stop keep pad / mask 0
    if steps < N:
        response, response_mask, logprobs = response[:, :steps], response_mask[:, :steps], logprobs[:, :steps]
    sequences = torch.cat([prompt_ids.long(), response], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), response_mask], dim=1)
    return GenerationOutput(sequences=sequences, attention_mask=attention_mask, response_ids=response,
                            response_mask=response_mask, logprobs=logprobs, prompt_len=P, num_steps=steps)
