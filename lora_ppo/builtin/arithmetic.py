"""A task with a verifiable reward: short additions that the built-in `arith` model writes.

    prompt      "12 + 7 ="            (operands 0 .. MAX_OPERAND)
    completion  " 19" then </s>        right or wrong, checked by `answer_of` (no reward model)

The `arith` model (builtin/tiny.py, SIZES) is pre-trained briefly on `texts()`, so it writes
answers of the right shape but gets many sums wrong; a critic-free estimator (GRPO) can then
raise the share of right answers with a reward function alone: the setting GRPO was made for.
"""

from __future__ import annotations

import random
import re

MAX_OPERAND = 9
_PROBLEM = re.compile(r"(\d+)\s*\+\s*(\d+)\s*=\s*$")


def _pairs(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)) for _ in range(n)]


def prompts(n: int, seed: int = 0) -> list[str]:
    """`n` problems "a + b =" (the completion should be " a+b")."""
    return [f"{a} + {b} =" for a, b in _pairs(n, seed)]


def texts(n: int, seed: int = 0) -> list[str]:
    """`n` solved problems "a + b = c" for pre-training."""
    return [f"{a} + {b} = {a + b}" for a, b in _pairs(n, seed)]


def answer_of(prompt: str) -> int | None:
    """The right answer to a prompt that ends with "a + b =", or None for any other prompt."""
    m = _PROBLEM.search(prompt)
    return None if m is None else int(m.group(1)) + int(m.group(2))


def first_number(completion: str) -> int | None:
    """The integer a completion starts with (after spaces), or None."""
    m = re.match(r"\s*(-?\d+)", completion)
    return None if m is None else int(m.group(1))
