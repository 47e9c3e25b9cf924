"""The decode loop's state and its batched decoding: draw each token from exactly the distribution
PPO scores, a group's prompt encoded once.

What is drawn. PPO's ratio pi/pi_old and the KL to the reference are computed from log softmax(z)
of the model's own logits over the temperature (`rl/logprobs.py::transform_logits`, through
`ActorCritic.forward`). The responses must be drawn from that same distribution. `transformers`'
`generate` builds its logits processors from the merged generation config, where every field left
None is filled from the checkpoint's `generation_config.json` and then the library defaults: a
plain call samples from the top 50 tokens, and a checkpoint's own top_p, min_p,
repetition_penalty... leak in too. So the decode loop here calls the trunk and the LM head that
scoring calls and samples from softmax(z) with nothing in between.

Each row's randomness is its own: row i's token t is drawn by inverse CDF from one uniform
`uniforms[i, t]`, drawn for the whole rollout up front (`draw`). What row i samples therefore
depends only on its prompt, its own earlier tokens and its uniforms, not on which rows share its
decode batch, when it entered it, or the batch size: dropping finished rows or refilling their
slots (continuous.py) changes no row's tokens (up to the float round-off of a matmul of another
shape).

Batched decoding (`decode_batched`) serves where a row cannot join a batch mid-way (a sliding-
window cache, whose ring layout cannot take a row placed mid-way; ZeRO-3 over several ranks,
where every rank must run the same forwards; a dynamic cache): rows decode in batches of
`rollout.generation_batch_size`, each distinct prompt prefilled once and its keys and values
copied to the rows that answer it (the n samples of a group), finished rows dropped from the
batch (except in lockstep).

The KV cache is transformers' `StaticCache`, written in place (`static_cache`): the default
`DynamicCache` concatenates every layer's keys and values at every token, which profiled at more
than half of CPU decoding time.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Protocol

import torch
from torch import Tensor
from transformers import DynamicCache, StaticCache

from lora_ppo.generation.kv_cache import cache_keyword, keep_rows, select_rows
from lora_ppo.generation.samples import left_pad
from lora_ppo.modeling.actor_critic import ActorCritic
from lora_ppo.rl.logprobs import transform_logits


def _all_done(done: Tensor, synced: bool) -> bool:
    """True when every row has stopped, on every rank when `synced` (they decode in lockstep)."""
    finished = bool(done.all())
    if not synced:
        return finished
    flag = torch.tensor([0.0 if finished else 1.0], device=done.device)
    torch.distributed.all_reduce(flag)
    return flag.item() == 0.0


class TurnHook(Protocol):
    """What a multi-turn rollout gives the decode loop (lora_ppo/agents implements it)."""

    def end_turns(self, rows: list[int], turns: list[list[int]]) -> list[Optional[list[int]]]:
        """`turns[k]`: the ids row `rows[k]` generated in the turn that just ended (its stop id
        included). For each row, the environment's ids to append before its next turn (a tool's
        result as the chat template renders it), or None when its trajectory ends."""


class Drawn(NamedTuple):
    """What one call of `sample` gives: the tokens and, when asked, their scores; with turns,
    which tokens the environment wrote and how far each row got."""

    tokens: Tensor                # (B, R) long, `pad_id` after a row's stop token (its end)
    logprobs: Optional[Tensor]    # (B, R) log softmax(z)[token], float32, or None
    values: Optional[Tensor]      # (B, R) V(state before token) of the shared head, or None
    env_mask: Optional[Tensor] = None  # (B, R) bool: written by the environment; None: no turns
    length: Optional[Tensor] = None    # (B,) long: tokens of each row, model and environment
    finished: Optional[Tensor] = None  # (B,) bool: ended by the model, not by the budget


def draw(z: Tensor, u: Optional[Tensor]) -> Tensor:
    """Tokens (k,) from z (k, V) float32 (the transformed logits): argmax when `u` is None, else
    by inverse CDF of softmax(z) at the uniforms u (k,) in [0, 1). The CDF is summed in float64,
    so the draw follows softmax(z) to float64 round-off; a zero-probability token is never drawn
    (searchsorted right: the first index whose CDF exceeds u * total)."""
    if u is None:
        return z.argmax(-1)
    cdf = torch.softmax(z, dim=-1).double().cumsum_(-1)
    target = (u.to(cdf) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=z.shape[-1] - 1)


class _Out:
    """Per-row results, written as rows advance (CPU)."""

    def __init__(self, rows: int, width: int, pad_id: int, score: bool, values: bool):
        self.tokens = torch.full((rows, width), pad_id, dtype=torch.long)
        self.logprobs = torch.zeros(rows, width) if score else None
        self.values = torch.zeros(rows, width) if values else None
        self.length = torch.zeros(rows, dtype=torch.long)
        self.env = torch.zeros(rows, width, dtype=torch.bool)
        self.turn_start = torch.zeros(rows, dtype=torch.long)  # where the row's turn began
        self.finished = torch.zeros(rows, dtype=torch.bool)

    def write_env(self, row: int, ids: list[int]) -> None:
        """The environment's ids after row `row`'s turn: context, not actions (no log-prob)."""
        t = int(self.length[row])
        self.tokens[row, t:t + len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.env[row, t:t + len(ids)] = True
        self.length[row] += len(ids)
        self.turn_start[row] = self.length[row]

    def write(self, rows: Tensor, tok: Tensor, lp: Optional[Tensor], v: Optional[Tensor]) -> None:
        rows, t = rows.cpu(), self.length[rows.cpu()]
        self.tokens[rows, t] = tok.cpu()
        if self.logprobs is not None:
            self.logprobs[rows, t] = lp.cpu()
        if self.values is not None:
            self.values[rows, t] = v.float().cpu()
        self.length[rows] += 1

    def drawn(self, turns: bool) -> Drawn:
        r = max(int(self.length.max()), 1)
        cut = (lambda x: None if x is None else x[:, :r])
        if not turns:
            return Drawn(self.tokens[:, :r], cut(self.logprobs), cut(self.values))
        return Drawn(self.tokens[:, :r], cut(self.logprobs), cut(self.values), self.env[:, :r],
                     self.length.clone(), self.finished.clone())


class Sampler:
    """One `sample` call's state: the model pieces, what each row has drawn, the stop rule."""

    def __init__(self, ac: ActorCritic, prompts, *, max_new_tokens, temperature, greedy,
                 stop_ids, pad_id, uniforms, score, forced=None, values=False,
                 turns: Optional[TurnHook] = None):
        self.ac, self.prompts, self.pad_id = ac, [tuple(p) for p in prompts], pad_id
        self.turns = turns
        # With the model's own logits (ActorCritic.use_own_logits) each step runs the whole
        # `*ForCausalLM.forward` on the new tokens and "the state" of a row is its logits row.
        self.own = ac.own_logits
        self.decoder = ac.causal_lm if self.own else ac.causal_lm.get_decoder()
        self.cache_kw = cache_keyword(type(self.decoder))
        self.head = (lambda x: x) if self.own else ac.lm_head
        self.device = ac.device
        self.max_new, self.temperature = max_new_tokens, temperature
        self.uniforms = None if greedy else uniforms.to(self.device)
        self.forced = None if forced is None else forced.to(self.device)
        self.stops = torch.tensor(stop_ids, device=self.device)
        self.stop_list = set(stop_ids)
        self.with_values = values and ac.value_mode == "shared" and not self.own
        self.out = _Out(len(prompts), max_new_tokens, pad_id, score, self.with_values)

    def forward(self, ids: Tensor, mask: Tensor, positions: Tensor, cache) -> Tensor:
        """The trunk's last hidden state (k, H) of each row (with the model's own logits: its
        logits (k, V)), its cache updated in place."""
        kw = {self.cache_kw: cache, **({"logits_to_keep": 1} if self.own else {})}
        out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                           use_cache=True, **kw)
        return (out.logits if self.own else out.last_hidden_state)[:, -1]

    def prefill(self, prompts: list[tuple[int, ...]], cache, static_width: int = 0) -> Tensor:
        """Encode left-padded `prompts` into `cache`; their last hidden states (k, H). A static
        cache takes a 2-D mask as wide as the cache (`static_width`), zero past the prompts."""
        ids, mask = (t.to(self.device) for t in left_pad(prompts, self.pad_id))
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        if static_width:
            mask = torch.cat([mask, mask.new_zeros(len(prompts), static_width - mask.shape[1])], 1)
        return self.forward(ids, mask, positions, cache)

    def advance(self, rows: Tensor, h: Tensor, live: Optional[Tensor] = None
                ) -> tuple[Tensor, Tensor]:
        """Draw the next token of `rows` (k,) from their states h (k, H) and record it; the
        tokens (k,) and whether each row stopped (a stop id, or max_new_tokens reached).
        `live` (k,) bool: the heads still run over every row (ranks in lockstep must call
        ZeRO-3's gathering heads alike, also a rank whose rows have all stopped), but only the
        live rows draw and are recorded; the others return pad and stopped."""
        if live is not None:
            z_all = self.head(h)
            v_all = self.ac.value_head(h) if self.with_values else None
            stopped = torch.ones(len(rows), dtype=torch.bool, device=self.device)
            tok = torch.full((len(rows),), self.pad_id, dtype=torch.long, device=self.device)
            idx = live.nonzero().squeeze(-1)
            if len(idx):
                stopped[idx], tok[idx] = self._draw(rows[idx], z_all[idx],
                                                    None if v_all is None else v_all[idx])
            return stopped, tok
        return self._draw(rows, self.head(h),
                          self.ac.value_head(h) if self.with_values else None)

    def context(self, row: int) -> tuple[int, ...]:
        """Row `row`'s prompt and everything after it so far: what a re-encode prefills."""
        return self.prompts[row] + tuple(self.out.tokens[row, :int(self.out.length[row])].tolist())

    def end_turns(self, rows: Tensor, last: Tensor) -> dict[int, list[int]]:
        """Rows that just stopped (`last`: the token each drew): those that stopped at a stop id
        end a turn and ask the turn hook what the environment says; each row it answers
        continues with the environment's ids written after its turn. Returns {row: those ids}.
        A row stopped by the length, answered None, or whose answer does not fit before
        rollout.max_new_tokens with room for one more token of its own, ends its trajectory
        (finished only when the model ended it: a stop id and no answer)."""
        if self.turns is None or not len(rows):
            return {}
        rows_l, last_l = rows.tolist(), last.tolist()
        length = self.out.length
        at_stop = [r for r, t in zip(rows_l, last_l) if t in self.stop_list]
        answers = self.turns.end_turns(at_stop, [self.out.tokens[r, int(self.out.turn_start[r]):
                                                                int(length[r])].tolist()
                                                 for r in at_stop]) if at_stop else []
        out = {}
        for r, env in zip(at_stop, answers):
            if env is None:
                self.out.finished[r] = True
            elif int(length[r]) + len(env) < self.max_new:
                self.out.write_env(r, env)
                out[r] = env
        return out

    def _draw(self, rows: Tensor, logits: Tensor, v: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        z = transform_logits(logits, self.temperature, self.ac.logits_transform)
        t = self.out.length[rows.cpu()].to(self.device)
        tok = (draw(z, None if self.uniforms is None else self.uniforms[rows, t])
               if self.forced is None else self.forced[rows, t])
        lp = (z.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(z, -1)
              if self.out.logprobs is not None else None)
        self.out.write(rows, tok, lp, v)
        return torch.isin(tok, self.stops) | (t + 1 >= self.max_new), tok


def decode_batched(s: Sampler, rows: Tensor, static_cache: bool, synced: bool) -> list[int]:
    """Decode `rows` to the end of their turn in one batch: each distinct prompt prefilled once
    and its cache rows repeated for the rows answering it; finished rows dropped (kept in
    lockstep, where every rank runs a forward per step until all are done). Returns the rows
    whose trajectory continues after the environment's answer: a later batch re-encodes
    them (`Sampler.context`)."""
    contexts = [s.context(i) for i in rows.tolist()]
    distinct = list(dict.fromkeys(contexts))
    which = torch.tensor([distinct.index(c) for c in contexts], device=s.device)
    col = max(len(p) for p in distinct)  # the next cache column
    static_width = col + s.max_new if static_cache else 0
    cache = (StaticCache(config=s.ac.causal_lm.config, max_cache_len=static_width)
             if static_cache else DynamicCache(config=s.ac.causal_lm.config))
    h = s.prefill(distinct, cache, static_width)
    if len(distinct) < len(rows):  # copy each prompt's cache rows to the rows answering it
        h = h.index_select(0, which)
        select_rows(cache, which)
    mask = left_pad(contexts, s.pad_id)[1].to(s.device)
    if static_cache:
        mask = torch.cat([mask, mask.new_zeros(len(rows), s.max_new)], 1)
    positions = mask.sum(1, keepdim=True) - 1
    rows = rows.to(s.device)
    live = torch.ones(len(rows), dtype=torch.bool, device=s.device)
    last = torch.full((len(rows),), s.pad_id, dtype=torch.long, device=s.device)
    again: list[int] = []
    while True:
        if synced:  # every row through the heads, the live ones drawn
            was = live.clone()
            stopped, last = s.advance(rows, h, live)
            live &= ~stopped
            ended = (was & ~live).nonzero().squeeze(-1)
        else:
            idx = live.nonzero().squeeze(-1)
            stopped, last[idx] = s.advance(rows[idx], h[idx])
            ended = idx[stopped]
            live[ended] = False
        again += list(s.end_turns(rows[ended], last[ended]))
        if _all_done(~live, synced):
            return again
        if not synced and (~live).sum() * 4 >= len(live):  # drop the finished rows
            keep = live.nonzero().squeeze(-1)
            keep_rows(cache, keep)
            rows, mask, positions, live, last = (x[keep] for x in (rows, mask, positions,
                                                                    live, last))
        if static_cache:
            mask[:, col] = 1
        else:
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
        positions = torch.where(live[:, None], positions + 1, 0)  # stopped rows: any position
        h = s.forward(last[:, None], mask, positions, cache)
        col += 1
