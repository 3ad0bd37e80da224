"""Model configuration for the Llama-family decoder (Llama 2/3, Qwen2/2.5, Mistral, SmolLM2).

``ModelConfig`` is a small dataclass validated in ``__post_init__``. It converts to and
from Hugging Face configs (``from_hf`` / ``to_hf``) for the ``llama``, ``qwen2`` and
``mistral`` model types, reading both the transformers 4 layout (``rope_theta`` +
``rope_scaling``) and the transformers 5 layout (``rope_parameters``). Named presets
(``preset("qwen2-0.5b")``) give the shapes of real models for random-weight benchmarks.
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings
from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
ATTN_BACKENDS = ("auto", "torch", "triton")


@dataclass
class RopeScaling:
    """Llama-3 ("llama3") RoPE frequency scaling, as in Llama 3.1/3.2 checkpoints."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"

    def __post_init__(self):
        if self.rope_type != "llama3":
            raise ValueError(f"rope_scaling.rope_type: expected 'llama3', got {self.rope_type!r}")
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor: expected > 0, got {self.factor}")
        if not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError("rope_scaling: expected high_freq_factor > low_freq_factor > 0, got "
                             f"{self.high_freq_factor} and {self.low_freq_factor}")
        if self.original_max_position_embeddings <= 0:
            raise ValueError("rope_scaling.original_max_position_embeddings: expected > 0, got "
                             f"{self.original_max_position_embeddings}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ModelConfig:
    """Shapes and constants of a Llama-family decoder.

    attention_bias: bias on q/k/v projections (Qwen2: True). o_proj_bias: bias on the
    output projection (Llama with ``attention_bias=True`` has both). ``attn_backend``
    is not part of the checkpoint: "auto" picks Triton kernels on CUDA tensors and
    PyTorch SDPA elsewhere; "torch" / "triton" force one. ``batch_invariant`` is not
    either: in fp32 on the CPU, a row's GEMMs and attention are computed the same way
    whatever the batch (model/batch_invariant.py), so generation's log-probs equal the
    training forward's; False trades that for faster decode steps below 16 sequences.
    The layers read it when the model is built: switch a built model with
    ``CausalLM.batch_invariant``.
    """

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | dict | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_proj_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"
    initializer_range: float = 0.02
    attn_backend: str = "auto"
    batch_invariant: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ModelConfig.{name}: expected a positive int, got {v!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"ModelConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                                 f"({self.num_heads}) when head_dim is not given")
            self.head_dim = self.hidden_size // self.num_heads
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim: expected a positive even int, got {self.head_dim!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads}) for grouped-query attention")
        if self.rope_theta <= 0:
            raise ValueError(f"ModelConfig.rope_theta: expected > 0, got {self.rope_theta}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"ModelConfig.rms_norm_eps: expected > 0, got {self.rms_norm_eps}")
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = _rope_scaling_from_dict(self.rope_scaling)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise TypeError(f"ModelConfig.rope_scaling: expected RopeScaling, dict or None, got "
                            f"{type(self.rope_scaling).__name__}")
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = tuple(self.eos_token_id)
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"ModelConfig.model_type: expected one of {SUPPORTED_MODEL_TYPES}, got "
                             f"{self.model_type!r}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"ModelConfig.attn_backend: expected one of {ATTN_BACKENDS}, got {self.attn_backend!r}")
        if not isinstance(self.batch_invariant, bool):
            raise TypeError(f"ModelConfig.batch_invariant: expected a bool, got {self.batch_invariant!r}")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                raise ValueError(f"ModelConfig.{name}: expected None or in [0, {self.vocab_size}), got {v}")

    # ------------------------------------------------------------------ helpers
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All end-of-sequence ids as a tuple (empty when none is set)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self, include_embedding: bool = True) -> int:
        """Parameter count computed from the shapes (embedding counted once when tied)."""
        H, I, V = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = H * self.q_size + 2 * H * self.kv_size + self.q_size * H
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.o_proj_bias:
            attn += H
        layer = attn + 3 * H * I + 2 * H
        n = self.num_layers * layer + H
        if include_embedding:
            n += V * H * (1 if self.tie_word_embeddings else 2)
        return n

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face interop
    @classmethod
    def from_hf(cls, hf_config: Any, **overrides) -> "ModelConfig":
        """Build from a transformers config object or a ``config.json`` dict (llama, qwen2, mistral).

        A sliding window (Mistral's ``sliding_window``, Qwen2's with ``use_sliding_window``) is not implemented: the
        model attends causally over the whole sequence, which is exact for sequences no longer than the window, and
        a warning says so when the config has one.
        """
        d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"hf_config.model_type: expected one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hf_config.hidden_act: expected 'silu', got {act!r}")
        if d.get("mlp_bias", False):
            raise ValueError("hf_config.mlp_bias=True is not supported")
        window = d.get("sliding_window")
        slides = window is not None and window < d.get("max_position_embeddings", float("inf"))
        if model_type == "qwen2":  # Qwen2: layers from max_window_layers on slide, with use_sliding_window
            slides = slides and d.get("use_sliding_window", False) and \
                d.get("max_window_layers", 0) < d.get("num_hidden_layers", 0)
        if slides:
            warnings.warn(f"hf_config.sliding_window={window}: sliding-window attention is not implemented; this "
                          f"model attends over the whole sequence, which equals the checkpoint's attention only "
                          f"for sequences of at most {window} tokens", stacklevel=2)

        # RoPE: transformers 5 stores {"rope_type", "rope_theta", ...} in rope_parameters;
        # transformers 4 stores rope_theta at the top level and rope_scaling separately.
        rope = d.get("rope_parameters") or {}
        if rope and any(isinstance(v, dict) for v in rope.values()):
            raise ValueError("hf_config.rope_parameters: per-layer-type RoPE is not supported")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or None
        rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else None
        if rope_type not in (None, "default"):
            scaling = rope
        rope_scaling = None
        if scaling:
            stype = scaling.get("rope_type", scaling.get("type", "default"))
            if stype == "llama3":
                rope_scaling = RopeScaling(
                    factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
                    high_freq_factor=float(scaling["high_freq_factor"]),
                    original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
            elif stype != "default":
                raise ValueError(f"hf_config rope scaling type {stype!r} is not supported (only 'llama3')")

        num_heads = d["num_attention_heads"]
        attn_bias = bool(d.get("attention_bias", False))
        kwargs = dict(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"], num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rope_theta=float(theta), rope_scaling=rope_scaling, rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else attn_bias,
            o_proj_bias=False if model_type == "qwen2" else attn_bias,
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"), model_type=model_type,
            initializer_range=d.get("initializer_range", 0.02),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self):
        """The equivalent transformers config (LlamaConfig, Qwen2Config or MistralConfig)."""
        import transformers

        if self.model_type == "qwen2" and (not self.attention_bias or self.o_proj_bias):
            raise ValueError("a qwen2 config needs attention_bias=True and o_proj_bias=False")
        if self.model_type != "qwen2" and self.attention_bias != self.o_proj_bias:
            raise ValueError(f"model_type {self.model_type!r} cannot express attention_bias != o_proj_bias")
        cls_name = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}[self.model_type]
        hf_cls = getattr(transformers, cls_name)
        kw: dict[str, Any] = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id, initializer_range=self.initializer_range,
        )
        if self.model_type == "llama":
            kw["attention_bias"] = self.attention_bias
        if self.model_type == "mistral":
            kw["sliding_window"] = None
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**self.rope_scaling.to_dict(), "rope_theta": self.rope_theta}
        params = inspect.signature(hf_cls.__init__).parameters
        if "rope_parameters" in params:  # transformers >= 5
            kw["rope_parameters"] = rope
        else:  # transformers 4
            kw["rope_theta"] = self.rope_theta
            if self.rope_scaling is not None:
                kw["rope_scaling"] = self.rope_scaling.to_dict()
        cfg = hf_cls(**kw)
        cfg.architectures = [cls_name.replace("Config", "ForCausalLM")]
        return cfg


