"""A tiny byte-level tokenizer with a chat template, for tests and examples that need no download.

Every UTF-8 byte is one token (no merges), after seven special tokens:

    id  token            role
    0   <pad>            pad_token
    1   <s>              bos_token (not added by ``encode``)
    2   </s>             eos_token, also the end of every chat turn
    3   <|user|>         chat role markers
    4   <|assistant|>
    5   <|system|>
    6   <|end|>          spare special token
    7.. the 256 bytes    (GPT-2's printable byte-to-unicode map)

so ``len(tokenizer) == 263``. The ids 0/1/2 for pad/bos/eos match the tiny model presets
of ``rlhf_engine.model.config``. The chat template renders
``<|role|>content</s>`` per message and ``<|assistant|>`` as the generation prompt.
"""
from __future__ import annotations

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer():
    """A ``transformers`` fast tokenizer (263 tokens, see the module docstring); builds in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b, ch in sorted(_bytes_to_unicode().items()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   chat_template=CHAT_TEMPLATE)


__all__ = ["byte_tokenizer", "SPECIAL_TOKENS", "CHAT_TEMPLATE"]
