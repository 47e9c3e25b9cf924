"""A custom rollout: `rollout.rollout_func: file.py:fn`, TRL 1.16's `rollout_func` for anything
the environment interface does not cover (an external simulator, a server, your own sampler).

The contract (TRL's, `trl/trainer/grpo_trainer.py::_generate`, with lora_ppo's checks):

    def fn(prompts: list, ctx: RolloutContext) -> dict

`prompts`: this rank's prompts of the update, each once (no repeats), as the data gives them:
strings, or conversations (lists of messages); rendering them is the function's job, as in TRL.
`ctx` stands where TRL passes the trainer: the tokenizer, the config, samples_per_prompt,
max_new_tokens and, from the run, `generate` (lora_ppo's engine on the policy).

It returns `samples = len(prompts) x rollout.samples_per_prompt` samples, prompt i's at
i*n .. i*n+n-1 (a group, as TRL expects `num_generations` per prompt):

    prompt_ids      list of `samples` token-id lists; a group's are equal (its prompt is
                    encoded once in scoring and the update)
    completion_ids  list of `samples` non-empty token-id lists, at most rollout.max_new_tokens
                    each, the model's and the environment's tokens in the order the model read
                    them
    logprobs        list of `samples` float lists, one per completion token: the sampler's
                    log-probability of each model token at rollout.temperature (finite, <= 0);
                    the values at environment tokens are ignored (TRL writes 0.0)
    env_mask        optional, list of `samples` 0/1 lists, one per completion token: 1 a token
                    the model generated, 0 one the environment added (TRL's convention, its
                    `tool_mask`); each sample has at least one 1. Absent: every token is the
                    model's
    anything else   a list with one value per sample, passed to reward functions by name (TRL's
                    extra fields)

`check_rollout_output` checks all of it and refuses with one line listing each violation (one
clause per rule, naming the first sample that breaks it); the run stops with exit code 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

from lora_ppo.agents.loading import AgentError, load_object

REQUIRED = ("prompt_ids", "completion_ids", "logprobs")


class RolloutFuncError(AgentError):
    """A rollout function returned something the contract does not allow."""


@dataclass
class RolloutContext:
    """What a rollout function gets in place of TRL's trainer."""

    tokenizer: Any
    config: Any
    samples_per_prompt: int
    max_new_tokens: int
    generate: Optional[Callable] = None  # set by the run: lora_ppo's engine on the policy


class RolloutOutput(NamedTuple):
    """A checked return: plain lists, env_mask filled in (all 1) when absent."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    env_mask: list[list[int]]
    extra: dict[str, list]


def load_rollout_func(spec: str) -> Callable:
    fn = load_object(spec, "rollout.rollout_func")
    if not callable(fn):
        raise AgentError(f"rollout.rollout_func={spec!r} is a {type(fn).__name__}; name a "
                         "function fn(prompts, ctx) -> dict")
    return fn


def _plain(x):
    """Tensors and arrays to lists, so the checks read one kind of value."""
    return x.tolist() if hasattr(x, "tolist") else x


def rollout_violations(out: Any, n_prompts: int, samples_per_prompt: int, vocab_size: int,
                       max_new_tokens: int) -> list[str]:
    """One line per rule `out` breaks (empty: it keeps the contract)."""
    if not isinstance(out, dict):
        return [f"returned a {type(out).__name__}, not a dict with keys "
                f"{', '.join(REQUIRED)}"]
    n = n_prompts * samples_per_prompt
    lines = [f"has no {key!r}" for key in REQUIRED if key not in out]
    lists = {}
    for key in (*REQUIRED, "env_mask", *[k for k in out if k not in (*REQUIRED, "env_mask")]):
        if key not in out:
            continue
        value = _plain(out[key])
        if not isinstance(value, (list, tuple)) or len(value) != n:
            size = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
            lines.append(f"{key!r} must be a list of {n} ({n_prompts} prompts x "
                         f"{samples_per_prompt} samples), got {size}")
        else:
            lists[key] = [_plain(v) for v in value]
    rules: dict[str, list[int]] = {}
    for i in range(n):
        for rule in _sample_violations(lists, i, samples_per_prompt, vocab_size, max_new_tokens):
            rules.setdefault(rule, []).append(i)
    for rule, idx in rules.items():
        more = f" (and {len(idx) - 1} more)" if len(idx) > 1 else ""
        lines.append(rule.format(idx[0]) + more)
    return lines


def _sample_violations(lists: dict, i: int, group: int, vocab_size: int,
                       max_new_tokens: int) -> list[str]:
    """The rules sample i breaks, each with `{}` where its index goes."""
    def ids_ok(seq) -> bool:
        return (isinstance(seq, (list, tuple)) and bool(seq)
                and all(isinstance(t, int) and 0 <= t < vocab_size for t in seq))

    out = []
    if "prompt_ids" in lists:
        p = lists["prompt_ids"][i]
        if not ids_ok(p):
            out.append(f"prompt_ids[{{}}] is not a non-empty list of token ids in [0, {vocab_size})")
        elif i % group and p != lists["prompt_ids"][i - 1]:
            out.append("prompt_ids[{}] differs from the prompt ids of its group's first sample")
    if "completion_ids" not in lists:
        return out
    c = lists["completion_ids"][i]
    if not ids_ok(c):
        return out + [f"completion_ids[{{}}] is not a non-empty list of token ids in "
                      f"[0, {vocab_size})"]
    if len(c) > max_new_tokens:
        out.append(f"completion_ids[{{}}] is longer than rollout.max_new_tokens={max_new_tokens}")
    mask = lists["env_mask"][i] if "env_mask" in lists else [1] * len(c)
    if not isinstance(mask, (list, tuple)) or len(mask) != len(c) or any(
            m not in (0, 1) for m in mask):
        return out + ["env_mask[{}] is not a list of 0/1, one per completion token"]
    if not any(mask):
        out.append("env_mask[{}] has no model token (1); a sample needs one to train on")
    if "logprobs" in lists:
        lp = lists["logprobs"][i]
        if not isinstance(lp, (list, tuple)) or len(lp) != len(c):
            out.append("logprobs[{}] does not hold one value per completion token")
        elif any(m and not (isinstance(v, (int, float)) and math.isfinite(v) and v <= 1e-4)
                 for v, m in zip(lp, mask)):
            out.append("logprobs[{}] holds a value that is not a finite log-probability (<= 0) "
                       "at a model token")
    return out


def check_rollout_output(out: Any, n_prompts: int, samples_per_prompt: int, vocab_size: int,
                         max_new_tokens: int, name: str = "rollout.rollout_func"
                         ) -> RolloutOutput:
    """The return of a rollout function as plain lists, or RolloutFuncError: one line naming
    the function and every rule it broke."""
    lines = rollout_violations(out, n_prompts, samples_per_prompt, vocab_size, max_new_tokens)
    if lines:
        raise RolloutFuncError(f"{name} broke its contract (docs/agents.md): "
                               + "; ".join(lines))
    get = lambda k: [list(_plain(v)) for v in _plain(out[k])]  # noqa: E731
    completion = get("completion_ids")
    extra = {k: list(_plain(v)) for k, v in out.items() if k not in (*REQUIRED, "env_mask")}
    return RolloutOutput(get("prompt_ids"), completion, [[float(x) for x in v]
                                                         for v in get("logprobs")],
                         get("env_mask") if "env_mask" in out else [[1] * len(c)
                                                                    for c in completion],
                         extra)

