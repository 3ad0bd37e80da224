"""Command line: the InstructGPT stages, each on its own, and the whole pipeline.

  rlhf-engine sft --data sft.jsonl --output DIR [--config FILE] [section.key=value ...]
  rlhf-engine rm  --data preferences.jsonl --output DIR [--config FILE] [section.key=value ...]
  rlhf-engine ppo [--config FILE] [--prompts FILE] [section.key=value ...]
  rlhf-engine pipeline [...]       sample pairs -> VADER labels -> reward model -> PPO

With no config, ``ppo`` runs the demo (rlhf_engine/configs/ppo_demo.yaml): PPO on the real
SmolLM2-135M-Instruct against VADER sentiment, on the GPU when there is one. ``sft`` and ``rm``
start from the config's ``model`` (the demo's by default) and write a Hugging Face model directory
(``rm``: plus its score head), which ``model.name_or_path=DIR`` and ``reward.kind=model
reward.path=DIR`` then hand to ``ppo``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "ppo_demo.yaml"


def _read_prompts(path: str | None):
    if path is None:
        return None
    from .data.datasets import load_prompt_dataset

    return load_prompt_dataset(path)


def _print_samples(title: str, samples, n: int = 4) -> None:
    print(f"\n{title}")
    for prompt, text, score in samples[:n]:
        print(f"  [{score:+.3f}] {prompt!s}{text!s}".replace("\n", " "))


def cmd_ppo(args) -> int:
    from .engine import Engine

    engine = Engine(args.config or DEMO_CONFIG, overrides=args.overrides)
    cfg = engine.config
    print(f"rlhf_engine PPO: model={cfg.model.name_or_path} device={engine.device} steps={cfg.run.steps} "
          f"prompts/step={cfg.run.prompts_per_step} reward={cfg.reward.kind}", flush=True)
    summary = engine.train_ppo(_read_prompts(args.prompts))
    if "eval_before" in summary:
        _print_samples("Held-out continuations BEFORE training:", summary["samples_before"])
        _print_samples("Held-out continuations AFTER training:", summary["samples_after"])
        delta = summary["eval_after"] - summary["eval_before"]
        print(f"\nHeld-out reward ({cfg.reward.kind}): before {summary['eval_before']:+.4f}  "
              f"after {summary['eval_after']:+.4f}  change {delta:+.4f}")
    print(f"metrics: {Path(summary['output_dir']) / 'metrics.jsonl'}  plot: {summary.get('plot')}  "
          f"checkpoint: {summary['checkpoint']}")
    short = {k: v for k, v in summary.items() if k not in ("history", "samples_before", "samples_after")}
    (Path(summary["output_dir"]) / "summary.json").write_text(json.dumps(short, indent=1))
    return 0


def _stage_engine(args):
    from .engine import Engine

    if not Path(args.data).exists():  # before the model is loaded
        raise FileNotFoundError(f"--data: {args.data} does not exist")
    engine = Engine(args.config or DEMO_CONFIG, overrides=args.overrides)
    print(f"rlhf_engine {args.command}: model={engine.config.model.name_or_path} device={engine.device} "
          f"data={args.data}", flush=True)
    return engine


def _stage_kwargs(args, engine) -> dict:
    """What sft and rm take from the flags and the config (model.gradient_checkpointing, lora.*)."""
    cfg = engine.config
    lora = None
    if cfg.lora.enabled:
        lora = dict(rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                    dropout=cfg.lora.dropout)
    return dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_len=args.max_len,
                grad_accum=args.grad_accum, chat_template=args.chat_template, lora=lora,
                gradient_checkpointing=cfg.model.gradient_checkpointing, progress=cfg.run.progress)


def cmd_sft(args) -> int:
    from .model.loading import save_pretrained

    engine = _stage_engine(args)
    s = engine.train_sft(args.data, **_stage_kwargs(args, engine))
    model, tok = engine.policy()
    out = save_pretrained(model, args.output, tok)
    print(f"SFT: {s['steps']} steps, loss {s['losses'][0]:.4f} -> {s['losses'][-1]:.4f}; saved to {out}")
    return 0


def cmd_rm(args) -> int:
    from .trainer.reward_model import save_reward_model

    engine = _stage_engine(args)
    s = engine.train_reward_model(args.data, pooling=args.pooling, eval_fraction=args.eval_fraction,
                                  **_stage_kwargs(args, engine))
    out = save_reward_model(s["reward_model"], args.output, s["tokenizer"])
    acc = s["eval_accuracy"]
    print(f"reward model: {s['steps']} steps on {s['n_train']} pairs, held-out accuracy "
          f"{'n/a' if acc is None else f'{acc:.3f}'} ({s['n_eval']} pairs); saved to {out}")
    return 0


def cmd_pipeline(args) -> int:
    from .engine import Engine
    from .pipeline import PipelineOptions, run_pipeline

    # PPO against a small learned reward model: a stronger KL anchor and a gentler step than the
    # VADER demo, since the reward model is wrong on a fair share of held-out pairs.
    overrides = ["run.output_dir=runs/pipeline", "run.overwrite=true", "ppo.kl_coef=0.1", "optim.lr=2e-5",
                 "run.steps=30",
                 *args.overrides]
    engine = Engine(args.config or DEMO_CONFIG, overrides=overrides)
    opts = PipelineOptions(pair_prompts=args.pair_prompts, samples_per_prompt=args.samples_per_prompt,
                           pairs_per_prompt=args.pairs_per_prompt, rm_epochs=args.rm_epochs, rm_lr=args.rm_lr,
                           rm_pooling=args.rm_pooling)
    print(f"rlhf_engine pipeline: model={engine.config.model.name_or_path} device={engine.device}", flush=True)
    s = run_pipeline(engine, opts)
    _print_samples("Held-out continuations BEFORE PPO:", s["samples_before"])
    _print_samples("Held-out continuations AFTER PPO:", s["samples_after"])
    acc = s["rm_eval_accuracy"]
    print(f"\npreference pairs: {s['pairs']}  reward-model held-out accuracy: "
          f"{'n/a' if acc is None else f'{acc:.3f}'}")
    print(f"VADER on held-out prompts: before {s['vader_before']:+.4f}  after {s['vader_after']:+.4f}  "
          f"change {s['vader_after'] - s['vader_before']:+.4f}")
    print(f"time: pairs {s['time/pairs_s']:.0f} s, reward model {s['time/reward_model_s']:.0f} s, "
          f"PPO {s['time/ppo_s']:.0f} s, total {s['time/total_s']:.0f} s")
    short = {k: v for k, v in s.items() if not k.startswith("samples")}
    (Path(engine.config.run.output_dir) / "pipeline_summary.json").write_text(json.dumps(short, indent=1))
    return 0


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing every large block back to the OS.

    PyTorch's CPU allocator is malloc: each tensor above glibc's mmap threshold (32 MB at most) is a fresh
    mmap, and every page of it faults on first touch, once per op per step (AdamW's temporaries, the
    logits, the embedding gradient). Serving them from the heap and never trimming it removed most of
    that: the demo's PPO update went from 4.6 s to 3.3 s (AdamW's sqrt alone from 725 ms to 68 ms) with
    bit-identical results. Process-wide, so only the CLI (an application) does it; Linux/glibc only;
    ``RLHF_ENGINE_KEEP_FREED_MEMORY=0`` turns it off. Returns whether it took effect.
    """
    import ctypes
    import os

    if os.environ.get("RLHF_ENGINE_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters (malloc.h)
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False


def main(argv=None) -> int:
    keep_freed_memory()
    parser = argparse.ArgumentParser(prog="rlhf-engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ppo", help="fine-tune a policy with PPO (default: the SmolLM2 + VADER demo)")
    p.add_argument("--config", help="YAML/TOML/JSON config file (default: the demo config)")
    p.add_argument("--prompts", help="prompts file (.txt one per line, or .jsonl with a 'prompt' field)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. run.steps=5 optim.lr=2e-5")
    p.set_defaults(func=cmd_ppo)
    q = sub.add_parser("pipeline", help="sample pairs -> label with VADER -> train a reward model -> PPO on it")
    q.add_argument("--config", help="engine config (default: the demo config, output in runs/pipeline)")
    q.add_argument("--pair-prompts", type=int, default=96, help="prompts sampled for preference pairs")
    q.add_argument("--samples-per-prompt", type=int, default=8, help="samples per prompt, ranked by VADER")
    q.add_argument("--pairs-per-prompt", type=int, default=0,
                   help="0: every two samples with different scores; i > 0: i-th best vs i-th worst, i < this")
    q.add_argument("--rm-epochs", type=int, default=2)
    q.add_argument("--rm-lr", type=float, default=2e-5)
    q.add_argument("--rm-pooling", default="response_mean",
                   help="the reward model's hidden state: 'last' (the last token's) or 'response_mean'")
    q.add_argument("overrides", nargs="*", help="section.key=value overrides")
    q.set_defaults(func=cmd_pipeline)
    for name, func, lr, bs, what in (("sft", cmd_sft, 1e-5, 8, "prompt/response or chat rows (JSONL)"),
                                     ("rm", cmd_rm, 2e-5, 16, "prompt/chosen/rejected rows (JSONL)")):
        c = sub.add_parser(name, help=("supervised fine-tuning of the policy" if name == "sft" else
                                       "train a reward model on preference pairs"))
        c.add_argument("--data", required=True, help=what)
        c.add_argument("--output", required=True, help="directory to write (replaced atomically)")
        c.add_argument("--config", help="engine config: its model.*, lora.* and run.* apply (default: the demo's)")
        c.add_argument("--epochs", type=int, default=1)
        c.add_argument("--lr", type=float, default=lr)
        c.add_argument("--batch-size", type=int, default=bs,
                       help="sequences per micro-batch" if name == "sft" else "pairs per micro-batch")
        c.add_argument("--grad-accum", type=int, default=1)
        c.add_argument("--max-len", type=int, default=512)
        c.add_argument("--chat-template", action="store_true", help="render prompts with the tokenizer's chat template")
        if name == "rm":
            c.add_argument("--pooling", default="last", help="'last' or 'response_mean' (see --rm-pooling)")
            c.add_argument("--eval-fraction", type=float, default=0.1, help="share of prompts held out")
        c.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. run.device=cpu")
        c.set_defaults(func=func)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"rlhf-engine: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
