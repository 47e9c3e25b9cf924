"""Conversations, the engine's turn hook, fed hand-written turns (no model): a TRL 1.16
environment class runs unchanged, tool results are the template's own tokens appended without
re-tokenising the model's, the token budget's roll-back, tool-call limits, env rewards, metrics."""

from __future__ import annotations

import textwrap
import time
from types import SimpleNamespace

import pytest

from lora_ppo.agents import AgentError, Conversations, Toolbox, format_conversation, tool_metrics
from lora_ppo.agents.render import chat_ids, cut_after

# An environment as TRL 1.16's docs write one (docs/source/openenv.md, "Environment class
# requirements"): no-argument __init__, reset(**kwargs) -> str | None getting the row's columns,
# public typed methods with Google-style docstrings as tools, get_reward() -> float.
TRL_ENV = textwrap.dedent('''
    class CalculatorEnv:
        def __init__(self):
            self.reward = 0.0
            self.resets = 0

        def reset(self, **kwargs) -> str | None:
            self.answer = kwargs["answer"]
            self.reward = 0.0
            self.resets += 1
            return kwargs.get("hint")

        def add(self, a: int, b: int) -> int:
            """
            Add two integers.

            Args:
                a: The first integer.
                b: The second integer.

            Returns:
                The sum of the two integers.
            """
            return a + b

        def submit(self, value: int) -> str:
            """
            Submit the final answer.

            Args:
                value: The answer.

            Returns:
                Whether the answer is right.
            """
            self.reward = float(value == self.answer)
            return "correct" if value == self.answer else "wrong"

        def get_reward(self) -> float:
            return self.reward
''')

QUESTION = [{"role": "user", "content": "What is 3 + 4?"}]


@pytest.fixture
def env_toolbox(tmp_path):
    path = tmp_path / "calc_env.py"
    path.write_text(TRL_ENV)
    return Toolbox.from_config(SimpleNamespace(environment=f"{path}:CalculatorEnv", tools=[]))


def turn(tok, text: str, stop: bool = True) -> list[int]:
    """What the model would generate: the text's ids and the stop id that ends the turn."""
    return tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if stop else [])


def call(name: str, **arguments) -> str:
    import json

    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'


def test_a_trl_environment_runs_unchanged(qwen_tokenizer, env_toolbox):
    tok = qwen_tokenizer
    assert [s["function"]["name"] for s in env_toolbox.schemas] == ["add", "submit"]
    assert env_toolbox.has_reward and env_toolbox.env_name == "CalculatorEnv"
    rows = [{"prompt": QUESTION, "answer": 7}, {"prompt": QUESTION, "answer": 7,
                                                "hint": " Use the tools."}]
    conv = Conversations(rows, tok, env_toolbox)
    # reset(**row) got the columns, its return appended to the last message (TRL)
    assert [e.resets for e in conv.environments] == [1, 1]
    assert conv.prompts()[1] == [{"role": "user", "content": "What is 3 + 4? Use the tools."}]
    # the prompt is the template's rendering with the tools' schemas, ending where the
    # assistant's reply begins
    assert conv.prompt_ids[0] == chat_ids(tok, QUESTION, env_toolbox.schemas, True)
    assert '"name": "submit"' in tok.decode(conv.prompt_ids[0])

    out = conv.end_turns([0, 1], [turn(tok, call("add", a=3, b=4)), turn(tok, "It is 8.")])
    assert out[1] is None  # no tool call: the trajectory ends
    assert tok.decode(out[0]) == ("\n<|im_start|>user\n<tool_response>\n7\n</tool_response>"
                                  "<|im_end|>\n<|im_start|>assistant\n")
    assert conv.end_turns([0], [turn(tok, call("submit", value=7))])[0] is not None
    assert conv.end_turns([0], [turn(tok, "The answer is 7.")]) == [None]
    conv.finish(conv.completion_ids())

    assert conv.completions()[0] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 3, "b": 4}}}]},
        {"role": "tool", "name": "add", "content": "7"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "submit", "arguments": {"value": 7}}}]},
        {"role": "tool", "name": "submit", "content": "correct"},
        {"role": "assistant", "content": "The answer is 7."}]
    assert conv.completions()[1] == [{"role": "assistant", "content": "It is 8."}]
    assert conv.env_rewards() == [1.0, 0.0]
    m = conv.metrics()
    assert m["tools/call_frequency"] == 1.0 and m["tools/failure_frequency"] == 0.0
    assert m["tools/turns"] == 2.0 and m["tools/call_limit_frac"] == 0.0
    # the trajectory is the template's rendering of the whole conversation, token for token,
    # up to the model's last stop id (the template's trailing newline is not generated)
    ids = conv.prompt_ids[0] + conv.completion_ids()[0]
    full = chat_ids(tok, conv.prompts()[0] + conv.completions()[0], env_toolbox.schemas)
    assert full[:len(ids)] == ids and tok.decode(full[len(ids):]) == "\n"
    mask = conv.env_masks()[0]
    assert len(mask) == len(conv.completion_ids()[0])
    assert sum(mask) == sum(len(turn(tok, t)) for t in (call("add", a=3, b=4),
                                                         call("submit", value=7),
                                                         "The answer is 7."))


