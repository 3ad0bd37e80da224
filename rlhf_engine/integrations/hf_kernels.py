"""Run a stock Hugging Face Llama / Qwen2 / Mistral / Qwen3 model's norms, MLPs, attention and training loss on our
kernels.

    from rlhf_engine.integrations.hf_kernels import apply_kernels
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).cuda()
    apply_kernels(model)          # before accelerate / Trainer wrap the model
    ...train as before (HF Trainer, your own loop)...
    remove_kernels(model)         # back to the model's own forwards

What changes, per module instance (the model's classes are left alone, other models are unaffected):
- every ``{Llama,Qwen2,Mistral,Qwen3}RMSNorm`` runs ``kernels.rmsnorm.rms_norm``: one pass forward, one backward,
  saving only its input (HF's eager norm saves an fp32 copy and the normalized output as well);
- every ``{Llama,Qwen2,Mistral,Qwen3}MLP`` whose activation is SiLU runs ``down(silu_mul(gate(x), up(x)))``:
  the activation and product in one kernel each way, saving gate and up only;
- with ``attention=True``, the model's attention implementation becomes ours (``hf_attention``);
- with ``lm_head_loss=True``, a ``{Llama,Qwen2,Mistral,Qwen3}ForCausalLM`` called with ``labels`` in training mode
  with autograd on computes HF's causal-LM loss (labels shifted by one, ``ignore_index`` (-100) skipped, mean over
  the counted tokens or sum over ``num_items_in_batch``, as transformers' ``ForCausalLMLoss``) with
  ``kernels.fused_linear_logprob``, which never materializes the (tokens, vocab) logits, and returns
  ``logits=None`` (HF's forward keeps the bf16 logits and an fp32 copy: 4.7 GB for 8192 tokens of Qwen2's
  151,936-entry vocabulary). Under autocast (Trainer's ``bf16=True``) hidden states and head weight are cast to
  the autocast dtype first, as autocast's matmul would. The model's own forward runs instead without labels, in
  eval mode or without autograd (metrics need the logits), with ``return_dict=False`` or ``logits_to_keep``, on a
  CPU with ``backend="auto"`` (the fused head's CPU path is the reference, which materializes the logits), and
  whenever the head is not a plain ``nn.Linear`` on the hidden states' device without hooks (PEFT, quantized,
  sharded or hooked heads) or the model's loss is not the default one.
  Trainers that read ``outputs.logits`` in training for their own metrics (TRL's SFTTrainer computes entropy and
  token accuracy from them) need ``lm_head_loss=False``.
The math is HF's, rounding step for rounding step (see the kernels' docstrings): fp32 statistics, the cast back
to the input dtype before the weight multiply. Modules of other classes (Gemma's ``1 + weight`` norm, a GELU MLP),
norms wider than ``kernels.rmsnorm.MAX_HIDDEN``, and modules whose ``forward`` was already replaced on the
instance (accelerate's device-map and offload hooks) are left as they are and counted as skipped. The patched
forwards are ``functools.partial`` objects of module-level functions: a patched model deep-copies and pickles.
"""
from __future__ import annotations

import functools
import inspect
import logging

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
_PREV_ATTN = "_rlhf_engine_prev_attn"  # model attribute: the attention implementation before apply_kernels
logger = logging.getLogger(__name__)


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=getattr(self, _PATCHED))


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_silu_mul(self.gate_proj(x), self.up_proj(x), backend=getattr(self, _PATCHED)))


@functools.lru_cache(maxsize=16)
def _signature(fn) -> inspect.Signature:
    return inspect.signature(fn)


def _plain_head(model: nn.Module, hidden: torch.Tensor) -> bool:
    """The fused head reads ``lm_head.weight`` directly: only for a plain, hook-free ``nn.Linear`` whose weight is
    materialized on the hidden states' device, and the default causal-LM loss."""
    head = model.lm_head
    return (type(head) is nn.Linear and not (head._forward_hooks or head._forward_pre_hooks)
            and head.weight.device == hidden.device and head.weight.numel() > 0
            and getattr(model, "_loss_function", None) is None
            and getattr(model.config, "loss_type", None) in (None, "ForCausalLM", "ForCausalLMLoss"))


