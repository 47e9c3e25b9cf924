"""Continuous batching: a row that stops leaves the decode batch and the next pending row takes
its slot, so the batch stays full until the prompts run out; then finished rows are dropped (the
batch and its KV cache compacted in place).

One static cache of `slots` rows holds the batch. Every row writes its next token at the same
cache column `col`; a row entering the batch has its prompt's keys and values placed
right-aligned to end at `col`, and the 2-D mask marks each row's columns (positions come from the
row itself, not the column). When `col` reaches the cache's width, every row's columns move left
by the span no live row uses. A step's attention reads only the columns some row sees, from the
first to `col` (modeling/block_sdpa.py::key_window), not the whole cache, and a prompt that
several rows copy (a group's) once for all of them (shared_prompts.py, modeling/cascade.py). The loop, one
decision per turn:

    admit       the next rows take the free slots: their distinct prompts prefilled once each
                (at most a quarter of the slots per prefill) and placed into the cache
    compact     no rows left to admit and a quarter of the slots free: drop the finished rows
    shift left  the write column reached the cache's end: move every row's columns left
    step        one forward of every slot at `col`, the live rows draw their next token

Rows enter longest prompt first, so the rows prefilled together have prompts of about the same
length (a prefill is left-padded to its longest); each row's tokens do not depend on when it
enters (sampler.py: every row draws from its own uniforms). Needs plain static cache layers
(kv_cache.py::continuous_batching_fits): not a sliding window's ring.

Turns (a multi-turn rollout, `Sampler.turns`): a row that ends a turn with a tool call keeps its
cache (the conversation is never encoded again), and the environment's answer (after the token
the row stopped at) enters it one of two ways:
  - in its own slot (`feed`), where it could not rejoin at once anyway: a row rejoining is
    right-aligned to end at `col`, so it waits for `col` to pass its conversation's new length,
    as many steps as the answer has ids where the batch's rows began together. Those steps take
    the answer instead: each gives the row its next id rather than a drawn token, and it draws
    again after the answer's last. While every live row is taking an answer (the rows of a
    rollout often call their tools at the same step), one forward takes as many ids of every
    row at once as the shortest answer has left (at most ANSWER_CHUNK): each row's columns stay
    contiguous. Nothing is copied, nothing waits.
  - on a cache of its own, where it can rejoin at once (its conversation fits left of `col`):
    it leaves the batch and its slot takes the next row; its keys and values are copied out,
    the answer is prefilled there (one forward of those few ids), and it waits in `ready` to
    rejoin like a prompt.
With `reuse_cache=False` the row is encoded again from its prompt on instead: what a tool loop
without its own cache does (TRL's), kept as the exactness reference.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import torch
from torch import Tensor
from transformers import DynamicCache, StaticCache

from lora_ppo.generation.kv_cache import keep_rows, shift_left
from lora_ppo.generation.sampler import Sampler
from lora_ppo.generation.shared_prompts import SharedPrompts
from lora_ppo.modeling.block_sdpa import key_window

PREFILL_SHARE = 4  # rows entering the continuous batch per prefill: at most slots / 4
ANSWER_CHUNK = 32  # environment ids per row in one forward of a batch that takes answers


def continuous_slack(max_new_tokens: int) -> int:
    """Columns beyond prompt + new tokens in the continuous batch's cache: every row moves left
    when the write column reaches the end, a copy of the cache at most every `slack` steps."""
    return max(8, max_new_tokens // 16)


class _Batch:
    """The continuous batch: `slots` rows of one static cache and what each slot holds."""

    def __init__(self, s: Sampler, slots: int, reuse_cache: bool = True, cascade: bool = True):
        self.s, self.n_rows, self.reuse_cache = s, len(s.prompts), reuse_cache
        # rows between turns, waiting to rejoin: (row, (per-layer keys and values, last state)
        # of their conversation so far, or None to encode it again, its length)
        self.ready: deque = deque()
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
        # rows taking the environment's answer in their slot: its ids still to take
        self.feed: dict[int, deque] = {}
        self.remaining: dict[tuple[int, ...], int] = {}  # rows still to place, per prompt
        for p in s.prompts:
            self.remaining[p] = self.remaining.get(p, 0) + 1
        self.encoded: dict = {}  # prompt -> (per-layer keys and values, last hidden state)
        # The sort is stable: the rows of a group stay together.
        self.order = torch.tensor(sorted(range(self.n_rows), key=lambda i: -len(s.prompts[i])),
                                  device=dev)
        self.pending, self.col = 0, self.p_max
        # the prompts rows share, read once per group in a decode step's attention
        self.shared = SharedPrompts(slots, dev)
        self.cascade = cascade

    def free(self) -> Tensor:
        return (self.row < 0).nonzero().squeeze(-1)

    def waiting(self) -> bool:
        """Rows are still to be admitted: prompts not yet started, or rows between turns."""
        return self.pending < self.n_rows or bool(self.ready)

    def admit(self, free: Tensor) -> bool:
        """The next rows take free slots: rows between turns first, then prompts, at most a
        quarter of the slots per prefill (its own cache, copied into the decode batch's, is a
        transient that stays a fraction of it). False when none could be placed yet (a row
        between turns needs `col` to have room for its conversation)."""
        s, take = self.s, min(len(free), max(1, -(-self.slots // PREFILL_SHARE)))
        if self.ready and not (self.row >= 0).any():  # an empty batch: move its write column
            self.col = max(self.col, max(n for _, _, n in self.ready))
        fits = [item for item in list(self.ready)[:take] if item[2] <= self.col]
        if fits:
            chosen = {id(item) for item in fits}
            self.ready = deque(item for item in self.ready if id(item) not in chosen)
            rows = [r for r, _, _ in fits]
            again = [r for r, enc, _ in fits if enc is None]  # encode their context again
            encoded = dict(zip(again, zip(*self._prefill([s.context(r) for r in again])))
                           ) if again else {}
            kv = [enc[0] if enc is not None else encoded[r][0] for r, enc, _ in fits]
            h = torch.stack([enc[1] if enc is not None else encoded[r][1]
                             for r, enc, _ in fits])
            self._place(free[:len(rows)], torch.tensor(rows, device=s.device), kv, h,
                        [n for _, _, n in fits])
            return True
        if self.pending >= self.n_rows or self.ready:
            # no new prompt while a conversation waits to rejoin: the rows in flight (live or
            # waiting) stay at most `slots`, so the waiting ones' caches cost at most what
            # their freed slots would hold (sizing/memory.py counts it)
            return False
        new = self.order[self.pending:self.pending + take]
        self.pending += len(new)
        kv, h, ids = self._encode([s.prompts[i] for i in new.tolist()])
        self._place(free[:len(new)], new, kv, h, [len(s.prompts[i]) for i in new.tolist()], ids)
        return True

    def _place(self, free: Tensor, new: Tensor, kv: list, h: Tensor, lengths: list[int],
               ids: Optional[list[int]] = None) -> None:
        """Rows `new` into slots `free`: each one's keys and values right-aligned to end at
        `col`, then each draws its next token from its last state `h`. `ids`: the encoding each
        row's columns copy (rows of one encoding share its prefix, SharedPrompts); else each
        row's columns are its own."""
        s, col = self.s, self.col
        if not self.cache.layers[0].is_initialized:
            # each layer shaped and typed as the prefill wrote it: under autocast the keys
            # (rope in fp32) and the values (a bf16 matmul) differ in dtype, which
            # Cache.early_initialization's one dtype cannot hold
            for layer, (k, v) in zip(self.cache.layers, kv[0]):
                layer.lazy_initialization(k.new_empty(self.slots, k.shape[1], 0, k.shape[3]),
                                          v.new_empty(self.slots, v.shape[1], 0, v.shape[3]))
        for slot, i, layers, n in zip(free.tolist(), new.tolist(), kv, lengths):
            for layer, (k, v) in zip(self.cache.layers, layers):  # it ends at the write column
                layer.keys[slot, :, col - n:col] = k[0]
                layer.values[slot, :, col - n:col] = v[0]
            self.mask[slot] = 0
            self.mask[slot, col - n:col] = 1
            self.positions[slot, 0], self.start[slot], self.row[slot] = n - 1, col - n, i
        self.shared.placed(free, ids if ids is not None else
                           [self.shared.new_id() for _ in range(len(free))], lengths)
        stopped, self.last[free] = s.advance(new, h)
        self._ended(free[stopped])  # rows that stopped at once free their slots again

    def _ended(self, slots: Tensor) -> None:
        """Free the slots whose rows stopped; a row whose turn the environment answered takes
        the answer in its slot, or leaves with its conversation to rejoin (module doc)."""
        answered = self.s.end_turns(self.row[slots], self.last[slots])
        freed = []
        for slot in slots.tolist():
            r = int(self.row[slot])
            if r in answered:
                n = int(self.col - self.start[slot]) + 1 + len(answered[r])
                if self.reuse_cache and n > self.col:  # it could not rejoin at once
                    self.feed[r] = deque(answered[r])
                    continue
                enc = self._continue(slot, [int(self.last[slot]), *answered[r]]) \
                    if self.reuse_cache else None
                self.ready.append((r, enc, n))
            freed.append(slot)
        self.row[freed] = -1
        self.mask[freed] = 0  # a free slot reads only the column it writes (step)
        self.shared.freed(freed)

    def _continue(self, slot: int, ids: list[int]) -> tuple[list, Tensor]:
        """The slot's conversation so far (columns start..col) on a cache of its own, with
        `ids` (the token it stopped at, then the environment's answer) prefilled after it:
        per-layer keys and values (1, heads, len, dim) and the last state (H,)."""
        s, a, b = self.s, int(self.start[slot]), self.col
        cache = DynamicCache(config=s.ac.causal_lm.config)
        for i, layer in enumerate(self.cache.layers):
            cache.update(layer.keys[slot:slot + 1, :, a:b], layer.values[slot:slot + 1, :, a:b], i)
        n, k = b - a, len(ids)
        mask = torch.ones(1, n + k, dtype=torch.long, device=s.device)
        positions = torch.arange(n, n + k, device=s.device)[None]
        h = s.forward(torch.tensor([ids], device=s.device), mask, positions, cache)
        return [(layer.keys, layer.values) for layer in cache.layers], h[0]

    def compact(self, live: Tensor) -> None:
        """Drop the finished rows: the batch and its cache keep the live ones, in place."""
        keep = live.nonzero().squeeze(-1)
        keep_rows(self.cache, keep)
        self.mask, self.positions, self.row, self.start, self.last = (
            x[keep] for x in (self.mask, self.positions, self.row, self.start, self.last))
        self.shared.keep(keep)

    def shift_left(self, live: Tensor) -> None:
        """Move every row's columns left by the span no live row uses (and, while rows are still
        to be admitted, no more than leaves room for the longest prompt left of `col`)."""
        k = int(self.start[live].min())
        k = min(k, self.col - self.p_max) if self.pending < self.n_rows else k
        if self.ready:  # keep room left of col for the longest conversation waiting to rejoin
            k = min(k, self.col - max(n for _, _, n in self.ready))
        shift_left(self.cache, k)
        self.mask[:, :self.width - k] = self.mask[:, k:].clone()
        self.mask[:, self.width - k:] = 0
        self.start, self.col = self.start - k, self.col - k

    def step(self, live: Tensor) -> None:
        """One forward of every slot at column `col`; the live rows draw their next token, or
        take the next id of an answer (module doc)."""
        self._forward(self.last[:, None], live, shared=self.cascade)

    def answer_step(self, live: Tensor) -> None:
        """Every live row is taking an answer: one forward of the next t ids of all of them (the
        token each stopped at first), t the fewest any has left (at most ANSWER_CHUNK), so that
        every row's columns stay contiguous; a row whose answer ends there draws its next
        token, the others go on taking theirs."""
        slots = live.nonzero().squeeze(-1).tolist()
        pending = {slot: self.feed[int(self.row[slot])] for slot in slots}
        t = min(ANSWER_CHUNK, 1 + min(len(q) for q in pending.values()), self.width - self.col)
        ids = torch.full((len(self.row), t), self.s.pad_id, dtype=torch.long,
                         device=self.s.device)
        for slot, q in pending.items():
            ids[slot] = torch.tensor([int(self.last[slot])] + [q.popleft() for _ in range(t - 1)],
                                     device=self.s.device)
            if not q:  # its answer ends here: it draws
                del self.feed[int(self.row[slot])]
        self._forward(ids, live)

    def _forward(self, ids: Tensor, live: Tensor, shared: bool = False) -> None:
        """The batch's forward of `ids` (slots, t), every row writing columns col .. col+t-1 (a
        free slot too: its softmax must not be empty), then `_draw` from the last state.
        Attention reads the columns some row sees, not the whole cache (block_sdpa.key_window),
        and with `shared` (one id a row) each shared prompt once (SharedPrompts)."""
        t = ids.shape[1]
        for layer in self.cache.layers:  # every row writes from column col on
            layer.cumulative_length.fill_(self.col)
        self.mask[:, self.col:self.col + t] = 1
        positions = torch.where(live[:, None], self.positions + torch.arange(
            1, t + 1, device=self.s.device), 0)  # a free slot: any position
        self.positions = positions[:, -1:]
        lo = int(self.mask.any(0).int().argmax())
        plan = (self.shared.plan(live, self.start, self.col, self.mask, self.cache)
                if shared else None)  # after the mask holds the columns written now
        with key_window(self.width, lo, self.col + t, plan):
            h = self.s.forward(ids, self.mask, positions, self.cache)
        self.col += t
        self._draw(live.nonzero().squeeze(-1), h)

    def _draw(self, idx: Tensor, h: Tensor) -> None:
        """Slots `idx` go on from their states h: a row taking an answer takes its next id
        (drawing nothing), the others draw their next token."""
        if self.feed:
            taking = torch.tensor([int(r) in self.feed for r in self.row[idx].tolist()],
                                  dtype=torch.bool, device=idx.device)
            for slot in idx[taking].tolist():
                r = int(self.row[slot])
                self.last[slot] = self.feed[r].popleft()
                if not self.feed[r]:
                    del self.feed[r]
            idx = idx[~taking]
        stopped, self.last[idx] = self.s.advance(self.row[idx], h[idx])
        self._ended(idx[stopped])

    def answering(self, live: Tensor) -> bool:
        """Every live row is taking an answer (`answer_step`), with a column to spare."""
        return (len(self.feed) > 0 and len(self.feed) == int(live.sum())
                and self.col + 1 < self.width)

    def _encode(self, prompts: list[tuple[int, ...]]
                ) -> tuple[list[list[tuple[Tensor, Tensor]]], Tensor, list[int]]:
        """Per row of `prompts`: its prompt's per-layer keys and values (1, heads, len, dim),
        its last hidden state (k, H) and the encoding's id (SharedPrompts). A prompt is
        prefilled once (a dynamic cache, positions from 0) and kept until every row that
        answers it has been placed."""
        new = [p for p in dict.fromkeys(prompts) if p not in self.encoded]
        for p, kv, h in zip(new, *self._prefill(new)):
            self.encoded[p] = (kv, h, self.shared.new_id())
        kv, hs, ids = [], [], []
        for p in prompts:
            layers, h, i = self.encoded[p]
            kv.append(layers)
            hs.append(h)
            ids.append(i)
            self.remaining[p] -= 1
            if self.remaining[p] == 0:
                del self.encoded[p]
        return kv, torch.stack(hs), ids


    def _prefill(self, seqs: list[tuple[int, ...]]) -> tuple[list, list]:
        """Each sequence prefilled (one left-padded batch, a dynamic cache, positions from 0):
        its per-layer keys and values (1, heads, len, dim) and its last hidden state (H,)."""
        if not seqs:
            return [], []
        cache = DynamicCache(config=self.s.ac.causal_lm.config)
        h = self.s.prefill(seqs, cache)
        width = max(len(p) for p in seqs)
        kv = [[(layer.keys[j:j + 1, :, width - len(p):], layer.values[j:j + 1, :, width - len(p):])
               for layer in cache.layers] for j, p in enumerate(seqs)]
        return kv, list(h)


def decode_continuous(s: Sampler, generation_batch_size: int, reuse_cache: bool = True,
                      cascade: bool = True) -> None:
    """Decode every row of `s` with continuous batching over `generation_batch_size` slots, the
    rows of the batch's static cache (module doc). `reuse_cache`: a row between turns keeps its
    keys and values (else its conversation is encoded again when it rejoins). `cascade`: a
    decode step reads a prompt its rows share once (SharedPrompts; else once per row)."""
    b = _Batch(s, generation_batch_size, reuse_cache, cascade)
    while True:
        free = b.free()
        if b.waiting() and len(free) and b.admit(free):
            continue
        live = b.row >= 0
        if not live.any():
            if b.ready:  # rows between turns wait for an empty batch's write column
                continue
            return
        if not b.waiting() and (~live).sum() * 4 >= len(live):
            b.compact(live)
            continue
        if b.col == b.width:
            b.shift_left(live)
        if b.answering(live):
            b.answer_step(live)
        else:
            b.step(live)
