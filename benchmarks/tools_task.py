"""The task of the `grpo-tools` workload of benchmarks/bench_vs_trl.py: arithmetic in 2 or 3
calculator calls, the environment both sides run, its reward and its SFT transcripts.

    user        "What is 12 * 34 + 56 * 78?"
    assistant   <tool_call>{"name": "calculate", "arguments": {"expression": "12 * 34"}}</tool_call>
    tool        408
    assistant   <tool_call>{"name": "calculate", "arguments": {"expression": "56 * 78"}}</tool_call>
    tool        4368
    assistant   <tool_call>{"name": "calculate", "arguments": {"expression": "408 + 4368"}}</tool_call>
    tool        4776
    assistant   "The answer is 4776."

`a * b + c` takes 2 calls, `a * b + c * d` 3. The model (benchmarks/tools_model.py) is trained on
`transcripts` until it calls the tool in this format, so that a rollout really runs 2-3 tool
rounds per sample; `tool_rounds` counts them from the completion messages, on both sides.

Standard library only: TRL's side (benchmarks/peers/trl_grpo.py, in its own venv) imports this
file by path, and lora_ppo's side names it in `rollout.environment` and `reward.function`, so
both run the same class, the same tool and the same reward.
"""

from __future__ import annotations

import ast
import random
import re
from typing import Optional

LO, HI = 10, 99  # two-digit operands: short expressions for a small model to copy
QUESTIONS = ("What is {e}?", "Compute {e}.", "How much is {e}?")
ANSWER = "The answer is {c}."
MAX_EXPRESSION = 64  # characters the calculator reads


# --- the tool and the environment ------------------------------------------------------------

_OPS = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y}


def evaluate(expression: str) -> int:
    """The value of integers with +, - and * (and parentheses); ValueError for anything else. A
    parse, not `eval`."""
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError(f"cannot read {expression!r}; write integers with +, - and *") from None

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
    """TRL 1.16's environment interface (`environment_factory` there, `rollout.environment`
    here): built with no arguments, `reset(**row)` before each rollout, `calculate` the tool."""

    def __init__(self):
        self.answer: Optional[int] = None
        self.calls = 0

    def reset(self, answer: Optional[int] = None, **kwargs) -> None:
        self.answer, self.calls = answer, 0
        return None

    def calculate(self, expression: str) -> str:
        """Evaluate an arithmetic expression of integers.

        Args:
            expression: The expression, integers with +, - and *, e.g. 12 * 34.
        """
        self.calls += 1
        return str(evaluate(expression))


# --- problems, transcripts, reward -----------------------------------------------------------

def problem(rng: random.Random) -> tuple[int, ...]:
    """(a, b, c) for a * b + c (2 calls) or (a, b, c, d) for a * b + c * d (3 calls), half each."""
    return tuple(rng.randint(LO, HI) for _ in range(rng.choice((3, 4))))


def expression(p: tuple[int, ...]) -> str:
    return f"{p[0]} * {p[1]} + {p[2]}" + (f" * {p[3]}" if len(p) == 4 else "")


def value(p: tuple[int, ...]) -> int:
    return p[0] * p[1] + (p[2] * p[3] if len(p) == 4 else p[2])


def steps(p: tuple[int, ...]) -> list[tuple[str, int]]:
    """The calls that solve `p`, in order, with their results."""
    x = p[0] * p[1]
    if len(p) == 3:
        return [(f"{p[0]} * {p[1]}", x), (f"{x} + {p[2]}", x + p[2])]
    y = p[2] * p[3]
    return [(f"{p[0]} * {p[1]}", x), (f"{p[2]} * {p[3]}", y), (f"{x} + {y}", x + y)]


def prompt_rows(n: int, seed: int) -> list[dict]:
    """`n` rows of TRL's conversational format: `prompt` (one user message) and `answer` (the
    reward's column; `reset` gets it too)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = problem(rng)
        text = rng.choice(QUESTIONS).format(e=expression(p))
        rows.append({"prompt": [{"role": "user", "content": text}], "answer": value(p)})
    return rows


def transcript(p: tuple[int, ...], rng: random.Random) -> list[dict]:
    """One solved conversation, TRL's conversational format with tool calls."""
    msgs = [{"role": "user", "content": rng.choice(QUESTIONS).format(e=expression(p))}]
    for expr, result in steps(p):
        call = {"type": "function",
                "function": {"name": "calculate", "arguments": {"expression": expr}}}
        msgs += [{"role": "assistant", "content": "", "tool_calls": [call]},
                 {"role": "tool", "name": "calculate", "content": str(result)}]
    return msgs + [{"role": "assistant", "content": ANSWER.format(c=value(p))}]


def transcripts(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    return [transcript(problem(rng), rng) for _ in range(n)]


_INT = re.compile(r"-?\d+")


def final_text(completion) -> str:
    """The last assistant message's content (a completion is a list of messages), or the text."""
    if isinstance(completion, str):
        return completion
    for m in reversed(completion):
        if m.get("role") == "assistant":
            return m.get("content") or ""
    return ""


def correct(completions: list, answer: list, **kwargs) -> list[float]:
    """1.0 when the final answer's last number is the row's `answer`, else 0.0 (TRL's reward
    function convention)."""
    out = []
    for c, a in zip(completions, answer):
        found = _INT.findall(final_text(c))
        out.append(float(bool(found) and int(found[-1]) == int(a)))
    return out


def tool_rounds(completion) -> int:
    """The tool rounds of one trajectory: the assistant turns that called a tool and got an
    answer (a tool message after them). Both sides pass the same messages."""
    if isinstance(completion, str):
        return 0
    return sum(1 for m, nxt in zip(completion, completion[1:])
               if m.get("role") == "assistant" and m.get("tool_calls") and nxt.get("role") == "tool")


def tool_failures(completion) -> int:
    """Calls that went wrong in one trajectory: tool messages that carry an error (both tools
    write `{'error': ...}`), and assistant turns whose text still holds a `<tool_call>` (a call
    that did not parse: TRL keeps it as text and ends the trajectory)."""
    if isinstance(completion, str):
        return int("<tool_call>" in completion)
    return sum(1 for m in completion
               if (m.get("role") == "tool" and str(m.get("content", "")).startswith("{'error'"))
               or (m.get("role") == "assistant" and "<tool_call>" in (m.get("content") or "")))
