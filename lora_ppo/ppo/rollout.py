"""Rollouts: the samples of generation (lora_ppo/generation, `Samples`: ids and masks laid out as
described there) scored under the policy, critic and reference.

Responses are drawn by `generation.generate.sample` from softmax(logits / temperature), the distribution
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

from dataclasses import dataclass, fields
from typing import Optional

import torch

from lora_ppo.generation.samples import Samples
from lora_ppo.modeling.actor_critic import ActorCritic
from lora_ppo.modeling.roles import REFERENCE


@dataclass(frozen=True)
class Rollout:
    """Everything the update needs. Steps 2 and 3 of the loop return it with scores .. returns
    filled (a new Rollout: nothing changes one in place)."""

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
    env_mask: Optional[torch.Tensor] = None    # (B, R) 1 on the environment's tokens between
    #                                            turns (context, no action); None: single-turn
    scores: Optional[torch.Tensor] = None      # (B,) shaped sequence scores
    raw_scores: Optional[torch.Tensor] = None  # (B,) scores as the reward source gave them
    kl: Optional[torch.Tensor] = None          # (B, R) per-token KL estimate
    rewards: Optional[torch.Tensor] = None     # (B, R) -kl_coef*kl + score on the last token
    advantages: Optional[torch.Tensor] = None  # (B, R)
    returns: Optional[torch.Tensor] = None     # (B, R)

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    @property
    def action_mask(self) -> torch.Tensor:
        """(B, R): the tokens the policy chose, what every loss, KL and token mean counts: the
        real response tokens less the environment's (its tool results are context the forward
        sees, no action of the policy's: docs/ppo.md, "Trajectories")."""
        if self.env_mask is None:
            return self.response_mask
        return self.response_mask * (1.0 - self.env_mask)

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


@torch.no_grad()
def logprobs_and_values(ac: ActorCritic, samples: Samples, *, temperature: float,
                        chunk_size: int, batch_size: int,
                        with_reference: bool = True) -> Rollout:
    """The rollout: `samples` with their old log-probs, values (with a value function) and
    reference log-probs (`with_reference`; without it the reference forward is skipped),
    computed in chunks of `batch_size` sequences (the run's ppo.micro_batch_size: the batches
    the update's forwards take, which also fit; as TRL scores in per_device_train_batch_size
    chunks). Smaller forwards are also faster on a CPU: the GRPO-with-tools workload's 32
    samples scored in one forward (4 packed rows of 1309 slots, 18% of them padding) took
    0.88-0.96 s, in four of 8 (one group, one exact row each) 0.58-0.62 s."""
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
            mask = batch[3] if samples.env_mask is None else batch[3] * (
                1.0 - samples.env_mask[s:s + batch_size].to(device))  # actions
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
                   else samples.logprobs.to(device),
                   env_mask=None if samples.env_mask is None else samples.env_mask.to(device))
