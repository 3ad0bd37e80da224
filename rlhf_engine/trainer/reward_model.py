"""Reward model: a transformer trunk + a scalar head, trained on preference pairs.

reward(prompt + response) = w · h + b, with the head the model package's ``ScalarHead`` (Linear(H, 1)) kept in
fp32 whatever the trunk's dtype, and h (H,) pooled from the trunk's final hidden states by ``pooling``:
  * "last" (the InstructGPT / OpenRLHF choice, the default): the hidden state at the LAST valid token of the
    sequence (any padding side; with the default ``append_eos`` that token is the EOS, as on a finished PPO
    rollout);
  * "response_mean": the mean over the response's tokens (its EOS included). On the project's VADER pairs
    (SmolLM2-135M, 8 samples of each of 97 prompts, all pairs; 831 pairs of 32 held-out prompts) a linear
    probe of the frozen trunk reached 0.71 held-out pairwise accuracy with this pooling and 0.59 with "last":
    a word-level preference is spread over the response, and the last position holds little of it until the
    trunk is trained. Fine-tuned whole, both reach about 0.67, but PPO gained VADER only against this one
    (benchmarks/RESULTS.md, "Reward model on the CPU").
A ``RewardModel`` is a token reward for PPO (``takes_tokens = True``, see ``rlhf_engine.rewards``):
``rm(input_ids, attention_mask) -> (B,)`` fp32, with ``response_mask=`` as well for "response_mean"
(``takes_response_mask``). Training minimizes the pairwise (Bradley-Terry) loss -log σ(r_chosen - r_rejected -
margin) of ``rlhf_engine.algo.pairwise_reward_loss``; by default the pairs of one prompt are trained together,
each distinct response forwarded once and each prompt weighing the same (InstructGPT's K(K-1)/2 comparisons of
K ranked samples as one batch element).

On disk (``save_reward_model``): a Hugging Face model directory for the trunk
(config.json + model.safetensors written by ``rlhf_engine.model.loading.save_pretrained``,
LoRA adapters merged; the LM head is kept so the directory also loads as a causal LM),
tokenizer files when given, ``score_head.safetensors`` (``weight`` (1, H), ``bias`` (1,),
fp32) and ``reward_model.json``. The directory is assembled under a temporary name and
renamed into place.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_engine.algo import pairwise_reward_loss
from rlhf_engine.data.datasets import collate_preference, last_token_index, load_preference_dataset
from rlhf_engine.model.heads import ScalarHead

from .optim import MasterWeightAdamW, check_training_args, finite_step, lr_schedule

HEAD_FILE = "score_head.safetensors"
META_FILE = "reward_model.json"
FORMAT = "rlhf_engine.reward_model"
POOLINGS = ("last", "response_mean")
_SCORE_POSITION = {"last": "last_valid_token", "response_mean": "response_mean"}  # reward_model.json names


class RewardModel(nn.Module):
    """``model`` (a CausalLM; only its trunk runs, its LM head is kept for saving) +
    ``score_head`` (a fp32 ``ScalarHead``: N(0, 1/(H+1)) weights, zero bias, unless given), pooled by
    ``pooling`` ("last" or "response_mean", see the module docstring).

    A token reward for PPO: ``rm(input_ids, attention_mask[, response_mask=])`` gives (B,) fp32 scores.
    """

    takes_tokens = True  # rlhf_engine.rewards protocol: called with (input_ids, attention_mask)

    def __init__(self, model: nn.Module, score_head: nn.Linear | None = None, pooling: str = "last"):
        super().__init__()
        if not hasattr(model, "hidden_states"):
            raise TypeError(f"model: expected a CausalLM (with hidden_states), got {type(model).__name__}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.model = model
        H = model.config.hidden_size
        if score_head is None:
            score_head = ScalarHead(H, bias=True, device=_device_of(model), dtype=torch.float32)
        if tuple(score_head.weight.shape) != (1, H):
            raise ValueError(f"score_head.weight: expected shape (1, {H}), got {tuple(score_head.weight.shape)}")
        self.score_head = score_head

    @property
    def config(self):
        return self.model.config

    @property
    def takes_response_mask(self) -> bool:
        """rlhf_engine.rewards protocol: PPO passes ``response_mask=`` (B, T) too."""
        return self.pooling == "response_mean"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                last_index: torch.Tensor | None = None, response_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards with autograd.

        input_ids: (B, T) int64; attention_mask: (B, T) 0/1, one contiguous valid run per row.
        last_index: (B,) int64 reward position for "last" pooling (default: each row's last valid token).
        response_mask: (B, T) 0/1, the response's tokens, for "response_mean" pooling (required there); a row
            with no response token reads its last valid token instead.
        Returns (B,) fp32. A row with no valid token reads position 0 (meaningless value).
        """
        if attention_mask is None or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got "
                             f"{None if attention_mask is None else tuple(attention_mask.shape)}")
        mean = self.pooling == "response_mean"
        if mean and (response_mask is None or tuple(response_mask.shape) != tuple(input_ids.shape)):
            raise ValueError(f"response_mask: expected shape {tuple(input_ids.shape)} for pooling='response_mean', "
                             f"got {None if response_mask is None else tuple(response_mask.shape)}")
        if last_index is None:
            last_index = last_token_index(attention_mask)
        B = input_ids.shape[0]
        hidden = self.model.hidden_states(input_ids, attention_mask)  # (B, T, H)
        idx = last_index.clamp(min=0).to(hidden.device)  # (B,)
        h = hidden[torch.arange(B, device=hidden.device), idx].float()  # (B, H)
        if mean:
            w = (response_mask.to(hidden.device).bool() & attention_mask.to(hidden.device).bool()).float()  # (B, T)
            n = w.sum(1, keepdim=True)  # (B, 1)
            pooled = torch.einsum("bt,bth->bh", w, hidden.float()) / n.clamp(min=1)  # fp32 sum over the response
            h = torch.where(n > 0, pooled, h)
        r = F.linear(h.to(self.score_head.weight.dtype), self.score_head.weight, self.score_head.bias)
        return r.squeeze(-1).float()  # (B,)

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              response_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids, (B, T) 0/1 mask [, (B, T) response mask] -> (B,) fp32 rewards, no grad."""
        return self.forward(input_ids, attention_mask, response_mask=response_mask)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# ============================================================================ save / load
def _atomic_swap(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, replacing an existing ``target`` (kept until the rename succeeds)."""
    backup = None
    if target.exists():
        backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, backup)
    try:
        os.rename(tmp, target)
    except OSError:
        if backup is not None:
            os.rename(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def save_reward_model(rm: RewardModel, directory: str | Path, tokenizer=None) -> Path:
    """Write ``rm`` as a HF-style directory + ``score_head.safetensors`` + ``reward_model.json`` (atomic).

    An existing directory is replaced. Returns the directory.
    """
    from safetensors.torch import save_file

    from rlhf_engine.model.loading import save_pretrained

    if not isinstance(rm, RewardModel):
        raise TypeError(f"rm: expected a RewardModel, got {type(rm).__name__}")
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.rm-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        save_pretrained(rm.model, tmp, tokenizer)
        head = {"weight": rm.score_head.weight.detach().float().cpu().contiguous(),
                "bias": (rm.score_head.bias.detach().float().cpu().contiguous() if rm.score_head.bias is not None
                         else torch.zeros(1))}
        save_file(head, str(tmp / HEAD_FILE), metadata={"format": "pt"})
        # version 2: "response_mean" pooling; readers from now on refuse versions they do not know
        meta = {"format": FORMAT, "version": 1 if rm.pooling == "last" else 2, "hidden_size": rm.config.hidden_size,
                "score_position": _SCORE_POSITION[rm.pooling], "head_dtype": "float32"}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _atomic_swap(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_reward_model(directory: str | Path, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu", attn_backend: str = "auto",
                      return_tokenizer: bool = False):
    """Load a directory written by :func:`save_reward_model`.

    Returns the RewardModel (in eval mode), or ``(rm, tokenizer)`` with ``return_tokenizer``
    (tokenizer None when the directory has none). The head stays fp32 whatever ``dtype``.
    """
    from safetensors.torch import load_file

    from rlhf_engine.model.loading import load_pretrained

    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"reward model directory not found: {path}")
    if not (path / HEAD_FILE).is_file():
        raise FileNotFoundError(f"{path / HEAD_FILE} does not exist: {path} is not a reward model directory "
                                "(written by save_reward_model)")
    backbone, tok = load_pretrained(path, dtype=dtype, device=device, attn_backend=attn_backend,
                                    load_tokenizer=return_tokenizer)
    head_sd = load_file(str(path / HEAD_FILE))
    H = backbone.config.hidden_size
    if tuple(head_sd["weight"].shape) != (1, H):
        raise ValueError(f"{path / HEAD_FILE}: weight has shape {tuple(head_sd['weight'].shape)}, expected (1, {H})")
    head = ScalarHead(H, bias=True, device=device, dtype=torch.float32)
    head.load_state_dict({k: v.to(device) for k, v in head_sd.items()})
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
    if meta.get("version", 1) not in (1, 2):
        raise ValueError(f"{path / META_FILE}: version {meta['version']!r} is newer than this rlhf_engine reads (1, 2)")
    position = meta.get("score_position", "last_valid_token")
    pooling = {v: k for k, v in _SCORE_POSITION.items()}.get(position)
    if pooling is None:
        raise ValueError(f"{path / META_FILE}: score_position: expected one of {sorted(_SCORE_POSITION.values())}, "
                         f"got {position!r}")
    rm = RewardModel(backbone, head, pooling=pooling).eval()
    return (rm, tok) if return_tokenizer else rm


# ============================================================================ training
def _as_reward_model(model_or_path: Any, tokenizer, device, dtype, copy_model: bool,
                     pooling: str | None = None) -> tuple[RewardModel, Any]:
    rm, tok = _load_or_wrap(model_or_path, tokenizer, device, dtype, copy_model, pooling or "last")
    if pooling is not None and rm.pooling != pooling:
        raise ValueError(f"pooling: the reward model pools by {rm.pooling!r}, got pooling={pooling!r}")
    return rm, tok


def _load_or_wrap(model_or_path: Any, tokenizer, device, dtype, copy_model: bool,
                  pooling: str) -> tuple[RewardModel, Any]:
    if isinstance(model_or_path, RewardModel):
        return model_or_path, tokenizer
    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        kw = dict(dtype=dtype or torch.float32, device=device or "cpu")
        if (path / HEAD_FILE).is_file():
            rm, tok = load_reward_model(path, return_tokenizer=True, **kw)
        else:
            from rlhf_engine.model.loading import load_pretrained

            backbone, tok = load_pretrained(path, **kw)
            rm = RewardModel(backbone, pooling=pooling)
        return rm, tokenizer if tokenizer is not None else tok
    if isinstance(model_or_path, nn.Module) and hasattr(model_or_path, "hidden_states"):
        lm = copy.deepcopy(model_or_path) if copy_model else model_or_path
        return RewardModel(lm.requires_grad_(True), pooling=pooling), tokenizer
    raise TypeError(f"model_or_path: expected a RewardModel, a CausalLM or a checkpoint path, got "
                    f"{type(model_or_path).__name__}")


def _prompt_groups(rows: list[dict]) -> dict[str, list[int]]:
    """prompt -> the indices of its rows, in order."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row["prompt"], []).append(i)
    return groups


def _split(pairs: list[dict], eval_fraction: float, gen: torch.Generator) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows; the held-out rows are all the pairs of a random ``eval_fraction`` of the prompts,
    so that no held-out pair shares its prompt (or a response) with a training pair. With a single prompt the
    pairs themselves are split (held-out pairs may then share responses with training pairs)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction: expected in [0, 1), got {eval_fraction}")
    groups = _prompt_groups(pairs)
    units = list(groups.values()) if len(groups) > 1 else [[i] for i in range(len(pairs))]
    order = torch.randperm(len(units), generator=gen).tolist()
    n_eval = 0 if eval_fraction == 0 or len(units) < 2 else max(1, round(eval_fraction * len(units)))
    n_eval = min(n_eval, len(units) - 1)
    held = {i for u in order[:n_eval] for i in units[u]}
    return [r for i, r in enumerate(pairs) if i not in held], [r for i, r in enumerate(pairs) if i in held]


def _pair_rewards(rm: RewardModel, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), (B,) each, from a ``collate_preference`` batch (each of its rows forwarded once)."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    response_mask = None
    if rm.pooling == "response_mean":
        j = torch.arange(ids.shape[1])
        response_mask = (j[None, :] >= batch["response_start"][:, None]).to(device) & mask.bool()
    r = rm(ids, mask, batch["last_index"].to(device), response_mask=response_mask)  # (R,)
    return r[batch["chosen_index"].to(device)], r[batch["rejected_index"].to(device)]


def _micro_batches(rows: list[dict], batch_size: int, group_by_prompt: bool, gen: torch.Generator) -> list[list[int]]:
    """One epoch's micro-batches of row indices (at most ``batch_size`` pairs each).

    group_by_prompt: the prompts are shuffled, then the pairs of each; whole prompts are packed into a
    micro-batch while they fit, and a prompt with more than ``batch_size`` pairs fills micro-batches of its
    own. Otherwise the pairs are shuffled alone and cut into consecutive micro-batches.
    """
    if not group_by_prompt:
        order = torch.randperm(len(rows), generator=gen).tolist()
        return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    groups = _prompt_groups(rows)
    keys = list(groups)
    micro: list[list[int]] = []
    current: list[int] = []
    for g in torch.randperm(len(keys), generator=gen).tolist():
        members = groups[keys[g]]
        members = [members[i] for i in torch.randperm(len(members), generator=gen).tolist()]
        if len(current) + len(members) > batch_size and current:
            micro.append(current)
            current = []
        while len(members) > batch_size:
            micro.append(members[:batch_size])
            members = members[batch_size:]
        current += members
    if current:
        micro.append(current)
    return micro


@torch.no_grad()
def evaluate_reward_model(rm: RewardModel, tokenizer, pairs: Any, *, batch_size: int = 16, max_len: int = 512,
                          use_margin: bool = True, chat_template: bool = False, append_eos: bool = True,
                          device: torch.device | str | None = None) -> dict:
    """Pairwise accuracy (r_chosen > r_rejected), mean loss and mean rewards over ``pairs`` (path or rows)."""
    rows = load_preference_dataset(pairs)
    device = torch.device(device) if device is not None else _device_of(rm)
    chosen, rejected, margins = [], [], []
    for i in range(0, len(rows), batch_size):
        batch = collate_preference(tokenizer, rows[i: i + batch_size], max_len, chat_template=chat_template,
                                   append_eos=append_eos, dedup=True)
        rc, rr = _pair_rewards(rm, batch, device)
        chosen.append(rc)
        rejected.append(rr)
        m = batch["margin"] if (use_margin and batch["margin"] is not None) else torch.zeros(rc.shape[0])
        margins.append(m.to(device))
    rc, rr, m = torch.cat(chosen), torch.cat(rejected), torch.cat(margins)
    loss, acc = pairwise_reward_loss(rc, rr, m)
    return {"accuracy": float(acc), "loss": float(loss), "chosen_mean": float(rc.mean()),
            "rejected_mean": float(rr.mean()), "n_pairs": len(rows)}


def train_reward_model(model_or_path: Any, tokenizer, pairs: Any, *, eval_fraction: float = 0.1, epochs: int = 1,
                       batch_size: int = 8, lr: float = 1e-5, max_len: int = 512, use_margin: bool = True,
                       lora: dict | None = None, grad_accum: int = 1, max_steps: int | None = None,
                       weight_decay: float = 0.0, max_grad_norm: float | None = 1.0, warmup_steps: int = 0,
                       schedule: str = "constant", chat_template: bool = False, append_eos: bool = True,
                       gradient_checkpointing: bool = False, copy_model: bool = True,
                       pooling: str | None = None, group_by_prompt: bool = True, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None, seed: int = 0,
                       log_fn: Callable[[int, dict], None] | None = None, progress: bool = True) -> dict:
    """Train a reward model on preference pairs with -log σ(r_c - r_r - margin).

    Args:
        model_or_path: a RewardModel (trained further, in place), a CausalLM (copied unless
            ``copy_model=False``, so a policy passed here is left untouched, then given a new
            head) or a directory (a saved reward model, or a HF causal-LM checkpoint loaded with
            ``dtype``/``device`` and given a new head).
        tokenizer: a transformers tokenizer; None takes the checkpoint's when a path is given.
        pairs: a path or a list of rows, see ``rlhf_engine.data.load_preference_dataset``.
        eval_fraction: share of the prompts whose pairs are held out (drawn with ``seed``) for the accuracy.
        epochs, batch_size (pairs per micro-batch), lr, grad_accum, max_steps, weight_decay,
            max_grad_norm, warmup_steps, schedule: as in ``train_sft``.
        max_len: tokens of prompt + response (+ EOS); use_margin: subtract each row's margin.
        lora: None (full fine-tune of trunk + head) or ``apply_lora`` keyword arguments (the
            trunk is frozen except the adapters; the head always trains).
        chat_template: render prompts as a chat user turn; append_eos: reward read on an EOS.
        pooling: "last" or "response_mean" for a new head (None: "last", or the given reward model's own).
        group_by_prompt: train a prompt's comparisons together, as InstructGPT does with the K(K-1)/2
            comparisons of K ranked samples: whole prompts are packed into micro-batches of at most
            ``batch_size`` pairs (a larger prompt fills micro-batches of its own), each distinct response is
            forwarded once, and each pair weighs 1 / (its prompt's number of pairs), so every prompt counts
            the same (exactly when each prompt's pairs fit in one micro-batch, ``batch_size`` pairs: a prompt is
            then never split across steps; the step loss is the weighted mean over the step's pairs). A sample
            in K-1 pairs is then one row of one step, not K-1 rows spread over the epoch, which overfits.
            False: pairs shuffled alone, each weighing the same.
        device: default the model's. seed: split, shuffling, head init. log_fn(step, metrics).
    Returns:
        summary dict: ``reward_model`` (the trained RewardModel), ``tokenizer``, ``train_loss``
        and ``train_accuracy`` (per optimizer step), ``eval`` (evaluate_reward_model's dict on the
        held-out pairs, None without any), ``eval_accuracy`` (float or None), ``eval_per_epoch``,
        ``steps``, ``skipped_steps`` (steps whose loss or gradient was not finite: no update), ``n_train``,
        ``n_eval``, ``time_s``, ``pairs_per_s``.
    """
    device = check_training_args(epochs, batch_size, grad_accum, max_steps, device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rm, tokenizer = _as_reward_model(model_or_path, tokenizer, device, dtype, copy_model, pooling)
    if tokenizer is None:
        raise ValueError("tokenizer: expected a tokenizer (the checkpoint has none), got None")
    device = torch.device(device) if device is not None else _device_of(rm)
    rm.to(device)
    rows = load_preference_dataset(pairs)
    train_rows, eval_rows = _split(rows, eval_fraction, gen)
    if lora is not None:
        from rlhf_engine.model.lora import apply_lora

        if not isinstance(lora, dict):
            raise TypeError(f"lora: expected None or a dict of apply_lora arguments, got {type(lora).__name__}")
        apply_lora(rm.model, **lora)
    rm.model.gradient_checkpointing = gradient_checkpointing
    opt = MasterWeightAdamW(rm.parameters(), lr=lr, weight_decay=weight_decay)
    plan = [_micro_batches(train_rows, batch_size, group_by_prompt, gen) for _ in range(epochs)]
    all_steps = sum(math.ceil(len(micro) / grad_accum) for micro in plan)
    total_steps = all_steps if max_steps is None else min(max_steps, all_steps)
    # group_by_prompt: each prompt's pairs share one unit of weight (InstructGPT divides a prompt's loss by its
    # number of comparisons), so a prompt with 28 ranked pairs does not count 28 times one with a single pair
    pair_weight = [1.0] * len(train_rows)
    if group_by_prompt:
        for members in _prompt_groups(train_rows).values():
            for i in members:
                pair_weight[i] = 1.0 / len(members)
    sched = lr_schedule(opt, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps)
    ev_kw = dict(batch_size=2 * batch_size, max_len=max_len, use_margin=use_margin, chat_template=chat_template,
                 append_eos=append_eos, device=device)

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc="reward model", disable=not progress, dynamic_ncols=True)
    summary: dict[str, Any] = {"train_loss": [], "train_accuracy": [], "eval_per_epoch": [], "skipped_steps": 0,
                               "n_train": len(train_rows), "n_eval": len(eval_rows)}
    was_training = rm.training
    t0 = time.perf_counter()
    step, n_pairs = 0, 0
    for micro in plan:
        if step >= total_steps:
            break
        rm.train()
        for s in range(0, len(micro), grad_accum):
            if step >= total_steps:
                break
            group = micro[s: s + grad_accum]
            n_step = sum(len(g) for g in group)
            w_step = sum(pair_weight[i] for g in group for i in g)
            opt.zero_grad()
            loss_sum = torch.zeros((), device=device)
            acc_sum = torch.zeros((), device=device)
            for idx in group:
                batch = collate_preference(tokenizer, [train_rows[i] for i in idx], max_len,
                                           chat_template=chat_template, append_eos=append_eos, dedup=True)
                rc, rr = _pair_rewards(rm, batch, device)
                margin = batch["margin"].to(device) if (use_margin and batch["margin"] is not None) else None
                weights = [pair_weight[i] for i in idx]
                loss, acc = pairwise_reward_loss(rc, rr, margin, weight=torch.tensor(weights, device=device))
                w = sum(weights) / w_step  # the weighted pair mean over the whole optimizer step
                (loss * w).backward()
                loss_sum += loss.detach() * w
                acc_sum += acc * (len(idx) / n_step)  # the pair mean, as the held-out accuracy
            grad_norm = opt.clip_grad_norm_(max_grad_norm)
            loss_f, acc_f, gn_f = torch.stack([loss_sum, acc_sum, grad_norm.to(loss_sum)]).tolist()  # one sync
            summary["skipped_steps"] += not finite_step(opt, sched, loss_f, gn_f)
            step += 1
            n_pairs += n_step
            metrics = {"loss": loss_f, "accuracy": acc_f, "grad_norm": gn_f, "lr": sched.get_last_lr()[0]}
            summary["train_loss"].append(metrics["loss"])
            summary["train_accuracy"].append(metrics["accuracy"])
            if log_fn is not None:
                log_fn(step, metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}")
        if eval_rows:
            rm.eval()
            summary["eval_per_epoch"].append(evaluate_reward_model(rm, tokenizer, eval_rows, **ev_kw))
    bar.close()
    opt.release()  # the fp32 masters and moments go with this run
    dt = time.perf_counter() - t0
    rm.train(was_training)
    ev = summary["eval_per_epoch"][-1] if summary["eval_per_epoch"] else None
    summary.update(reward_model=rm, tokenizer=tokenizer, eval=ev, eval_accuracy=None if ev is None else ev["accuracy"],
                   steps=step, time_s=dt, pairs_per_s=n_pairs / max(dt, 1e-9))
    return summary


__all__ = ["RewardModel", "evaluate_reward_model", "load_reward_model", "save_reward_model", "train_reward_model"]
