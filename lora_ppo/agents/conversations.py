"""Per-sample state of a multi-turn rollout: the generation engine's turn hook.

One `Conversations` per rollout, built from the rollout's dataset rows (each sample's row, a
group's row n times). The engine decodes `prompt_ids[i]` for sample i; whenever rows end a turn
(emit a stop id) it calls `end_turns(rows, turns)` and appends what comes back (mask 0), or ends
the row on None. Then `finish(completion_ids)` takes the trajectories as the engine ended them,
and the scoring side reads `completions()` (TRL's conversational completions: the assistant
turns and tool messages), `env_rewards()`, `env_masks()` and `metrics()`.

    prompt_ids[i]   the prompt rendered with the tools' schemas, `reset`'s observation appended
    end_turns       parse each turn, run its tool calls, return the tool results' token ids
    finish          reconcile with the engine's trajectories (a cut last turn, a rolled-back
                    tool result that did not fit rollout.max_new_tokens)
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from lora_ppo.agents.loading import AgentError
from lora_ppo.agents.parsing import parse_turn
from lora_ppo.agents.render import ToolSuffix, chat_ids, prompt_messages
from lora_ppo.agents.tools import Toolbox
from lora_ppo.errors import first_line

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One conversation. `ids` / `env_mask`: the completion so far, model (1) and environment
    (0) tokens; `messages`: the same as TRL's completion messages."""

    prompt: list[dict]
    prompt_ids: list[int]
    env: Any
    tools: dict
    ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    turns: int = 0          # assistant turns
    rounds: int = 0         # turns whose tool calls ran (what rollout.max_tool_calls counts)
    calls: int = 0          # tool calls run, failed ones included
    failures: int = 0
    last_env: int = 0       # environment ids the last end_turns returned (0: none)
    last_tools: int = 0     # tool messages that came with them
    done: bool = False
    hit_limit: bool = False  # ended with calls left unanswered at rollout.max_tool_calls
    truncated: bool = False  # ended by the token budget (finish)


