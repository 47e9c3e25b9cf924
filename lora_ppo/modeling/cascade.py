"""Decode attention with a shared prefix read once per group (cascade attention): pure tensor code.

A group's n rows answer the same prompt, and in the decode batch each row holds its own copy of
the prompt's keys and values (generation/continuous.py). One decode step's attention is bound by
reading the keys and values (a query per row), and the prompt is most of what each row reads
(a 214-token prompt against ~100 generated tokens, in the tools workload), so a step read each
group's prompt n times. Here the attention of a row over its columns is split in two: over its
group's prompt, read once for all the group's queries (one matmul of the group's n queries
against one copy), and over its own columns after the prompt; the two softmaxes are merged by
their log-sum-exp (the online-softmax rescaling of FlashAttention, Dao et al. 2022, sec. 3.1;
the prefix/suffix split is Hydragen's, Juravsky et al. 2024, and FlashInfer's cascade
attention). Exact up to fp32 round-off: the same scores, summed in two parts.

    Plan          which rows share which prefix, from the batch's bookkeeping (once a step)
    attend        one layer's attention of a decode step (one query a row)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class Plan(NamedTuple):
    """One decode step's split: C prefixes (a group's prompt), at most M rows each.

    members     (C, M) long: the batch rows of each prefix's group, padded with row 0
    valid       (C, M) bool: which of those are real
    rows        (R,) long: the batch rows that have a prefix, in members[valid] order
    lo          the first column of the own part that any row reads
    own_bias    (B, 1, 1, W) float32 over columns lo..: 0 where a row reads the column itself
                (its own columns after its prefix; a row without a prefix: all of its
                columns), -inf elsewhere
    prefix_bias (C, 1, 1, P) float32: 0 over each prefix's tokens, -inf past its end (the
                stacked prefixes are padded to the longest)
    """

    members: Tensor
    valid: Tensor
    rows: Tensor
    lo: int
    own_bias: Tensor
    prefix_bias: Tensor


def _bias(allowed: Tensor) -> Tensor:
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def plan(prefix_of: Tensor, lengths: Tensor, own_from: Tensor, mask: Tensor, lo: int) -> Plan:
    """The split of a step: `prefix_of` (B,) the index of each row's prefix or -1, `lengths`
    (C,) each prefix's tokens, `own_from` (B,) the first column each row reads itself, `mask`
    (B, W) the batch's columns (bool), `lo` <= every own_from."""
    C = len(lengths)
    rows = (prefix_of >= 0).nonzero().squeeze(-1)
    which = prefix_of[rows]
    order = torch.argsort(which, stable=True)
    rows, which = rows[order], which[order]
    counts = torch.bincount(which, minlength=C)
    M = max(int(counts.max()) if len(counts) else 1, 1)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(rows), device=rows.device) - first[which]
    members = torch.zeros(C, M, dtype=torch.long, device=rows.device)
    valid = torch.zeros(C, M, dtype=torch.bool, device=rows.device)
    members[which, slot] = rows
    valid[which, slot] = True
    cols = torch.arange(lo, mask.shape[1], device=mask.device)
    own = mask[:, lo:] & (cols[None] >= own_from[:, None])
    P = int(lengths.max()) if C else 0
    past = torch.arange(P, device=lengths.device)[None] < lengths[:, None]
    return Plan(members, valid, members[valid], lo, _bias(own)[:, None, None],
                _bias(past)[:, None, None])


def _softmax_parts(q: Tensor, key: Tensor, value: Tensor, bias: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(max, sum of exp, exp-weighted values) of the scores q key^T + bias, in fp32: q (.., n,
    D) already scaled, key and value (.., W, D)."""
    s = torch.matmul(q, key.transpose(-1, -2)).float().add_(bias)
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s.sub_(m))
    return m, e.sum(-1, keepdim=True), torch.matmul(e.to(value.dtype), value).float()


def attend(query: Tensor, key: Tensor, value: Tensor, prefix_key: Tensor, prefix_value: Tensor,
           p: Plan, scale: Optional[float]) -> Tensor:
    """One decode step's attention: query (B, H, 1, D); key, value (B, Hkv, W, D) the batch's
    columns from `p.lo` on (W at most `p.own_bias`'s); prefix_key, prefix_value (C, Hkv, P, D)
    the stacked prefixes. Scores and the softmax in fp32 (the matmuls in the inputs' dtype).
    Returned as transformers' attention functions return it: (B, 1, H, D)."""
    B, H, _, D = query.shape
    hk = key.shape[1]
    g = H // hk  # query heads per key/value head (grouped-query attention)
    q = query.reshape(B, hk, g, D) * (D ** -0.5 if scale is None else scale)
    m_own, l_own, o_own = _softmax_parts(q, key, value, p.own_bias[..., :key.shape[2]])
    # each prefix read once, for the queries of its group's rows
    C, M = p.members.shape
    qc = (q.index_select(0, p.members.reshape(-1)).view(C, M, hk, g, D).transpose(1, 2)
          .reshape(C, hk, M * g, D))
    m_pre, l_pre, o_pre = _softmax_parts(qc, prefix_key, prefix_value, p.prefix_bias)

    def per_row(x: Tensor, fill: float) -> Tensor:  # (C, hk, M g, k) -> (B, hk, g, k)
        k = x.shape[-1]
        x = x.view(C, hk, M, g, k).transpose(1, 2).reshape(C * M, hk, g, k)
        out = x.new_full((B, hk, g, k), fill)
        return out.index_copy_(0, p.rows, x[p.valid.reshape(-1)])

    m_pre, l_pre, o_pre = per_row(m_pre, float("-inf")), per_row(l_pre, 0.0), per_row(o_pre, 0.0)
    # the two softmaxes merged by their maxima (a row without a prefix: exp(-inf) = 0 of it)
    m = torch.maximum(m_own, m_pre)
    a_own, a_pre = torch.exp(m_own - m), torch.exp(m_pre - m)
    out = (o_own * a_own + o_pre * a_pre) / (l_own * a_own + l_pre * a_pre)
    return out.to(query.dtype).reshape(B, 1, H, D)
