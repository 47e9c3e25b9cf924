"""SFT on tool-calling transcripts: the loss on every assistant turn (its tool calls and its final
answer), the rest (system, user, tool results, the template's glue) context.

A transcript is TRL's conversational format with tools: a list of messages in which assistant
messages may carry `tool_calls` ({"type": "function", "function": {"name", "arguments"}}) and
`role: tool` messages carry the results; the tools' JSON schemas come from the row's `tools`
column (a list of schemas, or that list as a JSON string, as TRL's SFTTrainer reads it) or from
rollout.tools / rollout.environment.

Where each assistant turn starts and ends is found by rendering prefixes, not by `{% generation
%}` markers in the template (TRL's `assistant_only_loss` needs those and swaps in its own
training templates): an assistant turn starts after the rendering of the messages before it with
the generation prompt, and ends after its template's end-of-turn token (the EOS), as the turn
the model generates in a rollout ends at its stop id. The text between turns is glue. Each
segment is tokenised on its own, so the token boundaries are those of a rollout: the model's
tokens start after the generation prompt and the environment's ids are tokenised apart
(conversations.py). The mask therefore covers exactly the tokens a rollout of the same
conversation marks as the model's.
"""

from __future__ import annotations

import json
from typing import Optional

from lora_ppo.agents.loading import AgentError
from lora_ppo.agents.render import chat_text


def transcript_messages(messages: list) -> list[dict]:
    """The messages as the template takes them: keys whose value is None dropped (a table gives
    every message every key), a call's arguments written as a JSON string read as an object."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if m.get("tool_calls"):
            m["tool_calls"] = [_call(tc) for tc in m["tool_calls"]]
        out.append(m)
    return out


def _call(tc: dict) -> dict:
    fn = dict(tc.get("function") or {})
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except json.JSONDecodeError:
            pass  # kept as written: the template renders it as the model would read it
    return {**{k: v for k, v in tc.items() if v is not None}, "function": fn}


def row_tools(value, default: Optional[list[dict]], where: str) -> Optional[list[dict]]:
    """The tools' schemas of a row: its `tools` value (a list, or a JSON string of one), else
    `default` (rollout.tools / rollout.environment's)."""
    if value is None:
        return default
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise AgentError(f"{where}: the tools column is not JSON ({e.msg}); give a list of "
                             "JSON schemas {'type': 'function', 'function': {...}}")
    if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
        raise AgentError(f"{where}: the tools column must be a list of JSON schemas "
                         "{'type': 'function', 'function': {...}}")
    return value


def is_tool_transcript(messages) -> bool:
    """A conversation with a tool call or a tool message."""
    return isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages)


def transcript_row(prompt, response, row: dict, where: str) -> Optional[dict]:
    """An SFT row as a tool transcript, or None when it is not one: the messages (a prompt
    string as one user turn), the row's `tools` value, and the first message trained (the
    response's: every assistant turn of a whole conversation, `prompt` None)."""
    before = ([] if prompt is None else [{"role": "user", "content": prompt}]
              if isinstance(prompt, str) else list(prompt))
    after = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
    messages = before + list(after)
    if not is_tool_transcript(messages):
        return None
    return {"messages": messages, "tools": row.get("tools"), "where": where,
            "train_from": len(before) if prompt is not None else 0}


def transcript_segments(tokenizer, messages: list[dict], tools: Optional[list[dict]],
                        where: str, train_from: int = 0) -> list[tuple[str, bool]]:
    """(text, the model writes it) segments whose concatenation is the template's rendering of
    the conversation up to the end of its last assistant turn; assistant turns before message
    `train_from` (a prompt's) are context."""
    eos = tokenizer.eos_token
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m.get("role") != "assistant" or i < train_from:
            continue
        head = chat_text(tokenizer, messages[:i], tools, add_generation_prompt=True)
        turn = chat_text(tokenizer, messages[:i + 1], tools)
        if not head.startswith(done) or not turn.startswith(head):
            raise AgentError(f"{where}: the chat template renders message {i} (an assistant "
                             "turn) differently from the generation prompt it follows, or earlier "
                             "turns differently once it follows (not prefix-preserving); its "
                             "assistant turns cannot be found")
        body = turn[len(head):]
        if eos and eos in body:  # the turn ends at the end-of-turn token; the rest is glue
            body = body[:body.rindex(eos) + len(eos)]
        segments += [(head[len(done):], False), (body, True)]
        done = head + body
    if not segments:
        raise AgentError(f"{where}: the conversation has no assistant message to train on")
    return segments


def encode_transcript(tokenizer, messages: list, tools: Optional[list[dict]], *,
                      max_prompt_length: int, max_length: int, where: str = "sft.data",
                      train_from: int = 0) -> tuple[list[int], list[int]]:
    """(token ids, loss mask): 1 on every assistant turn's tokens (from message `train_from`
    on: TRL's prompt-completion rows train the completion's), its end-of-turn token included.
    The context before the first trained turn is cut from the left to `max_prompt_length` (as
    every prompt is), then the whole to `max_length` at the end."""
    segments = transcript_segments(tokenizer, transcript_messages(messages), tools, where,
                                   train_from)
    ids, mask = [], []
    for k, (text, model) in enumerate(segments):
        seg = tokenizer(text, add_special_tokens=False)["input_ids"]
        if k == 0:
            seg = seg[-max_prompt_length:]
        ids += seg
        mask += [int(model)] * len(seg)
    return ids[:max_length], mask[:max_length]