class Conversations:
    """The conversations of one rollout; the generation engine's `TurnHook`.

    `rows`: each sample's dataset row (every column; the prompt in `prompt_column`, a string or
    a list of messages); `toolbox`: the run's tools and environment (tools.Toolbox);
    `max_tool_calls`: rollout.max_tool_calls; `max_prompt_length`: prompts longer than this are
    cut from the left (as every prompt is), with a warning, since the tools' schemas may be cut.
    """

    def __init__(self, rows: Sequence[dict], tokenizer, toolbox: Toolbox, *,
                 prompt_column: str = "prompt", max_tool_calls: Optional[int] = None,
                 max_prompt_length: Optional[int] = None):
        self.tokenizer, self.toolbox, self.max_tool_calls = tokenizer, toolbox, max_tool_calls
        self.schemas = toolbox.schemas
        self.suffix = ToolSuffix(tokenizer)
        has_env = toolbox.factory is not None
        self.environments = toolbox.lease(len(rows)) if has_env else None
        if has_env:  # back to the pool once this rollout's conversations are dropped
            weakref.finalize(self, toolbox.release, list(self.environments))
        self.samples: list[Sample] = []
        cut = 0
        for i, row in enumerate(rows):
            env = self.environments[i] if has_env else None
            observation = self._reset(env, row, i) if has_env else None
            prompt = row.get(prompt_column)
            if prompt is None and has_env:  # TRL: the environment may own the data
                prompt = [{"role": "user", "content": ""}]
            messages = prompt_messages(prompt, observation)
            ids = chat_ids(tokenizer, messages, self.schemas, add_generation_prompt=True)
            if max_prompt_length is not None and len(ids) > max_prompt_length:
                ids, cut = ids[-max_prompt_length:], cut + 1
            self.samples.append(Sample(messages, ids, env, toolbox.tools_of(env)))
        if cut:
            log.warning("%d of %d prompts rendered with the tools' schemas are longer than "
                        "model.max_prompt_length=%d and were cut from the left (the schemas may "
                        "be cut with them); raise it", cut, len(rows), max_prompt_length)

    def _reset(self, env, row: dict, i: int) -> Optional[str]:
        try:
            observation = env.reset(**row)
        except Exception as e:
            raise AgentError(f"{self.toolbox.env_field}: {self.toolbox.env_name}.reset raised "
                             f"{type(e).__name__} on sample {i} (columns {', '.join(row)}): "
                             f"{first_line(e)}")
        if observation is not None and not isinstance(observation, str):
            raise AgentError(f"{self.toolbox.env_field}: {self.toolbox.env_name}.reset returned "
                             f"a {type(observation).__name__} on sample {i}; return a string (it "
                             "is appended to the prompt) or None")
        return observation

    @property
    def prompt_ids(self) -> list[list[int]]:
        return [s.prompt_ids for s in self.samples]

    def prompts(self) -> list[list[dict]]:
        """Each sample's prompt as messages, `reset`'s observation appended (TRL's `prompts`)."""
        return [s.prompt for s in self.samples]

    # -- the turn hook -------------------------------------------------------------------------

    def end_turns(self, rows: list[int], turns: list[list[int]]) -> list[Optional[list[int]]]:
        """`turns[k]`: the ids sample `rows[k]` generated in the turn that just ended, its stop
        id last. Per row: the tool results' ids followed by the next assistant turn's
        generation prompt, to append before the row's next turn, or None when the trajectory
        ends (no tool call, or the turn called tools after rollout.max_tool_calls turns did).
        The tool calls of all rows run together: async tools concurrently, sync tools one after
        another in row and call order."""
        out: list[Optional[list[int]]] = [None] * len(rows)
        running = []  # (k, sample, parsed calls)
        for k, (r, turn) in enumerate(zip(rows, turns)):
            s, turn = self.samples[r], [int(t) for t in turn]
            if s.done or not turn:
                raise RuntimeError(f"end_turns: sample {r} "
                                   f"{'already ended' if s.done else 'ended an empty turn'}")
            parsed = parse_turn(self.tokenizer, turn, s.prompt_ids + s.ids, self.schemas,
                                ended=self._ends_turn(turn[-1]))
            s.ids += turn
            s.env_mask += [1] * len(turn)
            s.messages.append(parsed.message)
            s.turns, s.last_env, s.last_tools = s.turns + 1, 0, 0
            if not parsed.calls:
                s.done = True
            elif self.max_tool_calls is not None and s.rounds >= self.max_tool_calls:
                s.done = s.hit_limit = True  # TRL leaves the last turn's calls unanswered
            else:
                s.rounds += 1
                running.append((k, s, parsed.calls))
        results = self.toolbox.run_calls([(s.tools, calls) for _, s, calls in running])
        for (k, s, _), result in zip(running, results):
            tool_messages = [{"role": "tool", "name": name, "content": content}
                             for name, content, _ in result]
            ids = self.suffix(tool_messages, int(turns[k][-1]))
            s.calls += len(result)
            s.failures += sum(failed for *_, failed in result)
            s.messages += tool_messages
            s.ids += ids
            s.env_mask += [0] * len(ids)
            s.last_env, s.last_tools = len(ids), len(tool_messages)
            out[k] = ids
        return out

    def _ends_turn(self, token: int) -> bool:
        """A stop id that is a special token (EOS, <|im_end|>) is not text of the turn; one that
        is text (a stop at `</tool_call>`) is parsed with the rest."""
        return token in self.tokenizer.all_special_ids

    def finish(self, completion_ids: Sequence[Sequence[int]]) -> None:
        """The trajectories as the engine ended them (prompt excluded): each must be what
        `end_turns` saw, plus a last turn cut by the token budget (parsed here), or minus the
        tool results of the last call, which the engine did not append because they did not fit
        rollout.max_new_tokens (rolled back here, as TRL rolls them back). Either marks the
        sample truncated."""
        if len(completion_ids) != len(self.samples):
            raise RuntimeError(f"finish: {len(completion_ids)} trajectories for "
                               f"{len(self.samples)} samples")
        for i, (s, got) in enumerate(zip(self.samples, completion_ids)):
            got = [int(t) for t in got]
            if got[:len(s.ids)] == s.ids and (not s.done or len(got) == len(s.ids)):
                tail = got[len(s.ids):]
                if tail:
                    parsed = parse_turn(self.tokenizer, tail, s.prompt_ids + s.ids,
                                        self.schemas, ended=False)
                    s.messages.append(parsed.message)
                    s.ids += tail
                    s.env_mask += [1] * len(tail)
                    s.turns += 1
                s.truncated = not s.done
            elif s.last_env and got == s.ids[:-s.last_env]:
                del s.ids[-s.last_env:], s.env_mask[-s.last_env:], s.messages[-s.last_tools:]
                s.truncated = True
            else:
                raise RuntimeError(f"finish: sample {i}'s trajectory ({len(got)} ids) is not "
                                   f"the one end_turns saw ({len(s.ids)} ids)")
            s.done = True

    # -- what scoring reads --------------------------------------------------------------------

    def completions(self) -> list[list[dict]]:
        """Each sample's trajectory as messages: assistant turns (content, tool_calls) and tool
        messages, what TRL passes reward functions as `completions`."""
        return [s.messages for s in self.samples]

    def completion_ids(self) -> list[list[int]]:
        return [s.ids for s in self.samples]

    def env_masks(self) -> list[list[int]]:
        """Per completion token: 1 generated by the model, 0 added by the environment (TRL's
        `tool_mask`)."""
        return [s.env_mask for s in self.samples]

    def env_rewards(self) -> Optional[list[float]]:
        """Each sample's environment's `get_reward()` (async ones awaited together), or None
        when the environment has no get_reward (or there is no environment)."""
        if self.environments is None or not self.toolbox.has_reward:
            return None
        values: list[Any] = [None] * len(self.samples)
        pending = []
        for i, env in enumerate(self.environments):
            try:
                values[i] = env.get_reward()
            except Exception as e:
                self._bad_reward(i, f"raised {type(e).__name__}: {first_line(e)}")
            if inspect.isawaitable(values[i]):
                pending.append(i)
        for i, v in zip(pending, self.toolbox.await_all([values[i] for i in pending])):
            if isinstance(v, BaseException):
                self._bad_reward(i, f"raised {type(v).__name__}: {first_line(v)}")
            values[i] = v
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                self._bad_reward(i, f"returned {v!r}", "; return a float")
        return [float(v) for v in values]

    def _bad_reward(self, i: int, what: str, fix: str = "") -> None:
        raise AgentError(f"{self.toolbox.env_field}: {self.toolbox.env_name}.get_reward {what} "
                         f"on sample {i}{fix}")

    def metric_sums(self) -> dict[str, float]:
        """Counts over this rank's samples, to sum over ranks before `tool_metrics`."""
        ss = self.samples
        return {"samples": len(ss), "calls": sum(s.calls for s in ss),
                "failures": sum(s.failures for s in ss), "turns": sum(s.turns for s in ss),
                "limit": sum(s.hit_limit for s in ss), "truncated": sum(s.truncated for s in ss),
                "env_tokens": sum(len(s.env_mask) - sum(s.env_mask) for s in ss),
                "tokens": sum(len(s.env_mask) for s in ss)}

    def metrics(self) -> dict[str, float]:
        return tool_metrics(self.metric_sums())

    def show(self, i: int) -> str:
        """Sample i as a conversation, one message per line (tool calls as name(arguments))."""
        return format_conversation(self.samples[i].prompt + self.samples[i].messages)


