"""A task the built-in `tools` model cannot do without its tool: two-digit arithmetic with a
calculator (`lora-ppo demo --preset tools`).

    user        "What is 47 * 29?"
    assistant   <tool_call>{"name": "calculate", "arguments": {"expression": "47 * 29"}}</tool_call>
    tool        1363
    assistant   "The answer is 1363."

The right answer is checked by `correct` (a reward function, TRL's signature), from the last
number of the final assistant message; no reward model. The `tools` model (builtin/chat.py) is
pre-trained on conversations without tools (`chat_corpus`): it answers such questions from its
head, restating the problem ("47 * 29 = 1353."), mostly wrongly, and it has read answers given
in its context ("Given that ..."); and on calls of another tool (chat.lookup), so it knows the
call format but not this tool. A few hundred tool transcripts (`transcripts`) then teach it to
call `calculate` and read the result (SFT), and RL raises the share of right answers.

The problems: a + b or a * b, operands 10 .. MAX_OPERAND. The held-out problems (`heldout`) are
never among the training prompts or the SFT transcripts (`problems` excludes them).
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Iterable
from typing import NamedTuple, Optional

# The built-in tools model's recipe (tiny.SIZES) carries VERSION: bump it when the problems,
# the held-out set or the corpus below change, so that a cached model is never stale.
VERSION = 2
MIN_OPERAND, MAX_OPERAND = 10, 99
OPS = ("+", "*")
HELDOUT_SEED, HELDOUT_N = 99, 200
QUESTIONS = ("What is {e}?", "Compute {e}.", "How much is {e}?")
ANSWER = "The answer is {c}."
MAX_EXPRESSION = 64  # characters the calculator reads: a bound on the work a call can ask for


class Problem(NamedTuple):
    a: int
    op: str
    b: int

    @property
    def expression(self) -> str:
        return f"{self.a} {self.op} {self.b}"

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a * self.b


def _draw(rng: random.Random) -> Problem:
    return Problem(rng.randint(MIN_OPERAND, MAX_OPERAND), rng.choice(OPS),
                   rng.randint(MIN_OPERAND, MAX_OPERAND))


def heldout(n: int = HELDOUT_N) -> list[Problem]:
    """The first `n` (at most HELDOUT_N) held-out problems, distinct: the same ones for any
    `n`."""
    if n > HELDOUT_N:
        raise ValueError(f"at most {HELDOUT_N} held-out problems; got {n}")
    rng, out = random.Random(HELDOUT_SEED), {}
    while len(out) < HELDOUT_N:
        out.setdefault(_draw(rng), None)
    return list(out)[:n]


def problems(n: int, seed: int) -> list[Problem]:
    """`n` problems drawn with `seed`, none of them held out."""
    rng, held, out = random.Random(seed), set(heldout()), []
    while len(out) < n:
        p = _draw(rng)
        if p not in held:
            out.append(p)
    return out


def question(p: Problem, rng: random.Random) -> str:
    return rng.choice(QUESTIONS).format(e=p.expression)


def prompt_rows(ps: Iterable[Problem], seed: int = 0) -> list[dict]:
    """Rows of a prompt dataset: `prompt` (one user message, TRL's conversational format) and
    `answer` (the environment's `reset` and the reward function get it)."""
    rng = random.Random(seed)
    return [{"prompt": [{"role": "user", "content": question(p, rng)}], "answer": p.answer}
            for p in ps]


def prompts(n: int, seed: int = 0) -> list[dict]:
    """`n` training prompts (never held out)."""
    return prompt_rows(problems(n, seed), seed)


def heldout_prompts(n: int = HELDOUT_N) -> list[dict]:
    return prompt_rows(heldout(n), HELDOUT_SEED)


# -- the tool ------------------------------------------------------------------------------------

_OPS = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y}


def evaluate(expression: str) -> int:
    """The value of an expression of integers with +, - and * (and parentheses); ValueError for
    anything else. A parse, not `eval`: no names, calls or powers."""
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError(f"cannot read {expression!r}; write integers with +, - and *")

    def value(node) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"cannot compute {expression!r}; only integers with +, - and *")

    return value(tree)


