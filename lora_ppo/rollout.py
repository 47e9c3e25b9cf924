"""Rollouts: sample responses, then score them under the policy, critic and reference.

Layout of every batch (B samples):

    query_ids      (B, Q)  left-padded prompts (generation appends on the right)
    response_ids   (B, R)  right-padded responses, cut after the first EOS/stop token
    response_mask  (B, R)  1.0 on real response tokens (the EOS included), 0.0 on padding

The hidden state at position Q-1+t predicts response token t, so logits and values for the
response are read from positions Q-1 .. Q+R-2 (values are V(state before token t), as in TRL).
The same function (`policy_outputs`) scores the rollout and the update, so with no update in
between and dropout off the PPO ratio is exactly 1 (to float round-off).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F

from lora_ppo.modeling.actor_critic import CRITIC, POLICY, REFERENCE, ActorCritic
from lora_ppo.modeling.loading import is_gradient_checkpointing, set_gradient_checkpointing
from lora_ppo.rl.logprobs import logprobs_and_entropy_from_hidden


@dataclass
class Rollout:
    """Everything the update needs. Steps 2 and 3 of the loop fill scores .. returns."""

    query_ids: torch.Tensor       # (B, Q) long
    query_mask: torch.Tensor      # (B, Q) long
    response_ids: torch.Tensor    # (B, R) long
    response_mask: torch.Tensor   # (B, R) float
    has_eos: torch.Tensor         # (B,) bool: the response ended with EOS/stop, not the length cap
    logprobs: torch.Tensor        # (B, R) policy log-probs at the sampling temperature
    ref_logprobs: torch.Tensor    # (B, R) reference log-probs at the same temperature
    values: torch.Tensor          # (B, R) V(s_t)
    scores: Optional[torch.Tensor] = None      # (B,) shaped sequence scores
    raw_scores: Optional[torch.Tensor] = None  # (B,) scores as the reward source gave them
    kl: Optional[torch.Tensor] = None          # (B, R) per-token KL estimate
    rewards: Optional[torch.Tensor] = None     # (B, R) -kl_coef*kl + score on the last token
    advantages: Optional[torch.Tensor] = None  # (B, R)
    returns: Optional[torch.Tensor] = None     # (B, R)

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def index(self, idx: torch.Tensor) -> Rollout:
        """The samples at `idx` (a minibatch), every tensor field sliced alike."""
        return Rollout(**{f.name: (None if getattr(self, f.name) is None
                                   else getattr(self, f.name)[idx]) for f in fields(self)})


@contextlib.contextmanager
def generation_mode(ac: ActorCritic) -> Iterator[None]:
    """Eval mode, KV cache on, gradient checkpointing off; all restored afterwards whatever the
    model's state was (HF disables the cache whenever checkpointing is on in train mode)."""
    lm = ac.causal_lm
    was_training, use_cache, gc = ac.training, lm.config.use_cache, is_gradient_checkpointing(lm)
    ac.eval()
    if gc:
        set_gradient_checkpointing(lm, False)
    lm.config.use_cache = True
    try:
        yield
    finally:
        lm.config.use_cache = use_cache
        if gc:
            set_gradient_checkpointing(lm, True)
        ac.train(was_training)


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_length: int,
                     add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids per prompt, cut from the left to `max_length` (the end of a prompt matters most).
    Text rendered by a chat template already holds its BOS: pass add_special_tokens=False."""
    ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    return [x[-max_length:] for x in ids]


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


def generate(ac: ActorCritic, tokenizer, prompt_ids: Sequence[Sequence[int]], rc, *,
             greedy: bool = False, synced_gpus: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample responses with the policy in chunks of `rc.generation_batch_size`.

    Returns query_ids (B, Q), query_mask (B, Q), response_ids (B, R), response_mask (B, R),
    has_eos (B,), every chunk padded to the same Q and R.
    """
    from transformers import GenerationConfig

    stop_ids = [tokenizer.eos_token_id, *rc.stop_token_ids]
    # A fresh GenerationConfig: the checkpoint's own defaults (top_k=50, repetition penalty...)
    # would silently change the sampling distribution that PPO's log-probs assume.
    gen_cfg = GenerationConfig(
        do_sample=not greedy, temperature=None if greedy else rc.temperature,
        top_k=None if greedy or rc.top_k == 0 else rc.top_k,
        top_p=None if greedy or rc.top_p >= 1.0 else rc.top_p,
        max_new_tokens=rc.max_new_tokens, eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, use_cache=True)
    query_ids, query_mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    device = ac.device
    responses = []
    with generation_mode(ac), ac.role(POLICY), torch.no_grad():
        for start in range(0, len(prompt_ids), rc.generation_batch_size):
            q = query_ids[start:start + rc.generation_batch_size].to(device)
            m = query_mask[start:start + rc.generation_batch_size].to(device)
            out = ac.generate(input_ids=q, attention_mask=m, generation_config=gen_cfg,
                              synced_gpus=synced_gpus)
            responses.append(out[:, q.shape[1]:].cpu())
    width = max(max(r.shape[1] for r in responses), 1)
    response_ids = torch.cat([F.pad(r, (0, width - r.shape[1]), value=tokenizer.pad_token_id)
                              for r in responses])
    response_ids, response_mask, has_eos = truncate_after_stop(
        response_ids, stop_ids, tokenizer.pad_token_id)
    return query_ids, query_mask, response_ids, response_mask, has_eos


