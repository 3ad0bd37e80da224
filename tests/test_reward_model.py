"""Reward model: learns a separable preference set, scores at the last valid token whatever the
padding side, saves/loads atomically with identical scores, clear errors."""
import json
import random

import pytest
import torch

from rlhf_engine.data import byte_tokenizer, collate_preference
from rlhf_engine.model.config import preset
from rlhf_engine.model.llama import CausalLM
from rlhf_engine.rewards import token_reward
from rlhf_engine.trainer.reward_model import (RewardModel, evaluate_reward_model, load_reward_model,
                                              save_reward_model, train_reward_model)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _model(tok, seed=0, name="tiny-llama"):
    torch.manual_seed(seed)
    return CausalLM(preset(name, vocab_size=len(tok), attn_backend="torch"))


def separable_pairs(n: int, seed: int = 0) -> list[dict]:
    """Chosen responses contain an 'A' and rejected ones a 'B' somewhere inside (then EOS)."""
    rng = random.Random(seed)
    letters = "abcdefgh"
    rows = []
    for _ in range(n):
        prompt = "".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) + ":"
        base = [rng.choice(letters) for _ in range(rng.randint(3, 7))]
        k = rng.randrange(len(base) + 1)
        rows.append({"prompt": prompt, "chosen": "".join(base[:k] + ["A"] + base[k:]),
                     "rejected": "".join(base[:k] + ["B"] + base[k:])})
    return rows


def test_learns_separable_preferences(tok):
    pairs = separable_pairs(160)
    s = train_reward_model(_model(tok), tok, pairs, eval_fraction=0.25, epochs=2, batch_size=16, lr=2e-3,
                           max_len=32, progress=False)
    assert s["n_eval"] + s["n_train"] == 160 and 30 <= s["n_eval"] <= 50, (s["n_eval"], s["n_train"])
    assert s["steps"] == 2 * -(-s["n_train"] // 16)
    assert s["eval_accuracy"] >= 0.9, s["eval"]
    assert s["train_loss"][-1] < s["train_loss"][0]
    rm = s["reward_model"]
    ev = evaluate_reward_model(rm, tok, separable_pairs(20, seed=7), max_len=32)
    assert ev["accuracy"] >= 0.9 and ev["chosen_mean"] > ev["rejected_mean"]
    # usable as a PPO token reward: rm(input_ids, attention_mask) -> (B,) scores
    b = collate_preference(tok, separable_pairs(4, seed=8), 32)
    assert rm.takes_tokens
    with torch.no_grad():
        r = rm(b["input_ids"], b["attention_mask"])
    assert (r[:4] > r[4:]).all()


def test_given_model_is_copied_by_default(tok):
    lm = _model(tok)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    s = train_reward_model(lm, tok, separable_pairs(8), eval_fraction=0.0, batch_size=8, lr=1e-2, max_len=32,
                           progress=False)
    assert s["reward_model"].model is not lm
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in before.items())
    s = train_reward_model(lm, tok, separable_pairs(8), eval_fraction=0.0, batch_size=8, lr=1e-2, max_len=32,
                           progress=False, copy_model=False)
    assert s["reward_model"].model is lm
    assert not all(torch.equal(v, lm.state_dict()[k]) for k, v in before.items())


def test_margin_and_lora(tok):
    pairs = [dict(p, margin=2.0) for p in separable_pairs(24, seed=1)]
    model = _model(tok, name="tiny-qwen2")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    s = train_reward_model(model, tok, pairs, eval_fraction=0.0, batch_size=8, lr=1e-3, max_len=32,
                           lora=dict(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj")), progress=False)
    assert s["eval"] is None and s["eval_accuracy"] is None and s["steps"] == 3
    rm = s["reward_model"]
    for k, v in base.items():
        assert torch.equal(v, rm.model.state_dict()[k]), k
    assert rm.score_head.weight.requires_grad
    # the margin is subtracted: with r_c == r_r the loss is -log σ(-2)
    b = collate_preference(tok, pairs[:4], 32)
    with torch.no_grad():
        rm.score_head.weight.zero_()
        rm.score_head.bias.zero_()
    ev = evaluate_reward_model(rm, tok, pairs[:4], max_len=32)
    assert ev["loss"] == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(-2.0)).item(), rel=1e-5)
    assert ev["accuracy"] == 0.0 and b["margin"].tolist() == [2.0] * 4


