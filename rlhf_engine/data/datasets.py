"""Datasets for SFT, reward-model and PPO training: loading, validation, tokenization, collation.

Sources
-------
Every ``load_*`` function takes one of:
  * a ``.jsonl`` file: one JSON object per line (blank lines are skipped);
  * a ``.json`` file holding a list of such objects;
  * a ``.txt`` file (prompts only): one prompt per non-blank line;
  * a directory written by Hugging Face ``datasets`` (``Dataset.save_to_disk``), read with
    ``datasets.load_from_disk``; the ``datasets`` package is imported only then (it is not
    a dependency of rlhf_engine). For a ``DatasetDict`` pass ``split`` (default "train");
  * an in-memory list (or any iterable) of such rows.

Schemas (extra fields are ignored)
----------------------------------
SFT, either form per row:
  ``{"prompt": str, "response": str}``: the loss is on the response tokens and an EOS
    appended to them; the prompt is masked.
  ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``: rendered
    with the tokenizer's chat template; the loss is on the assistant turns only (their text
    and the template's end-of-turn tokens). At least one assistant turn is required.
Preference: ``{"prompt": str, "chosen": str, "rejected": str, "margin": float (optional)}``;
  the pairwise loss is -log σ(r_chosen - r_rejected - margin), a missing margin is 0.
Prompts (PPO): ``{"prompt": str}`` per JSONL row, or a ``.txt`` file with one prompt per line.

A malformed row raises ``ValueError("<file>: row <n> (line <l>): field '<name>': expected ...")``
(rows count from 1, blank lines not counted); a missing file raises FileNotFoundError.

Tokenization conventions
------------------------
Prompt and response are tokenized separately (``add_special_tokens=False``; a BOS is
prepended to the prompt when the tokenizer's ``add_bos_token`` is set) and concatenated.
``chat_template=True`` wraps a plain prompt as one user message rendered with the
tokenizer's chat template and its generation prompt. Too-long examples are cut to
``max_len`` by :func:`truncate_pair`. ``labels_mask[t]`` is True where token t is a
training target; the trainer predicts token t from positions < t, so the loss at
position t - 1 uses target ``input_ids[t]`` when ``labels_mask[t]``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf_engine.algo.gae import last_valid_index

CHAT_ROLES = ("system", "user", "assistant")


# ============================================================================ loading
def _where(source: str, row: int, line: int | None) -> str:
    return f"{source}: row {row}" + (f" (line {line})" if line is not None else "")


def _read_rows(source: Any, split: str | None, allow_txt: bool) -> tuple[str, list[tuple[int, int | None, Any]]]:
    """-> (source name, [(row number, line number or None, raw row)])."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"dataset not found: {path}")
        if path.is_dir():
            return str(path), [(i + 1, None, r) for i, r in enumerate(_load_hf_from_disk(path, split))]
        suffix = path.suffix.lower()
        text = path.read_text(encoding="utf-8")
        if suffix == ".txt":
            if not allow_txt:
                raise ValueError(f"{path}: a .txt file holds prompts only; expected a .jsonl or .json file here")
            rows, n = [], 0
            for lineno, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    n += 1
                    rows.append((n, lineno, {"prompt": line.rstrip("\r")}))
            return str(path), rows
        if suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON: {e}") from None
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
            return str(path), [(i + 1, None, r) for i, r in enumerate(data)]
        if suffix != ".jsonl":
            raise ValueError(f"{path}: expected a .jsonl, .json or .txt file or a dataset directory, "
                             f"got suffix {suffix!r}")
        rows, n = [], 0
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            n += 1
            try:
                rows.append((n, lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{_where(str(path), n, lineno)}: invalid JSON: {e.msg}") from None
        return str(path), rows
    if isinstance(source, dict):
        raise TypeError("dataset: expected a path or a list of rows, got a single dict")
    if isinstance(source, Iterable):
        return "<rows>", [(i + 1, None, r) for i, r in enumerate(source)]
    raise TypeError(f"dataset: expected a path (str/Path) or a list of rows, got {type(source).__name__}")


def _load_hf_from_disk(path: Path, split: str | None) -> list[dict]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{path} is a directory: reading a Hugging Face dataset saved with save_to_disk needs "
                          "the 'datasets' package (pip install datasets), which rlhf_engine does not install") from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        name = split or "train"
        if name not in ds:
            raise ValueError(f"{path}: split {name!r} not found; available splits: {sorted(ds.keys())}")
        ds = ds[name]
    elif split not in (None, "train"):
        raise ValueError(f"{path}: holds a single Dataset, not a DatasetDict; got split={split!r}")
    return list(ds)


def _field(row: Any, name: str, where: str, *, required: bool = True) -> Any:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if name not in row or row[name] is None:
        if required:
            raise ValueError(f"{where}: field '{name}': missing (keys present: {sorted(row)})")
        return None
    return row[name]


def _str_field(row: Any, name: str, where: str, *, non_empty: bool = False) -> str:
    v = _field(row, name, where)
    if not isinstance(v, str):
        raise ValueError(f"{where}: field '{name}': expected a string, got {type(v).__name__}")
    if non_empty and not v.strip():
        raise ValueError(f"{where}: field '{name}': expected a non-empty string, got {v!r}")
    return v


def _validate_messages(row: dict, where: str) -> list[dict]:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: field 'messages': expected a non-empty list of "
                         f"{{'role', 'content'}} objects, got {msgs!r:.80}")
    out = []
    for j, m in enumerate(msgs):
        f = f"messages[{j}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where}: field '{f}': expected an object with 'role' and 'content', "
                             f"got {type(m).__name__}")
        if m.get("role") not in CHAT_ROLES:
            raise ValueError(f"{where}: field '{f}.role': expected one of {CHAT_ROLES}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: field '{f}.content': expected a string, got "
                             f"{type(m.get('content')).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: field 'messages': expected at least one 'assistant' turn (the loss is on them)")
    return out