def test_tool_suffix_is_the_templates_rendering_minus_the_prefix(qwen_tokenizer, env_toolbox):
    """The ids appended after a turn equal the template's rendering of the conversation with the
    tool messages (and the next generation prompt) minus its rendering up to the model's stop
    id; the stop id the model produced is not repeated."""
    tok = qwen_tokenizer
    conv = Conversations([{"prompt": QUESTION, "answer": 7}], tok, env_toolbox)
    two = call("add", a=3, b=4) + "\n" + call("add", a=1, b=2)
    t = turn(tok, "Adding.\n" + two)
    (suffix,) = conv.end_turns([0], [t])
    msgs = conv.prompts()[0] + conv.completions()[0]
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "tool"]
    with_tools = chat_ids(tok, msgs, env_toolbox.schemas, add_generation_prompt=True)
    before = chat_ids(tok, msgs[:2], env_toolbox.schemas)
    before = before[:cut_after(before, tok.eos_token_id, None)]
    assert with_tools[:len(before)] == before and suffix == with_tools[len(before):]
    assert suffix[0] != tok.eos_token_id and before[-1] == tok.eos_token_id
    assert conv.prompt_ids[0] + t == before  # the model's own tokens, not re-tokenised
    assert "\n7\n" in tok.decode(suffix) and "\n3\n" in tok.decode(suffix)


def test_tool_calls_in_every_form(qwen_tokenizer):
    """Standalone tools, sync and async: one row per case, all in one end_turns call."""
    tok = qwen_tokenizer
    toolbox = Toolbox([add, slow_add, broken])
    cases = {
        "one": call("add", a=1, b=2),
        "two": call("add", a=1, b=2) + call("slow_add", a=3, b=4),
        "malformed": '<tool_call>\n{"name": "add", "arguments": {"a": 1}\n</tool_call>',
        "unclosed": '<tool_call>\n{"name": "add", ',
        "unknown": call("mul", a=1, b=2),
        "no name": '<tool_call>\n{"arguments": {}}\n</tool_call>',
        "wrong arguments": call("add", a=1, c=2),
        "raises": call("broken", x="boom"),
        "text": "No tool needed.",
    }
    conv = Conversations([{"prompt": "Compute."}] * len(cases), tok, toolbox)
    out = conv.end_turns(list(range(len(cases))), [turn(tok, t) for t in cases.values()])
    results = {case: [m["content"] for m in c if m["role"] == "tool"]
               for case, c in zip(cases, conv.completions())}
    assert results["one"] == ["3"] and results["two"] == ["3", "7"]
    assert results["malformed"][0].startswith("{'error': 'the tool call could not be parsed")
    assert results["unclosed"] == ["{'error': 'the tool call could not be parsed: <tool_call> "
                                   "is not closed by </tool_call>'}"]
    assert results["unknown"] == ["{'error': 'Tool mul not found.'}"]
    assert results["no name"] == ["{'error': 'the tool call names no tool: give a \"name\"'}"]
    assert "unexpected keyword argument 'c'" in results["wrong arguments"][0]
    assert results["raises"] == ["{'error': 'boom'}"]
    assert results["text"] == [] and out[-1] is None
    assert all(o is not None for o in out[:-1])
    sums = conv.metric_sums()
    assert (sums["calls"], sums["failures"]) == (9, 6)
    # the malformed call stays visible in the assistant's content; only good calls are parsed
    assert "arguments" in conv.completions()[2][0]["content"]
    assert "tool_calls" not in conv.completions()[2][0]


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


