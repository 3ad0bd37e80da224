"""Supervised fine-tuning (SFT): next-token NLL on response tokens, through the fused LM head.

The loss never builds the (B, T, V) logits: ``rlhf_engine.model.sequence_logprobs`` feeds
the trunk's hidden states to the fused LM-head log-prob kernel
(``rlhf_engine.kernels.fused_linear_logprob``) on CUDA, or to a row-chunked PyTorch LM head
on the CPU, with next-token targets; every position whose target is not a response token
gets ``ignore_index`` (no log-prob, no gradient). The loss is the token mean over ALL the
response tokens of an optimizer step, Σ NLL / Σ tokens across its micro-batches, so it
does not depend on ``grad_accum`` or on how tokens fall into micro-batches.

Positions: hidden state t predicts token t + 1, so the target of position t is
``input_ids[t + 1]`` where ``labels_mask[t + 1]`` is True (see ``rlhf_engine.data``).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from rlhf_engine.data.datasets import (load_sft_dataset, pack_examples, pad_sft_batch, pad_token_id,
                                       tokenize_sft_example)
from rlhf_engine.model.logprobs import sequence_logprobs

from .optim import MasterWeightAdamW, check_training_args, finite_step, lr_schedule

IGNORE_INDEX = -100


def sft_targets(input_ids: torch.Tensor, labels_mask: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, T) ids, (B, T) bool mask -> (B, T - 1) int64 next-token targets, ``ignore_index`` where not trained."""
    nxt = input_ids[:, 1:]  # (B, T-1)
    return torch.where(labels_mask[:, 1:].bool(), nxt, torch.full_like(nxt, ignore_index))


def sft_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels_mask: torch.Tensor, *,
             normalizer: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response-token NLL divided by ``normalizer`` (default: this batch's token count).

    Args:
        model: a ``CausalLM`` (``hidden_states`` and ``lm_head_weight``).
        input_ids: (B, T) int64. attention_mask: (B, T) 0/1. labels_mask: (B, T) bool,
            True on the tokens to learn (responses).
        normalizer: the number of response tokens in the whole optimizer step (scalar).
    Returns:
        loss: 0-dim fp32 (differentiable), and n_tokens: 0-dim int64, the trained tokens here.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected (B, T), got {tuple(input_ids.shape)}")
    for name, t in (("attention_mask", attention_mask), ("labels_mask", labels_mask)):
        if t.shape != input_ids.shape:
            raise ValueError(f"{name}: expected shape {tuple(input_ids.shape)}, got {tuple(t.shape)}")
    trained = labels_mask.bool() & attention_mask.bool()  # (B, T)
    # start=<(B, T) mask>: log p(token t | tokens < t) where trained[t], else 0; (B, T) fp32
    logp = sequence_logprobs(model, input_ids, attention_mask, start=trained)
    n_tokens = trained[:, 1:].sum()
    if normalizer is None:
        normalizer = n_tokens.clamp(min=1)
    return -logp.sum() / normalizer, n_tokens


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _apply_lora(model, lora: dict | None) -> None:
    if lora is None:
        return
    from rlhf_engine.model.lora import apply_lora

    if not isinstance(lora, dict):
        raise TypeError(f"lora: expected None or a dict (rank, alpha, target_modules, dropout), got "
                        f"{type(lora).__name__}")
    apply_lora(model, **lora)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i: i + batch_size] for i in range(0, n, batch_size)]