class Calculator:
    """The task's environment, with TRL 1.16's interface (`rollout.environment`): built with no
    arguments, `reset(**row)` before each rollout, its public method `calculate` the tool."""

    def __init__(self):
        self.answer: Optional[int] = None
        self.calls = 0

    def reset(self, answer: Optional[int] = None, **kwargs) -> None:
        """Start a problem: the row's `answer` is kept (for a reward that reads environments)."""
        self.answer, self.calls = answer, 0
        return None

    def calculate(self, expression: str) -> str:
        """Evaluate an arithmetic expression of integers.

        Args:
            expression: The expression, integers with +, - and *, e.g. 12 * 34.
        """
        self.calls += 1
        return str(evaluate(expression))


# -- the reward ----------------------------------------------------------------------------------

_INT = re.compile(r"-?\d+")


def final_text(completion) -> str:
    """The final answer's text: the last assistant message's content of a conversation (a
    list of messages), or the completion itself when it is a string."""
    if isinstance(completion, str):
        return completion
    for m in reversed(completion):
        if m.get("role") == "assistant":
            return m.get("content") or ""
    return ""


def final_number(completion) -> Optional[int]:
    """The last integer of the final answer, or None."""
    found = _INT.findall(final_text(completion))
    return int(found[-1]) if found else None


def correct(completions: list, answer: list, **kwargs) -> list[float]:
    """1.0 when the final answer's last number is the row's `answer`, else 0.0 (TRL's reward
    function signature; `answer` is the dataset's column)."""
    return [float(final_number(c) == int(a)) for c, a in zip(completions, answer)]


# -- the data: SFT transcripts and the base model's pre-training conversations -------------------

def transcript(p: Problem, rng: random.Random) -> list[dict]:
    """One tool-calling transcript (TRL's conversational format with tools)."""
    call = {"type": "function",
            "function": {"name": "calculate", "arguments": {"expression": p.expression}}}
    return [{"role": "user", "content": question(p, rng)},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "calculate", "content": str(p.answer)},
            {"role": "assistant", "content": ANSWER.format(c=p.answer)}]


def transcripts(n: int, seed: int = 7) -> list[dict]:
    """`n` rows {"messages": a transcript} for `lora-ppo sft` (no held-out problem among them;
    the tools' schemas come from rollout.environment, or `tools_column`)."""
    rng = random.Random(seed + 1)
    return [{"messages": transcript(p, rng)} for p in problems(n, seed)]


def tool_schemas() -> list[dict]:
    """The JSON schemas of the environment's tools, as the chat template shows them."""
    from transformers.utils import get_json_schema

    return [get_json_schema(Calculator.calculate)]


def chat_corpus(n: int, seed: int = 0) -> list[list[dict]]:
    """`n` conversations without tools, the base model's pre-training: half questions answered
    from the head ("47 * 29 = 1363.": the problem restated, then its value, which a small
    model gets mostly wrong), half answers read from the context ("Given that 47 * 29 = 1363,
    what is 47 * 29?" -> "The answer is 1363."). No held-out problem among them."""
    rng = random.Random(seed + 1)
    out = []
    for p in problems(n, seed):
        if rng.random() < 0.5:
            out.append([{"role": "user", "content": question(p, rng)},
                        {"role": "assistant", "content": f"{p.expression} = {p.answer}."}])
        else:
            ask = question(p, rng)
            out.append([{"role": "user", "content": f"Given that {p.expression} = {p.answer}, "
                                                    f"{ask[0].lower()}{ask[1:]}"},
                        {"role": "assistant", "content": ANSWER.format(c=p.answer)}])
    return out
