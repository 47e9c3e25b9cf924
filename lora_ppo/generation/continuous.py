"""Continuous batching: a row that stops leaves the decode batch and the next pending row takes
its slot, so the batch stays full until the prompts run out; then finished rows are dropped (the
batch and its KV cache compacted in place).

One static cache of `slots` rows holds the batch. Every row writes its next token at the same
cache column `col`; a row entering the batch has its prompt's keys and values placed
right-aligned to end at `col`, and the 2-D mask marks each row's columns (positions come from the
row itself, not the column). When `col` reaches the cache's width, every row's columns move left
by the span no live row uses. The loop, one decision per turn:

    admit       the next rows take the free slots: their distinct prompts prefilled once each
                (at most a quarter of the slots per prefill) and placed into the cache
    compact     no rows left to admit and a quarter of the slots free: drop the finished rows
    shift left  the write column reached the cache's end: move every row's columns left
    step        one forward of every slot at `col`, the live rows draw their next token

Rows enter longest prompt first, so the rows prefilled together have prompts of about the same
length (a prefill is left-padded to its longest); each row's tokens do not depend on when it
enters (sampler.py: every row draws from its own uniforms). Needs plain static cache layers
(kv_cache.py::continuous_batching_fits): not a sliding window's ring.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache, StaticCache

from lora_ppo.generation.kv_cache import keep_rows, shift_left
from lora_ppo.generation.sampler import Sampler

PREFILL_SHARE = 4  # rows entering the continuous batch per prefill: at most slots / 4


def continuous_slack(max_new_tokens: int) -> int:
    """Columns beyond prompt + new tokens in the continuous batch's cache: every row moves left
    when the write column reaches the end, a copy of the cache at most every `slack` steps."""
    return max(8, max_new_tokens // 16)


class _Batch:
    """The continuous batch: `slots` rows of one static cache and what each slot holds."""

    def __init__(self, s: Sampler, slots: int):
        self.s, self.n_rows = s, len(s.prompts)
        self.p_max = max(len(p) for p in s.prompts)
        self.width = self.p_max + s.max_new + continuous_slack(s.max_new)
        self.slots = slots = min(slots, self.n_rows)
        dev = s.device
        self.cache = StaticCache(config=s.ac.causal_lm.config, max_cache_len=self.width)
        self.mask = torch.zeros(slots, self.width, dtype=torch.long, device=dev)
        self.positions = torch.zeros(slots, 1, dtype=torch.long, device=dev)
        self.row = torch.full((slots,), -1, dtype=torch.long, device=dev)  # -1: a free slot
        self.start = torch.zeros(slots, dtype=torch.long, device=dev)     # first live column
        self.last = torch.full((slots,), s.pad_id, dtype=torch.long, device=dev)
        self.remaining: dict[tuple[int, ...], int] = {}  # rows still to place, per prompt
        for p in s.prompts:
            self.remaining[p] = self.remaining.get(p, 0) + 1
        self.encoded: dict = {}  # prompt -> (per-layer keys and values, last hidden state)
        # The sort is stable: the rows of a group stay together.
        self.order = torch.tensor(sorted(range(self.n_rows), key=lambda i: -len(s.prompts[i])),
                                  device=dev)
        self.pending, self.col = 0, self.p_max

    def free(self) -> Tensor:
        return (self.row < 0).nonzero().squeeze(-1)

    def admit(self, free: Tensor) -> None:
        """The next rows take free slots: at most a quarter of the slots per prefill (its own
        cache, copied into the decode batch's, is a transient that stays a fraction of it)."""
        s, col = self.s, self.col
        take = min(len(free), max(1, -(-self.slots // PREFILL_SHARE)))
        new = self.order[self.pending:self.pending + take]
        free, self.pending = free[:len(new)], self.pending + len(new)
        kv, h = self._encode([s.prompts[i] for i in new.tolist()])
        if not self.cache.layers[0].is_initialized:
            # each layer shaped and typed as the prefill wrote it: under autocast the keys
            # (rope in fp32) and the values (a bf16 matmul) differ in dtype, which
            # Cache.early_initialization's one dtype cannot hold
            for layer, (k, v) in zip(self.cache.layers, kv[0]):
                layer.lazy_initialization(k.new_empty(self.slots, k.shape[1], 0, k.shape[3]),
                                          v.new_empty(self.slots, v.shape[1], 0, v.shape[3]))
        for slot, i, layers in zip(free.tolist(), new.tolist(), kv):
            n = len(s.prompts[i])  # the prompt ends at the current column
            for layer, (k, v) in zip(self.cache.layers, layers):
                layer.keys[slot, :, col - n:col] = k[0]
                layer.values[slot, :, col - n:col] = v[0]
            self.mask[slot] = 0
            self.mask[slot, col - n:col] = 1
            self.positions[slot, 0], self.start[slot], self.row[slot] = n - 1, col - n, i
        stopped, self.last[free] = s.advance(new, h)
        self.row[free[stopped]] = -1  # rows that stopped at once free their slots again

    def compact(self, live: Tensor) -> None:
        """Drop the finished rows: the batch and its cache keep the live ones, in place."""
        keep = live.nonzero().squeeze(-1)
        keep_rows(self.cache, keep)
        self.mask, self.positions, self.row, self.start, self.last = (
            x[keep] for x in (self.mask, self.positions, self.row, self.start, self.last))

    def shift_left(self, live: Tensor) -> None:
        """Move every row's columns left by the span no live row uses (and, while rows are still
        to be admitted, no more than leaves room for the longest prompt left of `col`)."""
        k = int(self.start[live].min())
        k = min(k, self.col - self.p_max) if self.pending < self.n_rows else k
        shift_left(self.cache, k)
        self.mask[:, :self.width - k] = self.mask[:, k:].clone()
        self.mask[:, self.width - k:] = 0
        self.start, self.col = self.start - k, self.col - k

    def step(self, live: Tensor) -> None:
        """One forward of every slot at column `col`; the live rows draw their next token."""
        for layer in self.cache.layers:  # every row writes its token at column col
            layer.cumulative_length.fill_(self.col)
        self.mask[:, self.col] = 1
        self.positions = torch.where(live[:, None], self.positions + 1, 0)  # free: any position
        h = self.s.forward(self.last[:, None], self.mask, self.positions, self.cache)
        self.col += 1
        idx = live.nonzero().squeeze(-1)
        stopped, self.last[idx] = self.s.advance(self.row[idx], h[idx])
        self.row[idx[stopped]] = -1

    def _encode(self, prompts: list[tuple[int, ...]]
                ) -> tuple[list[list[tuple[Tensor, Tensor]]], Tensor]:
        """Per row of `prompts`: its prompt's per-layer keys and values (1, heads, len, dim) and
        its last hidden state (k, H). A prompt is prefilled once (a dynamic cache, positions
        from 0) and kept until every row that answers it has been placed."""
        new = [p for p in dict.fromkeys(prompts) if p not in self.encoded]
        if new:
            cache = DynamicCache(config=self.s.ac.causal_lm.config)
            h = self.s.prefill(new, cache)
            width = max(len(p) for p in new)
            for j, p in enumerate(new):
                layers = [(layer.keys[j:j + 1, :, width - len(p):],
                           layer.values[j:j + 1, :, width - len(p):]) for layer in cache.layers]
                self.encoded[p] = (layers, h[j])
        kv, hs = [], []
        for p in prompts:
            layers, h = self.encoded[p]
            kv.append(layers)
            hs.append(h)
            self.remaining[p] -= 1
            if self.remaining[p] == 0:
                del self.encoded[p]
        return kv, torch.stack(hs)


def decode_continuous(s: Sampler, generation_batch_size: int) -> None:
    """Decode every row of `s` with continuous batching over `generation_batch_size` slots, the
    rows of the batch's static cache (module doc)."""
    b = _Batch(s, generation_batch_size)
    while True:
        free = b.free()
        if b.pending < b.n_rows and len(free):
            b.admit(free)
            continue
        live = b.row >= 0
        if not live.any():
            return
        if b.pending >= b.n_rows and (~live).sum() * 4 >= len(live):
            b.compact(live)
            continue
        if b.col == b.width:
            b.shift_left(live)
        b.step(live)