def load_sft_dataset(source: Any, *, split: str | None = None) -> list[dict]:
    """Validated SFT rows: ``{"prompt", "response"}`` or ``{"messages"}`` dicts (see the module docstring)."""
    name, rows = _read_rows(source, split, allow_txt=False)
    out = []
    for n, line, row in rows:
        where = _where(name, n, line)
        if isinstance(row, dict) and row.get("messages") is not None:
            out.append({"messages": _validate_messages(row, where)})
        else:
            out.append({"prompt": _str_field(row, "prompt", where), "response": _str_field(row, "response", where)})
    if not out:
        raise ValueError(f"{name}: the SFT dataset is empty")
    return out


def load_preference_dataset(source: Any, *, split: str | None = None) -> list[dict]:
    """Validated preference rows ``{"prompt", "chosen", "rejected", "margin" (float or None)}``."""
    name, rows = _read_rows(source, split, allow_txt=False)
    out = []
    for n, line, row in rows:
        where = _where(name, n, line)
        ex = {"prompt": _str_field(row, "prompt", where), "chosen": _str_field(row, "chosen", where),
              "rejected": _str_field(row, "rejected", where), "margin": None}
        margin = _field(row, "margin", where, required=False)
        if margin is not None:
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                raise ValueError(f"{where}: field 'margin': expected a finite number, got {margin!r}")
            ex["margin"] = float(margin)
        out.append(ex)
    if not out:
        raise ValueError(f"{name}: the preference dataset is empty")
    return out


def load_prompt_dataset(source: Any, *, split: str | None = None) -> list[str]:
    """Validated prompts (non-empty strings) from JSONL ``{"prompt"}`` rows, a .txt file or a list of strings."""
    if not isinstance(source, (str, Path, dict)) and isinstance(source, Iterable):
        source = [{"prompt": r} if isinstance(r, str) else r for r in source]
    name, rows = _read_rows(source, split, allow_txt=True)
    out = [_str_field(row, "prompt", _where(name, n, line), non_empty=True) for n, line, row in rows]
    if not out:
        raise ValueError(f"{name}: the prompt dataset is empty")
    return out