def test_score_reads_the_last_valid_token_any_padding(tok):
    rm = RewardModel(_model(tok)).eval()
    b = collate_preference(tok, separable_pairs(3, seed=2), 32)
    ids, mask = b["input_ids"], b["attention_mask"]  # right padded
    right = rm.score(ids, mask)
    # left padding: shift each row's valid run to the end
    left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    T = ids.shape[1]
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        left_ids[i, T - n:], left_mask[i, T - n:] = ids[i, :n], 1
    torch.testing.assert_close(rm.score(left_ids, left_mask), right, rtol=1e-5, atol=1e-5)
    single = torch.stack([rm.score(ids[i: i + 1, : int(mask[i].sum())], mask[i: i + 1, : int(mask[i].sum())])[0]
                          for i in range(ids.shape[0])])
    torch.testing.assert_close(single, right, rtol=1e-5, atol=1e-5)
    assert right.dtype == torch.float32 and right.shape == (ids.shape[0],) and not right.requires_grad


def test_save_load_round_trip(tok, tmp_path):
    rm = RewardModel(_model(tok, seed=4))
    with torch.no_grad():
        rm.score_head.bias.fill_(0.25)
    b = collate_preference(tok, separable_pairs(4, seed=3), 32)
    ref = rm.score(b["input_ids"], b["attention_mask"])
    out = tmp_path / "rm"
    save_reward_model(rm, out, tok)
    save_reward_model(rm, out, tok)  # overwriting an existing directory works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]  # no temp / backup dirs left
    assert {"config.json", "model.safetensors", "score_head.safetensors", "reward_model.json"} <= \
        {p.name for p in out.iterdir()}
    loaded, tok2 = load_reward_model(out, return_tokenizer=True)
    assert torch.equal(loaded.score(b["input_ids"], b["attention_mask"]), ref)
    assert tok2.encode("abc", add_special_tokens=False) == tok.encode("abc", add_special_tokens=False)
    # a saved reward model can be trained further from its path
    s = train_reward_model(out, None, separable_pairs(8), eval_fraction=0.0, batch_size=8, max_len=32,
                           progress=False)
    assert s["steps"] == 1 and isinstance(s["reward_model"], RewardModel)


def test_save_merges_lora(tok, tmp_path):
    from rlhf_engine.model.lora import apply_lora

    rm = RewardModel(_model(tok, seed=5))
    apply_lora(rm.model, rank=2, alpha=4.0)
    with torch.no_grad():
        for n, p in rm.model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.05)
    b = collate_preference(tok, separable_pairs(3, seed=6), 32)
    ref = rm.score(b["input_ids"], b["attention_mask"])
    loaded = load_reward_model(save_reward_model(rm, tmp_path / "rm"))
    torch.testing.assert_close(loaded.score(b["input_ids"], b["attention_mask"]), ref, rtol=1e-4, atol=1e-5)


def test_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_reward_model(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="score_head.safetensors"):
        load_reward_model(tmp_path / "plain")
    with pytest.raises(TypeError, match="model_or_path"):
        train_reward_model(42, tok, separable_pairs(4), progress=False)
    with pytest.raises(ValueError, match="eval_fraction"):
        train_reward_model(_model(tok), tok, separable_pairs(4), eval_fraction=1.0, progress=False)
    with pytest.raises(FileNotFoundError, match="prefs.jsonl"):
        train_reward_model(_model(tok), tok, tmp_path / "prefs.jsonl", progress=False)