def _rope_scaling_from_dict(d: dict) -> RopeScaling:
    d = dict(d)
    rope_type = d.pop("rope_type", d.pop("type", "llama3"))
    d.pop("rope_theta", None)
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"rope_scaling: unknown keys {sorted(unknown)}")
    return RopeScaling(rope_type=rope_type, **d)


# ---------------------------------------------------------------------- presets
_PRESETS: dict[str, dict] = {
    # Qwen2 / Qwen2.5 0.5B: 494M parameters, 14 query heads / 2 KV heads.
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                       num_kv_heads=2, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6,
                       max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True,
                       bos_token_id=None, eos_token_id=151645, pad_token_id=151643, model_type="qwen2"),
    # SmolLM2-135M(-Instruct): 30 layers, 9 query heads / 3 KV heads, tied embeddings.
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, rope_theta=1e5, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2, model_type="llama"),
    # Llama-3-8B.
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, rope_theta=5e5, rms_norm_eps=1e-5,
                      max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001, model_type="llama"),
    # Llama-3.1-8B: same shapes with "llama3" RoPE scaling and a 128k context.
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                        num_kv_heads=8, head_dim=128, rope_theta=5e5, rms_norm_eps=1e-5,
                        max_position_embeddings=131072, rope_scaling=dict(factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=8192),
                        bos_token_id=128000, eos_token_id=(128001, 128008, 128009), model_type="llama"),
    # Tiny test shapes (odd sizes on purpose).
    "tiny-llama": dict(vocab_size=257, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=256, rope_scaling=dict(factor=8.0, low_freq_factor=1.0,
                       high_freq_factor=4.0, original_max_position_embeddings=32),
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, model_type="llama"),
    "tiny-qwen2": dict(vocab_size=263, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6,
                       num_kv_heads=2, head_dim=8, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=256,
                       tie_word_embeddings=True, attention_bias=True, bos_token_id=None, eos_token_id=3,
                       pad_token_id=0, model_type="qwen2"),
    "tiny-mistral": dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4,
                         num_kv_heads=1, head_dim=16, rope_theta=1e4, rms_norm_eps=1e-5, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, model_type="mistral"),
}


def preset_names() -> tuple[str, ...]:
    return tuple(_PRESETS)


def preset(name: str, **overrides) -> ModelConfig:
    """A named model shape ("qwen2-0.5b", "smollm2-135m", "llama3-8b", "llama3.1-8b", "tiny-llama", ...)."""
    if name not in _PRESETS:
        raise ValueError(f"preset: expected one of {preset_names()}, got {name!r}")
    return ModelConfig(**{**_PRESETS[name], **overrides})


__all__ = ["ModelConfig", "RopeScaling", "preset", "preset_names", "SUPPORTED_MODEL_TYPES", "ATTN_BACKENDS"]
