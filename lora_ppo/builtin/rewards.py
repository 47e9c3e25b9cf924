"""Built-in reward functions (TRL's signature: prompts, completions, **kwargs -> list[float])."""

from __future__ import annotations


def positive_sentiment(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """+1 per positive sentiment word, -1 per negative one, of the synthetic review corpus;
    divided by sqrt(words + 1) so padding a response with sentiment words is worth less."""
    from lora_ppo.builtin.corpus import NEGATIVE_WORDS, POSITIVE_WORDS

    scores = []
    for text in completions:
        words = text.lower().split()
        raw = sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words)
        scores.append(raw / (len(words) + 1) ** 0.5)
    return scores
