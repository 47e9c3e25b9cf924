"""Rollouts: sample responses, then score them under the policy, critic and reference.

Layout of every batch (B samples):

    query_ids      (B, Q)  left-padded prompts (generation appends on the right)
    response_ids   (B, R)  right-padded responses, cut after the first EOS/stop token
    response_mask  (B, R)  1.0 on real response tokens (the EOS included), 0.0 on padding

Responses are drawn by `sampling.sample` from softmax(logits / temperature), the distribution
that `ActorCritic.forward` scores for the rollout's old log-probs and for the update, so the
ratio's denominator and the KL estimate are of the distribution actually sampled from. With no
update in between and dropout off the PPO ratio is exactly 1 (to float round-off). Where the
sampler computes in fp32 its own log-probs of the drawn tokens serve as the old log-probs
(`rollout.sampler_logprobs`; docs/ppo.md, "Doing less work"). They are kept with every sampled
rollout (`Rollout.sampler_logprobs`): in reduced precision the decode loop's distribution is
not the scored one, and the update weighs the one against the other
(rl/sampler_correction.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch

from lora_ppo.modeling.actor_critic import POLICY, REFERENCE, ActorCritic
from lora_ppo.modeling.generation import can_merge_for_generation, merged_policy
from lora_ppo.ppo.sampling import left_pad, sample


@dataclass
class Rollout:
    """Everything the update needs. Steps 2 and 3 of the loop fill scores .. returns."""

    query_ids: torch.Tensor       # (B, Q) long
    query_mask: torch.Tensor      # (B, Q) long
    response_ids: torch.Tensor    # (B, R) long
    response_mask: torch.Tensor   # (B, R) float
    has_eos: torch.Tensor         # (B,) bool: the response ended with EOS/stop, not the length cap
    logprobs: torch.Tensor        # (B, R) policy log-probs at the sampling temperature
    ref_logprobs: Optional[torch.Tensor]  # (B, R) reference log-probs; None: no KL term at all
    values: Optional[torch.Tensor]        # (B, R) V(s_t); None without a value function
    sampler_logprobs: Optional[torch.Tensor] = None  # (B, R) the sampler's own log-probs of the
    #                                                  drawn tokens; None for greedy samples
    scores: Optional[torch.Tensor] = None      # (B,) shaped sequence scores
    raw_scores: Optional[torch.Tensor] = None  # (B,) scores as the reward source gave them
    kl: Optional[torch.Tensor] = None          # (B, R) per-token KL estimate
    rewards: Optional[torch.Tensor] = None     # (B, R) -kl_coef*kl + score on the last token
    advantages: Optional[torch.Tensor] = None  # (B, R)
    returns: Optional[torch.Tensor] = None     # (B, R)

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def index(self, idx: torch.Tensor) -> Rollout:
        """The samples at `idx` (a micro-batch), every tensor field sliced alike, and trimmed to
        their own width: the query columns that are padding in every selected row (on the left)
        and the response columns past the selected rows' longest response go. Positions come
        from the mask, so the trimmed forward sees what the full-width one saw."""
        rows = {f.name: getattr(self, f.name) for f in fields(self)}
        rows = {k: None if v is None else v[idx] for k, v in rows.items()}
        q_used = rows["query_mask"].any(0).nonzero()
        q0 = int(q_used[0]) if len(q_used) else 0
        r_used = rows["response_mask"].any(0).nonzero()
        r1 = int(r_used[-1]) + 1 if len(r_used) else 1
        out = {}
        for k, v in rows.items():
            if v is None or v.dim() < 2:
                out[k] = v
            elif k.startswith("query"):
                out[k] = v[:, q0:]
            else:
                out[k] = v[:, :r1]
        return Rollout(**out)


def truncate_after_stop(response_ids: torch.Tensor, stop_ids: Sequence[int], pad_id: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response after its first stop token. (B, R) -> ids, mask (float), has_eos (B,).

    The stop token itself stays (it is an action the policy took and gets the score).
    """
    is_stop = torch.isin(response_ids, torch.tensor(list(stop_ids), device=response_ids.device))
    # Tokens strictly after the first stop: cumulative count of stops before this position > 0.
    after = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
    mask = (~after).float()
    ids = response_ids.masked_fill(after, pad_id)
    return ids, mask, is_stop.any(-1)


class Samples(NamedTuple):
    """Sampled responses to left-padded prompts (CPU tensors), with the sampler's own scores
    when it was asked for them (`generate(score=True)`)."""

    query_ids: torch.Tensor       # (B, Q) long
    query_mask: torch.Tensor      # (B, Q) long
    response_ids: torch.Tensor    # (B, R) long, padding after the first stop token
    response_mask: torch.Tensor   # (B, R) float
    has_eos: torch.Tensor         # (B,) bool
    logprobs: Optional[torch.Tensor] = None  # (B, R) the sampler's log-probs of the drawn tokens
    values: Optional[torch.Tensor] = None    # (B, R) shared-head values on the same states
    scored: bool = False  # the sampler's log-probs (and values) stand for the scoring forward


