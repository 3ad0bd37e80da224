"""Datasets: loading + validation errors, tokenization masks, packing, preference/prompt collation."""
import json
import sys
from pathlib import Path

import pytest
import torch

from rlhf_engine.data import (byte_tokenizer, collate_preference, collate_prompts, last_token_index,
                              load_preference_dataset, load_prompt_dataset, load_sft_dataset, pack_examples,
                              pad_sft_batch, tokenize_sft_example, truncate_pair)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------- loading
def test_example_files_load():
    sft = load_sft_dataset(EXAMPLES / "sft.jsonl")
    assert any("messages" in r for r in sft) and any("response" in r for r in sft)
    pref = load_preference_dataset(EXAMPLES / "preferences.jsonl")
    assert {type(r["margin"]) for r in pref} == {float, type(None)}
    assert load_prompt_dataset(EXAMPLES / "prompts.jsonl") == load_prompt_dataset(EXAMPLES / "prompts.txt")


def test_json_list_and_in_memory_rows(tmp_path):
    rows = [{"prompt": "p", "response": "r", "extra": 1}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert load_sft_dataset(tmp_path / "d.json") == [{"prompt": "p", "response": "r"}]
    assert load_sft_dataset(rows) == [{"prompt": "p", "response": "r"}]
    assert load_prompt_dataset(["a", "b"]) == ["a", "b"]


@pytest.mark.parametrize("loader, rows, row, field", [
    (load_sft_dataset, [{"prompt": "a", "response": "b"}, {"prompt": "a"}], 2, "response"),
    (load_sft_dataset, [{"prompt": 3, "response": "b"}], 1, "prompt"),
    (load_sft_dataset, [{"prompt": "a", "response": "b"}, "", {"messages": [{"role": "bot", "content": "x"}]}],
     2, "messages[0].role"),
    (load_sft_dataset, [{"messages": [{"role": "user", "content": "x"}]}], 1, "messages"),
    (load_sft_dataset, [{"messages": [{"role": "assistant", "content": None}]}], 1, "messages[0].content"),
    (load_preference_dataset, [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c"}],
     2, "rejected"),
    (load_preference_dataset, [{"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}], 1, "margin"),
    (load_preference_dataset, [{"prompt": "p", "chosen": ["c"], "rejected": "r"}], 1, "chosen"),
    (load_prompt_dataset, [{"prompt": "ok"}, {"prompt": "  "}], 2, "prompt"),
    (load_prompt_dataset, [{"text": "no prompt"}], 1, "prompt"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, loader, rows, row, field):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError) as e:
        loader(path)
    msg = str(e.value)
    assert str(path) in msg and f"row {row}" in msg and f"field '{field}'" in msg, msg


def test_invalid_json_line_and_non_object(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a"}, "{not json"])
    with pytest.raises(ValueError, match=r"x\.jsonl: row 2 \(line 2\): invalid JSON"):
        load_prompt_dataset(path)
    path = _write_jsonl(tmp_path / "y.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"row 1 .*expected a JSON object, got list"):
        load_sft_dataset(path)


def test_missing_file_and_wrong_suffix(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_sft_dataset(missing)
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="suffix '.csv'"):
        load_preference_dataset(tmp_path / "a.csv")
    (tmp_path / "p.txt").write_text("x\n")
    with pytest.raises(ValueError, match="prompts only"):
        load_sft_dataset(tmp_path / "p.txt")


def test_hf_directory_without_datasets_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match="'datasets' package"):
        load_preference_dataset(tmp_path)


def test_hf_load_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the optional 'datasets' package is not installed")
    rows = [{"prompt": "p1", "chosen": "c", "rejected": "r", "margin": None},
            {"prompt": "p2", "chosen": "c", "rejected": "r", "margin": 0.5}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert load_preference_dataset(tmp_path / "ds") == rows
    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"prompt": "q"}])}).save_to_disk(str(tmp_path / "dd"))
    assert load_prompt_dataset(tmp_path / "dd", split="test") == ["q"]
    with pytest.raises(ValueError, match="split 'train' not found"):
        load_prompt_dataset(tmp_path / "dd")


# ---------------------------------------------------------------------------- tokenization
def test_sft_example_masks_prompt_and_appends_eos(tok):
    ids, mask = tokenize_sft_example(tok, {"prompt": "Hi ", "response": "yo"}, 64)
    assert ids.tolist() == tok.encode("Hi yo", add_special_tokens=False) + [tok.eos_token_id]
    assert mask.tolist() == [False] * 3 + [True] * 3


def test_chat_example_trains_assistant_turns_only(tok):
    ex = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "yo"}, {"role": "user", "content": "q"},
                       {"role": "assistant", "content": "ok"}]}
    ids, mask = tokenize_sft_example(tok, ex, 128)
    text = tok.apply_chat_template(ex["messages"], tokenize=False)
    assert ids.tolist() == tok.encode(text, add_special_tokens=False)
    trained = tok.decode(ids[mask].tolist())
    assert trained == "yo</s>ok</s>"


def test_truncation_keeps_prompt_end_and_response_start():
    p, r = truncate_pair(list(range(10)), list(range(100, 110)), 8)
    assert p == [6, 7, 8, 9] and r == [100, 101, 102, 103]
    p, r = truncate_pair([1, 2], list(range(100, 110)), 8)
    assert p == [1, 2] and r == list(range(100, 106))
    assert truncate_pair([1], [2], 8) == ([1], [2])


def test_pad_batch(tok):
    exs = [tokenize_sft_example(tok, {"prompt": "a", "response": "bcd"}, 64),
           tokenize_sft_example(tok, {"prompt": "xyz", "response": "w" * 5}, 64)]
    b = pad_sft_batch(exs, tok.pad_token_id)
    assert b["input_ids"].shape == (2, 9)
    assert b["attention_mask"].sum(1).tolist() == [5, 9]
    assert not b["labels_mask"][0, 5:].any() and b["labels_mask"][0].sum() == 4


def test_pack_examples_segments_and_boundaries(tok):
    exs = [tokenize_sft_example(tok, {"prompt": "p" * k, "response": "r" * (k + 1)}, 64) for k in range(1, 8)]
    packed = pack_examples(exs, 16, pad_id=0)
    ids, mask, seg, attn = packed["input_ids"], packed["labels_mask"], packed["segment_ids"], packed["attention_mask"]
    assert ids.shape[1] == 16
    # every token of every example is there once, in order
    flat = torch.cat([ids[r][attn[r].bool()] for r in range(ids.shape[0])])
    assert flat.tolist() == torch.cat([e[0] for e in exs]).tolist()
    assert ((seg > 0) == attn.bool()).all()
    for r in range(ids.shape[0]):
        starts = torch.nonzero(torch.diff(seg[r], prepend=seg[r, :1] - 1) != 0).flatten()
        for s in starts.tolist():
            assert not mask[r, s]  # no target crosses a segment boundary
    assert mask.sum() == sum(int(m[1:].sum()) for _, m in exs)  # examples start with a prompt token here


def test_pack_drops_nothing_when_prompt_is_empty(tok):
    exs = [tokenize_sft_example(tok, {"prompt": "", "response": "ab"}, 64) for _ in range(3)]
    packed = pack_examples(exs, 9)
    assert packed["input_ids"].shape == (1, 9)
    assert packed["labels_mask"][0].tolist() == [False, True, True] * 3


def test_collate_preference(tok):
    rows = [{"prompt": "Q", "chosen": "good answer", "rejected": "bad", "margin": 1.5},
            {"prompt": "Longer q", "chosen": "x", "rejected": "yy", "margin": None}]
    b = collate_preference(tok, rows, 64)
    assert b["input_ids"].shape[0] == 4
    assert b["input_ids"][torch.arange(4), b["last_index"]].tolist() == [tok.eos_token_id] * 4
    assert torch.equal(b["last_index"], last_token_index(b["attention_mask"]))
    assert b["margin"].tolist() == [1.5, 0.0]
    assert tok.decode(b["input_ids"][2, : b["last_index"][2]].tolist()) == "Qbad"
    assert collate_preference(tok, [dict(rows[1], margin=None)], 64)["margin"] is None


def test_collate_prompts_left_pads(tok):
    b = collate_prompts(tok, ["ab", "abcd"], 3)
    assert b["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert tok.decode(b["input_ids"][1].tolist()) == "bcd"
    assert last_token_index(b["attention_mask"]).tolist() == [2, 2]
