"""Kernels for RLHF: Triton (and, in ``native``, C++/CUDA) ops with PyTorch references and autograd.

The functional API, importable from here (each name loads its module on first use: importing the package imports
no Triton) or from its module:

========================  ==========================  ===============================================
name                      module                      what
========================  ==========================  ===============================================
token_logprobs            logprob                     log p(target) (+ entropy) from logits, one pass
fused_linear_logprobs     fused_linear_logprob        LM head + log-probs without the (N, V) logits
gae_triton                gae                         GAE advantages and returns, one launch
ppo_loss_triton           ppo_loss                    PPO-clip (+ value, entropy, KL) loss, autograd
ppo_loss_with_grads       ppo_loss                    the loss and its gradients, two launches
flash_attention           attention                   causal GQA attention, training and prefill
write_kv_cache            kv_cache                    KV-cache write, RoPE fused
apply_rope                kv_cache                    RoPE (HF rotate_half convention)
rms_norm                  rmsnorm                     residual add + RMSNorm
silu_mul                  swiglu                      silu(gate) * up
decode_linear             norm_linear                 split-K GEMM for decode rows, norm/SwiGLU/add fused
========================  ==========================  ===============================================

Decode attention over a KV cache is ``rlhf_engine.kernels.decode_attention.decode_attention``: the function shares
its module's name, and ``from rlhf_engine.kernels import decode_attention`` gives the module.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "token_logprobs": "logprob",
    "fused_linear_logprobs": "fused_linear_logprob",
    "gae_triton": "gae",
    "ppo_loss_triton": "ppo_loss",
    "ppo_loss_with_grads": "ppo_loss",
    "flash_attention": "attention",
    "write_kv_cache": "kv_cache",
    "apply_rope": "kv_cache",
    "rms_norm": "rmsnorm",
    "silu_mul": "swiglu",
    "decode_linear": "norm_linear",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