def rows_of(prompts: Sequence, prompt_column: str = "prompt") -> list[dict]:
    """The dataset rows of the loop's prompts (io/data.py's Prompt: the prompt as the data gave
    it, and the row's other columns), as Conversations and `reset(**row)` take them."""
    return [{prompt_column: p.raw if p.raw is not None else p.text, **p.columns}
            for p in prompts]


def tool_metrics(sums: dict[str, float]) -> dict[str, float]:
    """TRL 1.16's tool metrics (`tools/call_frequency`: calls per sample, `tools/failure_frequency`:
    failed calls per call) and lora_ppo's: assistant turns per sample, the share of samples that
    hit rollout.max_tool_calls, the share of completion tokens the environment wrote."""
    n, calls = max(sums["samples"], 1), sums["calls"]
    return {"tools/call_frequency": calls / n,
            "tools/failure_frequency": sums["failures"] / calls if calls else 0.0,
            "tools/turns": sums["turns"] / n,
            "tools/call_limit_frac": sums["limit"] / n,
            "tools/env_token_frac": sums["env_tokens"] / max(sums["tokens"], 1)}


def format_conversation(messages: list[dict], width: int = 500) -> str:
    """[role] content lines; an assistant's tool calls as `-> name({arguments})`; a tool's
    result as `[tool name]`. Each text cut to `width` characters."""
    lines = []
    for m in messages:
        role = m.get("role", "?") + (f" {m['name']}" if m.get("role") == "tool" else "")
        content = m.get("content")
        text = content if isinstance(content, str) else json.dumps(content)
        lines.append(f"[{role}] {text[:width]}".rstrip())
        for tc in m.get("tool_calls") or []:
            fn = tc.get("function", {})
            lines.append(f"  -> {fn.get('name')}({json.dumps(fn.get('arguments'))[:width]})")
    return "\n".join(lines)
