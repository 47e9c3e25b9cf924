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

Positions skip left padding (`position_ids_from_mask`), as in scoring; the KV cache is the one
the model's own forward creates and fills.
"""

from __future__ import annotations

import functools
import inspect

import torch

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


@torch.no_grad()
def sample(ac: ActorCritic, query_ids: torch.Tensor, query_mask: torch.Tensor, *,
           max_new_tokens: int, temperature: float, greedy: bool, stop_ids: list[int],
           pad_id: int, synced: bool = False) -> torch.Tensor:
    """Response ids (B, R), R <= max_new_tokens, for left-padded prompts (B, Q) (mask (B, Q)).

    Each token is drawn from softmax(logits / temperature) in float32 (argmax when `greedy`);
    after a row's first stop id it holds `pad_id`. Runs under the active role and mode; the
    caller puts the model in eval mode under the policy. Stops early once every row has
    stopped (on every rank when `synced`).
    """
    decoder = ac.causal_lm.get_decoder()
    cache_kw = _cache_keyword(type(decoder))
    stops = torch.tensor(stop_ids, device=query_ids.device)
    batch = query_ids.shape[0]
    ids, mask = query_ids, query_mask
    positions = position_ids_from_mask(mask)
    cache = None
    done = torch.zeros(batch, dtype=torch.bool, device=query_ids.device)
    tokens = []
    with ac.output_head() as head:
        for _ in range(max_new_tokens):
            out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                          use_cache=True, **{cache_kw: cache})
            cache = getattr(out, cache_kw)
            z = head(out.last_hidden_state[:, -1]).float()  # (B, V), as rl/logprobs casts it
            if greedy:
                tok = z.argmax(-1)
            else:
                tok = torch.multinomial(torch.softmax(z / temperature, dim=-1), 1).squeeze(-1)
            tok = tok.masked_fill(done, pad_id)
            tokens.append(tok)
            done |= torch.isin(tok, stops)
            if _all_done(done, synced):
                break
            ids = tok[:, None]
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            positions = positions[:, -1:] + 1
    return torch.stack(tokens, dim=1)
