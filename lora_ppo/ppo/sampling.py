"""Autoregressive sampling from exactly the distribution PPO scores, without wasted work.

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
slots changes no row's tokens (up to the float round-off of a matmul of another shape).

No wasted work (docs/ppo.md, "Doing less work"):

- A prompt is encoded once: the distinct prompts of the rows entering the batch are prefilled
  once each and their keys and values copied to every row that answers them (the n samples of a
  group), and the prompt's last hidden state gives every such row its first token.
- Continuous batching (`continuous`): a row that stops leaves the decode batch and the next
  pending row takes its slot, so the batch stays full until the prompts run out; then finished
  rows are dropped (the batch and its KV cache compacted). Every row writes its next token at the
  same cache column c; a new row's prompt is placed right-aligned to end at c, and the 2-D mask
  marks each row's columns (positions come from the row itself, not the column). When c reaches
  the cache's width, every row's columns move left by the span no live row uses.
- Otherwise (a sliding-window cache, whose ring layout cannot take a row placed mid-way; ZeRO-3
  over several ranks, where every rank must run the same forwards; a dynamic cache) rows are
  decoded in batches of `slots`, finished rows dropped from the batch (except in lockstep).

The KV cache is transformers' `StaticCache`, written in place (`static_cache`): the default
`DynamicCache` concatenates every layer's keys and values at every token, which profiled at more
than half of CPU decoding time.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor
from transformers import DynamicCache, StaticCache

from lora_ppo.modeling.actor_critic import ActorCritic
from lora_ppo.modeling.kv_cache import (
    cache_keyword,
    continuous_batching_fits,
    keep_rows,
    select_rows,
    shift_left,
)
from lora_ppo.rl.logprobs import transform_logits


def _all_done(done: Tensor, synced: bool) -> bool:
    """True when every row has stopped, on every rank when `synced` (they decode in lockstep)."""
    finished = bool(done.all())
    if not synced:
        return finished
    flag = torch.tensor([0.0 if finished else 1.0], device=done.device)
    torch.distributed.all_reduce(flag)
    return flag.item() == 0.0


class Drawn(NamedTuple):
    """What one call of `sample` gives: the tokens and, when asked, their scores."""

    tokens: Tensor                # (B, R) long, `pad_id` after a row's stop token
    logprobs: Optional[Tensor]    # (B, R) log softmax(z)[token], float32, or None
    values: Optional[Tensor]      # (B, R) V(state before token) of the shared head, or None


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


def left_pad(seqs, pad_id: int) -> tuple[Tensor, Tensor]:
    """Lists of ids -> (ids (B, L), mask (B, L)) padded on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


PREFILL_SHARE = 4  # rows entering the continuous batch per prefill: at most slots / 4


