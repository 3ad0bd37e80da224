"""Rewards for PPO: a protocol, VADER sentiment, and adapters.

A reward is either
  * a text reward: ``fn(prompts: list[str], responses: list[str]) -> sequence of B floats``, or
  * a token reward: an object with ``takes_tokens = True`` and
    ``fn(input_ids (B, T) long, attention_mask (B, T)) -> (B,) float tensor`` scoring the whole
    prompt + response (a reward model is one). A token reward that also sets ``takes_response_mask = True``
    is called with ``response_mask=`` (B, T) 0/1 as well, marking the response's tokens.
Any plain Python callable is treated as a text reward. Scores must be finite: the trainer skips
a step whose rewards hold NaN or inf and reports it.
"""
from __future__ import annotations

import numbers
from typing import Callable, Sequence

import torch


class VaderSentimentReward:
    """VADER compound sentiment of each response, in [-1, 1].

    VADER (Hutto & Gilbert 2014) is a lexicon of 7,506 words whose valence was rated by ten
    people each, plus rules for negation, intensifiers and punctuation. It is a *lexicon proxy*
    for human preference: cheap and human-derived, but it scores words, not a person's judgement
    of the whole text. Only the response is scored, not the prompt.
    """

    takes_tokens = False

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the VADER reward needs the 'vaderSentiment' package: "
                              "pip install vaderSentiment==3.3.2") from e
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [self._analyzer.polarity_scores(r)["compound"] for r in responses]


def token_reward(fn: Callable | None = None, *, response_mask: bool = False) -> Callable:
    """Mark a callable as a token reward: ``fn(input_ids, attention_mask) -> (B,) tensor``, or with
    ``response_mask=True`` ``fn(input_ids, attention_mask, response_mask=...)`` (what a "response_mean" reward
    model needs when wrapped). Works as ``token_reward(fn)``, ``@token_reward`` and
    ``@token_reward(response_mask=True)``."""
    def mark(f: Callable) -> Callable:
        f.takes_tokens = True
        f.takes_response_mask = response_mask
        return f

    return mark if fn is None else mark(fn)


def as_score_tensor(scores, batch: int, device: torch.device) -> torch.Tensor:
    """Validate a reward's output: B finite-or-not floats -> (B,) float32 tensor (NaN is kept and
    caught by the trainer, which then skips the step)."""
    expected = f"reward: expected {batch} numbers (one per response) as a sequence or a ({batch},) tensor"
    if isinstance(scores, torch.Tensor):
        if scores.dtype.is_complex:
            raise TypeError(f"{expected}, got a {scores.dtype} tensor")
        t = scores.detach().float()
    else:
        if isinstance(scores, (str, bytes, dict, set, frozenset)) or not hasattr(scores, "__iter__"):
            raise TypeError(f"{expected}, got {type(scores).__name__}")  # a dict would be scored by its keys
        values = list(scores)
        bad = [i for i, v in enumerate(values)
               if isinstance(v, complex) or not isinstance(v, (numbers.Real, torch.Tensor))]  # bools count 0/1
        if bad:
            raise TypeError(f"{expected}, got {type(values[bad[0]]).__name__} {values[bad[0]]!r} at index {bad[0]}")
        try:
            t = torch.tensor([float(v) for v in values], dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:  # e.g. a tensor of several elements in the list
            raise TypeError(f"{expected}: {e}") from e
    if t.shape != (batch,):
        raise ValueError(f"reward: expected {batch} scores (one per response), got shape {tuple(t.shape)}")
    return t.to(device)