def _causal_lm_forward(self, *args, **kwargs):
    """The class's forward, except in training with labels: trunk, then the fused LM head + loss, no logits."""
    cls_forward = type(self).forward
    bound = _signature(cls_forward).bind(self, *args, **kwargs)
    call = dict(bound.arguments)
    call.pop("self")
    call.update(call.pop("kwargs", {}))
    labels = call.get("labels")
    backend = getattr(self, _PATCHED)
    device = self.lm_head.weight.device
    if (labels is None or not self.training or not torch.is_grad_enabled() or call.get("return_dict") is False
            or call.get("logits_to_keep", 0) not in (0, None)
            or (backend == "auto" and device.type != "cuda") or backend == "torch"):
        return cls_forward(self, *args, **kwargs)
    call.pop("labels")
    call.pop("logits_to_keep", None)
    num_items = call.pop("num_items_in_batch", None)
    shift_labels = call.pop("shift_labels", None)
    ignore_index = call.pop("ignore_index", -100)
    outputs = self.model(**call)
    hidden = outputs.last_hidden_state  # (B, T, H), after the final norm
    if not _plain_head(self, hidden):
        logger.debug("hf_kernels: %s's head or loss is not plain; HF's own head and loss run", type(self).__name__)
        logits = self.lm_head(hidden)
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                  num_items_in_batch=num_items, shift_labels=shift_labels, ignore_index=ignore_index)
        return _output(outputs, loss, logits)
    if shift_labels is None:  # position t predicts token t+1
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.to(hidden.device).reshape(-1)
    weight, bias = self.lm_head.weight, self.lm_head.bias
    if torch.is_autocast_enabled(device.type):  # what autocast's matmul would do: both operands in its dtype
        dt = torch.get_autocast_dtype(device.type)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    with torch.autocast(device.type, enabled=False):
        logp = fused_linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, targets, bias=bias,
                                     ignore_index=ignore_index, backend=backend)
    nll = -logp.sum()
    if num_items is not None:
        loss = nll / (num_items.to(nll.device) if torch.is_tensor(num_items) else num_items)
    else:
        loss = nll / (targets != ignore_index).sum()  # HF's mean over the counted tokens (NaN when there are none)
    return _output(outputs, loss, None)


def _output(outputs, loss, logits):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = CausalLMOutputWithPast.__dataclass_fields__
    return CausalLMOutputWithPast(loss=loss, logits=logits,
                                  **{k: v for k, v in outputs.items() if k in fields and k not in ("loss", "logits")})


def _ours(module: nn.Module) -> bool:
    """Whether the module's instance forward is the one apply_kernels set."""
    fwd = vars(module).get("forward")
    return (isinstance(fwd, functools.partial) and fwd.func in (_norm_forward, _mlp_forward, _causal_lm_forward)
            and len(fwd.args) == 1 and fwd.args[0] is module)


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
        if name in NORM_CLASSES and rms_norm and hasattr(module, "variance_epsilon"):
            fn = _norm_forward if module.weight.numel() <= MAX_HIDDEN else None
            key = "rms_norm"
        elif name in MLP_CLASSES and swiglu:
            fn = _mlp_forward if _is_silu(getattr(module, "act_fn", None)) else None
            key = "mlp"
        elif name in CAUSAL_LM_CLASSES and lm_head_loss and hasattr(module, "lm_head"):
            fn, key = _causal_lm_forward, "lm_head_loss"
        else:
            if name.endswith(("RMSNorm", "MLP")) and (rms_norm if name.endswith("RMSNorm") else swiglu):
                counts["skipped"] += 1
            continue
        current = vars(module).get("forward")
        if fn is not None and current is not None and not _ours(module):
            logger.warning("hf_kernels: %s already has an instance forward (an accelerate hook?); left as it is",
                           name)
            fn = None
        if fn is None:
            counts["skipped"] += 1
            continue
        module.forward = functools.partial(fn, module)  # a partial pickles; a bound method of a function does not
        setattr(module, _PATCHED, backend)
        counts[key] += 1
    if attention:
        from .hf_attention import register_hf_attention

        impl = register_hf_attention(f"rlhf_engine_{backend}" if backend != "auto" else "rlhf_engine",
                                     backend=backend)
        prev = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if not (isinstance(prev, str) and prev.startswith("rlhf_engine")):
            setattr(model, _PREV_ATTN, prev)
        model.set_attn_implementation(impl)
        counts["attention"] = 1
    return counts


def remove_kernels(model: nn.Module, *, attention_implementation: str | None = None) -> int:
    """Undo ``apply_kernels``: every patched module gets its class's forward back, and the attention
    implementation the model had before (or ``attention_implementation`` when given; "sdpa" if unknown) when it
    is currently ours. A module whose forward was replaced again after ``apply_kernels`` (a hook wrapping ours)
    keeps it, with a warning. Returns the number of modules restored."""
    restored = 0
    for module in model.modules():
        if not hasattr(module, _PATCHED):
            continue
        if _ours(module):
            del module.forward  # the instance attribute; the class's forward shows again
            delattr(module, _PATCHED)
            restored += 1
        else:
            logger.warning("hf_kernels: %s's forward was replaced after apply_kernels; left as it is",
                           type(module).__name__)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if isinstance(impl, str) and impl.startswith("rlhf_engine"):
        target = attention_implementation or getattr(model, _PREV_ATTN, None) or "sdpa"
        model.set_attn_implementation(target)
    if hasattr(model, _PREV_ATTN):
        delattr(model, _PREV_ATTN)
    return restored
