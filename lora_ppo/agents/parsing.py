"""Tool calls parsed from the text of an assistant turn, in the model's own format.

Two parsers, as TRL 1.16 (`trl/chat_template_utils.py::parse_response`) picks them:

- the tokenizer's own response parser, `tokenizer.parse_response(ids, prefix=..., tools=...)`,
  where the tokenizer has a `response_template` (transformers >= 5.13; it types the arguments
  from the tools' schemas, "7" -> 7 for an integer);
- else the format most tool-calling templates use (Qwen 2.5/3, Hermes, many fine-tunes):
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number per turn.

Where TRL turns a turn it cannot parse into plain text (no call, the trajectory ends), a call
that does not parse here, names no tool or has arguments that are not an object is a call that
failed: it gets an error message back as its result and is counted (`tools/failure_frequency`),
so the model learns from the mistake instead of the episode silently ending.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple, Optional

from lora_ppo.errors import first_line

_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


class ParsedCall(NamedTuple):
    """One tool call as the model wrote it: a name and arguments, or why it cannot be run."""

    name: Optional[str]
    arguments: Optional[dict]
    error: Optional[str] = None  # set when the call could not be parsed into a name and object


class ParsedTurn(NamedTuple):
    """An assistant turn: the message (role, content, tool_calls as TRL writes them: {"type":
    "function", "function": {"name", "arguments"}}) and its calls, those that failed included."""

    message: dict
    calls: list[ParsedCall]


def parse_turn(tokenizer, turn_ids: list[int], context_ids: list[int], schemas: list[dict],
               ended: bool = True) -> ParsedTurn:
    """Parse one assistant turn. `turn_ids`: what the model generated, its stop id last when
    `ended`; `context_ids`: every token before it (the response parser reads the generation
    prompt there); `schemas`: the tools' JSON schemas."""
    body = turn_ids[:-1] if ended and turn_ids else turn_ids
    text = tokenizer.decode(body, skip_special_tokens=False)
    if getattr(tokenizer, "response_template", None) is not None:
        try:
            parsed = tokenizer.parse_response(turn_ids, prefix=context_ids, tools=schemas or None)
        except (ValueError, TypeError, KeyError) as e:
            # The template's parser found a region it could not read (e.g. broken JSON): read
            # the common format, and if that finds no call either, the turn is one failed call.
            turn = parse_tool_call_blocks(text)
            if not turn.calls:
                turn.calls.append(ParsedCall(None, None, f"the tool call could not be parsed: "
                                                          f"{first_line(e)}"))
            return turn
        return _from_response_parser(parsed, tokenizer)
    return parse_tool_call_blocks(text)


def parse_tool_call_blocks(text: str) -> ParsedTurn:
    """The `<tool_call>{json}</tool_call>` format: every block is a call; the text outside the
    well-formed blocks is the content. A `<tool_call>` left open at the end (the turn was cut
    or stopped inside it) is a call that failed."""
    calls, kept, content, at = [], [], [], 0
    for m in _BLOCK.finditer(text):
        call = _call_from_json(m.group(1))
        calls.append(call)
        content.append(text[at:m.start()] if call.error is None else text[at:m.end()])
        at = m.end()
        if call.error is None:
            kept.append(_message_call(call))
    rest = text[at:]
    if "<tool_call>" in rest:
        calls.append(ParsedCall(None, None, "the tool call could not be parsed: <tool_call> is "
                                            "not closed by </tool_call>"))
    content.append(rest)
    message = {"role": "assistant", "content": "".join(content).strip()}
    if kept:
        message["tool_calls"] = kept
    return ParsedTurn(message, calls)


def _call_from_json(raw: str) -> ParsedCall:
    try:
        obj = json.loads(raw.strip())
    except json.JSONDecodeError as e:
        return ParsedCall(None, None, f"the tool call could not be parsed: {e.msg} at column "
                                      f"{e.colno} of {raw.strip()!r:.80}")
    if not isinstance(obj, dict):
        return ParsedCall(None, None, "the tool call is not a JSON object "
                                      '{"name": ..., "arguments": {...}}')
    return _checked(obj.get("name"), obj.get("arguments"))


def _checked(name: Any, arguments: Any) -> ParsedCall:
    """A call with a name and an arguments object; arguments written as a JSON string (the
    OpenAI wire format) are read, missing ones are {} (TRL's `_validate_tool_calls`)."""
    if not isinstance(name, str) or not name:
        return ParsedCall(None, None, "the tool call names no tool: give a \"name\"")
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return ParsedCall(name, None, f"the arguments of {name} could not be parsed: {e.msg}")
    if not isinstance(arguments, dict):
        return ParsedCall(name, None, f"the arguments of {name} are not a JSON object")
    return ParsedCall(name, arguments)


def _message_call(call: ParsedCall) -> dict:
    return {"type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _from_response_parser(parsed: Any, tokenizer) -> ParsedTurn:
    """The tokenizer parser's message, its calls checked one by one (it can return a call
    without a name, or a list where the function should be)."""
    message = dict(parsed) if isinstance(parsed, dict) else {}
    message["role"] = "assistant"
    content = message.get("content")
    # TRL's hotfix (transformers#42249): some parsers leave the EOS text on the content.
    if isinstance(content, str) and tokenizer.eos_token:
        content = content.removesuffix(tokenizer.eos_token)
    message["content"] = content or ""
    raw = message.pop("tool_calls", None) or []
    calls, kept = [], []
    for tc in raw if isinstance(raw, list) else [raw]:
        fn = tc.get("function") if isinstance(tc, dict) else None
        if isinstance(tc, dict) and tc.get("type", "function") != "function":
            call = ParsedCall(None, None, f"unsupported tool call type: {tc.get('type')!r}")
        elif not isinstance(fn, dict):
            call = ParsedCall(None, None, "the tool call is not a JSON object "
                                          '{"name": ..., "arguments": {...}}')
        else:
            call = _checked(fn.get("name"), fn.get("arguments"))
        calls.append(call)
        if call.error is None:
            kept.append(_message_call(call))
    if kept:
        message["tool_calls"] = kept
    return ParsedTurn(message, calls)