# ============================================================================ tokenization
def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens added (special-token strings in the text are kept)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is always masked, so its value is free)."""
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise ValueError("tokenizer: expected an eos_token_id (appended to every response), got None")
    return int(eos)


def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer: chat data (messages / chat_template=True) needs a tokenizer with a chat "
                         "template, got one whose chat_template is None")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_ids(tokenizer, prompt: str, *, chat_template: bool = False) -> list[int]:
    """Token ids of a prompt: raw (BOS first when ``tokenizer.add_bos_token``) or as a chat user turn."""
    if chat_template:
        return encode_text(tokenizer, _render_chat(tokenizer, [{"role": "user", "content": prompt}], True))
    ids = encode_text(tokenizer, prompt)
    bos = getattr(tokenizer, "bos_token_id", None)
    if getattr(tokenizer, "add_bos_token", False) and bos is not None and (not ids or ids[0] != bos):
        ids = [int(bos)] + ids
    return ids


def truncate_pair(prompt: list[int], response: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Cut prompt + response to ``max_len`` tokens.

    The response keeps max(max_len - len(prompt), min(len(response), max_len // 2)) tokens
    (its start); the prompt keeps the rest of the budget from its end (the tokens nearest
    the response). A truncated response loses its EOS, which is then not trained.
    """
    if max_len < 2:
        raise ValueError(f"max_len: expected >= 2, got {max_len}")
    if len(prompt) + len(response) <= max_len:
        return prompt, response
    keep_r = max(max_len - len(prompt), min(len(response), max_len // 2))
    keep_p = max_len - keep_r
    return (prompt[len(prompt) - keep_p:] if keep_p > 0 else []), response[:keep_r]


def _chat_example(tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[bool]]:
    """Render a conversation; mark the tokens of each assistant turn (text + end-of-turn tokens).

    The text is cut at the turn boundaries given by rendering message prefixes (the
    generation prompt before each assistant turn, the end of that turn) and each piece is
    tokenized separately, which equals tokenizing the whole text when the template's turn
    markers are special tokens (true of the usual templates).
    """
    full = _render_chat(tokenizer, messages, False)
    cuts: list[tuple[int, int]] = []  # [start, end) character spans of the assistant turns
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = _render_chat(tokenizer, messages[: i + 1], False)
        if i:
            before = _render_chat(tokenizer, messages[:i], True)
        else:  # an opening assistant turn: an empty conversation cannot be rendered, find its text
            before = upto[: max(upto.find(m["content"]), 0)] if m["content"] else ""
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValueError("tokenizer.chat_template: rendering a prefix of the conversation does not give a "
                             "prefix of the full text, so assistant turns cannot be located")
        cuts.append((len(before), len(upto)))
    ids: list[int] = []
    mask: list[bool] = []
    pos = 0
    for a, b in cuts:
        for lo, hi, train in ((pos, a, False), (a, b, True)):
            if hi > lo:
                piece = encode_text(tokenizer, full[lo:hi])
                ids += piece
                mask += [train] * len(piece)
        pos = b
    if pos < len(full):
        piece = encode_text(tokenizer, full[pos:])
        ids += piece
        mask += [False] * len(piece)
    return ids[:max_len], mask[:max_len]


def tokenize_sft_example(tokenizer, example: dict, max_len: int, *,
                         chat_template: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One SFT row -> (input_ids (L,) int64, labels_mask (L,) bool), L <= max_len.

    ``{"prompt", "response"}``: prompt ids (masked) + response ids + EOS (trained), cut
    by :func:`truncate_pair`. ``{"messages"}``: see :func:`_chat_example` (right-truncated).
    ``chat_template`` renders a plain prompt as a chat user turn + generation prompt.
    """
    if "messages" in example and example["messages"] is not None:
        ids, mask = _chat_example(tokenizer, example["messages"], max_len)
    else:
        p = prompt_ids(tokenizer, example["prompt"], chat_template=chat_template)
        r = encode_text(tokenizer, example["response"]) + [_eos_id(tokenizer)]
        p, r = truncate_pair(p, r, max_len)
        ids, mask = p + r, [False] * len(p) + [True] * len(r)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)


def pad_sft_batch(examples: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels_mask) pairs into a batch.

    Returns ``input_ids`` (B, T) int64 (pad_id in padding), ``attention_mask`` (B, T) int64
    0/1 and ``labels_mask`` (B, T) bool (False in padding), T = the longest example.
    """
    if not examples:
        raise ValueError("examples: expected at least one example, got an empty list")
    T = max(len(ids) for ids, _ in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    labels_mask = torch.zeros(B, T, dtype=torch.bool)
    for i, (ids, m) in enumerate(examples):
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
        labels_mask[i, : len(ids)] = m
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels_mask": labels_mask}


def pack_examples(examples: Sequence[tuple[torch.Tensor, torch.Tensor]], seq_len: int,
                  pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Concatenate short examples into rows of ``seq_len`` tokens ("naive packing").

    Examples are placed in order; one that does not fit in the current row starts a new
    row (an example longer than ``seq_len`` is cut to it). The first token of every
    segment is never a target, so no loss term predicts across a segment boundary.
    Honest trade-off: attention is NOT isolated per segment (our attention kernels take
    one contiguous valid run per row, not a block-diagonal mask), so a token also sees the
    earlier examples of its row, and positions run 0..seq_len-1 across the row. This is
    the usual throughput-for-purity trade of packed SFT; use ``packing=False`` when it matters.

    Returns ``input_ids`` (R, seq_len) int64, ``attention_mask`` (R, seq_len) int64 (0 only in
    the right padding of the last rows), ``labels_mask`` (R, seq_len) bool and
    ``segment_ids`` (R, seq_len) int32 (1, 2, ... per example within a row, 0 in padding).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len: expected >= 2, got {seq_len}")
    rows: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[]]
    used = 0
    for ids, m in examples:
        ids, m = ids[:seq_len], m[:seq_len]
        if len(ids) == 0:
            continue
        if used + len(ids) > seq_len and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append((ids, m))
        used += len(ids)
    if not rows[-1]:
        raise ValueError("examples: expected at least one non-empty example")
    R = len(rows)
    input_ids = torch.full((R, seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(R, seq_len, dtype=torch.long)
    labels_mask = torch.zeros(R, seq_len, dtype=torch.bool)
    segment_ids = torch.zeros(R, seq_len, dtype=torch.int32)
    for r, row in enumerate(rows):
        pos = 0
        for s, (ids, m) in enumerate(row, start=1):
            n = len(ids)
            input_ids[r, pos: pos + n] = ids
            attention_mask[r, pos: pos + n] = 1
            labels_mask[r, pos: pos + n] = m
            labels_mask[r, pos] = False  # its prediction would come from the previous segment
            segment_ids[r, pos: pos + n] = s
            pos += n
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels_mask": labels_mask,
            "segment_ids": segment_ids}


# ============================================================================ preference / prompt collation
# (B, T) 0/1 mask -> (B,) int64 index of each row's last valid token (any padding side); -1 if empty.
last_token_index = last_valid_index


def collate_preference(tokenizer, examples: Sequence[dict], max_len: int, *, chat_template: bool = False,
                       append_eos: bool = True, dedup: bool = False) -> dict[str, torch.Tensor | None]:
    """Tokenize B preference pairs into one right-padded batch of sequences.

    Without ``dedup``: 2B rows, [0, B) prompt + chosen and [B, 2B) prompt + rejected. With ``dedup``: each
    distinct (prompt, response) once, in order of first appearance (the K samples of a prompt ranked into
    K(K-1)/2 pairs cost K rows, not K(K-1)). Each row is followed by EOS when ``append_eos`` (so the reward
    sits on the EOS, as on a finished PPO rollout) and cut by :func:`truncate_pair`.

    Returns ``input_ids`` (R, T) int64, ``attention_mask`` (R, T) int64 0/1, ``last_index`` (R,) int64
    (each row's last valid token), ``response_start`` (R,) int64 (the row's first response token; equal to
    ``last_index + 1`` when the response was cut to nothing), ``chosen_index`` and ``rejected_index`` (B,)
    int64 (pair i's rows) and ``margin`` (B,) float32 (0 where a row has none), or None when no example has
    a margin.
    """
    if not examples:
        raise ValueError("examples: expected at least one preference pair, got an empty list")
    eos = [_eos_id(tokenizer)] if append_eos else []
    seqs: list[list[int]] = []
    starts: list[int] = []
    row_of: dict[tuple[str, str], int] = {}
    index: dict[str, list[int]] = {"chosen": [], "rejected": []}
    for key in ("chosen", "rejected"):
        for ex in examples:
            if dedup and (ex["prompt"], ex[key]) in row_of:
                index[key].append(row_of[(ex["prompt"], ex[key])])
                continue
            p = prompt_ids(tokenizer, ex["prompt"], chat_template=chat_template)
            p, r = truncate_pair(p, encode_text(tokenizer, ex[key]) + eos, max_len)
            if not p + r:
                raise ValueError(f"examples: prompt + {key} tokenized to nothing (prompt {ex['prompt']!r:.60})")
            row_of[(ex["prompt"], ex[key])] = len(seqs)
            index[key].append(len(seqs))
            seqs.append(p + r)
            starts.append(len(p))
    T = max(len(s) for s in seqs)
    pad = pad_token_id(tokenizer)
    input_ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = 1
    margins = [ex.get("margin") for ex in examples]
    margin = None
    if any(m is not None for m in margins):
        margin = torch.tensor([0.0 if m is None else float(m) for m in margins], dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "last_index": attention_mask.sum(1) - 1, "response_start": torch.tensor(starts, dtype=torch.long),
            "chosen_index": torch.tensor(index["chosen"], dtype=torch.long),
            "rejected_index": torch.tensor(index["rejected"], dtype=torch.long), "margin": margin}


def collate_prompts(tokenizer, prompts: Sequence[str], max_len: int, *,
                    chat_template: bool = False) -> dict[str, torch.Tensor]:
    """LEFT-pad tokenized prompts for generation (long prompts keep their last ``max_len`` tokens).

    Returns ``input_ids`` (B, P) int64 and ``attention_mask`` (B, P) int64 0/1, each row's
    valid tokens at the end (the layout ``CausalLM.prefill`` expects).
    """
    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got an empty list")
    seqs = [prompt_ids(tokenizer, p, chat_template=chat_template)[-max_len:] for p in prompts]
    for p, s in zip(prompts, seqs):
        if not s:
            raise ValueError(f"prompts: {p!r:.60} tokenized to nothing")
    P = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), P), pad_token_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), P, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, P - len(s):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


__all__ = [
    "CHAT_ROLES", "collate_preference", "collate_prompts", "encode_text", "last_token_index", "load_preference_dataset",
    "load_prompt_dataset", "load_sft_dataset", "pack_examples", "pad_sft_batch", "pad_token_id", "prompt_ids",
    "tokenize_sft_example", "truncate_pair",
]
