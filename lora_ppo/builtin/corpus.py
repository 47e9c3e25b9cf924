"""A deterministic synthetic corpus of short reviews, positive and negative.

Nothing can be downloaded here, so the demo model is pre-trained on this corpus and RLHF then has
something to change: half the reviews are negative, and a reward that counts `POSITIVE_WORDS`
against `NEGATIVE_WORDS` prefers the positive half. Every review is

    <prompt> <opener?> <clause> <join> <clause> [<join> <clause>] . <closer>

e.g. "review of the pizza place : the food was great and the staff were friendly . i would come
back ." Lowercase, punctuation split off by spaces, 8-30 words, about 300 distinct words.

Sentiment lives only in the adjectives and closers, and the two word sets are disjoint from each
other and from the neutral words, so a review's label can be read off its words (tests check it).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import NamedTuple

# (noun, verb) -> positive / negative adjectives, grouped so that every pairing reads naturally.
_TASTE = (("delicious", "tasty", "fresh", "excellent", "perfect"),
          ("bland", "stale", "cold", "greasy", "disgusting"))
_PEOPLE = (("friendly", "helpful", "kind", "attentive", "lovely"),
           ("rude", "careless", "unfriendly", "awful", "dismissive"))
_SPEED = (("quick", "fast", "efficient", "prompt", "smooth"),
          ("slow", "sluggish", "chaotic", "painful", "terrible"))
_PRICE = (("fair", "reasonable", "generous", "honest", "great"),
          ("outrageous", "absurd", "ridiculous", "stingy", "insulting"))
_ART = (("brilliant", "superb", "gripping", "moving", "wonderful"),
        ("dull", "wooden", "boring", "lifeless", "dreadful"))
_STORY = (("clever", "original", "smart", "surprising", "satisfying"),
          ("predictable", "confusing", "silly", "pointless", "lazy"))
_FUN = (("funny", "hilarious", "witty", "charming", "fantastic"),
        ("lame", "unfunny", "tiresome", "cringeworthy", "painful"))
_BUILD = (("solid", "sturdy", "excellent", "superb", "flawless"),
          ("flimsy", "cheap", "poor", "shoddy", "broken"))
_LOOKS = (("beautiful", "elegant", "sleek", "lovely", "stylish"),
          ("ugly", "clunky", "awkward", "tacky", "hideous"))
_EASE = (("simple", "easy", "clear", "painless", "straightforward"),
         ("confusing", "useless", "frustrating", "awful", "baffling"))


class _Domain(NamedTuple):
    subjects: tuple[str, ...]
    aspects: tuple[tuple[str, str, tuple[tuple[str, ...], tuple[str, ...]]], ...]
    openers: tuple[str, ...]
    pos_closers: tuple[str, ...]
    neg_closers: tuple[str, ...]


_DOMAINS = (
    _Domain(
        subjects=("pizza place", "sushi bar", "taco truck", "corner cafe", "noodle shop",
                  "steak house", "bakery", "burger joint", "thai restaurant", "diner",
                  "brunch spot", "ramen shop"),
        aspects=(("food", "was", _TASTE), ("coffee", "was", _TASTE), ("dessert", "was", _TASTE),
                 ("soup", "was", _TASTE), ("pasta", "was", _TASTE), ("bread", "was", _TASTE),
                 ("staff", "were", _PEOPLE), ("waiter", "was", _PEOPLE),
                 ("owner", "was", _PEOPLE), ("service", "was", _SPEED),
                 ("kitchen", "was", _SPEED), ("prices", "were", _PRICE),
                 ("portions", "were", _PRICE), ("room", "was", _LOOKS)),
        openers=("we went there on a friday night .", "i came here for lunch with a friend .",
                 "we had dinner here last week .", "i stopped by after work ."),
        pos_closers=("i would come back .", "we will definitely return .",
                     "highly recommended .", "best meal in town ."),
        neg_closers=("i would not come back .", "we will never return .",
                     "avoid this place .", "worst meal in years ."),
    ),
    _Domain(
        subjects=("movie", "film", "new sequel", "horror movie", "comedy", "documentary",
                  "animated film", "space movie", "crime drama", "musical", "war film",
                  "romance"),
        aspects=(("acting", "was", _ART), ("cast", "was", _ART), ("music", "was", _ART),
                 ("camera work", "was", _ART), ("plot", "was", _STORY),
                 ("ending", "was", _STORY), ("story", "was", _STORY),
                 ("script", "was", _STORY), ("jokes", "were", _FUN),
                 ("dialogue", "was", _FUN), ("pacing", "was", _SPEED),
                 ("costumes", "were", _LOOKS), ("effects", "were", _LOOKS)),
        openers=("i watched it on a rainy sunday .", "we saw it at the cinema last night .",
                 "i went with my sister .", "i streamed it at home ."),
        pos_closers=("i loved every minute of it .", "a must see .", "worth watching twice .",
                     "easily the best film this year ."),
        neg_closers=("i hated every minute of it .", "a total waste of time .",
                     "skip this one .", "easily the worst film this year ."),
    ),
    _Domain(
        subjects=("headphones", "blender", "laptop", "backpack", "coffee maker", "phone case",
                  "desk lamp", "vacuum", "running shoes", "toaster", "keyboard",
                  "water bottle"),
        aspects=(("quality", "was", _BUILD), ("build", "was", _BUILD),
                 ("material", "was", _BUILD), ("design", "was", _LOOKS),
                 ("color", "was", _LOOKS), ("setup", "was", _EASE),
                 ("manual", "was", _EASE), ("app", "was", _EASE), ("price", "was", _PRICE),
                 ("delivery", "was", _SPEED), ("support", "was", _PEOPLE),
                 ("seller", "was", _PEOPLE)),
        openers=("i bought it last month .", "i ordered it online a few weeks ago .",
                 "i have used it every day since march .", "it was a gift for my dad ."),
        pos_closers=("worth every penny .", "i love it .", "would buy again .", "five stars ."),
        neg_closers=("a waste of money .", "i want a refund .", "would not buy again .",
                     "one star ."),
    ),
)

_PROMPTS = ("review of the {} :", "my review of the {} :", "thoughts on the {} :", "{} review :")
_INTENSIFIERS = ("", "", "really ", "very ", "so ", "pretty ")
_JOINS = (" and ", " , and ", " . ", " , ")
MIN_WORDS, MAX_WORDS = 8, 30  # review length in space-separated words, prompt included


def _words(phrases) -> frozenset[str]:
    return frozenset(w for phrase in phrases for w in phrase.split())


def _sentiment_words(sign: int) -> frozenset[str]:
    """Words of the adjectives and closers on one side (sign 0 = positive, 1 = negative)."""
    adjectives = (a for d in _DOMAINS for _, _, pair in d.aspects for a in pair[sign])
    closers = (c for d in _DOMAINS for c in (d.pos_closers, d.neg_closers)[sign])
    return _words(adjectives) | _words(closers)


_NEUTRAL_WORDS = _words(
    [*_PROMPTS, *_INTENSIFIERS, *_JOINS]
    + [s for d in _DOMAINS for s in d.subjects + d.openers]
    + [f"the {noun} {verb}" for d in _DOMAINS for noun, verb, _ in d.aspects]
)
# Words that occur only in positive / only in negative reviews, so a reward can count them.
# "not" and "never" are negative words here because only negative closers use them.
POSITIVE_WORDS: frozenset[str] = _sentiment_words(0) - _sentiment_words(1) - _NEUTRAL_WORDS
NEGATIVE_WORDS: frozenset[str] = _sentiment_words(1) - _sentiment_words(0) - _NEUTRAL_WORDS


class _Plan(NamedTuple):
    """The sentiment-free skeleton of one review; `_render` fills in the sentiment."""

    domain: _Domain
    prompt: str
    opener: str
    aspects: tuple  # the 1-3 (noun, verb, adjectives) clauses
    intensifiers: tuple[str, ...]
    adjective_picks: tuple[int, ...]  # index into each clause's adjective tuple
    joins: tuple[str, ...]
    closer_pick: int


def _plan(rng: random.Random) -> _Plan:
    """Draw a skeleton whose reviews are 8-30 words either way (redraw the rare long ones)."""
    while True:
        domain = rng.choice(_DOMAINS)
        k = rng.choice((1, 2, 2, 3))
        plan = _Plan(
            domain=domain,
            prompt=rng.choice(_PROMPTS).format(rng.choice(domain.subjects)),
            opener=rng.choice(domain.openers) if rng.random() < 0.3 else "",
            aspects=tuple(rng.sample(domain.aspects, k)),
            intensifiers=tuple(rng.choice(_INTENSIFIERS) for _ in range(k)),
            adjective_picks=tuple(rng.randrange(5) for _ in range(k)),
            joins=tuple(rng.choice(_JOINS) for _ in range(k - 1)),
            closer_pick=rng.randrange(4),
        )
        n_words = max(len((plan.prompt + _render(plan, lab)).split()) for lab in (0, 1))
        if MIN_WORDS <= n_words <= MAX_WORDS:
            return plan


def _render(plan: _Plan, label: int) -> str:
    """The review body after the prompt, with a leading space: prompt + body is the full text."""
    sign = 0 if label == 1 else 1
    clauses = [
        f"the {noun} {verb} {inten}{adjs[sign][pick]}"
        for (noun, verb, adjs), inten, pick in zip(plan.aspects, plan.intensifiers,
                                                   plan.adjective_picks)
    ]
    body = clauses[0] + "".join(j + c for j, c in zip(plan.joins, clauses[1:]))
    closers = plan.domain.pos_closers if label == 1 else plan.domain.neg_closers
    parts = [plan.opener, body + " .", closers[plan.closer_pick]]
    return " " + " ".join(p for p in parts if p)


def review_corpus(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """`n` reviews as (text, label), label 1 = positive, 0 = negative; same seed, same list."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        plan = _plan(rng)
        label = int(rng.random() < 0.5)
        out.append((plan.prompt + _render(plan, label), label))
    return out


