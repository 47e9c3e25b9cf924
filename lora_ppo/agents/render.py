"""The chat template's rendering of tool turns: prompts with the tools' schemas, and the token ids
of tool results, appended after what the model generated without re-tokenising any of it.

A tool result's ids are the suffix the template adds after an assistant turn that called the
tool: TRL 1.16's `_get_tool_suffix_ids` (`trl/trainer/grpo_trainer.py`) renders a dummy
conversation (user, assistant calling the tool) with and without the tool messages (and the
generation prompt for the next assistant turn) and keeps the difference. The rendered assistant
turn ends with the template's end-of-turn token and often a newline ("<|im_end|>\\n"); the model
stopped at its end-of-turn token, so the cut is made right after the last occurrence of the stop
id the model generated in the dummy rendering (TRL cuts after the tokenizer's EOS): the newline
goes into the suffix and the stop id is not repeated. A stop id the template never renders (a
model that ended its turn with `<|endoftext|>` where the template writes `<|im_end|>`) falls back
to TRL's cut at the EOS, then to the whole rendered turn.
"""

from __future__ import annotations

from typing import Optional

from lora_ppo.agents.loading import AgentError
from lora_ppo.errors import first_line
from lora_ppo.io.data import template_messages

_DUMMY_USER = {"role": "user", "content": "dummy"}


def chat_ids(tokenizer, messages: list[dict], tools: Optional[list[dict]] = None,
             add_generation_prompt: bool = False) -> list[int]:
    """Token ids of the template's rendering. `tools or None`: Llama 3's template renders its
    tool boilerplate for `tools=[]` (TRL's note). Rendered text already holds its BOS, so no
    special tokens are added (transformers' chat-template docs)."""
    text = chat_text(tokenizer, messages, tools, add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_text(tokenizer, messages: list[dict], tools: Optional[list[dict]] = None,
              add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def prompt_messages(prompt, observation: Optional[str] = None) -> list[dict]:
    """The prompt as messages: a string is one user turn, a conversation is kept (keys whose
    value is None dropped: a table gives every message every key). An environment's `reset`
    observation is appended to the last message's content, as TRL appends it."""
    messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                else template_messages(prompt))
    if observation is not None:
        last = messages[-1]
        messages[-1] = {**last, "content": (last.get("content") or "") + observation}
    return messages


class ToolSuffix:
    """Token ids of tool messages as the template renders them after an assistant turn that
    ended with `stop_id`, followed by the generation prompt of the next assistant turn."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._prefix: dict[tuple[str, int], list[int]] = {}  # (tool name, stop id) -> ids

    def dummy_turn(self, name: str) -> list[dict]:
        # The real tool name: some templates (GPT-OSS) take the tool response's header from the
        # call it answers (TRL's note).
        call = {"type": "function", "function": {"name": name, "arguments": {}}}
        return [_DUMMY_USER, {"role": "assistant", "content": "", "tool_calls": [call]}]

    def prefix_ids(self, name: str, stop_id: int) -> list[int]:
        """The dummy conversation's ids up to and including the end of the assistant's turn."""
        key = (name, stop_id)
        if key not in self._prefix:
            ids = chat_ids(self.tokenizer, self.dummy_turn(name))
            self._prefix[key] = ids[:cut_after(ids, stop_id, self.tokenizer.eos_token_id)]
        return self._prefix[key]

    def __call__(self, tool_messages: list[dict], stop_id: int) -> list[int]:
        name = tool_messages[0].get("name") or "unknown"
        prefix = self.prefix_ids(name, stop_id)
        full = chat_ids(self.tokenizer, self.dummy_turn(name) + tool_messages,
                        add_generation_prompt=True)
        if full[:len(prefix)] != prefix:
            raise AgentError("the chat template renders an assistant turn differently once a "
                             "tool message follows it (not prefix-preserving), so tool results "
                             "cannot be appended to what the model generated; use a template that "
                             "is (TRL ships *_training.jinja ones)")
        return full[len(prefix):]


def cut_after(ids: list[int], stop_id: int, eos_id: Optional[int]) -> int:
    """Where the rendered turn ends: after the last `stop_id`, else after the last EOS (TRL's
    rule), else at the end."""
    for tok in (stop_id, eos_id):
        if tok is not None and tok in ids:
            return len(ids) - ids[::-1].index(tok)
    return len(ids)


def check_template(tokenizer, where: str = "the tokenizer") -> None:
    """At setup: the template exists, renders a whole tool exchange (user, assistant calling a
    tool, tool result: TRL's `supports_tool_calling`, whose sentinels must all appear) and is
    prefix-preserving there. One line otherwise."""
    if not getattr(tokenizer, "chat_template", None):
        raise AgentError(f"{where} has no chat template; tools and environments need one that "
                         "renders tool calls and tool messages")
    name, key, value, content = ("tool_name_a8f3", "arg_key_b9d4", "arg_val_d6e7",
                                 "tool_content_c4f9")
    call = {"type": "function", "function": {"name": name, "arguments": {key: value}}}
    turn = [_DUMMY_USER, {"role": "assistant", "content": "", "tool_calls": [call]}]
    tool = {"role": "tool", "name": name, "content": content}
    try:
        rendered = chat_text(tokenizer, turn + [tool])
    except Exception as e:
        raise AgentError(f"the chat template of {where} cannot render a tool call and its "
                         f"result ({type(e).__name__}: {first_line(e)}); use a model whose "
                         "template supports tools")
    missing = [s for s in (name, key, value, content) if s not in rendered]
    if missing:
        raise AgentError(f"the chat template of {where} drops "
                         f"{'the tool message' if missing == [content] else 'the tool call'} "
                         "when it renders a tool exchange; use a model whose template supports "
                         "tools")
    ToolSuffix(tokenizer)([tool], tokenizer.eos_token_id)  # prefix-preserving, or one line