def stop_ids_of(tokenizer, generation_config, extra: Sequence[int]) -> list[int]:
    """The ids that end a response: the tokenizer's EOS, every id of the checkpoint's
    `generation_config.json` `eos_token_id` (an int or a list: Llama 3 and Qwen 2.5 instruct
    checkpoints list `<|eot_id|>` and `<|end_of_text|>`, `<|im_end|>` and `<|endoftext|>`), and
    `rollout.stop_token_ids`; in that order, each once."""
    listed = getattr(generation_config, "eos_token_id", None) if generation_config else None
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    return list(dict.fromkeys([tokenizer.eos_token_id, *listed, *extra]))


def generate(ac: ActorCritic, prompt_ids: Sequence[Sequence[int]], rc, stop_ids: list[int],
             pad_id: int, *, greedy: bool = False, synced: bool = False,
             score: bool = False) -> Samples:
    """Sample responses with the policy (ppo/sampling.py: at most `rc.generation_batch_size`
    rows at once, continuous batching unless `rc.continuous_batching` is off). `synced`: every
    rank runs the same forwards (ZeRO-3 gathers weights collectively in each one). The sampler's
    log-probs of the drawn tokens are kept (not `greedy`); `score`: they (and the shared-head
    values) stand for the scoring forward in `logprobs_and_values`, where the two agree to fp32
    round-off (never under autocast). The uniforms behind every draw come from torch's global
    generator, one row per prompt, so a seeded run draws the same tokens whatever the
    batching."""
    query_ids, query_mask = left_pad(prompt_ids, pad_id)
    score = score and ac.autocast is None  # autocast: bf16 matmuls, not fp32
    uniforms = None if greedy else torch.rand(len(prompt_ids), rc.max_new_tokens)
    merge = (rc.merge_for_generation and ac.autocast is None
             and can_merge_for_generation(ac.peft_model))
    with ac.role(POLICY, train=False), ac.precision(), (merged_policy(ac.peft_model) if merge
                                                        else contextlib.nullcontext()):
        drawn = sample(ac, [list(p) for p in prompt_ids], max_new_tokens=rc.max_new_tokens,
                       temperature=rc.temperature, greedy=greedy, stop_ids=stop_ids,
                       pad_id=pad_id, slots=rc.generation_batch_size, uniforms=uniforms,
                       continuous=rc.continuous_batching, synced=synced,
                       static_cache=rc.static_kv_cache, score=not greedy, values=score)
    response_ids, response_mask, has_eos = truncate_after_stop(drawn.tokens, stop_ids, pad_id)
    return Samples(query_ids, query_mask, response_ids, response_mask, has_eos,
                   None if drawn.logprobs is None else drawn.logprobs * response_mask,
                   None if drawn.values is None else drawn.values * response_mask, score)


@torch.no_grad()
def logprobs_and_values(ac: ActorCritic, samples: Samples, *, temperature: float,
                        chunk_size: int, batch_size: int, with_reference: bool = True) -> Rollout:
    """The rollout: `samples` with their old log-probs, values (with a value function) and
    reference log-probs (`with_reference`; without it the reference forward is skipped),
    computed in chunks of `batch_size` sequences."""
    query_ids, query_mask, response_ids, response_mask, has_eos = samples[:5]
    # the sampler's own log-probs (and shared-head values) stand for the policy forward
    from_sampler = samples.scored and samples.logprobs is not None and (
        samples.values is not None or ac.value_mode == "none")
    was_training = ac.training
    ac.eval()
    device = ac.device
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "values": [], "ref_logprobs": []}
    try:
        for s in range(0, query_ids.shape[0], batch_size):
            batch = [t[s:s + batch_size].to(device)
                     for t in (query_ids, query_mask, response_ids, response_mask)]
            mask = batch[3]
            with ac.precision():  # the run's autocast, as the update's forwards run under it
                if not from_sampler:
                    lp, _, v = ac(*batch, temperature=temperature, chunk_size=chunk_size)
                    parts["logprobs"].append(lp * mask)
                    if v is not None:
                        parts["values"].append(v * mask)
                if with_reference:
                    ref, _, _ = ac(*batch, temperature=temperature, chunk_size=chunk_size,
                                   with_values=False, role=REFERENCE)
                    parts["ref_logprobs"].append(ref * mask)
    finally:
        ac.train(was_training)
    if from_sampler:
        parts["logprobs"] = [samples.logprobs.to(device)]
        parts["values"] = [] if samples.values is None else [samples.values.to(device)]
    return Rollout(query_ids=query_ids.to(device), query_mask=query_mask.to(device),
                   response_ids=response_ids.to(device), response_mask=response_mask.to(device),
                   has_eos=has_eos.to(device),
                   **{k: torch.cat(v) if v else None for k, v in parts.items()},
                   sampler_logprobs=None if samples.logprobs is None
                   else samples.logprobs.to(device))
