"""Run a stock Hugging Face Llama / Qwen2 / Mistral / Qwen3 model's norms and MLPs on our fused kernels.

    from rlhf_engine.integrations.hf_kernels import apply_kernels
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).cuda()
    apply_kernels(model)          # RMSNorm and silu(gate) * up on Triton (forward and backward), attention too
    ...train as before (HF Trainer, TRL, your own loop)...
    remove_kernels(model)         # back to the model's own forwards

What changes, per module instance (the model's classes are left alone, other models are unaffected):
- every ``{Llama,Qwen2,Mistral,Qwen3}RMSNorm`` runs ``kernels.rmsnorm.rms_norm``: one pass forward, one backward,
  saving only its input (HF's eager norm saves an fp32 copy and the normalized output as well);
- every ``{Llama,Qwen2,Mistral,Qwen3}MLP`` whose activation is SiLU runs ``down(silu_mul(gate(x), up(x)))``:
  the activation and product in one kernel each way, saving gate and up only;
- with ``attention=True``, the model's attention implementation becomes ours (``hf_attention``);
- with ``lm_head_loss=True``, a ``{Llama,Qwen2,Mistral,Qwen3}ForCausalLM`` called with ``labels`` in training mode
  computes HF's causal-LM loss (labels shifted by one, -100 ignored, mean over the counted tokens or sum over
  ``num_items_in_batch``, as transformers' ``ForCausalLMLoss``) with ``kernels.fused_linear_logprob``, which never
  materializes the (tokens, vocab) logits, and returns ``logits=None`` (HF's forward keeps the bf16 logits and
  an fp32 copy: 4.7 GB for 8192 tokens of Qwen2's 151,936-entry vocabulary). Without labels, or in eval mode
  (metrics need the logits), or under autocast, the model's own forward runs.
The math is HF's, rounding step for rounding step (see the kernels' docstrings): fp32 statistics, the cast back
to the input dtype before the weight multiply. Modules of other classes (Gemma's ``1 + weight`` norm, a GELU MLP)
are left as they are and counted as skipped, as are norms wider than ``kernels.rmsnorm.MAX_HIDDEN``.
"""
from __future__ import annotations

import inspect
import types

import torch
from torch import nn

from ..kernels.fused_linear_logprob import fused_linear_logprobs
from ..kernels.rmsnorm import MAX_HIDDEN
from ..kernels.rmsnorm import rms_norm as _rms_norm
from ..kernels.swiglu import silu_mul as _silu_mul

_FAMILIES = ("Llama", "Qwen2", "Mistral", "Qwen3")
NORM_CLASSES = tuple(f"{f}RMSNorm" for f in _FAMILIES)
MLP_CLASSES = tuple(f"{f}MLP" for f in _FAMILIES)
CAUSAL_LM_CLASSES = tuple(f"{f}ForCausalLM" for f in _FAMILIES)
_BACKENDS = ("auto", "triton", "torch")
_PATCHED = "_rlhf_engine_kernels"  # instance attribute: the backend a patched module runs on


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=getattr(self, _PATCHED))


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_silu_mul(self.gate_proj(x), self.up_proj(x), backend=getattr(self, _PATCHED)))


def _causal_lm_forward(self, *args, **kwargs):
    """The class's forward, except in training with labels: trunk, then the fused LM head + loss, no logits."""
    cls_forward = type(self).forward
    bound = inspect.signature(cls_forward).bind(self, *args, **kwargs)
    call = dict(bound.arguments)
    call.pop("self")
    call.update(call.pop("kwargs", {}))
    labels = call.get("labels")
    if labels is None or not self.training or torch.is_autocast_enabled(self.lm_head.weight.device.type):
        return cls_forward(self, *args, **kwargs)  # the fused head needs hidden and weight of one dtype
    call.pop("labels")
    call.pop("logits_to_keep", None)  # every position is scored
    num_items = call.pop("num_items_in_batch", None)
    shift_labels = call.pop("shift_labels", None)
    return_dict = call.pop("return_dict", None)
    outputs = self.model(**call)
    hidden = outputs.last_hidden_state  # (B, T, H), after the final norm
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]  # position t predicts t+1
    targets = shift_labels.to(hidden.device).reshape(-1)
    head = self.lm_head
    logp = fused_linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets, bias=head.bias,
                                 ignore_index=-100, backend=getattr(self, _PATCHED))
    nll = -logp.sum()
    if num_items is not None:
        loss = nll / (num_items.to(nll.device) if torch.is_tensor(num_items) else num_items)
    else:
        loss = nll / (targets != -100).sum()  # HF's mean over the counted tokens (NaN when there are none)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = CausalLMOutputWithPast.__dataclass_fields__
    out = CausalLMOutputWithPast(loss=loss, logits=None,
                                 **{k: v for k, v in outputs.items() if k in fields and k != "logits"})
    return out.to_tuple() if return_dict is False else out


