"""Tool calls parsed from a turn: the tokenizer's own response parser where it has a
response_template, else the <tool_call>{json}</tool_call> format; a call that cannot be read is
a failed call with its reason, never a crash and never a silently ended episode."""

from __future__ import annotations

from lora_ppo.agents.parsing import ParsedCall, parse_tool_call_blocks, parse_turn
from lora_ppo.agents.render import chat_ids
from lora_ppo.agents.tools import tool_schema


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


SCHEMAS = [tool_schema(add, "add")]


def test_tool_call_blocks_by_hand():
    one = parse_tool_call_blocks('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
                                 '</tool_call>')
    assert one.calls == [ParsedCall("add", {"a": 1, "b": 2})]
    assert one.message == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]}
    several = parse_tool_call_blocks(
        'First. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>'
        '<tool_call>{"name": "now"}</tool_call> Done.')
    assert several.calls == [ParsedCall("add", {"a": 1, "b": 2}), ParsedCall("add", {"a": 3, "b": 4}),
                             ParsedCall("now", {})]  # arguments as a JSON string; none: {}
    assert several.message["content"] == "First.  Done."
    bad = parse_tool_call_blocks('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>'
                                 '<tool_call>[1]</tool_call><tool_call>{oops}</tool_call>')
    assert [c.error for c in bad.calls] == [
        "the arguments of add are not a JSON object",
        'the tool call is not a JSON object {"name": ..., "arguments": {...}}',
        "the tool call could not be parsed: Expecting property name enclosed in double quotes "
        "at column 2 of '{oops}'"]
    assert "tool_calls" not in bad.message and bad.message["content"].count("<tool_call>") == 3
    assert parse_tool_call_blocks("Just text.").calls == []


def test_the_tokenizers_response_parser_is_used_where_it_has_one(qwen_tokenizer,
                                                                  qwen_response_template):
    tok = qwen_tokenizer
    tok.response_template = qwen_response_template
    context = chat_ids(tok, [{"role": "user", "content": "Add."}], SCHEMAS, True)

    def parse(text):
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return parse_turn(tok, ids, context, SCHEMAS)

    # the parser types arguments from the schema ("2" -> 2 for an integer), which the common
    # format's JSON reading does not
    typed = parse('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": "2"}}\n</tool_call>')
    assert typed.calls == [ParsedCall("add", {"a": 1, "b": 2})]
    assert typed.message == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]}
    two = parse('Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
                '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n'
                '</tool_call>')
    assert [c.arguments for c in two.calls] == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    assert two.message["content"] == "Let me add."
    # transformers' parser raises on broken JSON (TRL then drops the call as plain text): here
    # the call is a failed call with the reason
    broken = parse('<tool_call>\n{"name": "add", "arguments": {"a": 1}\n</tool_call>')
    assert len(broken.calls) == 1 and broken.calls[0].error.startswith(
        "the tool call could not be parsed")
    nameless = parse('<tool_call>\n{"arguments": {}}\n</tool_call>')
    assert nameless.calls[0].error == 'the tool call names no tool: give a "name"'
    text = parse("The answer is 3.")
    assert text.calls == [] and text.message == {"role": "assistant",
                                                 "content": "The answer is 3."}