def continuous_slack(max_new_tokens: int) -> int:
    """Columns beyond prompt + new tokens in the continuous batch's cache: every row moves left
    when the write column reaches the end, a copy of the cache at most every `slack` steps."""
    return max(8, max_new_tokens // 16)


class _Out:
    """Per-row results, written as rows advance (CPU)."""

    def __init__(self, rows: int, width: int, pad_id: int, score: bool, values: bool):
        self.tokens = torch.full((rows, width), pad_id, dtype=torch.long)
        self.logprobs = torch.zeros(rows, width) if score else None
        self.values = torch.zeros(rows, width) if values else None
        self.length = torch.zeros(rows, dtype=torch.long)

    def write(self, rows: Tensor, tok: Tensor, lp: Optional[Tensor], v: Optional[Tensor]) -> None:
        rows, t = rows.cpu(), self.length[rows.cpu()]
        self.tokens[rows, t] = tok.cpu()
        if self.logprobs is not None:
            self.logprobs[rows, t] = lp.cpu()
        if self.values is not None:
            self.values[rows, t] = v.float().cpu()
        self.length[rows] += 1

    def drawn(self) -> Drawn:
        r = max(int(self.length.max()), 1)
        cut = (lambda x: None if x is None else x[:, :r])
        return Drawn(self.tokens[:, :r], cut(self.logprobs), cut(self.values))


class _Sampler:
    """One `sample` call's state: the model pieces, what each row has drawn, the stop rule."""

    def __init__(self, ac: ActorCritic, prompts, *, max_new_tokens, temperature, greedy,
                 stop_ids, pad_id, uniforms, score, forced=None, values=False):
        self.ac, self.prompts, self.pad_id = ac, [tuple(p) for p in prompts], pad_id
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

    def _draw(self, rows: Tensor, logits: Tensor, v: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        z = transform_logits(logits, self.temperature, self.ac.logits_transform)
        t = self.out.length[rows.cpu()].to(self.device)
        tok = (draw(z, None if self.uniforms is None else self.uniforms[rows, t])
               if self.forced is None else self.forced[rows, t])
        lp = (z.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(z, -1)
              if self.out.logprobs is not None else None)
        self.out.write(rows, tok, lp, v)
        return torch.isin(tok, self.stops) | (t + 1 >= self.max_new), tok


@torch.no_grad()
def sample(ac: ActorCritic, prompts: list[list[int]], *, max_new_tokens: int,
           temperature: float, greedy: bool, stop_ids: list[int], pad_id: int, slots: int,
           uniforms: Optional[Tensor] = None, continuous: bool = True, synced: bool = False,
           static_cache: bool = True, score: bool = False,
           forced: Optional[Tensor] = None, values: Optional[bool] = None) -> Drawn:
    """Responses (B, R), R <= max_new_tokens, to `prompts` (B lists of ids; rows answering the
    same prompt share its encoding). Each token is drawn from softmax(model logits / T) in
    float32 by inverse CDF at `uniforms` (B, max_new_tokens) (argmax when `greedy`); after a
    row's first stop id it holds `pad_id`. At most `slots` rows decode at once. Runs under the
    active role and mode (the caller: eval mode under the policy). `score`: also the log-prob of
    each drawn token under the distribution it was drawn from; `values` (default: `score`): also
    the shared value head on the same state (value.mode=shared), what the rollout's scoring
    forward computes, asked where the two agree to fp32 round-off.
    `synced`: every rank runs the same forwards (ZeRO-3 gathers weights collectively).
    `forced` (B, max_new_tokens): take these tokens instead of drawing (teacher forcing: the
    setup's check of the decode loop, modeling/seams.py).
    """
    if not greedy and uniforms is None:
        raise ValueError("sampling needs uniforms (B, max_new_tokens); greedy does not")
    s = _Sampler(ac, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                 greedy=greedy, stop_ids=stop_ids, pad_id=pad_id, uniforms=uniforms, score=score,
                 forced=forced, values=score if values is None else values)
    config = ac.causal_lm.config
    if continuous and static_cache and not synced and continuous_batching_fits(
            StaticCache(config=config, max_cache_len=1)):
        _continuous(s, slots)
    else:
        for start in range(0, len(prompts), slots):
            _one_batch(s, torch.arange(start, min(start + slots, len(prompts))),
                       static_cache, synced)
    return s.out.drawn()


def _one_batch(s: _Sampler, rows: Tensor, static_cache: bool, synced: bool) -> None:
    """Decode `rows` to the end in one batch: each distinct prompt prefilled once and its cache
    rows repeated for the rows answering it; finished rows dropped (kept in lockstep, where
    every rank runs a forward per step until all are done)."""
    distinct = list(dict.fromkeys(s.prompts[i] for i in rows.tolist()))
    which = torch.tensor([distinct.index(s.prompts[i]) for i in rows.tolist()], device=s.device)
    col = max(len(p) for p in distinct)  # the next cache column
    static_width = col + s.max_new if static_cache else 0
    cache = (StaticCache(config=s.ac.causal_lm.config, max_cache_len=static_width)
             if static_cache else DynamicCache(config=s.ac.causal_lm.config))
    h = s.prefill(distinct, cache, static_width)
    if len(distinct) < len(rows):  # copy each prompt's cache rows to the rows answering it
        h = h.index_select(0, which)
        select_rows(cache, which)
    mask = left_pad([s.prompts[i] for i in rows.tolist()], s.pad_id)[1].to(s.device)
    if static_cache:
        mask = torch.cat([mask, mask.new_zeros(len(rows), s.max_new)], 1)
    positions = mask.sum(1, keepdim=True) - 1
    rows = rows.to(s.device)
    live = torch.ones(len(rows), dtype=torch.bool, device=s.device)
    last = torch.full((len(rows),), s.pad_id, dtype=torch.long, device=s.device)
    while True:
        if synced:  # every row through the heads, the live ones drawn
            stopped, last = s.advance(rows, h, live)
            live &= ~stopped
        else:
            idx = live.nonzero().squeeze(-1)
            stopped, last[idx] = s.advance(rows[idx], h[idx])
            live[idx[stopped]] = False
        if _all_done(~live, synced):
            return
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


def _continuous(s: _Sampler, slots: int) -> None:
    """Continuous batching over `slots` rows (module doc); needs plain static cache layers."""
    n_rows = len(s.prompts)
    p_max = max(len(p) for p in s.prompts)
    slack = continuous_slack(s.max_new)
    width = p_max + s.max_new + slack
    slots = min(slots, n_rows)
    cache = StaticCache(config=s.ac.causal_lm.config, max_cache_len=width)
    mask = torch.zeros(slots, width, dtype=torch.long, device=s.device)
    positions = torch.zeros(slots, 1, dtype=torch.long, device=s.device)
    row = torch.full((slots,), -1, dtype=torch.long, device=s.device)  # -1: a free slot
    start = torch.zeros(slots, dtype=torch.long, device=s.device)     # first live column
    last = torch.full((slots,), s.pad_id, dtype=torch.long, device=s.device)
    remaining: dict[tuple[int, ...], int] = {}
    for p in s.prompts:
        remaining[p] = remaining.get(p, 0) + 1
    encoded: dict = {}  # prompt -> (per-layer keys and values, last hidden state)
    # Rows enter longest prompt first, so the rows prefilled together have prompts of about the
    # same length (a prefill is left-padded to its longest); their tokens do not depend on when
    # they enter. The sort is stable: the rows of a group stay together.
    order = torch.tensor(sorted(range(n_rows), key=lambda i: -len(s.prompts[i])),
                         device=s.device)
    pending, col = 0, p_max
    while True:
        free = (row < 0).nonzero().squeeze(-1)
        if pending < n_rows and len(free):  # the next rows take the free slots
            # at most a quarter of the slots per prefill: its own cache, copied into the
            # decode batch's, is a transient that stays a fraction of it
            take = min(len(free), max(1, -(-slots // PREFILL_SHARE)))
            new = order[pending:pending + take]
            free, pending = free[:len(new)], pending + len(new)
            kv, h = _encode(s, [s.prompts[i] for i in new.tolist()], encoded, remaining)
            if not cache.layers[0].is_initialized:
                # each layer shaped and typed as the prefill wrote it: under autocast the keys
                # (rope in fp32) and the values (a bf16 matmul) differ in dtype, which
                # Cache.early_initialization's one dtype cannot hold
                for layer, (k, v) in zip(cache.layers, kv[0]):
                    layer.lazy_initialization(k.new_empty(slots, k.shape[1], 0, k.shape[3]),
                                              v.new_empty(slots, v.shape[1], 0, v.shape[3]))
            for slot, i, layers in zip(free.tolist(), new.tolist(), kv):
                n = len(s.prompts[i])  # the prompt ends at the current column
                for layer, (k, v) in zip(cache.layers, layers):
                    layer.keys[slot, :, col - n:col] = k[0]
                    layer.values[slot, :, col - n:col] = v[0]
                mask[slot] = 0
                mask[slot, col - n:col] = 1
                positions[slot, 0], start[slot], row[slot] = n - 1, col - n, i
            stopped, last[free] = s.advance(new, h)
            row[free[stopped]] = -1
            continue  # rows that stopped at once free their slots again
        live = row >= 0
        if not live.any():
            return
        if pending >= n_rows and (~live).sum() * 4 >= len(live):  # no rows left: compact
            keep = live.nonzero().squeeze(-1)
            keep_rows(cache, keep)
            mask, positions, row, start, last = (x[keep] for x in (mask, positions, row,
                                                                    start, last))
            continue
        if col == width:  # move every row left by the columns no live row uses
            k = int(start[live].min())
            k = min(k, col - p_max) if pending < n_rows else k
            shift_left(cache, k)
            mask[:, :width - k] = mask[:, k:].clone()
            mask[:, width - k:] = 0
            start, col = start - k, col - k
        for layer in cache.layers:  # every row writes its token at column col
            layer.cumulative_length.fill_(col)
        mask[:, col] = 1
        positions = torch.where(live[:, None], positions + 1, 0)  # free slots: any position
        h = s.forward(last[:, None], mask, positions, cache)
        col += 1
        idx = live.nonzero().squeeze(-1)
        stopped, last[idx] = s.advance(row[idx], h[idx])
        row[idx[stopped]] = -1


def _encode(s: _Sampler, prompts: list[tuple[int, ...]], encoded: dict, remaining: dict
            ) -> tuple[list[list[tuple[Tensor, Tensor]]], Tensor]:
    """Per row of `prompts`: its prompt's per-layer keys and values (1, heads, len, dim) and its
    last hidden state (k, H). A prompt is prefilled once (a dynamic cache, positions from 0) and
    kept until every row that answers it has been placed."""
    new = [p for p in dict.fromkeys(prompts) if p not in encoded]
    if new:
        cache = DynamicCache(config=s.ac.causal_lm.config)
        h = s.prefill(new, cache)
        width = max(len(p) for p in new)
        for j, p in enumerate(new):
            layers = [(layer.keys[j:j + 1, :, width - len(p):],
                       layer.values[j:j + 1, :, width - len(p):]) for layer in cache.layers]
            encoded[p] = (layers, h[j])
    kv, hs = [], []
    for p in prompts:
        layers, h = encoded[p]
        kv.append(layers)
        hs.append(h)
        remaining[p] -= 1
        if remaining[p] == 0:
            del encoded[p]
    return kv, torch.stack(hs)