def train_sft(model, tokenizer, dataset: Any, *, epochs: int = 1, batch_size: int = 8, lr: float = 1e-5,
              max_len: int = 512, packing: bool = False, lora: dict | None = None, grad_accum: int = 1,
              max_steps: int | None = None, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
              warmup_steps: int = 0, schedule: str = "constant", chat_template: bool = False,
              gradient_checkpointing: bool = False, device: torch.device | str | None = None, seed: int = 0,
              log_fn: Callable[[int, dict], None] | None = None, progress: bool = True) -> dict:
    """Fine-tune ``model`` in place on (prompt, response) or chat data; loss on response tokens only.

    Args:
        model: a ``CausalLM``. tokenizer: a transformers tokenizer (``encode``, ``eos_token_id``,
            ``apply_chat_template`` for chat rows).
        dataset: a path or a list of rows, see ``rlhf_engine.data.load_sft_dataset``.
        epochs, batch_size (sequences per micro-batch), lr, grad_accum (micro-batches per
            optimizer step), max_steps (optimizer steps, caps ``epochs``).
        max_len: tokens per example; with ``packing`` also the packed row length (examples are
            concatenated, see ``rlhf_engine.data.pack_examples`` for the attention trade-off).
        lora: None (full fine-tune) or keyword arguments of ``rlhf_engine.model.lora.apply_lora``
            (rank, alpha, target_modules, dropout); the adapters stay in the model (not merged).
        weight_decay, max_grad_norm (None: no clipping), warmup_steps, schedule ("constant",
            "linear", "cosine"): the optimizer is ``MasterWeightAdamW`` (fp32 masters for bf16).
        chat_template: render plain prompts as a chat user turn.
        device: where to train (default: the model's device). seed: shuffling and init of adapters.
        log_fn: called as ``log_fn(step, metrics)`` after each optimizer step (floats).
        progress: show a tqdm bar.
    Returns:
        summary dict: ``losses`` (per optimizer step), ``lr``, ``grad_norm``, ``steps``, ``skipped_steps`` (steps
        whose loss or gradient was not finite: no update), ``tokens``
        (trained response tokens), ``tokens_seen`` (non-pad input tokens), ``time_s``,
        ``tokens_per_s`` (non-pad input tokens per second), ``n_examples``, ``n_rows``.
    """
    device = check_training_args(epochs, batch_size, grad_accum, max_steps, device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device) if device is not None else _device_of(model)
    model.to(device)
    rows_data = load_sft_dataset(dataset)
    examples = [tokenize_sft_example(tokenizer, ex, max_len, chat_template=chat_template) for ex in rows_data]
    pad = pad_token_id(tokenizer)
    if packing:
        order = torch.randperm(len(examples), generator=gen).tolist()
        packed = pack_examples([examples[i] for i in order], max_len, pad)
        rows = [(packed["input_ids"][r], packed["labels_mask"][r], packed["attention_mask"][r])
                for r in range(packed["input_ids"].shape[0])]
    else:
        rows = [(ids, m, None) for ids, m in examples]

    _apply_lora(model, lora)
    model.gradient_checkpointing = gradient_checkpointing
    opt = MasterWeightAdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n_micro = math.ceil(len(rows) / batch_size)
    steps_per_epoch = math.ceil(n_micro / grad_accum)
    total_steps = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    sched = lr_schedule(opt, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps)

    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        if packing:
            return {"input_ids": torch.stack([rows[i][0] for i in idx]),
                    "labels_mask": torch.stack([rows[i][1] for i in idx]),
                    "attention_mask": torch.stack([rows[i][2] for i in idx])}
        return pad_sft_batch([(rows[i][0], rows[i][1]) for i in idx], pad)

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc="sft", disable=not progress, dynamic_ncols=True)
    summary: dict[str, Any] = {"losses": [], "lr": [], "grad_norm": [], "steps": 0, "tokens": 0, "tokens_seen": 0,
                               "n_examples": len(examples), "n_rows": len(rows), "skipped_steps": 0}
    was_training = model.training
    model.train()
    t0 = time.perf_counter()
    step = 0
    for _ in range(epochs):
        micro = _batches(len(rows), batch_size, gen)
        for s in range(0, len(micro), grad_accum):
            if step >= total_steps:
                break
            group = [collate(idx) for idx in micro[s: s + grad_accum]]
            # Token-mean over the whole optimizer step: count its targets first (host tensors, no sync).
            n_step = sum(int((b["labels_mask"][:, 1:] & b["attention_mask"][:, 1:].bool()).sum()) for b in group)
            normalizer = float(max(n_step, 1))
            opt.zero_grad()
            loss_sum = torch.zeros((), device=device)
            for b in group:
                summary["tokens_seen"] += int(b["attention_mask"].sum())  # host tensor: no sync
                b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
                loss, _ = sft_loss(model, b["input_ids"], b["attention_mask"], b["labels_mask"],
                                   normalizer=normalizer)
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = opt.clip_grad_norm_(max_grad_norm)
            loss_f, gn_f = torch.stack([loss_sum, grad_norm.to(loss_sum)]).tolist()  # the step's one host sync
            summary["skipped_steps"] += not finite_step(opt, sched, loss_f, gn_f)
            step += 1
            metrics = {"loss": loss_f, "grad_norm": gn_f, "lr": sched.get_last_lr()[0], "tokens": n_step}
            summary["losses"].append(metrics["loss"])
            summary["grad_norm"].append(metrics["grad_norm"])
            summary["lr"].append(metrics["lr"])
            summary["tokens"] += n_step
            if log_fn is not None:
                log_fn(step, metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
    bar.close()
    opt.release()  # the fp32 masters and moments go with this run
    model.train(was_training)
    dt = time.perf_counter() - t0
    summary.update(steps=step, time_s=dt, tokens_per_s=summary["tokens_seen"] / max(dt, 1e-9))
    return summary


__all__ = ["IGNORE_INDEX", "sft_loss", "sft_targets", "train_sft"]