def _is_silu(act) -> bool:
    """nn.SiLU, transformers' SiLUActivation (ACT2FN["silu"] in 5.x) or F.silu itself."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" or act is torch.nn.functional.silu


def apply_kernels(model: nn.Module, *, rms_norm: bool = True, swiglu: bool = True, attention: bool = True,
                  lm_head_loss: bool = True, backend: str = "auto") -> dict[str, int]:
    """Patch ``model``'s RMSNorm and SwiGLU-MLP modules (and, with ``attention``, its attention implementation;
    with ``lm_head_loss``, its training loss) to run on our kernels, in place. Idempotent; ``remove_kernels``
    undoes it.

    Args:
        model: a transformers model (``PreTrainedModel``) or any module holding such layers.
        rms_norm, swiglu, attention, lm_head_loss: which parts to patch.
        backend: "auto" (Triton on CUDA tensors, the eager definition elsewhere), "triton" (on a CPU only under
            ``TRITON_INTERPRET=1``) or "torch".
    Returns:
        counts: {"rms_norm": patched norms, "mlp": patched MLPs, "lm_head_loss": patched causal-LM heads,
        "skipped": norm/MLP-like modules of other kinds, "attention": 1 if the attention implementation was set,
        else 0}.
    Raises:
        TypeError: ``model`` is not an ``nn.Module``. ValueError: a bad ``backend``, or ``attention=True`` on a
        model that has no ``set_attn_implementation`` (not a transformers model).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    if attention and not hasattr(model, "set_attn_implementation"):
        raise ValueError("attention: the model has no set_attn_implementation (not a transformers model); "
                         "pass attention=False")
    counts = {"rms_norm": 0, "mlp": 0, "lm_head_loss": 0, "skipped": 0, "attention": 0}
    for module in model.modules():
        name = type(module).__name__
        if (name in NORM_CLASSES and rms_norm and hasattr(module, "variance_epsilon")
                and module.weight.numel() <= MAX_HIDDEN):
            module.forward = types.MethodType(_norm_forward, module)
            setattr(module, _PATCHED, backend)
            counts["rms_norm"] += 1
        elif name in MLP_CLASSES and swiglu and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_mlp_forward, module)
            setattr(module, _PATCHED, backend)
            counts["mlp"] += 1
        elif name in CAUSAL_LM_CLASSES and lm_head_loss and isinstance(getattr(module, "lm_head", None), nn.Linear):
            module.forward = types.MethodType(_causal_lm_forward, module)
            setattr(module, _PATCHED, backend)
            counts["lm_head_loss"] += 1
        elif name.endswith(("RMSNorm", "MLP")) and (rms_norm if name.endswith("RMSNorm") else swiglu):
            counts["skipped"] += 1
    if attention:
        from .hf_attention import register_hf_attention

        impl = register_hf_attention(f"rlhf_engine_{backend}" if backend != "auto" else "rlhf_engine",
                                     backend=backend)
        model.set_attn_implementation(impl)
        counts["attention"] = 1
    return counts


def remove_kernels(model: nn.Module, *, attention_implementation: str | None = "sdpa") -> int:
    """Undo ``apply_kernels``: every patched module gets its class's forward back. With
    ``attention_implementation`` (default "sdpa"; None: leave it), the model's attention implementation is set to
    it if it is currently ours. Returns the number of modules restored."""
    restored = 0
    for module in model.modules():
        if hasattr(module, _PATCHED):
            del module.forward  # the instance attribute; the class's forward shows again
            delattr(module, _PATCHED)
            restored += 1
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attention_implementation and isinstance(impl, str) and impl.startswith("rlhf_engine"):
        model.set_attn_implementation(attention_implementation)
    return restored