def ranked_pairs(n_prompts: int, k: int = 4, seed: int = 0) -> list[dict]:
    """k responses per prompt, ranked by their count of 'A's (all k(k-1)/2 pairs, the one with more 'A's chosen)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_prompts):
        prompt = "".join(rng.choice("abcdefgh") for _ in range(6)) + ":"
        resp = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6))) + "A" * c for c in range(k)]
        rows += [{"prompt": prompt, "chosen": resp[j], "rejected": resp[i]} for i in range(k) for j in range(i + 1, k)]
    return rows


@pytest.mark.parametrize("max_len", [32, 9])  # 9: prompts and responses cut by truncate_pair
def test_collate_dedup_maps_pairs_to_rows(tok, max_len):
    rows = [dict(r, margin=float(i)) for i, r in enumerate(ranked_pairs(2, k=3))]  # 3 pairs a prompt, 3 responses
    plain = collate_preference(tok, rows, max_len)
    dd = collate_preference(tok, rows, max_len, dedup=True)
    assert plain["input_ids"].shape[0] == 12 and dd["input_ids"].shape[0] == 6
    assert plain["chosen_index"].tolist() == list(range(6)) and plain["rejected_index"].tolist() == list(range(6, 12))
    assert torch.equal(plain["margin"], dd["margin"]) and dd["margin"].tolist() == [float(i) for i in range(6)]
    for key in ("chosen", "rejected"):
        for i, row in enumerate(rows):  # pair i's row in the deduplicated batch is the same sequence, cut the same
            a, b = plain[f"{key}_index"][i], dd[f"{key}_index"][i]
            n = int(plain["attention_mask"][a].sum())
            assert int(dd["attention_mask"][b].sum()) == n and n <= max_len
            assert torch.equal(plain["input_ids"][a, :n], dd["input_ids"][b, :n])
            assert plain["response_start"][a] == dd["response_start"][b]
            prompt = tok.encode(row["prompt"], add_special_tokens=False)
            start = int(dd["response_start"][b])  # the prompt's tokens (its kept end), then the response's
            assert dd["input_ids"][b, :start].tolist() == prompt[len(prompt) - start:]
            resp = tok.encode(row[key], add_special_tokens=False) + [tok.eos_token_id]
            assert dd["input_ids"][b, start:n].tolist() == resp[:n - start]


def test_response_mean_pooling(tok, tmp_path):
    rm = RewardModel(_model(tok, seed=9), pooling="response_mean").eval()
    assert rm.takes_response_mask and not RewardModel(_model(tok)).takes_response_mask
    b = collate_preference(tok, separable_pairs(3, seed=2), 32)
    ids, mask = b["input_ids"], b["attention_mask"]
    j = torch.arange(ids.shape[1])
    resp = (j[None] >= b["response_start"][:, None]) & mask.bool()
    r = rm.score(ids, mask, resp)
    with torch.no_grad():  # fp64 reference: the head on the mean hidden state over the response tokens
        h = rm.model.hidden_states(ids, mask).double()
        w = resp.double()
        pooled = (h * w[..., None]).sum(1) / w.sum(1, keepdim=True)
        ref = pooled @ rm.score_head.weight.double()[0] + rm.score_head.bias.double()
    torch.testing.assert_close(r.double(), ref, rtol=1e-5, atol=1e-5)
    # a row with no response token reads its last valid token, as "last" pooling does
    last = RewardModel(rm.model, rm.score_head).eval()
    torch.testing.assert_close(rm.score(ids, mask, torch.zeros_like(mask)), last.score(ids, mask))
    with pytest.raises(ValueError, match="response_mask"):
        rm.score(ids, mask)
    with pytest.raises(ValueError, match="pooling"):
        RewardModel(_model(tok), pooling="max")
    loaded = load_reward_model(save_reward_model(rm, tmp_path / "rm"))
    assert loaded.pooling == "response_mean"
    assert torch.equal(loaded.score(ids, mask, resp), r)
    with pytest.raises(ValueError, match="pooling"):  # a saved model keeps its pooling
        train_reward_model(tmp_path / "rm", tok, separable_pairs(4), pooling="last", progress=False)
    meta = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert meta["version"] == 2 and meta["score_position"] == "response_mean"
    (tmp_path / "rm" / "reward_model.json").write_text(json.dumps(dict(meta, version=3)))
    with pytest.raises(ValueError, match="version"):
        load_reward_model(tmp_path / "rm")
    wrapped = token_reward(lambda ids, m, response_mask: rm.score(ids, m, response_mask), response_mask=True)
    assert wrapped.takes_tokens and wrapped.takes_response_mask

    @token_reward(response_mask=True)
    def decorated(ids, m, response_mask):
        return rm.score(ids, m, response_mask)

    @token_reward
    def plain(ids, m):
        return rm.score(ids, m, torch.ones_like(m))

    assert decorated.takes_response_mask and plain.takes_tokens and not plain.takes_response_mask
    assert torch.equal(decorated(ids, mask, resp), r)


def test_grouped_training_holds_out_whole_prompts(tok):
    from rlhf_engine.trainer.reward_model import _micro_batches, _split

    rows = ranked_pairs(20, k=4, seed=3)  # 6 pairs per prompt
    train, held = _split(rows, 0.25, torch.Generator().manual_seed(0))
    assert len(held) == 5 * 6 and len(train) == 15 * 6
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    one = [dict(r, prompt="same") for r in rows[:8]]  # a single prompt: its pairs are split instead
    train1, held1 = _split(one, 0.25, torch.Generator().manual_seed(0))
    assert len(held1) == 2 and len(train1) == 6
    for batch_size in (4, 6, 13):
        micro = _micro_batches(train, batch_size, True, torch.Generator().manual_seed(1))
        assert sorted(i for m in micro for i in m) == list(range(len(train)))
        assert all(len(m) <= batch_size for m in micro)
        prompts = [train[i]["prompt"] for m in micro for i in m]
        assert len([p for i, p in enumerate(prompts) if i == 0 or p != prompts[i - 1]]) == 15  # contiguous
        if batch_size >= 6:  # a prompt's 6 pairs fit: never split across micro-batches, whole prompts packed
            assert all(len({train[i]["prompt"] for i in m}) == len(m) // 6 for m in micro)
            assert len(micro) == -(-15 // (batch_size // 6))
        else:
            assert sorted(len(m) for m in micro) == [2] * 15 + [4] * 15
    for pooling in ("last", "response_mean"):
        s = train_reward_model(_model(tok, seed=2), tok, rows, eval_fraction=0.25, epochs=3, batch_size=6, lr=2e-3,
                               max_len=32, pooling=pooling, progress=False)
        assert s["n_eval"] == 30 and s["reward_model"].pooling == pooling and s["steps"] == 3 * 15
        assert s["eval_accuracy"] >= 0.8, (pooling, s["eval"])


def test_each_prompt_weighs_the_same(tok, monkeypatch):
    """group_by_prompt: a prompt's pairs share one unit of weight in the step loss (InstructGPT)."""
    import rlhf_engine.trainer.reward_model as rm_mod

    rows = ranked_pairs(1, k=4, seed=5) + ranked_pairs(1, k=2, seed=6)  # 6 pairs + 1 pair
    assert rows[0]["prompt"] != rows[-1]["prompt"]
    seen = []
    real = rm_mod.pairwise_reward_loss

    def spy(rc, rr, margin=None, weight=None):
        seen.append(weight.tolist())
        return real(rc, rr, margin, weight=weight)

    monkeypatch.setattr(rm_mod, "pairwise_reward_loss", spy)
    s = train_reward_model(_model(tok), tok, rows, eval_fraction=0.0, batch_size=7, max_len=32, progress=False)
    assert s["steps"] == 1 and sorted(seen[0]) == pytest.approx([1 / 6] * 6 + [1.0])
    seen.clear()
    train_reward_model(_model(tok), tok, rows, eval_fraction=0.0, batch_size=7, max_len=32, group_by_prompt=False,
                       progress=False)
    assert seen[0] == [1.0] * 7


