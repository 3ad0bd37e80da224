"""Batched generation: static KV cache, sampling, prefill + decode loop, CUDA-graph decode."""
from .cache import KVCache, kv_bytes_per_token, max_batch_from_free_memory, step_bytes_per_sequence
from .cuda_graph import CudaGraphDecoder, DecodeGraphCache
from .generate import GenerationOutput, generate
from .sampling import apply_top_k, apply_top_p, sample_tokens, sampling_logits

__all__ = ["KVCache", "CudaGraphDecoder", "DecodeGraphCache", "kv_bytes_per_token", "max_batch_from_free_memory",
           "step_bytes_per_sequence",
           "GenerationOutput", "generate", "apply_top_k", "apply_top_p", "sample_tokens", "sampling_logits"]