def review_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` review openings such as "my review of the movie :", the sentiment left to the model."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        domain = rng.choice(_DOMAINS)
        out.append(rng.choice(_PROMPTS).format(rng.choice(domain.subjects)))
    return out


def sft_pairs(n: int = 2000, seed: int = 7) -> list[dict]:
    """Reviews of the corpus cut after their opening "... :" into prompt / response (SFT data)."""
    rows = []
    for text, _ in review_corpus(n, seed=seed):
        cut = text.index(" :") + 2
        rows.append({"prompt": text[:cut], "response": text[cut:]})
    return rows


def _broken(text: str, rng: random.Random) -> str:
    """A malformed version of a review body: cut short, its words shuffled, or a word repeated."""
    words = text.split()
    kind = rng.randrange(3)
    if kind == 0:
        words = words[:rng.randint(1, max(1, min(4, len(words) - 2)))]
    elif kind == 1:
        rng.shuffle(words)
        if words == text.split():  # the identity shuffle of a short review
            words.reverse()
    else:
        i = rng.randrange(len(words))
        words = words[:i + 1] + [words[i]] * rng.randint(3, 6) + words[i + 1:]
    return " " + " ".join(words)


def preference_pairs(n: int, seed: int = 0, broken: float = 0.0) -> list[dict]:
    """`n` rows {"prompt", "chosen", "rejected"}: one review skeleton rendered both ways.

    chosen is positive, rejected negative; they differ only in adjectives and closer, so the
    preference signal is the sentiment alone. Like TRL's preference format, the continuations
    start with a space: prompt + chosen is the full review text.

    With `broken` > 0, that share of the pairs instead rejects a malformed copy of the positive
    review (cut short, shuffled or repeating; see `_broken`). A reward model that has only seen
    well-formed text has no opinion on broken text, and PPO finds that gap: on the built-in demo
    the policy learnt to write "the was ." for a high score (reward hacking; docs/troubleshooting.md).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        plan = _plan(rng)
        chosen = _render(plan, 1)
        rejected = _broken(chosen, rng) if broken and rng.random() < broken else _render(plan, 0)
        rows.append({"prompt": plan.prompt, "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Write one JSON object per line (UTF-8), creating parent dirs; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
