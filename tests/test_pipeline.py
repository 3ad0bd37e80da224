"""The SFT -> RM -> PPO pipeline plumbing on a tiny model (VADER replaced by a length score,
since a random tiny model writes no English)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import byte_tokenizer, tiny_model  # noqa: E402

from rlhf_engine import Engine, pipeline  # noqa: E402


class LengthScore:
    takes_tokens = False

    def __call__(self, prompts, responses):
        return [float(len(r.split())) + 0.01 * len(r) for r in responses]


def test_pipeline_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "VaderSentimentReward", LengthScore)
    cfg = {"generation": {"max_new_tokens": 8, "max_prompt_len": 16},
           "ppo": {"minibatch_size": 4, "micro_batch_size": 4, "epochs": 1},
           "optim": {"lr": 1e-3},
           "run": {"steps": 2, "prompts_per_step": 4, "device": "cpu", "output_dir": str(tmp_path),
                   "eval_prompts": 4, "eval_samples": 1, "progress": False, "tensorboard": False, "plot": False}}
    eng = Engine(cfg, model=tiny_model(), tokenizer=byte_tokenizer())
    s = pipeline.run_pipeline(eng, pipeline.PipelineOptions(pair_prompts=12, samples_per_prompt=4, pairs_per_prompt=2, min_words=1, rm_epochs=1, rm_lr=1e-3))
    assert s["pairs"] >= 4
    assert 0.0 <= s["rm_eval_accuracy"] <= 1.0
    assert s["ppo_steps"] == 2
    for k in ("vader_before", "vader_after"):
        assert s[k] == s[k]  # not NaN
    pairs = [json.loads(x) for x in (tmp_path / "preference_pairs.jsonl").read_text().splitlines()]
    assert all(LengthScore()([], [p["chosen"]])[0] > LengthScore()([], [p["rejected"]])[0] for p in pairs)
    assert (Path(s["rm_dir"]) / "score_head.safetensors").is_file()


def test_all_pairs_of_ranked_samples(tmp_path, monkeypatch):
    """pairs_per_prompt=0: every two samples of a prompt with different scores, the higher one chosen."""
    cfg = {"generation": {"max_new_tokens": 8, "max_prompt_len": 16},
           "ppo": {"minibatch_size": 4, "micro_batch_size": 4},
           "run": {"prompts_per_step": 4, "device": "cpu", "output_dir": str(tmp_path), "progress": False}}
    eng = Engine(cfg, model=tiny_model(), tokenizer=byte_tokenizer())
    scored = {}

    def score(prompts, responses):
        out = [float(len(r.split())) + 0.01 * len(r) for r in responses]
        for p, r, s in zip(prompts, responses, out):
            scored.setdefault(p, {})[r] = s
        return out

    prompts = ["the movie", "a film", "it was"]
    pairs = pipeline.sample_preference_pairs(eng, prompts, score, samples_per_prompt=5, pairs_per_prompt=0,
                                             min_words=0)
    for p in prompts:
        values = sorted(set(scored[p].values()))
        got = {(x["chosen"], x["rejected"]) for x in pairs if x["prompt"] == p}
        want = {(a, b) for a in scored[p] for b in scored[p] if scored[p][a] > scored[p][b]}
        assert got == want and len([x for x in pairs if x["prompt"] == p]) == len(got)  # each pair once
        assert len(values) < 2 or got