def test_grad_accum_gives_the_weighted_mean_gradient(tok, monkeypatch):
    """One step of 7 pairs in one micro-batch, or 7 micro-batches of one accumulated: the same gradient, that of
    the per-prompt weighted mean."""
    from rlhf_engine.trainer.optim import MasterWeightAdamW

    rows = ranked_pairs(1, k=4, seed=5) + ranked_pairs(1, k=2, seed=6)  # 6 pairs + 1 pair
    grads = []
    real_step = MasterWeightAdamW.step

    def spy(self, *a, **k):
        grads.append({i: m.grad.detach().clone() for i, m in enumerate(self.masters) if m.grad is not None})
        return real_step(self, *a, **k)

    monkeypatch.setattr(MasterWeightAdamW, "step", spy)
    kw = dict(eval_fraction=0.0, max_len=32, max_grad_norm=None, progress=False)
    s1 = train_reward_model(_model(tok, seed=3), tok, rows, batch_size=7, **kw)
    s7 = train_reward_model(_model(tok, seed=3), tok, rows, batch_size=1, grad_accum=7, **kw)
    assert s1["steps"] == s7["steps"] == 1 and grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for i in grads[0]:
        torch.testing.assert_close(grads[1][i], grads[0][i], rtol=1e-4, atol=1e-6)
    assert s1["train_loss"][0] == pytest.approx(s7["train_loss"][0], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("pooling", ["last", "response_mean"])
def test_reward_model_on_cuda_bf16(tok, tmp_path, pooling):
    torch.manual_seed(0)
    lm = CausalLM(preset("tiny-llama", vocab_size=len(tok))).to("cuda", torch.bfloat16)  # attn "auto": Triton
    s = train_reward_model(lm, tok, separable_pairs(160), eval_fraction=0.25, epochs=2, batch_size=16, lr=2e-3,
                           max_len=32, pooling=pooling, progress=False)
    assert s["eval_accuracy"] >= 0.9, s["eval"]
    rm = s["reward_model"]
    b = collate_preference(tok, separable_pairs(4, seed=3), 32)
    ids, mask = b["input_ids"].cuda(), b["attention_mask"].cuda()
    resp = ((torch.arange(ids.shape[1])[None] >= b["response_start"][:, None]).cuda() & mask.bool()).long()
    resp = resp if pooling == "response_mean" else None
    loaded = load_reward_model(save_reward_model(rm, tmp_path / "rm"), dtype=torch.bfloat16, device="cuda")
    scores = rm.score(ids, mask, resp)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.equal(loaded.score(ids, mask, resp), scores)