def policy_outputs(ac: ActorCritic, query_ids, query_mask, response_ids, response_mask, *,
                   temperature: float, chunk_size: int, with_values: bool = True,
                   with_entropy: bool = False, role: str = POLICY
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Log-probs (B, R), entropy (B, R) or None, values (B, R) or None of the response tokens.

    `role=REFERENCE` gives the reference log-probs (no values). Values come from the policy
    trunk (value.mode=shared, same forward) or from the critic adapter (value.mode=adapter).
    """
    ids = torch.cat([query_ids, response_ids], 1)
    mask = torch.cat([query_mask, response_mask.long()], 1)
    q, r = query_ids.shape[1], response_ids.shape[1]
    values = None
    with ac.role(role), ac.output_head() as head:
        h = ac.hidden(ids, mask)[:, q - 1:q - 1 + r]  # (B, R, H): states predicting each token
        logprobs, entropy = logprobs_and_entropy_from_hidden(
            h, head, response_ids, temperature=temperature, chunk_size=chunk_size,
            with_entropy=with_entropy)
        if with_values and role == POLICY and ac.value_mode == "shared":
            values = ac.value_head(h)
    if with_values and role == POLICY and ac.value_mode == "adapter":
        with ac.role(CRITIC):
            values = ac.value_head(ac.hidden(ids, mask)[:, q - 1:q - 1 + r])
    return logprobs, entropy, values


@torch.no_grad()
def score_rollout(ac: ActorCritic, query_ids, query_mask, response_ids, response_mask, has_eos,
                  *, temperature: float, chunk_size: int, batch_size: int) -> Rollout:
    """Old log-probs, values and reference log-probs of sampled responses, in chunks."""
    was_training = ac.training
    ac.eval()
    device = ac.device
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "values": [], "ref_logprobs": []}
    try:
        for s in range(0, query_ids.shape[0], batch_size):
            batch = [t[s:s + batch_size].to(device)
                     for t in (query_ids, query_mask, response_ids, response_mask)]
            lp, _, v = policy_outputs(ac, *batch, temperature=temperature, chunk_size=chunk_size)
            ref, _, _ = policy_outputs(ac, *batch, temperature=temperature, chunk_size=chunk_size,
                                       with_values=False, role=REFERENCE)
            mask = batch[3]
            parts["logprobs"].append(lp * mask)
            parts["values"].append(v * mask)
            parts["ref_logprobs"].append(ref * mask)
    finally:
        ac.train(was_training)
    return Rollout(query_ids=query_ids.to(device), query_mask=query_mask.to(device),
                   response_ids=response_ids.to(device), response_mask=response_mask.to(device),
                   has_eos=has_eos.to(device), **{k: torch.cat(v) for k, v in parts.items()})
