"""``Engine``: the thin facade over models, rollout and trainers.

    from rlhf_engine import Engine
    engine = Engine()                                   # demo defaults: SmolLM2-135M-Instruct, VADER
    summary = engine.train_ppo(prompts, reward=my_reward_fn)

The engine builds the roles from an ``EngineConfig`` (or takes a ready model and tokenizer),
picks the device, seeds every RNG, and hands the work to the trainers.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Sequence

import torch

from .config import EngineConfig

_DATA = Path(__file__).resolve().parent / "data"


def default_prompts() -> tuple[list[str], list[str]]:
    """The project's movie-review openings: (training prompts, held-out prompts)."""
    read = lambda name: [ln.strip() for ln in (_DATA / name).read_text().splitlines() if ln.strip()]  # noqa: E731
    return read("movie_review_openings.txt"), read("movie_review_openings_heldout.txt")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device: {name!r} was asked for but CUDA is not available")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = False


def load_model(spec, device: torch.device):
    """(model, tokenizer) for a ModelSpec; the tokenizer is None for random presets."""
    from .model.config import preset
    from .model.llama import CausalLM
    from .model.loading import load_pretrained, smollm2_135m_instruct

    dtype = resolve_dtype(spec.dtype, device)
    name = spec.name_or_path
    if name == "smollm2-135m-instruct":
        model, tok = smollm2_135m_instruct(spec.cache_dir, dtype=dtype, device=device, attn_backend=spec.attn_backend)
    elif name.startswith("preset:"):
        cfg = preset(name[len("preset:"):], attn_backend=spec.attn_backend)
        model, tok = CausalLM(cfg).to(device=device, dtype=dtype), None
    else:
        model, tok = load_pretrained(name, dtype=dtype, device=device, attn_backend=spec.attn_backend)
    model.gradient_checkpointing = spec.gradient_checkpointing
    model.batch_invariant = spec.batch_invariant
    return model, tok


def _tokenizer_size(tokenizer) -> int | None:
    """The number of ids a tokenizer can produce (added tokens included), None where it does not say."""
    try:
        return len(tokenizer)
    except TypeError:
        return getattr(tokenizer, "vocab_size", None)


