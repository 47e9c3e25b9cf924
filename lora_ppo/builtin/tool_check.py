"""Held-out accuracy of a model directory on the calculator task, through plain transformers: an
independent check of what the tools demo exports (`lora-ppo demo --preset tools`).

`AutoModelForCausalLM` on the directory and a small tool loop of its own, as a user would write
one: render the conversation with the tokenizer's chat template and the tool's schema, generate
greedily to the end of the turn, parse `<tool_call>{json}</tool_call>` blocks, run
`Calculator.calculate`, append the call and its result as messages, render again and generate
again, until a turn calls no tool (its text is the final answer) or `max_calls` turns have called
tools. Nothing of lora_ppo's rollout, parser or engine is used; the reward function
(`calculator.correct`) scores the conversations.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

from lora_ppo.builtin import calculator

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


class ToolCheck(NamedTuple):
    accuracy: float        # right final answers / problems
    call_frequency: float  # tool calls run / problems
    conversations: list    # per problem, the messages after the prompt


def parse_calls(text: str) -> tuple[str, list[dict]]:
    """(the text outside the call blocks, the calls {"name", "arguments"}); a block that is not
    such a JSON object becomes a call of no tool, which the loop answers with an error."""
    calls = []
    for block in _CALL.findall(text):
        try:
            obj = json.loads(block.strip())
        except json.JSONDecodeError:
            obj = None
        ok = isinstance(obj, dict) and isinstance(obj.get("arguments"), dict)
        calls.append({"name": obj.get("name") if ok else None,
                      "arguments": obj["arguments"] if ok else {}})
    return _CALL.sub("", text).strip(), calls


def run_call(env: calculator.Calculator, call: dict) -> str:
    """A call's result as TRL writes a failure (`{'error': ...}`) or the tool's return."""
    if call["name"] is None:
        return str({"error": "the tool call could not be parsed"})
    if call["name"] != "calculate":
        return str({"error": f"Tool {call['name']} not found."})
    try:
        return env.calculate(**call["arguments"])
    except (TypeError, ValueError) as e:
        return str({"error": str(e)})


def _greedy(model, tok, texts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Each text continued greedily to the end of the turn (left-padded batches)."""
    import torch

    tok.padding_side = "left"
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tok(texts[s:s + batch_size], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out += tok.batch_decode(gen[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return out


def solve(model, tok, rows: list[dict], *, max_calls: int = 2, max_new_tokens: int = 48,
          batch_size: int = 50) -> list[list[dict]]:
    """The conversations (messages after each row's prompt) of a greedy tool loop."""
    schemas = calculator.tool_schemas()
    envs = [calculator.Calculator() for _ in rows]
    for env, row in zip(envs, rows):
        env.reset(**row)
    convs = [list(row["prompt"]) for row in rows]
    done = [[] for _ in rows]
    active = list(range(len(rows)))
    for turn in range(max_calls + 1):
        texts = [tok.apply_chat_template(convs[i], tools=schemas, add_generation_prompt=True,
                                         tokenize=False) for i in active]
        still = []
        for i, text in zip(active, _greedy(model, tok, texts, max_new_tokens, batch_size)):
            content, calls = parse_calls(text)
            message = {"role": "assistant", "content": content}
            if calls and turn < max_calls:
                message["tool_calls"] = [{"type": "function", "function": c} for c in calls]
                results = [{"role": "tool", "name": c["name"] or "unknown",
                            "content": run_call(envs[i], c)} for c in calls]
                convs[i] += [message] + results
                done[i] += [message] + results
                still.append(i)
            else:
                done[i].append(message)
        active = still
        if not active:
            break
    return done


def tool_accuracy(model_dir: str, rows: list[dict], **kwargs) -> ToolCheck:
    """Greedy accuracy on `rows` (prompt and answer columns) of the model in `model_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    convs = solve(model, tok, rows, **kwargs)
    scores = calculator.correct(convs, [r["answer"] for r in rows])
    calls = sum(len(m.get("tool_calls", [])) for c in convs for m in c)
    return ToolCheck(sum(scores) / len(rows), calls / len(rows), convs)
