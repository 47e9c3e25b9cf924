"""Sampling responses from the policy: `generate` for a rollout (the policy role, the adapter
folded where that is exact, responses cut at their stop token), `sample` for the decode loop
itself (continuous batching where the cache allows it, else batches)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from transformers import StaticCache

from lora_ppo.generation.continuous import decode_continuous
from lora_ppo.generation.folded import can_fold, folded_policy
from lora_ppo.generation.kv_cache import continuous_batching_fits
from lora_ppo.generation.sampler import Drawn, Sampler, TurnHook, decode_batched
from lora_ppo.generation.samples import Samples, left_pad, truncate_after_stop
from lora_ppo.modeling.actor_critic import ActorCritic
from lora_ppo.modeling.roles import POLICY


class DecodePath(NamedTuple):
    """How the decode loop runs for a model: what the user allows (`rollout.continuous_batching`,
    `rollout.static_kv_cache`, `rollout.fold_for_generation`) less what the setup's check found
    inexact (ppo/seams.py)."""

    continuous_batching: bool = True
    static_kv_cache: bool = True
    fold: bool = True  # the policy folded into the base weights, where that is exact (folded.py)
    turn_cache: bool = True  # a row keeps its cache across turns (else encoded again each turn)


@torch.no_grad()
def sample(ac: ActorCritic, prompts: list[list[int]], *, max_new_tokens: int,
           temperature: float, greedy: bool, stop_ids: list[int], pad_id: int,
           generation_batch_size: int, uniforms: Optional[Tensor] = None,
           continuous: bool = True, synced: bool = False, static_cache: bool = True,
           score: bool = False, forced: Optional[Tensor] = None,
           values: Optional[bool] = None, turns: Optional[TurnHook] = None,
           reuse_cache: bool = True) -> Drawn:
    """Responses (B, R), R <= max_new_tokens, to `prompts` (B lists of ids; rows answering the
    same prompt share its encoding). Each token is drawn from softmax(model logits / T) in
    float32 by inverse CDF at `uniforms` (B, max_new_tokens) (argmax when `greedy`); after a
    row's first stop id it holds `pad_id`. At most `generation_batch_size` rows decode at once.
    Runs under the active role and mode (the caller: eval mode under the policy). `score`: also
    the log-prob of each drawn token under the distribution it was drawn from; `values`
    (default: `score`): also the shared value head on the same state (value.mode=shared), what
    the rollout's scoring forward computes, asked where the two agree to fp32 round-off.
    `synced`: every rank runs the same forwards (ZeRO-3 gathers weights collectively).
    `forced` (B, max_new_tokens): take these tokens instead of drawing (teacher forcing: the
    setup's check of the decode loop, ppo/seams.py). `turns`: a multi-turn rollout's hook; a row
    that ends a turn the hook answers continues after the answer (sampler.py::end_turns), its
    tokens and the answer's in one response of at most max_new_tokens, the answer marked in
    `Drawn.env_mask`. `reuse_cache`: continuous batching keeps each conversation's cache
    across turns (else it is encoded again at each turn, as a reference).
    """
    if not greedy and uniforms is None:
        raise ValueError("sampling needs uniforms (B, max_new_tokens); greedy does not")
    if turns is not None and synced:
        raise ValueError("multi-turn rollouts do not decode in lockstep (ZeRO-3 over ranks)")
    s = Sampler(ac, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                greedy=greedy, stop_ids=stop_ids, pad_id=pad_id, uniforms=uniforms, score=score,
                forced=forced, values=score if values is None else values, turns=turns)
    config = ac.causal_lm.config
    if continuous and static_cache and not synced and continuous_batching_fits(
            StaticCache(config=config, max_cache_len=1)):
        decode_continuous(s, generation_batch_size, reuse_cache)
    else:  # batches; a row between turns is encoded again in a later batch
        rows = list(range(len(prompts)))
        while rows:
            again = []
            for start in range(0, len(rows), generation_batch_size):
                again += decode_batched(s, torch.tensor(rows[start:start + generation_batch_size]),
                                        static_cache, synced)
            rows = sorted(again)
    return s.out.drawn(turns is not None)


def generate(ac: ActorCritic, prompt_ids: Sequence[Sequence[int]], rollout, decode: DecodePath,
             stop_ids: list[int], pad_id: int, *, greedy: bool = False, synced: bool = False,
             score: bool = False, turns: Optional[TurnHook] = None) -> Samples:
    """Sample responses with the policy (at most `rollout.generation_batch_size` rows at once).
    `rollout`: the config's RolloutConfig (max_new_tokens, temperature, the batch size, whether
    to fold the adapter); `decode`: the decode path setup chose for this model. `synced`: every
    rank runs the same forwards (ZeRO-3 gathers weights collectively in each one). The
    sampler's log-probs of the drawn tokens are kept (not `greedy`): in reduced precision the
    decode loop's distribution is not the scored one, and the update weighs the one against the
    other (rl/sampler_correction.py). `score`: they (and the shared-head values) stand for the
    scoring forward, where the two agree to fp32 round-off (never under the run's autocast,
    `ActorCritic.precision`, which the whole decode loop runs under). The uniforms behind every
    draw come from torch's global generator, one row per prompt, so a seeded run draws the same
    tokens whatever the batching. `turns`: a multi-turn rollout's hook (sample's doc): each
    response then holds every turn and the environment's answers between them (`env_mask`),
    and `has_eos` says the model ended it (not the token budget)."""
    query_ids, query_mask = left_pad(prompt_ids, pad_id)
    uniforms = None if greedy else torch.rand(len(prompt_ids), rollout.max_new_tokens)
    score = score and ac.autocast is None  # autocast: bf16 matmuls, not fp32
    fold = (rollout.fold_for_generation and decode.fold and ac.autocast is None
            and can_fold(ac.peft_model))
    with ac.role(POLICY, train=False), ac.precision(), (folded_policy(ac.peft_model) if fold
                                                        else contextlib.nullcontext()):
        drawn = sample(ac, [list(p) for p in prompt_ids], max_new_tokens=rollout.max_new_tokens,
                       temperature=rollout.temperature, greedy=greedy, stop_ids=stop_ids,
                       pad_id=pad_id, generation_batch_size=rollout.generation_batch_size,
                       uniforms=uniforms, continuous=decode.continuous_batching, synced=synced,
                       static_cache=decode.static_kv_cache, score=not greedy, values=score,
                       turns=turns, reuse_cache=decode.turn_cache)
    env_mask = None
    if turns is None:
        response_ids, response_mask, has_eos = truncate_after_stop(drawn.tokens, stop_ids,
                                                                   pad_id)
    else:  # every turn ends at a stop id: the response ends where the row's tokens end
        response_ids, has_eos = drawn.tokens, drawn.finished
        response_mask = (torch.arange(drawn.tokens.shape[1])[None] < drawn.length[:, None]).float()
        env_mask = drawn.env_mask.float()
    actions = response_mask if env_mask is None else response_mask * (1 - env_mask)
    return Samples(query_ids, query_mask, response_ids, response_mask, has_eos,
                   None if drawn.logprobs is None else drawn.logprobs * actions,
                   None if drawn.values is None else drawn.values * actions, score, env_mask)
