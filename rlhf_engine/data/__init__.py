"""Data loading, validation, tokenization and collation for SFT, reward-model and PPO training."""
from .datasets import (CHAT_ROLES, collate_preference, collate_prompts, encode_text, last_token_index,
                       load_preference_dataset, load_prompt_dataset, load_sft_dataset, pack_examples, pad_sft_batch,
                       pad_token_id, prompt_ids, tokenize_sft_example, truncate_pair)
from .toy_tokenizer import byte_tokenizer

__all__ = [
    "CHAT_ROLES", "byte_tokenizer", "collate_preference", "collate_prompts", "encode_text", "last_token_index",
    "load_preference_dataset", "load_prompt_dataset", "load_sft_dataset", "pack_examples", "pad_sft_batch",
    "pad_token_id", "prompt_ids", "tokenize_sft_example", "truncate_pair",
]
