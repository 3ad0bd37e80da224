"""The seed RLHF pipeline end to end (InstructGPT / LLaMA-2 order, on one machine):

1. sample a few continuations per prompt from the policy;
2. rank them with the VADER sentiment lexicon and pair them up: by default every two samples
   of a prompt with different scores form a pair, the more positive one "chosen" (InstructGPT
   ranks K samples into K(K-1)/2 comparisons; ties and very short responses are dropped) --
   VADER's human-rated lexicon stands in for a human labeller;
3. train a reward model (the policy's trunk + a scalar head on its mean response state) on the
   pairs, a prompt's comparisons together, and report its pairwise accuracy on held-out prompts;
4. run PPO against the learned reward model, and report the VADER score of held-out
   continuations before and after.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .engine import Engine, default_prompts
from .rewards import VaderSentimentReward
from .trainer.reward_model import POOLINGS


@dataclass
class PipelineOptions:
    pair_prompts: int = 96  # prompts sampled to build preference pairs
    samples_per_prompt: int = 8  # ranked by VADER
    pairs_per_prompt: int = 0  # 0: every two samples with different scores; i > 0: i-th best vs i-th worst, i < this
    min_words: int = 4  # responses shorter than this are not used in pairs (see sample_preference_pairs)
    rm_epochs: int = 2
    rm_lr: float = 2e-5
    rm_batch_size: int = 28  # pairs per micro-batch: the 8 * 7 / 2 comparisons of one prompt at most
    rm_grad_accum: int = 4  # micro-batches per optimizer step
    rm_pooling: str = "response_mean"  # see rlhf_engine.trainer.reward_model
    eval_fraction: float = 0.2

    def __post_init__(self):
        if self.pair_prompts < 2:
            raise ValueError(f"pair_prompts: expected >= 2, got {self.pair_prompts}")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt: expected >= 2, got {self.samples_per_prompt}")
        if not 0 <= self.pairs_per_prompt <= self.samples_per_prompt // 2:
            raise ValueError(f"pairs_per_prompt: expected 0 (all pairs) .. samples_per_prompt // 2 = "
                             f"{self.samples_per_prompt // 2}, got {self.pairs_per_prompt}")
        if self.rm_pooling not in POOLINGS:
            raise ValueError(f"rm_pooling: expected one of {POOLINGS}, got {self.rm_pooling!r}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: expected a value in (0, 1), got {self.eval_fraction}")


@torch.no_grad()
def sample_preference_pairs(engine: Engine, prompts: list[str], vader: VaderSentimentReward, *,
                            samples_per_prompt: int = 8, pairs_per_prompt: int = 0,
                            min_words: int = 4) -> list[dict]:
    """Per prompt, ``samples_per_prompt`` sampled continuations ranked by VADER, paired up:
    [{prompt, chosen, rejected, margin}], ties dropped. ``pairs_per_prompt`` 0: every two samples
    (K(K-1)/2 pairs at most, the more positive "chosen"); i > 0: pair i has the i-th most positive
    as "chosen" and the i-th least positive as "rejected" (disjoint samples), for i < that.

    Responses under ``min_words`` words are left out: an empty or one-word continuation scores a
    neutral 0, which would teach the reward model "shorter beats negative" -- a length preference
    that PPO then exploits by ending every response at once.
    """
    from .trainer.sampler import PolicySampler

    model, tok = engine.policy()
    gen = torch.Generator(device=engine.device).manual_seed(engine.config.run.seed + 777)
    sampler = PolicySampler(model, tok, engine.config.generation, engine.device, gen)
    pairs = []
    k = samples_per_prompt
    batch = max(1, engine.config.run.prompts_per_step * 2 // k)
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        rep = [p for p in chunk for _ in range(k)]
        texts, _ = sampler.sample_texts(rep)
        scores = vader(rep, texts)
        for j, prompt in enumerate(chunk):
            cands = list({texts[j * k + c]: (scores[j * k + c], texts[j * k + c]) for c in range(k)
                          if len(texts[j * k + c].split()) >= min_words}.values())  # a repeated sample once
            ranked = sorted(cands, key=lambda c: c[0], reverse=True)
            if pairs_per_prompt == 0:
                todo = [(a, b) for a in range(len(ranked)) for b in range(a + 1, len(ranked))]
            else:
                todo = [(i, len(ranked) - 1 - i) for i in range(min(pairs_per_prompt, len(ranked) // 2))]
            for a, b in todo:
                (s_hi, hi), (s_lo, lo) = ranked[a], ranked[b]
                if s_hi > s_lo:
                    pairs.append({"prompt": prompt, "chosen": hi, "rejected": lo, "margin": None})
    return pairs


def run_pipeline(engine: Engine, options: PipelineOptions | None = None) -> dict:
    """Run the four stages; returns a summary (pairs, RM accuracy, VADER before/after, timings)."""
    from .trainer.reward_model import save_reward_model, train_reward_model

    from .trainer.checkpoint import check_run_dir

    opt = options or PipelineOptions()
    cfg = engine.config
    out = Path(cfg.run.output_dir)
    check_run_dir(out, overwrite=cfg.run.overwrite or cfg.run.resume)  # now, not after minutes of sampling
    out.mkdir(parents=True, exist_ok=True)
    train_prompts, heldout = default_prompts()
    vader = VaderSentimentReward()
    summary: dict = {}
    t0 = time.perf_counter()
    pairs = sample_preference_pairs(engine, train_prompts[:opt.pair_prompts], vader,
                                    samples_per_prompt=opt.samples_per_prompt,
                                    pairs_per_prompt=opt.pairs_per_prompt, min_words=opt.min_words)
    n_prompts = len({p["prompt"] for p in pairs})
    if len(pairs) < 4 or n_prompts < 2:
        raise ValueError(f"pipeline: only {len(pairs)} usable preference pairs of {n_prompts} prompts were sampled "
                         f"(need 4 pairs of 2 prompts at least); raise pair_prompts")
    (out / "preference_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    summary["pairs"], summary["time/pairs_s"] = len(pairs), time.perf_counter() - t0

    t1 = time.perf_counter()
    model, tok = engine.policy()
    rm_summary = train_reward_model(model, tok, pairs, eval_fraction=opt.eval_fraction, epochs=opt.rm_epochs,
                                    lr=opt.rm_lr, batch_size=opt.rm_batch_size, grad_accum=opt.rm_grad_accum,
                                    pooling=opt.rm_pooling,
                                    max_len=cfg.generation.max_prompt_len
                                    + cfg.generation.max_new_tokens + 1, device=engine.device, seed=cfg.run.seed,
                                    progress=cfg.run.progress)
    rm = rm_summary["reward_model"]
    rm_dir = save_reward_model(rm, out / "reward_model", tok)
    summary["rm_eval_accuracy"] = rm_summary["eval_accuracy"]
    summary["rm_dir"], summary["time/reward_model_s"] = str(rm_dir), time.perf_counter() - t1

    t2 = time.perf_counter()
    rm.eval().requires_grad_(False)
    eval_prompts = heldout[:max(1, cfg.run.eval_prompts)]
    trainer = engine.build_ppo_trainer(rm)
    before, samples_before = trainer.evaluate(eval_prompts, cfg.run.eval_samples, reward=vader)
    ppo = trainer.train(train_prompts)
    after, samples_after = trainer.evaluate(eval_prompts, cfg.run.eval_samples, reward=vader)
    summary.update({"vader_before": before, "vader_after": after, "samples_before": samples_before,
                    "samples_after": samples_after, "ppo_steps": ppo["steps"], "time/ppo_s": time.perf_counter() - t2,
                    "time/total_s": time.perf_counter() - t0})
    return summary
