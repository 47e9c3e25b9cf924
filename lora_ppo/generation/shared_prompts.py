"""The prompts a continuous batch's rows share, kept once for its decode steps' attention.

A group's n rows are placed from one prefill of their prompt (continuous.py), each with its own
copy in its cache slot; a decode step reading all n copies reads the same keys and values n
times. `SharedPrompts` knows which slots' first columns copy which encoding, keeps one copy of
each shared prompt per layer, and makes each step's cascade plan (modeling/cascade.py), which
the attention wrapper (modeling/block_sdpa.py::key_window) takes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lora_ppo.modeling import cascade


class SharedPrompts:
    """Which slots' first columns hold one encoding of a prompt (a group's n rows copy one
    prefill), and those prompts' keys and values stacked once per layer: a decode step's
    attention then reads each shared prompt once for its rows' queries instead of once per row
    (cascade attention, modeling/cascade.py). A prompt joins the stack at the first step two
    live rows share it, and stays while any of its rows is live; the stack is made again (a copy
    of each prompt's columns from one of its rows) when a new one joins. Rows that share with no
    other read all of their columns themselves."""

    def __init__(self, slots: int, device):
        self.id = torch.full((slots,), -1, dtype=torch.long, device=device)  # -1: nothing
        self.length = torch.zeros(slots, dtype=torch.long, device=device)    # its columns
        self.count = 0
        self.index: dict[int, int] = {}  # encoding id -> its place in the stack
        self.stack: list[tuple[Tensor, Tensor]] = []  # per layer: (C, heads, P, dim) K and V
        self.lengths: Optional[Tensor] = None  # (C,) each prompt's columns

    def new_id(self) -> int:
        self.count += 1
        return self.count - 1

    def placed(self, slots: Tensor, ids: list[int], lengths: list[int]) -> None:
        self.id[slots] = torch.tensor(ids, device=self.id.device)
        self.length[slots] = torch.tensor(lengths, device=self.id.device)

    def freed(self, slots: list[int]) -> None:
        self.id[slots] = -1

    def keep(self, keep: Tensor) -> None:
        self.id, self.length = self.id[keep], self.length[keep]

    def plan(self, live: Tensor, start: Tensor, col: int, mask: Tensor, cache):
        """This step's cascade (the Plan and each cache layer's stacked prompts), or None where
        no two live rows share a prompt: `live` (slots,) bool, `start` each slot's first column,
        `col` the column the step writes, `mask` the batch's (slots, width) columns, `cache` its
        static cache."""
        ids = torch.where(live, self.id, -1)
        seen, counts = torch.unique(ids[ids >= 0], return_counts=True)
        shared = set(seen[counts >= 2].tolist())
        keep = (shared | set(self.index)) & set(seen.tolist())
        if not keep:
            return None
        if not shared <= set(self.index) or 2 * len(keep) < len(self.index):
            self._stack(cache, start, ids, sorted(keep))
        lut = torch.full((self.count,), -1, dtype=torch.long, device=ids.device)
        lut[list(self.index)] = torch.tensor(list(self.index.values()), device=ids.device)
        prefix_of = torch.where(ids >= 0, lut[ids.clamp(min=0)], -1)
        own_from = torch.where(prefix_of >= 0, start + self.length, start)
        own_from = torch.where(live, own_from, col)  # a free slot reads only its column
        p = cascade.plan(prefix_of, self.lengths, own_from, mask.bool(),
                         int(own_from.min()))
        return p, {layer.keys.data_ptr(): kv for layer, kv in zip(cache.layers, self.stack)}

    def _stack(self, cache, start: Tensor, ids: Tensor, keep: list[int]) -> None:
        reps = [int((ids == i).nonzero()[0]) for i in keep]  # one live row of each
        starts = [int(start[r]) for r in reps]
        lengths = [int(self.length[r]) for r in reps]
        width = max(lengths)
        self.stack = []
        for layer in cache.layers:
            kv = []
            for x in (layer.keys, layer.values):
                out = x.new_zeros(len(reps), x.shape[1], width, x.shape[3])
                for c, (r, a, n) in enumerate(zip(reps, starts, lengths)):
                    out[c, :, :n] = x[r, :, a:a + n]
                kv.append(out)
            self.stack.append(tuple(kv))
        self.index = {i: c for c, i in enumerate(keep)}
        self.lengths = torch.tensor(lengths, device=ids.device)
