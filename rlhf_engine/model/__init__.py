"""The Llama-family model: config, modules, checkpoint I/O, LoRA, scalar heads, log-probs."""
from .config import ModelConfig, RopeScaling, preset, preset_names
from .heads import ScalarHead, ScalarModel, last_valid_index
from .llama import CausalLM, Transformer
from .loading import (from_hf_model, load_pretrained, save_pretrained, smollm2_135m_instruct,
                      to_hf_model)
from .logprobs import sequence_logprobs
from .lora import apply_lora, disable_adapters, lora_parameters, merge_lora

__all__ = [
    "ModelConfig", "RopeScaling", "preset", "preset_names", "CausalLM", "Transformer", "ScalarHead", "ScalarModel",
    "last_valid_index", "load_pretrained", "save_pretrained", "smollm2_135m_instruct", "from_hf_model",
    "to_hf_model", "sequence_logprobs", "apply_lora", "disable_adapters", "lora_parameters", "merge_lora",
]