async def slow_add(a: int, b: int) -> int:
    """Add two integers, slowly.

    Args:
        a: The first integer.
        b: The second integer.
    """
    import asyncio

    await asyncio.sleep(0.01)
    return a + b


def broken(x: str) -> str:
    """Raise.

    Args:
        x: The message.
    """
    raise ValueError(x)


def test_async_tools_of_several_rows_run_concurrently(qwen_tokenizer):
    """Each row's call waits for the other row's: sequential execution would time out."""
    import asyncio

    barrier = asyncio.Barrier(2)

    async def meet(who: str) -> str:
        """Wait for the other caller.

        Args:
            who: The caller.
        """
        await asyncio.wait_for(barrier.wait(), timeout=5)
        return f"met {who}"

    tok = qwen_tokenizer
    toolbox = Toolbox([meet])
    conv = Conversations([{"prompt": "Meet."}] * 2, tok, toolbox)
    start = time.monotonic()
    conv.end_turns([0, 1], [turn(tok, call("meet", who="a")), turn(tok, call("meet", who="b"))])
    assert time.monotonic() - start < 4
    assert [c[1]["content"] for c in conv.completions()] == ["met a", "met b"]
    toolbox.close()


def test_max_tool_calls_ends_the_trajectory_with_the_calls_unanswered(qwen_tokenizer):
    tok = qwen_tokenizer
    conv = Conversations([{"prompt": "Add."}], tok, Toolbox([add]), max_tool_calls=1)
    assert conv.end_turns([0], [turn(tok, call("add", a=1, b=2))])[0] is not None
    assert conv.end_turns([0], [turn(tok, call("add", a=3, b=4))]) == [None]
    assert [m["role"] for m in conv.completions()[0]] == ["assistant", "tool", "assistant"]
    assert conv.metric_sums()["calls"] == 1 and conv.metrics()["tools/call_limit_frac"] == 1.0
    with pytest.raises(RuntimeError, match="already ended"):
        conv.end_turns([0], [turn(tok, "more")])


def test_finish_rolls_back_results_that_did_not_fit_and_parses_a_cut_turn(qwen_tokenizer):
    """The engine leaves out tool results that do not fit rollout.max_new_tokens and cuts a turn
    at the budget; the messages then say what the tokens say (TRL rolls back the same way)."""
    tok = qwen_tokenizer
    conv = Conversations([{"prompt": "Add."}] * 3, tok, Toolbox([add]))
    first = turn(tok, call("add", a=1, b=2))
    out = conv.end_turns([0, 1], [first, first])
    cut = turn(tok, "The sum is", stop=False)
    conv.finish([first,                      # results did not fit: not appended
                 first + out[1] + cut,       # cut by the budget in its next turn
                 cut])                       # cut in its first turn, end_turns never called
    assert [m["role"] for m in conv.completions()[0]] == ["assistant"]
    assert conv.completion_ids()[0] == first and conv.env_masks()[0] == [1] * len(first)
    assert conv.completions()[1][-1] == {"role": "assistant", "content": "The sum is"}
    assert conv.completions()[2] == [{"role": "assistant", "content": "The sum is"}]
    assert conv.metric_sums()["truncated"] == 3
    other = Conversations([{"prompt": "Add."}], tok, Toolbox([add]))
    other.end_turns([0], [first])
    with pytest.raises(RuntimeError, match="not the one end_turns saw"):
        other.finish([first[1:]])


