"""Built-in reward functions (TRL's signature: prompts, completions, **kwargs -> list[float])."""

from __future__ import annotations

from lora_ppo.builtin.arithmetic import answer_of, first_number
from lora_ppo.builtin.corpus import NEGATIVE_WORDS, POSITIVE_WORDS


def positive_sentiment(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """+1 per positive sentiment word, -1 per negative one, of the synthetic review corpus;
    divided by sqrt(words + 1) so padding a response with sentiment words is worth less."""
    scores = []
    for text in completions:
        words = text.lower().split()
        raw = sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words)
        scores.append(raw / (len(words) + 1) ** 0.5)
    return scores


def arithmetic_correct(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """1.0 when the completion starts with the right sum of its "a + b =" prompt, else 0.0:
    a verifiable reward (lora_ppo.builtin.arithmetic), no reward model involved."""
    return [float(answer_of(p) is not None and first_number(c) == answer_of(p))
            for p, c in zip(prompts, completions)]