class Engine:
    """Builds the roles and runs the RLHF stages.

    Args:
        config: an EngineConfig, a dict of sections, a path to a YAML/TOML/JSON file, or None (defaults).
        overrides: "section.key=value" strings applied on top of ``config``.
        model, tokenizer: use these instead of loading ``config.model`` (e.g. a model you built).
    """

    def __init__(self, config: EngineConfig | dict | str | Path | None = None, *,
                 overrides: Sequence[str] | None = None, model=None, tokenizer=None):
        if isinstance(config, EngineConfig):
            cfg = config if not overrides else EngineConfig.from_dict(config.to_dict(), list(overrides))
        elif isinstance(config, (str, Path)):
            cfg = EngineConfig.from_file(config, list(overrides or []))
        elif config is None or isinstance(config, dict):
            cfg = EngineConfig.from_dict(config or {}, list(overrides or []))
        else:
            raise TypeError(f"config: expected an EngineConfig, dict, path or None, got {type(config).__name__}")
        self.config = cfg
        self.device = resolve_device(cfg.run.device)
        seed_everything(cfg.run.seed, cfg.run.deterministic)
        self._model, self._tokenizer = model, tokenizer

    # ------------------------------------------------------------------ roles
    def policy(self):
        """(model, tokenizer) of the policy, loaded once."""
        if self._model is None:
            self._model, tok = load_model(self.config.model, self.device)
            self._tokenizer = self._tokenizer or tok
        if self._tokenizer is None:
            raise ValueError("tokenizer: the model has no tokenizer; pass Engine(..., tokenizer=...)")
        n_tok, vocab = _tokenizer_size(self._tokenizer), self._model.config.vocab_size
        if n_tok is not None and n_tok > vocab:
            raise ValueError(f"tokenizer: it has {n_tok} tokens but the model's vocab_size is {vocab}: ids from "
                             f"{vocab} up would index past the embedding; pass the model's own tokenizer")
        dev = self._model.lm_head_weight.device
        if dev.type != self.device.type or (self.device.index is not None and dev.index != self.device.index):
            raise ValueError(f"model: expected its parameters on run.device = {self.device}, got {dev}")
        return self._model, self._tokenizer

    def _reward(self, reward):
        from .rewards import VaderSentimentReward

        if reward is not None:
            if not callable(reward):
                raise TypeError(f"reward: expected a callable, got {type(reward).__name__}")
            return reward
        rs = self.config.reward
        if rs.kind == "vader":
            return VaderSentimentReward()
        from .trainer.reward_model import load_reward_model

        rm = load_reward_model(rs.path, dtype=resolve_dtype(self.config.model.dtype, self.device), device=self.device)
        return rm.eval().requires_grad_(False)

    def build_ppo_trainer(self, reward: Callable | None = None):
        """The PPO trainer for this config: policy (+ LoRA), reference, critic and reward roles."""
        import copy

        from .model.lora import apply_lora, lora_parameters
        from .trainer.actor_critic import separate_critic
        from .trainer.ppo import PPOTrainer

        cfg = self.config
        if cfg.lora.enabled and cfg.lora.dropout > 0:
            raise ValueError(f"lora.dropout: expected 0 for PPO (old log-probs are taken without dropout, so the "
                             f"ratio would not start at 1), got {cfg.lora.dropout}")
        model, tok = self.policy()
        if model.dtype == torch.float16:
            raise ValueError("model.dtype: float16 has no loss scaling here; use bfloat16 (GPU) or float32")
        reward_fn = self._reward(reward)
        critic = None
        if cfg.ppo.uses_critic and cfg.ppo.critic == "separate":
            if cfg.ppo.critic_init == "reward":
                if not hasattr(reward_fn, "score_head"):
                    raise ValueError("ppo.critic_init: 'reward' needs a reward model (reward.kind 'model')")
                critic = separate_critic(copy.deepcopy(reward_fn.model).requires_grad_(True), head=reward_fn.score_head)
            else:  # a copy of the policy's weights, taken before any adapters are added
                critic = separate_critic(copy.deepcopy(model).requires_grad_(True))
            # trained as the policy is: recomputation as the policy has it (model.gradient_checkpointing for a
            # loaded one), whichever model the critic was copied from (a reward model is loaded without it)
            critic.gradient_checkpointing = model.gradient_checkpointing
        if cfg.lora.enabled and not lora_parameters(model):
            model.requires_grad_(False)
            apply_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                       dropout=cfg.lora.dropout)
        trainer = PPOTrainer(cfg, model, tok, reward_fn, critic=critic, device=self.device)
        self.last_trainer = trainer
        return trainer

    # ------------------------------------------------------------------ stages
    def train_ppo(self, prompts: Sequence[str] | None = None, reward: Callable | None = None, *,
                  eval_prompts: Sequence[str] | None = None) -> dict:
        """Fine-tune the policy with PPO (or a critic-free estimator) against ``reward``.

        Args:
            prompts: training prompts (default: the project's movie-review openings).
            reward: a text reward ``fn(prompts, responses) -> floats`` or a token reward (see
                ``rlhf_engine.rewards``); default: ``config.reward`` (VADER sentiment).
            eval_prompts: held-out prompts scored before and after training (default: the project's
                held-out openings, the first ``run.eval_prompts`` of them).
        Returns:
            a summary dict: per-step history, eval reward before/after with samples, checkpoint and
            plot paths.

        Each call is a run of its own, from the policy as it is now: its KL reference is a copy of these weights
        (after an earlier call, the trained ones). Its ``run.output_dir`` must hold no earlier run unless
        ``run.overwrite`` (replace it) or ``run.resume`` (continue it, from the same initial weights).
        """
        train_default, heldout_default = default_prompts()
        for name, value in (("prompts", prompts), ("eval_prompts", eval_prompts)):
            if isinstance(value, str):
                raise TypeError(f"{name}: expected a list of strings, got a single string")
            if isinstance(value, (dict, set, frozenset)):  # a dict's keys or a set's order would be taken silently
                raise TypeError(f"{name}: expected a list of strings, got a {type(value).__name__}")
        prompts = list(train_default if prompts is None else prompts)
        if not prompts:
            raise ValueError("prompts: expected at least one prompt, got an empty list")
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts: expected a list of strings")
        if eval_prompts is None:
            eval_prompts = heldout_default[:self.config.run.eval_prompts]
        trainer = self.build_ppo_trainer(reward)
        return trainer.train(prompts, list(eval_prompts))

    def train_sft(self, dataset, **kwargs) -> dict:
        """Supervised fine-tuning of the policy (see ``rlhf_engine.trainer.sft.train_sft``)."""
        from .trainer.sft import train_sft

        model, tok = self.policy()
        kwargs.setdefault("device", self.device)
        kwargs.setdefault("seed", self.config.run.seed)
        return train_sft(model, tok, dataset, **kwargs)

    def train_reward_model(self, pairs, **kwargs) -> dict:
        """Train a reward model on preference pairs (see ``rlhf_engine.trainer.reward_model``)."""
        from .trainer.reward_model import train_reward_model

        model, tok = self.policy()
        kwargs.setdefault("device", self.device)
        kwargs.setdefault("seed", self.config.run.seed)
        return train_reward_model(model, tok, pairs, **kwargs)
