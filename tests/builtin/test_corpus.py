"""The synthetic review corpus: deterministic, well-formed, and labelled by its own words."""

import json
import re

from lora_ppo.builtin.corpus import (
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    preference_pairs,
    review_corpus,
    review_prompts,
    write_jsonl,
)


def _sentiment_counts(text: str) -> tuple[int, int]:
    """(number of positive words, number of negative words) in a review."""
    words = text.split()
    return sum(w in POSITIVE_WORDS for w in words), sum(w in NEGATIVE_WORDS for w in words)


def test_word_sets_on_the_task_example():
    # "great" and "friendly" are the positive words of this review, nothing in it is negative:
    # a reward counting positive minus negative words gives 2 - 0 = 2.
    text = ("review of the pizza place : the food was great and the staff were friendly . "
            "i would come back .")
    assert _sentiment_counts(text) == (2, 0)
    assert not POSITIVE_WORDS & NEGATIVE_WORDS
    assert {"great", "delicious", "recommended"} <= POSITIVE_WORDS
    assert {"terrible", "bland", "not", "never", "waste"} <= NEGATIVE_WORDS
    assert not {"the", "was", "food", "review", ":", "."} & (POSITIVE_WORDS | NEGATIVE_WORDS)


def test_corpus_is_deterministic_per_seed():
    assert review_corpus(50, seed=3) == review_corpus(50, seed=3)
    assert review_corpus(50, seed=3) != review_corpus(50, seed=4)
    assert review_corpus(10, seed=3) == review_corpus(50, seed=3)[:10]  # a prefix, not resampled


def test_reviews_are_well_formed_and_varied():
    rows = review_corpus(5000, seed=0)
    texts = [t for t, _ in rows]
    for text in texts:
        assert 8 <= len(text.split()) <= 30, text
        assert re.fullmatch(r"[a-z ,.:]+", text), text  # lowercase, punctuation split off
        assert text.endswith(" ."), text
    words = {w for t in texts for w in t.split()}
    assert 150 <= len(words) <= 600  # several hundred distinct words at most
    assert len(set(texts)) >= 3000  # thousands of distinct reviews


def test_labels_match_the_sentiment_words():
    rows = review_corpus(2000, seed=1)
    for text, label in rows:
        pos, neg = _sentiment_counts(text)
        assert (pos > 0 and neg == 0) if label == 1 else (neg > 0 and pos == 0), (label, text)
    share_positive = sum(label for _, label in rows) / len(rows)
    assert 0.45 < share_positive < 0.55


def test_prompts_are_the_review_prefixes():
    prompts = review_prompts(3000, seed=2)
    assert review_prompts(20, seed=2) == prompts[:20]
    assert all(p.endswith(" :") and _sentiment_counts(p) == (0, 0) for p in prompts)
    # Each review starts with one of the prompts and a space; over enough samples both sides
    # cover the same 4 templates x 36 subjects = 144 prompts.
    review_prefixes = {t.split(" : ")[0] + " :" for t, _ in review_corpus(3000, seed=2)}
    assert set(prompts) == review_prefixes
    assert len(review_prefixes) == 144


def test_preference_pairs_share_a_prompt_and_differ_in_sentiment():
    rows = preference_pairs(300, seed=5)
    assert rows == preference_pairs(300, seed=5)
    prompts = set(review_prompts(3000, seed=0))
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["prompt"] in prompts
        assert row["chosen"].startswith(" ") and row["rejected"].startswith(" ")
        assert _sentiment_counts(row["prompt"] + row["chosen"])[1] == 0
        assert _sentiment_counts(row["prompt"] + row["rejected"])[0] == 0
        # Same skeleton: the first clause differs only in its adjective.
        chosen, rejected = row["chosen"].split(), row["rejected"].split()
        first_diff = next(i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r)
        assert chosen[first_diff] in POSITIVE_WORDS and rejected[first_diff] in NEGATIVE_WORDS
        assert chosen[:first_diff] == rejected[:first_diff]


def test_write_jsonl_round_trips(tmp_path):
    rows = preference_pairs(3, seed=0) + [{"text": "caf\u00e9 \u2713", "n": 1}]
    path = write_jsonl(tmp_path / "sub" / "pairs.jsonl", rows)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4
    assert [json.loads(line) for line in lines] == rows


def test_broken_pairs_reject_a_malformed_copy_of_the_positive_review():
    rows = preference_pairs(400, seed=5, broken=0.25)
    assert all(r["rejected"].startswith(" ") for r in rows)
    broken = [r for r in rows if _sentiment_counts(r["prompt"] + r["rejected"])[1] == 0
              and r["rejected"] != r["chosen"]]
    # A broken rejection has no negative words: it is the chosen review cut short, shuffled or
    # with a word repeated; everything else is the negative rendering as without `broken`.
    assert 0.15 < len(broken) / len(rows) < 0.35, len(broken)
    for r in broken:
        c, b = r["chosen"].split(), r["rejected"].split()
        cut, shuffled = b == c[:len(b)] and len(b) < len(c), sorted(b) == sorted(c) and b != c
        repeated = len(b) > len(c) and set(b) == set(c)
        assert cut or shuffled or repeated, r
    assert all(r["rejected"] != r["chosen"] for r in rows)
