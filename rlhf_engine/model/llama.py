"""A Llama-family decoder (Llama 2/3, Qwen2, Mistral, SmolLM2) in one readable file.

Module names follow Hugging Face, so ``state_dict()`` keys map 1:1 to HF checkpoint keys
(``model.layers.{i}.self_attn.q_proj.weight``, ``model.norm.weight``, ``lm_head.weight``).

Three ways to run the trunk, all with explicit inputs (no state hidden in modules):
  * ``hidden_states`` / ``forward``: the whole sequence (training, scoring);
  * ``prefill``: a left-padded prompt, writing K/V into a cache passed in;
  * ``decode_step``: Tn new tokens per sequence against that cache.
The attention implementation is picked per call (``attn_backend``), defaulting to the
config's ("auto": Triton kernels on CUDA, PyTorch SDPA elsewhere). On the triton backend the
decoder layers also run on the fused norm and SwiGLU kernels (``DecoderLayer.forward_fused``),
in training as in generation; the torch backend is the eager, reference definition.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_engine.kernels.reference.norm import rms_norm_reference

from . import fused_layer
from .attention import (AttnMeta, cache_attention, decode_fused_write_enabled, decode_gemm_ws_enabled,
                        decode_norm_gemm_enabled, full_attention, mask_to_kv_range, resolve_backend, write_kv)
from .batch_invariant import Linear, linear
from .checkpointing import checkpoint_layer, needs_torch_checkpoint
from .decode_gemms import RowSumSq, decode_gemm_ws_layer, decode_norm_gemm_layer
from .config import ModelConfig
from .lora import LoRALinear
from .packing import PROJECTION_GROUPS, global_hooks, group_linear, pack_linears
from .rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps), the statistics in fp32 (as transformers)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the cast back to x's dtype happens before the weight multiply, as in transformers
        return rms_norm_reference(x, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE: Hq query heads share Hkv key/value heads."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        H, bi = config.hidden_size, config.batch_invariant
        self.q_proj = Linear(H, config.q_size, bias=config.attention_bias, batch_invariant=bi)
        self.k_proj = Linear(H, config.kv_size, bias=config.attention_bias, batch_invariant=bi)
        self.v_proj = Linear(H, config.kv_size, bias=config.attention_bias, batch_invariant=bi)
        self.o_proj = Linear(config.q_size, H, bias=config.o_proj_bias, batch_invariant=bi)

    def forward(self, x: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, meta: AttnMeta,
                qkv: torch.Tensor | None = None, project: bool = True, pdl: bool = False) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); or, with ``qkv`` (B, T, Dq + 2 Dkv) given (the q/k/v projection already done,
        e.g. by the fused norm + GEMM of the decode step), x None. ``project=False``: the attention output (B, T, Dq)
        before o_proj (the decode step's split-K path fuses o_proj with the residual add). ``pdl``: the decode
        attention kernel launched with PDL (``cache_attention``), after the split-K q/k/v GEMM."""
        B, T = (x if qkv is None else qkv).shape[:2]
        Dq, Dkv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        # every mode on the fused path: generation, scoring and training run the same packed GEMM (training through
        # PackedLinearFunction), so that log-probs computed without autograd (old log-probs) equal the training
        # forward's bit for bit (at equal shapes on a GPU); LoRA adapters packed in generation only (scoring runs
        # them one layer at a time, as training does)
        if qkv is None and meta.fused_ops:
            qkv = group_linear(x, (self.q_proj, self.k_proj, self.v_proj), lora=meta.mode != "full")
        # fused decode: K is rotated inside the cache write, q inside the decode attention kernel
        rope_in_write = meta.mode == "decode" and meta.fused_ops
        joint_rope = qkv is not None and meta.backend == "triton" and not rope_in_write
        if joint_rope and meta.mode == "full" and torch.is_grad_enabled() and qkv.requires_grad \
                and not torch.compiler.is_compiling():
            # training: RoPE + attention as one autograd node, whose backward writes the packed q/k/v gradient
            # (no copy joining dQK and dV; kernels/attention.py RopeAttentionPackedFunction)
            from rlhf_engine.kernels.attention import rope_attention_packed

            y = rope_attention_packed(qkv.view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim), cos, sin,
                                      self.n_head, self.n_kv_head, kv_start=meta.kv_start, kv_end=meta.kv_end)
            y = y.reshape(B, T, Dq)
            return self.o_proj(y) if project else y
        if joint_rope:  # q and k rotated together: one launch forward and one backward, not two of each
            # (q and k are then two views of one autograd output: do not modify them in place)
            from rlhf_engine.kernels.kv_cache import apply_rope_qk

            qk, v = qkv.split([Dq + Dkv, Dkv], dim=-1)
            q, k = apply_rope_qk(qk.view(B, T, self.n_head + self.n_kv_head, self.head_dim), cos, sin, self.n_head)
        elif qkv is not None:  # one GEMM over the packed weights (model/packing.py)
            # strided views of (B, T, Dq + 2 Dkv); in training the attention saves v, which keeps the whole qkv
            # buffer (pre-RoPE q and k included: (Dq + Dkv) more elements a token a layer) until the backward
            # unless the layer is recomputed (activation checkpointing), where nothing of it is saved
            q, k, v = qkv.split([Dq, Dkv, Dkv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, Hq, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        if meta.backend != "triton":
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        elif not (joint_rope or rope_in_write):  # one fused kernel per tensor instead of ~5 elementwise ops
            from rlhf_engine.kernels.kv_cache import apply_rope

            q, k = apply_rope(q, cos, sin, backend="triton"), apply_rope(k, cos, sin, backend="triton")
        if meta.mode == "decode":
            k_cache, v_cache = meta.cache.k[self.layer_idx], meta.cache.v[self.layer_idx]  # (B, L, Hkv, D)
            if rope_in_write and meta.fuse_cache_write:
                # by default (RLHF_ENGINE_DECODE_FUSED_WRITE=0 turns it off) the attention kernel writes the cache: one
                # split (K rotated with q's tables: rope_rows is b * T, the same rows), one launch fewer a layer
                y = cache_attention(q, k_cache, v_cache, meta, q_rope=(cos, sin), kv_write=(k, v, meta.write_pos),
                                    pdl=pdl)
            else:
                if rope_in_write:
                    from rlhf_engine.kernels.kv_cache import write_kv_cache

                    write_kv_cache(k_cache, v_cache, k, v, meta.write_pos, cos=cos.reshape(B * T, -1),
                                   sin=sin.reshape(B * T, -1), rope_positions=meta.rope_rows, backend="triton",
                                   check_positions=False)  # rows 0..B*T-1 of the tables made above
                else:
                    write_kv(k_cache, v_cache, k, v, meta)
                y = cache_attention(q, k_cache, v_cache, meta, q_rope=(cos, sin) if rope_in_write else None,
                                    pdl=pdl)
        else:
            y = full_attention(q, k, v, meta)  # (B, T, Hq, D)
            if meta.mode == "prefill":
                meta.cache.k[self.layer_idx][:, :T].copy_(k)
                meta.cache.v[self.layer_idx][:, :T].copy_(v)
        y = y.reshape(B, T, self.n_head * self.head_dim)  # (B, T, Hq*D)
        return self.o_proj(y) if project else y


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H, I, bi = config.hidden_size, config.intermediate_size, config.batch_invariant
        self.gate_proj = Linear(H, I, bias=False, batch_invariant=bi)
        self.up_proj = Linear(H, I, bias=False, batch_invariant=bi)
        self.down_proj = Linear(I, H, bias=False, batch_invariant=bi)

    def forward(self, x: torch.Tensor, fused: bool = False, lora: bool = True) -> torch.Tensor:
        """``fused`` (triton backend): silu(gate) * up in one kernel, gate and up as one GEMM over their packed
        weights where ``group_linear`` can (LoRA adapters packed only with ``lora``: generation)."""
        if fused:
            from rlhf_engine.kernels.swiglu import silu_mul, silu_mul_packed

            gu = group_linear(x, (self.gate_proj, self.up_proj), lora=lora)
            if gu is not None:  # (..., 2 I): the kernel reads both halves in place, its backward writes one gradient
                return self.down_proj(silu_mul_packed(gu, backend="triton"))
            return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x), backend="triton"))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, x: torch.Tensor, d: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                      meta: AttnMeta) -> tuple[torch.Tensor, torch.Tensor]:
        """The same math on the fused kernels, with the residual stream carried as x + d (d: the previous layer's
        MLP output, not yet added; None: none). Returns (x', d'), this layer's output x' + d': each residual add
        happens inside the next norm (residual add + RMSNorm in one kernel). Differentiable; q/k/v and gate/up run
        as one GEMM each over their packed weights, with autograd too (``PackedLinearFunction``: one GEMM for the
        input's gradient, one for the packed weights', split into each parameter's rows)."""
        from rlhf_engine.kernels.rmsnorm import rms_norm

        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        if meta.fuse_norm_gemm:
            out = decode_norm_gemm_layer(self, x, d, cos, sin, meta)
            if out is not None:
                return out
        if meta.gemm_ws:
            out = decode_gemm_ws_layer(self, x, d, cos, sin, meta)
            if out is not None:
                return out
        if d is None or isinstance(d, RowSumSq):  # (RowSumSq: x is the whole stream, after a split-K GEMM layer)
            h = rms_norm(x, n1.weight, n1.eps, backend="triton")
        else:
            h, x = rms_norm(d, n1.weight, n1.eps, residual=x, backend="triton")
        h, x = rms_norm(self.self_attn(h, cos, sin, meta), n2.weight, n2.eps, residual=x, backend="triton")
        return x, self.mlp(h, fused=True, lora=meta.mode != "full")


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """HF convention: position = (number of valid tokens before this one), clamped at 0. (B,T) int64."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Transformer(nn.Module):
    """Embedding -> decoder layers -> final RMSNorm. Returns hidden states (B, T, H)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.pack_projections()

    def pack_projections(self) -> None:
        """Lay each layer's q/k/v weights (and biases) and gate/up weights back to back in one tensor per group,
        so that generation runs them as 2 GEMMs instead of 5 (model/packing.py); values and parameter objects stay.
        Done at construction, by ``.to()``-style conversions and deepcopy; call it after anything else that gives
        the parameters new tensors (``load_state_dict(assign=True)``)."""
        for layer in self.layers:
            for names in PROJECTION_GROUPS:
                pack_linears([layer.get_submodule(n) for n in names])

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.pack_projections()  # .to() / .cuda() / .half() gave every parameter its own tensor
        return self

    def __setstate__(self, state):
        super().__setstate__(state)
        self.pack_projections()  # deepcopy and unpickling give every parameter its own tensor

    def _check_ids(self, input_ids: torch.Tensor, name: str = "input_ids") -> tuple[int, int]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"{name}: expected a (B, T) tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name}: expected int64 or int32, got {input_ids.dtype}")
        return input_ids.shape

    def run_layers(self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        """input_ids (B, T), position_ids (B, T) -> hidden after the final norm (B, T, H)."""
        x = self.embed_tokens(input_ids)  # (B, T, H)
        # (B, T, D) each; the fused kernels read only the first half of the (duplicated) tables: (B, T, D/2)
        if meta.rope_table is not None:  # decode: the step's rows of the precomputed half table, one gather
            B, T = position_ids.shape
            rows = meta.rope_table.index_select(0, position_ids.reshape(-1))  # (B * T, D): [cos | sin]
            half = rows.shape[1] // 2
            cos, sin = rows[:, :half].view(B, T, half), rows[:, half:].view(B, T, half)
        else:
            cos, sin = self.rotary(position_ids, x.dtype, half=meta.fused_ops)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        fallback = use_ckpt and needs_torch_checkpoint(self)  # dropout or autocast: torch.utils.checkpoint
        if meta.fused_ops:  # triton backend: the residual adds ride in the norms (DecoderLayer.forward_fused)
            from rlhf_engine.kernels.rmsnorm import rms_norm

            d = None
            one_node = use_ckpt and not fallback and fused_layer.enabled()
            for layer in self.layers:
                if one_node and fused_layer.applies(layer, x, meta):  # the recomputed layer as one autograd node
                    x, d = fused_layer.fused_layer_forward(layer, x, d, cos, sin, meta)
                elif use_ckpt:
                    x, d = checkpoint_layer(layer.forward_fused, x, d, cos, sin, meta, torch_fallback=fallback)
                else:
                    x, d = layer.forward_fused(x, d, cos, sin, meta)
            if isinstance(d, RowSumSq):  # the split-K decode GEMMs added the last residual
                return rms_norm(x, self.norm.weight, self.norm.eps, backend="triton")
            return rms_norm(d, self.norm.weight, self.norm.eps, residual=x, backend="triton")[0]
        for layer in self.layers:
            if use_ckpt:
                x = checkpoint_layer(layer, x, cos, sin, meta, torch_fallback=fallback)
            else:
                x = layer(x, cos, sin, meta)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, attn_backend: str | None = None,
                validate_mask: bool = True) -> torch.Tensor:
        """Hidden states of the whole sequence.

        input_ids: (B, T) int64. attention_mask: (B, T) 0/1 (any int/bool dtype) or None
        (all valid). position_ids: (B, T) int64 or None -> cumsum(mask) - 1 clamped at 0.
        Returns (B, T, H) in the parameter dtype, after the final norm. Positions where the
        mask is 0 hold finite but meaningless values.
        """
        B, T = self._check_ids(input_ids)
        backend = resolve_backend(attn_backend or self.config.attn_backend, input_ids.device)
        if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask: expected shape {(B, T)}, got {tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = (default_position_ids(attention_mask) if attention_mask is not None
                            else torch.arange(T, device=input_ids.device).expand(B, T))
        elif tuple(position_ids.shape) != (B, T):
            raise ValueError(f"position_ids: expected shape {(B, T)}, got {tuple(position_ids.shape)}")
        meta = AttnMeta(backend=backend, fused_ops=_fused_ops(backend, self),
                        batch_invariant=self.config.batch_invariant)
        if attention_mask is not None:
            if backend == "torch":
                meta.attention_mask = attention_mask.bool()
            else:
                meta.kv_start, meta.kv_end = mask_to_kv_range(attention_mask, validate=validate_mask)
        return self.run_layers(input_ids, position_ids, meta)


class CausalLM(nn.Module):
    """Transformer trunk + LM head (tied to the embedding or not).

    ``model.gradient_checkpointing = True`` recomputes each layer in the backward pass while training
    (``model/checkpointing.py``: works with ``loss.backward()``, not with ``torch.autograd.grad``).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Transformer(config)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, bias=False, batch_invariant=config.batch_invariant)
        self._rope_rows_cache: dict[tuple[int, int, str], torch.Tensor] = {}  # decode_step's b * Tn rows
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    # ------------------------------------------------------------------ properties
    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The (V, H) output projection (the embedding matrix when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.model.gradient_checkpointing = bool(value)

    @property
    def batch_invariant(self) -> bool:
        """fp32 on the CPU: GEMMs and attention computed the same way whatever the batch (``ModelConfig``)."""
        return self.config.batch_invariant

    @batch_invariant.setter
    def batch_invariant(self, value: bool) -> None:
        """Switch a built model: its config (a copy, so that another model built from the same config object keeps
        its own setting) and every Linear and LoRALinear layer, which read the config once, when built."""
        if not isinstance(value, bool):
            raise TypeError(f"batch_invariant: expected a bool, got {value!r}")
        if value != self.config.batch_invariant:
            self.config = self.model.config = dataclasses.replace(self.config, batch_invariant=value)
        for m in self.modules():
            if isinstance(m, (Linear, LoRALinear)):
                m.batch_invariant = value

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    # ------------------------------------------------------------------ full-sequence paths
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, *, attn_backend: str | None = None,
                      validate_mask: bool = True) -> torch.Tensor:
        """(B, T) ids, (B, T) 0/1 mask -> (B, T, H) hidden states after the final norm. See Transformer.forward."""
        return self.model(input_ids, attention_mask, position_ids, attn_backend=attn_backend,
                          validate_mask=validate_mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden -> (..., V) logits in the parameter dtype."""
        return linear(hidden, self.lm_head_weight, batch_invariant=self.config.batch_invariant)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, attn_backend: str | None = None) -> torch.Tensor:
        """Logits (B, T, V) in the parameter dtype; logits at position t predict token t+1.

        Materializes B·T·V logits: trainers should use ``sequence_logprobs`` (fused LM head).
        """
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids, attn_backend=attn_backend))

    def sampling_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden -> (..., V) logits for sampling: the LM-head GEMM's output, in the parameter dtype (the
        samplers read any float dtype as fp32, exactly; on a bf16 model no fp32 copy of the (B, V) logits is made:
        at batch 64 and V = 151,936 that copy moved 58 MB a decode step).

        The rounding is the fused log-prob path's (its logit chunks are in the parameter dtype too, as are HF's and
        Liger's): a sampled token's log-prob and the one the training forward recomputes come from the same
        bf16-rounded logits, so the PPO ratio does not start from a mismatch of up to half a bf16 step (0.03 at
        |logit| 10) per token."""
        return linear(hidden, self.lm_head_weight, batch_invariant=self.config.batch_invariant)

    # ------------------------------------------------------------------ cached generation paths
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, *,
                attn_backend: str | None = None) -> torch.Tensor:
        """Run a LEFT-padded prompt, fill the cache, return the last position's logits (B, V) (parameter dtype).

        input_ids: (B, P) int64; attention_mask: (B, P) 0/1 with every row's valid tokens
        at the end (left padding), at least one per row. cache: a KVCache (see
        ``rlhf_engine.generation.cache``) with B rows and room for L >= P slots; on return
        its K/V slots [0, P) hold the prompt, ``cache.start`` = P - prompt length and
        ``cache.lengths`` = P. No host sync (the mask layout is the caller's contract).
        """
        B, P = self.model._check_ids(input_ids)
        if tuple(attention_mask.shape) != (B, P):
            raise ValueError(f"attention_mask: expected shape {(B, P)}, got {tuple(attention_mask.shape)}")
        _check_cache(cache, B, P, self.config)
        backend = resolve_backend(attn_backend or self.config.attn_backend, input_ids.device)
        n_valid = attention_mask.long().sum(1)  # (B,)
        start = (P - n_valid).to(torch.int32)  # (B,)
        meta = AttnMeta(backend=backend, mode="prefill", cache=cache,
                        fused_ops=_fused_ops(backend, self.model), batch_invariant=self.config.batch_invariant)
        if backend == "torch":
            meta.attention_mask = attention_mask.bool()
        else:
            meta.kv_start, meta.kv_end = start, torch.full_like(start, P)
        position_ids = default_position_ids(attention_mask)
        hidden = self.model.run_layers(input_ids, position_ids, meta)  # (B, P, H)
        cache.start.copy_(start)
        cache.lengths.fill_(P)
        return self.sampling_logits(hidden[:, -1])  # (B, V) in the parameter dtype

    @torch.no_grad()
    def decode_step(self, input_ids: torch.Tensor, cache, *, attn_backend: str | None = None,
                    kv_len: int | None = None, head: str = "logits") -> torch.Tensor:
        """Append Tn tokens per sequence to the cache and return their logits (B, Tn, V) in the parameter dtype
        (``head="hidden"``: the final norm's output (B, Tn, H) instead, for an LM head fused with the sampler,
        ``kernels.lm_head_sample``).

        input_ids: (B, Tn) int64, written at slots [cache.lengths, cache.lengths + Tn);
        position ids are slot - cache.start. Mutates the cache in place (K/V and
        ``cache.lengths += Tn``) and never syncs with the host, so the step can be
        captured in a CUDA graph; the caller keeps ``lengths + Tn <= max_len`` (``generate`` does: past the
        end the new K/V would be dropped and, on the triton path, the RoPE table read out of range).
        kv_len: optional host-side upper bound on the used cache length after this step (lets the torch
        path skip the unused tail).
        """
        B, Tn = self.model._check_ids(input_ids)
        _check_cache(cache, B, None, self.config)
        backend = resolve_backend(attn_backend or self.config.attn_backend, input_ids.device)
        dev = input_ids.device
        # write_pos: cache.lengths itself (int32, what the write kernel takes: no cast per layer); read by the
        # layers before lengths += Tn below
        meta = AttnMeta(backend=backend, mode="decode", cache=cache, write_pos=cache.lengths,
                        cache_lens=cache.lengths + Tn, cache_start=cache.start, kv_len=kv_len,
                        fused_ops=_fused_ops(backend, self.model), batch_invariant=self.config.batch_invariant)
        if meta.fused_ops:
            # position ids slot - start in int32 (one kernel for Tn = 1), the RoPE rows gathered from the model's
            # table (None only inside a first CUDA-graph capture: then run_layers computes them), the rope_rows
            # constant kept per (B, Tn): ~10 kernels fewer a step than computing them all
            meta.rope_table = self.model.rotary.half_table(cache.max_len, dev, self.model.embed_tokens.weight.dtype)
            pos = (cache.lengths - cache.start)[:, None]  # (B, 1) int32
            position_ids = pos if Tn == 1 else pos + torch.arange(Tn, device=dev, dtype=torch.int32)
            meta.rope_rows = self._rope_rows(B, Tn, dev)
            if backend == "triton" and decode_fused_write_enabled():  # only where the attention runs one split
                from rlhf_engine.kernels.decode_attention import default_num_splits

                k0 = cache.k[0]
                meta.fuse_cache_write = default_num_splits(B, k0.shape[2], k0.shape[1], k0.device) == 1
            if backend == "triton" and decode_norm_gemm_enabled():
                from rlhf_engine.kernels.norm_linear import MAX_ROWS

                meta.fuse_norm_gemm = B * Tn <= MAX_ROWS
            if backend == "triton" and decode_gemm_ws_enabled():
                from rlhf_engine.kernels import decode_gemm_ws

                meta.gemm_ws = B * Tn <= decode_gemm_ws.MAX_ROWS and decode_gemm_ws.on_hopper(dev)
        else:
            slots = cache.lengths.long()[:, None] + torch.arange(Tn, device=dev)  # (B, Tn)
            position_ids = slots - cache.start.long()[:, None]  # (B, Tn)
        hidden = self.model.run_layers(input_ids, position_ids, meta)  # (B, Tn, H)
        cache.lengths.add_(Tn)
        if head == "hidden":
            return hidden
        return self.sampling_logits(hidden)  # (B, Tn, V) in the parameter dtype

    def _rope_rows(self, B: int, Tn: int, device: torch.device) -> torch.Tensor:
        """(B,) int32 b * Tn, kept per (B, Tn, device) (a constant of the step); made per call while a CUDA graph is
        being captured and it does not exist yet (it must not live in the graph's memory pool)."""
        key = (B, Tn, str(device))
        rows = self._rope_rows_cache.get(key)
        if rows is None:
            rows = torch.arange(0, B * Tn, Tn, device=device, dtype=torch.int32)
            if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                self._rope_rows_cache[key] = rows
        return rows


def _fused_ops(backend: str, trunk: "Transformer") -> bool:
    """Whether the decoder layers run on the fused kernels (residual add + RMSNorm, silu(gate) * up, with their
    backward): on the triton backend, for hidden sizes the one-row-per-program norm kernel holds in registers.
    Not under autocast (the residual stream and the layer outputs differ in dtype there), and not when a decoder
    layer or a norm has forward or backward hooks, which the fused path, calling the kernels directly, would
    skip."""
    from rlhf_engine.kernels.rmsnorm import MAX_HIDDEN

    if backend != "triton" or trunk.config.hidden_size > MAX_HIDDEN:
        return False
    device = trunk.embed_tokens.weight.device.type
    if torch.is_autocast_enabled(device):
        return False
    return not _has_hooks(trunk)


def _has_hooks(trunk: "Transformer") -> bool:
    """Forward or backward (pre-)hooks on a decoder layer or a norm, or global ones: ``Module.__call__`` runs
    them, and the fused path calls the kernels directly. Walks the ``_modules`` dicts (a module attribute lookup
    through ``__getattr__`` costs ~1 µs, and decode steps call this): ~20 µs for 24 layers."""
    if global_hooks(backward=True):
        return True
    mods = trunk._modules
    watch = [mods["norm"]]
    for layer in mods["layers"]._modules.values():
        sub = layer._modules
        watch += (layer, sub["input_layernorm"], sub["post_attention_layernorm"])
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in watch)


def _check_cache(cache, B: int, P: int | None, config: ModelConfig) -> None:
    if len(cache.k) != config.num_layers:
        raise ValueError(f"cache: expected {config.num_layers} layers, got {len(cache.k)}")
    k0 = cache.k[0]
    if k0.shape[0] != B or k0.shape[2] != config.num_kv_heads or k0.shape[3] != config.head_dim:
        raise ValueError(f"cache: expected K/V of shape ({B}, L, {config.num_kv_heads}, {config.head_dim}), "
                         f"got {tuple(k0.shape)}")
    if P is not None and k0.shape[1] < P:
        raise ValueError(f"cache: capacity {k0.shape[1]} is smaller than the prompt length {P}")
