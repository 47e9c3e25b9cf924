"""Step 1 for agents: responses that are conversations with tools and an environment, or that a
custom rollout function returns (lora_ppo/agents; docs/agents.md).

    Episodes        the samples of one round, with what scoring needs besides their ids: the
                    conversations (completions as messages, the environments, tool metrics) or
                    the rollout function's extra fields
    tool_rollout    the engine decodes with the round's Conversations as its turn hook: a row
                    that ends a turn with a tool call gets the results' tokens onto the cache it
                    has and goes on (generation/sampler.py::TurnHook, continuous.py)
    custom_rollout  rollout.rollout_func's samples, checked against TRL's contract, as Samples
                    (its log-probs are the sampler's, weighed against the scored ones in the
                    update as any sampler's are: rl/sampler_correction.py)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple, Optional

import torch

from lora_ppo.agents import Conversations, RolloutContext, check_rollout_output, rows_of
from lora_ppo.generation.generate import generate
from lora_ppo.generation.samples import Samples, left_pad
from lora_ppo.io.data import Prompt
from lora_ppo.ppo.run import Run


class Episodes(NamedTuple):
    samples: Samples
    conversations: Optional[Conversations] = None
    columns: Mapping[str, list] = MappingProxyType({})  # a rollout function's extra fields


def response_lists(samples: Samples) -> list[list[int]]:
    """Each sample's response ids, padding dropped."""
    return [row[m.bool()].tolist() for row, m in zip(samples.response_ids.cpu(),
                                                     samples.response_mask.cpu())]


def tool_rollout(run: Run, prompts: Sequence[Prompt], greedy: bool, score: bool) -> Episodes:
    """The prompts' conversations with the run's tools and environment: each prompt rendered with
    the tools' schemas (and `reset`'s observation), decoded turn by turn, each turn's tool calls
    run as it ends; rollout.max_new_tokens counts every token of the trajectory."""
    cfg = run.cfg
    conv = Conversations(rows_of(prompts, cfg.data.prompt_column), run.tokenizer,
                         run.agents.toolbox, prompt_column=cfg.data.prompt_column,
                         max_tool_calls=cfg.rollout.max_tool_calls,
                         max_prompt_length=cfg.model.max_prompt_length)
    samples = generate(run.ac, conv.prompt_ids, cfg.rollout, run.seams.decode, run.stop_ids,
                       run.tokenizer.pad_token_id, greedy=greedy, synced=run.synced,
                       score=score, turns=conv)
    conv.finish(response_lists(samples))
    return Episodes(samples, conv)


def custom_rollout(run: Run, prompts: Sequence[Prompt]) -> Episodes:
    """rollout.rollout_func on this rank's prompts, each once (`prompts` holds every group's
    prompt samples_per_prompt times in a row), as the data gave them."""
    cfg, n = run.cfg, run.cfg.rollout.samples_per_prompt
    firsts = list(prompts[::n])
    ctx = RolloutContext(run.tokenizer, cfg, n, cfg.rollout.max_new_tokens,
                         generate=lambda ids, greedy=False: engine_generate(run, ids, greedy))
    out = check_rollout_output(run.agents.rollout_func([p.raw if p.raw is not None else p.text
                                                        for p in firsts], ctx),
                               len(firsts), n, run.ac.vocab, cfg.rollout.max_new_tokens)
    pad = run.tokenizer.pad_token_id
    query_ids, query_mask = left_pad(out.prompt_ids, pad)
    width = max(len(c) for c in out.completion_ids)

    def right(rows, fill, dtype):
        t = torch.full((len(rows), width), fill, dtype=dtype)
        for i, r in enumerate(rows):
            t[i, :len(r)] = torch.tensor(r, dtype=dtype)
        return t

    response_ids = right(out.completion_ids, pad, torch.long)
    response_mask = right([[1.0] * len(c) for c in out.completion_ids], 0.0, torch.float32)
    env_mask = 1.0 - right(out.env_mask, 1.0, torch.float32)  # theirs: 1 = the model's token
    logprobs = right(out.logprobs, 0.0, torch.float32) * response_mask * (1.0 - env_mask)
    stops = set(run.stop_ids)
    has_eos = torch.tensor([c[-1] in stops for c in out.completion_ids])
    samples = Samples(query_ids, query_mask, response_ids, response_mask, has_eos, logprobs,
                      None, False, env_mask if env_mask.any() else None)
    return Episodes(samples, columns=out.extra)


def engine_generate(run: Run, prompt_ids: Sequence[Sequence[int]], greedy: bool = False
                    ) -> dict[str, list]:
    """`RolloutContext.generate`: lora_ppo's engine on the policy, one response per prompt at
    rollout.temperature and rollout.max_new_tokens, as TRL's rollout function calls its vLLM
    generation: {"completion_ids", "logprobs"} (the sampler's log-probs; empty for greedy)."""
    samples = generate(run.ac, [list(p) for p in prompt_ids], run.cfg.rollout, run.seams.decode,
                       run.stop_ids, run.tokenizer.pad_token_id, greedy=greedy,
                       synced=run.synced)
    ids = response_lists(samples)
    logprobs = ([[] for _ in ids] if samples.logprobs is None else
                [row[:len(c)].tolist() for row, c in zip(samples.logprobs, ids)])
    return {"completion_ids": ids, "logprobs": logprobs}
