"""Autoregressive sampling from exactly the distribution PPO scores.

PPO's ratio pi/pi_old and the KL to the reference are computed from log softmax(z / T) of the
LM head's logits z (`rl/logprobs.py`, through `ActorCritic.forward`). The responses must be drawn
from that same distribution. `transformers`' `generate` builds its logits processors from the
merged generation config, where every field left None is filled from the checkpoint's
`generation_config.json` and then the library defaults (`GenerationMixin.
_prepare_generation_config`, "only update values that are None"): a plain call samples from the
top 50 tokens, and a checkpoint's own top_p, min_p, repetition_penalty, no_repeat_ngram_size...
leak in too. Rather than neutralise a list of fields that grows with each release, the decode
loop here calls the trunk and the LM head that scoring calls, and samples from
softmax(float32 logits / T) with nothing in between.

Positions skip left padding (`position_ids_from_mask`), as in scoring. The KV cache is
transformers' `StaticCache`, allocated once at prompt + max_new_tokens and written in place
(`static_cache`): the default `DynamicCache` concatenates every layer's keys and values at every
token, a fresh allocation and an O(length) copy per layer per step, which profiled at more than
half of CPU decoding time (docs/ppo.md, "Doing less work").
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple, Optional

import torch
from transformers import StaticCache

from lora_ppo.modeling.actor_critic import ActorCritic, position_ids_from_mask


@functools.cache
def _cache_keyword(forward_cls: type) -> str:
    """transformers 5.x renamed the decoder's `past_key_values` argument (and output) `cache`."""
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _all_done(done: torch.Tensor, synced: bool) -> bool:
    """True when every row has stopped, on every rank when `synced` (they decode in lockstep)."""
    finished = bool(done.all())
    if not synced:
        return finished
    flag = torch.tensor([0.0 if finished else 1.0], device=done.device)
    torch.distributed.all_reduce(flag)
    return flag.item() == 0.0


class Drawn(NamedTuple):
    """What one call of `sample` gives: the tokens and, when asked, their scores."""

    tokens: torch.Tensor                # (B, R) long
    logprobs: Optional[torch.Tensor]    # (B, R) log softmax(z / T)[token], float32, or None
    values: Optional[torch.Tensor]      # (B, R) V(state before token) of the shared head, or None


@torch.no_grad()
def sample(ac: ActorCritic, query_ids: torch.Tensor, query_mask: torch.Tensor, *,
           max_new_tokens: int, temperature: float, greedy: bool, stop_ids: list[int],
           pad_id: int, synced: bool = False, static_cache: bool = True,
           score: bool = False) -> Drawn:
    """Response ids (B, R), R <= max_new_tokens, for left-padded prompts (B, Q) (mask (B, Q)).

    Each token is drawn from softmax(logits / temperature) in float32 (argmax when `greedy`);
    after a row's first stop id it holds `pad_id`. Runs under the active role and mode; the
    caller puts the model in eval mode under the policy. Stops early once every row has
    stopped (on every rank when `synced`). `static_cache`: keys and values in one buffer of
    Q + max_new_tokens positions, the 2-D mask kept at that width (unwritten slots are 0).
    `score`: also the log-prob of each drawn token under the distribution it was drawn from, and
    the shared value head on the same hidden state (value.mode=shared), the quantities the
    rollout's scoring forward computes; the caller asks only where the two forwards agree to
    fp32 round-off (`ActorCritic.decodes_in_fp32`).
    """
    decoder = ac.causal_lm.get_decoder()
    cache_kw = _cache_keyword(type(decoder))
    stops = torch.tensor(stop_ids, device=query_ids.device)
    batch = query_ids.shape[0]
    width = query_ids.shape[1]
    positions = position_ids_from_mask(query_mask)
    if static_cache:
        cache = StaticCache(config=ac.causal_lm.config, max_cache_len=width + max_new_tokens)
        full = query_mask.new_zeros(batch, width + max_new_tokens)
        full[:, :width] = query_mask
    else:
        cache, full = None, query_mask
    ids, mask = query_ids, full
    done = torch.zeros(batch, dtype=torch.bool, device=query_ids.device)
    tokens, logprobs, values = [], [], []
    with_values = score and ac.value_mode == "shared"
    with ac.output_head() as head:
        for _ in range(max_new_tokens):
            out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                          use_cache=True, **{cache_kw: cache})
            cache = getattr(out, cache_kw)
            h = out.last_hidden_state[:, -1]
            z = head(h).float()  # (B, V), as rl/logprobs casts it
            zt = z / temperature if temperature != 1.0 else z  # the distribution drawn from
            if greedy:
                tok = z.argmax(-1)
            else:
                tok = torch.multinomial(torch.softmax(zt, dim=-1), 1).squeeze(-1)
            tok = tok.masked_fill(done, pad_id)
            tokens.append(tok)
            if score:  # rl/logprobs.py's formula: z[token] - logsumexp(z), z = logits / T
                logprobs.append(zt.gather(-1, tok[:, None]).squeeze(-1)
                                - torch.logsumexp(zt, dim=-1))
            if with_values:
                values.append(ac.value_head(h))
            done |= torch.isin(tok, stops)
            if _all_done(done, synced):
                break
            ids = tok[:, None]
            if static_cache:
                mask[:, width] = 1
            else:
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            width += 1
            positions = positions[:, -1:] + 1
    return Drawn(torch.stack(tokens, dim=1), _columns(logprobs), _columns(values))


def _columns(steps: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per-step (B,) tensors -> (B, steps), or None when nothing was recorded."""
    return torch.stack(steps, dim=1) if steps else None