def test_environments_are_pooled_and_reset(qwen_tokenizer, env_toolbox):
    """TRL's pool: constructed once, reset before every rollout; two rollouts alive at once
    never share an instance."""
    tok = qwen_tokenizer
    rows = [{"prompt": QUESTION, "answer": 7}] * 2
    a = Conversations(rows, tok, env_toolbox)
    b = Conversations(rows, tok, env_toolbox)
    assert not {id(e) for e in a.environments} & {id(e) for e in b.environments}
    first = [id(e) for e in a.environments]
    del a
    c = Conversations(rows, tok, env_toolbox)
    assert [id(e) for e in c.environments] == first
    assert [e.resets for e in c.environments] == [2, 2]


def test_reset_errors_and_bad_rewards_are_one_line(qwen_tokenizer, env_toolbox):
    tok = qwen_tokenizer
    with pytest.raises(AgentError, match=r"CalculatorEnv.reset raised KeyError on sample 0") as e:
        Conversations([{"prompt": QUESTION}], tok, env_toolbox)
    assert "\n" not in str(e.value)
    conv = Conversations([{"prompt": QUESTION, "answer": 7}], tok, env_toolbox)
    conv.environments[0].reward = "high"
    with pytest.raises(AgentError, match=r"get_reward returned 'high' on sample 0; return a"):
        conv.env_rewards()


def test_metrics_sum_over_ranks_and_conversations_print():
    sums = {"samples": 4, "calls": 6, "failures": 3, "turns": 10, "limit": 1, "truncated": 0,
            "env_tokens": 30, "tokens": 120}
    assert tool_metrics(sums) == {"tools/call_frequency": 1.5, "tools/failure_frequency": 0.5,
                                  "tools/turns": 2.5, "tools/call_limit_frac": 0.25,
                                  "tools/env_token_frac": 0.25}
    text = format_conversation([
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 3, "b": 4}}}]},
        {"role": "tool", "name": "add", "content": "7"},
        {"role": "assistant", "content": "7."}])
    assert text == ('[user] What is 3 + 4?\n[assistant]\n  -> add({"a": 3, "b": 4})\n'
                    "[tool add] 7\n[assistant] 7.")


ASYNC_ENV = textwrap.dedent('''
    import asyncio

    class Judge:
        def reset(self, **kwargs) -> str | None:
            self.seen = []
            return None

        async def lookup(self, key: str) -> str:
            """
            Look a key up.

            Args:
                key: The key.
            """
            await asyncio.sleep(0.01)
            self.seen.append(key)
            return key.upper()

        async def get_reward(self) -> float:
            await asyncio.sleep(0.01)
            return float(len(self.seen))
''')


def test_async_environment_tools_and_reward(qwen_tokenizer, tmp_path):
    (tmp_path / "judge.py").write_text(ASYNC_ENV)
    toolbox = Toolbox.from_config(SimpleNamespace(environment=f"{tmp_path}/judge.py:Judge",
                                                  tools=[]))
    tok = qwen_tokenizer
    conv = Conversations([{"prompt": "Look up."}] * 2, tok, toolbox)
    conv.end_turns([0, 1], [turn(tok, call("lookup", key="a") + call("lookup", key="b")),
                            turn(tok, "Nothing to look up.")])
    assert [m["content"] for m in conv.completions()[0][1:]] == ["A", "B"]
    assert conv.env_rewards() == [2.0, 0.0]
    toolbox.close()


def test_the_loops_prompts_give_back_their_rows(qwen_tokenizer, env_toolbox):
    """io/data.py's Prompts keep the prompt as the data gave it: a string rendered with the chat
    template (data.chat_template) is a plain user turn again, with the tools' schemas."""
    from lora_ppo.agents import rows_of
    from lora_ppo.io.data import encode_rows, load_prompts

    tok = qwen_tokenizer
    data = [{"question": "What is 3 + 4?", "answer": 7}]
    prompts = encode_rows(tok, load_prompts(data, "question"), True, 64, "data.prompts")
    assert prompts[0].text.endswith("<|im_start|>assistant\n")
    rows = rows_of(prompts, "question")
    assert rows == [{"question": "What is 3 + 4?", "answer": 7}]
    conv = Conversations(rows, tok, env_toolbox, prompt_column="question")
    assert conv.prompts() == [QUESTION] and conv.environments[0].answer == 7
