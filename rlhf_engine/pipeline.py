"""The seed RLHF pipeline end to end (InstructGPT / LLaMA-2 order, on one machine):

1. sample two continuations per prompt from the policy;
2. label each pair with the VADER sentiment lexicon (the higher-scoring one is "chosen"; ties
   are dropped) -- VADER's human-rated lexicon stands in for a human labeller;
3. train a reward model (the policy's trunk + a scalar head) on the pairs, report its
   pairwise accuracy on a held-out split;
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


@dataclass
class PipelineOptions:
    pair_prompts: int = 96  # prompts sampled twice each to build preference pairs
    rm_epochs: int = 2
    rm_lr: float = 2e-5
    rm_batch_size: int = 8
    eval_fraction: float = 0.2

    def __post_init__(self):
        if self.pair_prompts < 2:
            raise ValueError(f"pair_prompts: expected >= 2, got {self.pair_prompts}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: expected a value in (0, 1), got {self.eval_fraction}")


@torch.no_grad()
def sample_preference_pairs(engine: Engine, prompts: list[str], vader: VaderSentimentReward) -> list[dict]:
    """Two sampled continuations per prompt, labelled by VADER: [{prompt, chosen, rejected, margin}]."""
    from .trainer.sampler import PolicySampler

    model, tok = engine.policy()
    gen = torch.Generator(device=engine.device).manual_seed(engine.config.run.seed + 777)
    sampler = PolicySampler(model, tok, engine.config.generation, engine.device, gen)
    pairs = []
    batch = engine.config.run.prompts_per_step
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        rep = [p for p in chunk for _ in range(2)]
        texts, _ = sampler.sample_texts(rep)
        scores = vader(rep, texts)
        for j, prompt in enumerate(chunk):
            (a, sa), (b, sb) = (texts[2 * j], scores[2 * j]), (texts[2 * j + 1], scores[2 * j + 1])
            if sa == sb or not a.strip() or not b.strip():
                continue
            chosen, rejected = (a, b) if sa > sb else (b, a)
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": None})
    return pairs


def run_pipeline(engine: Engine, options: PipelineOptions | None = None) -> dict:
    """Run the four stages; returns a summary (pairs, RM accuracy, VADER before/after, timings)."""
    from .trainer.reward_model import save_reward_model, train_reward_model

    opt = options or PipelineOptions()
    cfg = engine.config
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts, heldout = default_prompts()
    vader = VaderSentimentReward()
    summary: dict = {}
    t0 = time.perf_counter()
    pairs = sample_preference_pairs(engine, train_prompts[:opt.pair_prompts], vader)
    if len(pairs) < 4:
        raise ValueError(f"pipeline: only {len(pairs)} usable preference pairs were sampled; raise pair_prompts")
    (out / "preference_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    summary["pairs"], summary["time/pairs_s"] = len(pairs), time.perf_counter() - t0

    t1 = time.perf_counter()
    model, tok = engine.policy()
    rm_summary = train_reward_model(model, tok, pairs, eval_fraction=opt.eval_fraction, epochs=opt.rm_epochs,
                                    lr=opt.rm_lr, batch_size=opt.rm_batch_size, max_len=cfg.generation.max_prompt_len
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
