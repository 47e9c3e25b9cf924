"""Attention over packed rows that computes only the blocks a token can see.

A packed row (modeling/packing.py) holds units end to end; a grouped unit is one prompt followed
by the responses of its group. The row's explicit (C, C) mask is mostly False: a response sees
its unit's prompt and itself, never a sibling and never another unit. SDPA given a dense mask
computes every score of the row all the same (a kernel given a mask cannot know which of its
blocks are empty), so a group of n responses of length R after a prompt of length Q costs
(Q + nR)^2 scores where Q^2 + nR(Q + R) are needed: for the GRPO-with-tools workload (a
~214-token prompt, 8 responses of ~117 tokens), 1.32M against 0.36M per head and layer, and
attention was 46% of the update's time (torch.profiler, docs/benchmarks.md).

Here each unit's attention is split into blocks, each a query span against the only keys it may
see:

    prompt block   the unit's prompt against the prompt
    branch block   one response against its unit's prompt, then itself

Blocks of one kind are sorted by size and cut into buckets (`_split`), each padded to its
largest block and run as one batched SDPA call; the small mask of each block is packing's own
rule (`allowed`) evaluated on the gathered unit, branch and position ids, so a sliding window
holds exactly as in the dense mask. A slot that holds no token sees only
itself in the dense mask, so its output is its own value. The outputs are put back in slot order.
Every score computed is one the dense call computes too, over the same keys: the results agree to
float round-off, which the setup check (ppo/seams.py) compares against the padded forward per
model, as it does for the dense mask.

Pure tensor code; modeling/block_sdpa.py hands the blocks to transformers' attention.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class Bucket(NamedTuple):
    """Blocks of one kind, padded to a common size: nb blocks of up to nq queries and nk keys."""

    queries: Tensor  # (nb, nq) long: flat slot index of each query (padding: a real slot)
    keys: Tensor     # (nb, nk) long: flat slot index of each key (padding: a real slot)
    mask: Tensor     # (nb, 1, nq, nk) bool, True = attend (packing's rule on the gathered ids)
    real: Tensor     # (n,) long: where the real (not padding) queries are in nb * nq


class Blocks(NamedTuple):
    """The blocked attention of packed rows: P rows of C slots, flattened to P * C."""

    rows: int
    width: int
    buckets: tuple[Bucket, ...]
    idle: Tensor     # (n,) long: slots holding no token; each sees only itself
    order: Tensor    # (P * C,) long: slot s's place in cat(bucket outputs at real queries, idle)

    def to(self, device) -> Blocks:
        return Blocks(self.rows, self.width,
                      tuple(Bucket(*(t.to(device) for t in b)) for b in self.buckets),
                      self.idle.to(device), self.order.to(device))

    def cost(self) -> int:
        """Scores computed per head and layer."""
        return sum(b.queries.numel() * b.keys.shape[1] for b in self.buckets) + len(self.idle)


def allowed(uq: Tensor, uk: Tensor, bq: Tensor, bk: Tensor, pq: Tensor, pk: Tensor,
            window: Optional[int]) -> Tensor:
    """Whether a query (unit uq, branch bq, position pq) sees a key (uk, bk, pk): the same unit,
    a key not later than the query, in the prompt (branch 0) or the query's own branch; with a
    window W, pq - pk < W (transformers' sliding_window_overlay, kv > q - W). Broadcasts."""
    ok = (uq == uk) & ((bk == 0) | (bk == bq)) & (pk <= pq)
    if window is not None:
        ok &= pq - pk < window
    return ok


def _bucket(spans: list[tuple[list[int], list[int]]], unit: Tensor, branch: Tensor, pos: Tensor,
            window: Optional[int]) -> Bucket:
    """One batched call's blocks from (query slots, key slots) lists."""
    nb = len(spans)
    nq = max(len(q) for q, _ in spans)
    nk = max(len(k) for _, k in spans)
    queries = torch.empty(nb, nq, dtype=torch.long)
    keys = torch.empty(nb, nk, dtype=torch.long)
    real = torch.zeros(nb, nq, dtype=torch.bool)
    key_real = torch.zeros(nb, nk, dtype=torch.bool)
    for i, (q, k) in enumerate(spans):
        queries[i] = torch.tensor(q + [q[0]] * (nq - len(q)))
        keys[i] = torch.tensor(k + [k[0]] * (nk - len(k)))
        real[i, :len(q)] = True
        key_real[i, :len(k)] = True
    ok = allowed(unit[queries][:, :, None], unit[keys][:, None, :],
                 branch[queries][:, :, None], branch[keys][:, None, :],
                 pos[queries][:, :, None], pos[keys][:, None, :], window)
    ok &= key_real[:, None, :]
    # a padding query sees the block's real keys: no softmax row is empty (its output, unused,
    # must not be NaN: the backward would carry it)
    ok |= ~real[:, :, None] & key_real[:, None, :]
    return Bucket(queries, keys, ok[:, None], real.reshape(-1).nonzero().squeeze(-1))


CALL_COST = 16384  # one more batched call, in scores: what splitting a bucket must save


def _split(spans: list[tuple[list[int], list[int]]]) -> list[list]:
    """Blocks of one kind into buckets of least cost: sorted by size, cut where the padding
    saved (each bucket pads to its largest block) outweighs one more call (dynamic programming
    over the cut points)."""
    if not spans:
        return []
    spans = sorted(spans, key=lambda qk: (len(qk[0]), len(qk[1])))
    n = len(spans)
    step = -(-n // 64)  # cut only between chunks of `step` blocks: O(64^2) work at most
    points = list(range(0, n, step)) + [n]
    chunk_q = [max(len(q) for q, _ in spans[a:b]) for a, b in zip(points, points[1:])]
    chunk_k = [max(len(k) for _, k in spans[a:b]) for a, b in zip(points, points[1:])]
    best, cut = {0: 0.0}, {}  # best[j]: least cost of the first j blocks; cut[j]: its last cut
    for c in range(1, len(points)):
        j, nq, nk = points[c], 0, 0
        best[j] = float("inf")
        for a in range(c - 1, -1, -1):  # the last bucket: blocks points[a] .. j - 1
            nq, nk = max(nq, chunk_q[a]), max(nk, chunk_k[a])
            i = points[a]
            cost = best[i] + (j - i) * nq * nk + CALL_COST
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], n
    while j:
        out.append(spans[cut[j]:j])
        j = cut[j]
    return out[::-1]


def blocks_for(unit: Tensor, branch: Tensor, pos: Tensor, window: Optional[int]) -> Blocks:
    """The blocks of rows whose slots carry unit, branch and position ids (P, C), as
    packing.pack lays them out: each unit's prompt (branch 0) first, then its branches 1..n,
    each contiguous; a slot of no unit has a negative unit id of its own."""
    P, C = unit.shape
    unit, branch, pos = unit.reshape(-1), branch.reshape(-1), pos.reshape(-1)
    spans: dict[tuple[int, int], list[int]] = {}  # (unit, branch) -> its slots, in order
    idle = []
    for s, (u, b) in enumerate(zip(unit.tolist(), branch.tolist())):
        if u < 0:
            idle.append(s)
        else:
            spans.setdefault((u, b), []).append(s)
    prompts = [(slots, slots) for (u, b), slots in spans.items() if b == 0]
    branches = [(slots, spans.get((u, 0), []) + slots)
                for (u, b), slots in spans.items() if b != 0]
    buckets = tuple(_bucket(group, unit, branch, pos, window)
                    for kind in (prompts, branches) for group in _split(kind))
    placed = torch.cat([b.queries.reshape(-1)[b.real] for b in buckets]
                       + [torch.tensor(idle, dtype=torch.long)])
    order = torch.empty(P * C, dtype=torch.long)
    order[placed] = torch.arange(len(placed))
    return Blocks(P, C, buckets, torch.tensor(idle, dtype=torch.long), order)


def _flat(x: Tensor) -> Tensor:
    """(P, H, C, D) -> (H, P * C, D)"""
    P, H, C, D = x.shape
    return x.transpose(0, 1).reshape(H, P * C, D)


def _gathered(b: Bucket, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A bucket's queries, keys and values (nb, H, n, D) from the flat (H, P * C, D) ones
    (index_select, not [...]: its backward adds, indexing's sorts)."""
    nb, nq = b.queries.shape
    H = q.shape[0]
    qb = q.index_select(1, b.queries.reshape(-1)).view(H, nb, nq, -1).transpose(0, 1)
    kb, vb = (x.index_select(1, b.keys.reshape(-1)).view(H, nb, -1, x.shape[-1]).transpose(0, 1)
              for x in (k, v))
    return qb, kb, vb


def _in_slot_order(blocks: Blocks, outs: list[Tensor], v: Tensor, shape) -> Tensor:
    """Each bucket's outputs (nb, H, nq, D) at its real queries, and the idle slots' own values,
    put back in slot order as transformers' attention functions return it: (P, C, H, D)."""
    P, H, C, _ = shape
    real = [o.transpose(0, 1).reshape(H, -1, o.shape[-1]).index_select(1, b.real)
            for b, o in zip(blocks.buckets, outs)]
    out = torch.cat(real + [v.index_select(1, blocks.idle)], 1).index_select(1, blocks.order)
    return out.view(H, P, C, -1).permute(1, 2, 0, 3).contiguous()


def attend(blocks: Blocks, query: Tensor, key: Tensor, value: Tensor, dropout: float,
           scale: Optional[float]) -> Tensor:
    """SDPA over `blocks` of query (P, H, C, D), key and value (P, H, C, D) (key/value heads
    already repeated to the query's), returned as transformers' attention functions return it:
    (P, C, H, D), contiguous."""
    q, k, v = _flat(query), _flat(key), _flat(value)
    outs = [F.scaled_dot_product_attention(*_gathered(b, q, k, v), attn_mask=b.mask,
                                           dropout_p=dropout, scale=scale)
            for b in blocks.buckets]
    return _in_slot_order(blocks, outs, v, query.shape)


# The CPU flash kernel's own forward and backward, called directly: the forward's outputs and
# log-sum-exps are what its backward needs, so keeping them spares the backward a second forward.
_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _bias(b: Bucket, dtype: torch.dtype) -> Tensor:
    """The bucket's mask as the additive bias the CPU kernel takes (0 / -inf, in `dtype`)."""
    return torch.zeros(b.mask.shape, dtype=dtype, device=b.mask.device).masked_fill_(
        ~b.mask, float("-inf"))


def attend_keeping(blocks: Blocks, query: Tensor, key: Tensor, value: Tensor,
                   scale: Optional[float]) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """`attend` without dropout on the CPU, through the flash kernel's forward: its output,
    and each bucket's (output, log-sum-exp), which `attend_backward` takes."""
    q, k, v = _flat(query), _flat(key), _flat(value)
    kept = [_FLASH_CPU(*_gathered(b, q, k, v), attn_mask=_bias(b, query.dtype), scale=scale)
            for b in blocks.buckets]
    return _in_slot_order(blocks, [o for o, _ in kept], v, query.shape), kept


def attend_backward(blocks: Blocks, grad: Tensor, query: Tensor, key: Tensor, value: Tensor,
                    kept: list[tuple[Tensor, Tensor]], scale: Optional[float]
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of query, key and value (P, H, C, D) from `grad` (P, C, H, D) of
    `attend_keeping`'s output: each bucket's kernel backward, its keys' gradients summed over
    the blocks that gathered them (a prompt's, once per branch). A padding query's output
    gradient is 0, so it adds nothing anywhere; an idle slot's output is its value."""
    P, H, C, D = query.shape
    g = grad.permute(2, 0, 1, 3).reshape(H, P * C, -1)
    q, k, v = _flat(query), _flat(key), _flat(value)
    gq, gk, gv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b, (o, lse) in zip(blocks.buckets, kept):
        nb, nq = b.queries.shape
        go = g.new_zeros(H, nb * nq, g.shape[-1])
        go[:, b.real] = g.index_select(1, b.queries.reshape(-1)[b.real])
        go = go.view(H, nb, nq, -1).transpose(0, 1).contiguous()
        dq, dk, dv = _FLASH_CPU_BACKWARD(go, *_gathered(b, q, k, v), o, lse, 0.0, False,
                                         attn_mask=_bias(b, query.dtype), scale=scale)
        gq.index_add_(1, b.queries.reshape(-1), dq.transpose(0, 1).reshape(H, -1, D))
        gk.index_add_(1, b.keys.reshape(-1), dk.transpose(0, 1).reshape(H, -1, D))
        gv.index_add_(1, b.keys.reshape(-1), dv.transpose(0, 1).reshape(H, -1, dv.shape[-1]))
    gv.index_add_(1, blocks.idle, g.index_select(1, blocks.idle))

    def unflat(x: Tensor) -> Tensor:
        return x.view(H, P, C, -1).transpose(0, 1)

    return unflat(gq), unflat(gk), unflat(gv)
