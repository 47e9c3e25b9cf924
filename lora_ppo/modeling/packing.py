"""Padding-free forwards: a batch's real tokens packed into rows, positions restarting per sequence.

A rollout holds left-padded prompts (B, Q) and right-padded responses (B, R), padded to the widest
of the whole rollout. Packing lays each sequence's real tokens (prompt, then response) end to end
into rows of at most `capacity` tokens (first-fit decreasing), with position ids that restart at 0
for every sequence: transformers 5 turns position ids that restart into a block-diagonal causal
mask when no attention mask is given (`masking_utils.find_packed_sequence_indices`; flash-attention
uses them as varlen boundaries), so each sequence attends only to itself, at the positions the
padded forward gives it (`position_ids_from_mask`). The capacity is the longest sequence, so a
row's attention is no wider than the padded batch's and a batch of equal lengths packs one
sequence per row: packing never costs more than padding, and with varied lengths it drops the
padding tokens from every linear layer.

`predicting` maps each response token back to the flat index of the hidden state that predicts
it (position Q_i - 1 + t of sequence i), so the rest of the forward keeps the (B, R) layout.
Pure tensor code: no model, no rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Packed(NamedTuple):
    input_ids: Tensor     # (P, C) long: P rows of capacity C; unused slots hold `pad_id`
    position_ids: Tensor  # (P, C) long: 0, 1, ... within each sequence (and each unused tail)
    predicting: Tensor    # (B, R) long: flat index into P*C of the state predicting token (i, t)
    real_tokens: int      # tokens packed (the rest of P*C is padding)


def _rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices per row, each row's lengths summing to <= capacity."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack(query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
         pad_id: int = 0) -> Packed:
    """Pack query (B, Q) left-padded + response (B, R) right-padded into rows (see module doc).

    Response tokens past a sequence's end (mask 0) point at the sequence's last real state;
    their results are masked out downstream like any padding.
    """
    device = query_ids.device
    q_len = query_mask.sum(1).long()                  # (B,) real prompt tokens
    r_len = response_mask.sum(1).long()               # (B,) real response tokens
    lengths = (q_len + r_len).tolist()
    capacity = max(max(lengths), 1)
    rows = _rows(lengths, capacity)
    B, R = response_ids.shape
    ids = torch.full((len(rows), capacity), pad_id, dtype=torch.long, device=device)
    pos = torch.zeros((len(rows), capacity), dtype=torch.long, device=device)
    start = torch.zeros(B, dtype=torch.long)          # flat offset of each sequence
    real_q, real_r = query_mask.bool(), response_mask.bool()
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = lengths[i]
            ids[r, at:at + n] = torch.cat([query_ids[i][real_q[i]], response_ids[i][real_r[i]]])
            pos[r, at:at + n] = torch.arange(n, device=device)
            start[i] = r * capacity + at
            at += n
        if at < capacity:  # the unused tail: a "sequence" of its own, never read
            pos[r, at:] = torch.arange(capacity - at, device=device)
    # State predicting response token t of sequence i: its (q_len_i - 1 + t)-th token, clamped
    # to the sequence's last real token for the padding past its end.
    t = torch.arange(R).expand(B, R)
    offset = (q_len.cpu()[:, None] - 1 + t).clamp(max=torch.tensor(lengths)[:, None] - 1)
    predicting = (start[:, None] + offset.clamp(min=0)).to(device)
    return Packed(ids, pos, predicting, int(sum(lengths)))


def padding_share(query_mask: Tensor, response_mask: Tensor) -> float:
    """Share of the padded (B, Q + R) batch that is padding."""
    total = query_mask.numel() + response_mask.numel()
    return 1.0 - float(query_mask.sum() + response_mask.sum()) / max(total, 1)
