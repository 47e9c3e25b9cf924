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
(`rollout.sampler_logprobs`; docs/ppo.md, "Doing less work").
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from lora_ppo.modeling.actor_critic import POLICY, REFERENCE, ActorCritic
from lora_ppo.ppo.sampling import sample


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


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ids -> (ids (B, L), mask (B, L)) padded on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


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
    logprobs: Optional[torch.Tensor] = None  # (B, R) policy log-probs of the drawn tokens
    values: Optional[torch.Tensor] = None    # (B, R) shared-head values on the same states


def generate(ac: ActorCritic, tokenizer, prompt_ids: Sequence[Sequence[int]], rc, *,
             greedy: bool = False, synced: bool = False, score: bool = False) -> Samples:
    """Sample responses with the policy in chunks of `rc.generation_batch_size`, every chunk
    padded to the same Q and R. `synced`: every rank runs the same number of decoding steps
    (ZeRO-3 gathers weights collectively in each forward). `score`: keep the sampler's
    log-probs (and shared-head values) of the drawn tokens, for `logprobs_and_values`."""
    stop_ids = [tokenizer.eos_token_id, *rc.stop_token_ids]
    query_ids, query_mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    device = ac.device
    drawn = []
    merge = rc.merge_for_generation and ac.can_merge_for_generation()
    with ac.role(POLICY, train=False), (ac.merged_policy() if merge else contextlib.nullcontext()):
        for start in range(0, len(prompt_ids), rc.generation_batch_size):
            q = query_ids[start:start + rc.generation_batch_size].to(device)
            m = query_mask[start:start + rc.generation_batch_size].to(device)
            drawn.append(sample(ac, q, m, max_new_tokens=rc.max_new_tokens,
                                temperature=rc.temperature, greedy=greedy, stop_ids=stop_ids,
                                pad_id=tokenizer.pad_token_id, synced=synced,
                                static_cache=rc.static_kv_cache, score=score))
    width = max(max(d.tokens.shape[1] for d in drawn), 1)

    def columns(parts: list[Optional[torch.Tensor]], pad) -> Optional[torch.Tensor]:
        if parts[0] is None:
            return None
        return torch.cat([F.pad(p.cpu(), (0, width - p.shape[1]), value=pad) for p in parts])

    response_ids, response_mask, has_eos = truncate_after_stop(
        columns([d.tokens for d in drawn], tokenizer.pad_token_id), stop_ids,
        tokenizer.pad_token_id)
    logprobs, values = (columns([getattr(d, k) for d in drawn], 0.0) for k in ("logprobs", "values"))
    return Samples(query_ids, query_mask, response_ids, response_mask, has_eos,
                   None if logprobs is None else logprobs * response_mask,
                   None if values is None else values * response_mask)


@torch.no_grad()
def logprobs_and_values(ac: ActorCritic, samples: Samples, *, temperature: float,
                        chunk_size: int, batch_size: int, with_reference: bool = True,
                        packed: bool = True) -> Rollout:
    """The rollout: `samples` with their old log-probs, values (with a value function) and
    reference log-probs (`with_reference`; without it the reference forward is skipped),
    computed in chunks of `batch_size` sequences."""
    query_ids, query_mask, response_ids, response_mask, has_eos = samples[:5]
    # the sampler's own log-probs (and shared-head values) stand for the policy forward
    from_sampler = samples.logprobs is not None and (
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
            if not from_sampler:
                lp, _, v = ac(*batch, temperature=temperature, chunk_size=chunk_size,
                              packed=packed)
                parts["logprobs"].append(lp * mask)
                if v is not None:
                    parts["values"].append(v * mask)
            if with_reference:
                ref, _, _ = ac(*batch, temperature=temperature, chunk_size=chunk_size,
                               with_values=False, role=REFERENCE, packed=packed)
                parts["ref_logprobs"].append(ref * mask)
    finally:
        ac.train(was_training)
    if from_sampler:
        parts["logprobs"] = [samples.logprobs.to(device)]
        parts["values"] = [] if samples.values is None else [samples.values.to(device)]
    return Rollout(query_ids=query_ids.to(device), query_mask=query_mask.to(device),
                   response_ids=response_ids.to(device), response_mask=response_mask.to(device),
                   has_eos=has_eos.to(device),
                   **{k: torch.cat(v) if v else None for k, v in parts.items()})
