"""Padding-free forwards: a batch's real tokens laid end to end in rows, each sequence seeing only
itself, and a group's shared prompt encoded once.

A rollout holds left-padded prompts (B, Q) and right-padded responses (B, R), padded to the widest
of the whole rollout. Packing lays the real tokens of the batch into rows of at most `capacity`
tokens (first-fit decreasing) as *units*:

    ungrouped  a unit is one sequence, prompt then response, positions 0 .. Q_i + R_i - 1;
    grouped    a unit is one distinct prompt followed by the responses of every sample that
               shares it (the n samples of a GRPO/RLOO group): prompt at positions 0 .. Q - 1,
               then each response at positions Q .. Q + R_j - 1, so the prompt is encoded once.

Which key a query token may attend to is given by `Attention`, an explicit 4-D mask built here
(`mask_for`): the same unit, a position not later than its own, and either the unit's prompt or
its own branch (a response never sees another response of its group); with a sliding window, a
position less than `window` behind. Per token that is the set of keys, at the same positions,
that the token attends to in its own padded sequence, so every hidden state equals the padded
forward's up to float round-off (tested per architecture): the mask replaces transformers'
detection of packed sequences from restarting position ids, which some models never receive
(OPT's mask builder takes no position ids). Models whose attention cannot take such a mask
(ALiBi built from a 2-D mask in Bloom; flash-attention kernels) are found by the setup check
(ppo/seams.py) and fall back to position-id packing or to padded micro-batches. An SDPA mask
can carry its blocks (`attention_blocks`, modeling/blocks.py): the attention then computes only
the scores of the keys each token sees, not the whole (C, C) square.

The rows' capacity is chosen per batch (`_capacity`): every slot of a row runs through every
linear layer whether it holds a token or not, while attention costs grow with the row's width.
The capacity C minimises slots x (1 + C x width_cost) over widths from the longest unit up to
`max_width` (or the longest unit, if longer): width_cost is attention's cost per key relative to
a token's linear work, about 1 / (6 x hidden) for a transformer layer (its linears hold ~12
hidden^2 weights, 2 FLOPs each per token; attention 4 x hidden FLOPs per query and key). A batch
of equal lengths packs one unit per row (wider rows only add attention); four sequences of 100,
70, 60 and 40 tokens take one row of 270 slots, not three of 100.

`predicting` maps each response token back to the flat index of the hidden state that predicts
it: response token 0 of every member of a group is predicted by the prompt's last state (shared,
so its gradient sums over the group, as n separate forwards' would), token t > 0 by the
member's own token t - 1. Pure tensor code: no model, no rank.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from lora_ppo.modeling.blocks import Blocks, allowed, blocks_for


class Attention(NamedTuple):
    """How the packed rows' attention mask is given to the model (ppo/seams.py picks it)."""

    implementation: str            # "sdpa" (bool mask, True = attend) or "eager" (additive)
    window: Optional[int] = None   # sliding window of every layer (Mistral), or None
    layer_types: tuple[str, ...] = ()  # a dict of masks by layer type (Gemma 2/3, Qwen 2)
    dtype: torch.dtype = torch.float32  # of the additive mask


class Layout(NamedTuple):
    """How scoring and update forwards lay out a batch (ppo/seams.py decides it per model)."""

    packed: bool = False                   # padding-free rows; False: padded micro-batches
    group: bool = False                    # a group's shared prompt encoded once
    attention: Optional[Attention] = None  # the explicit mask; None: restarting position ids
    blocks: bool = False                   # an SDPA mask carries its blocks (blocks.py)


PADDED = Layout()
EXPLICIT_MASKS = ("sdpa", "eager")  # attention implementations that take an explicit 4-D mask


def explicit_attentions(config, dtype: torch.dtype) -> list[Attention]:
    """The explicit masks a model's attention can take, most specific first: a dict by layer
    type where the config has `layer_types` (Gemma 2/3, Qwen 2), then one mask for every layer
    (with the model's sliding window, if any); none for other implementations (flash)."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in EXPLICIT_MASKS:
        return []
    window = getattr(config, "sliding_window", None)
    out = []
    if getattr(config, "layer_types", None):
        out.append(Attention(impl, window, tuple(config.layer_types), dtype))
    out.append(Attention(impl, window, (), dtype))
    return out


class Packed(NamedTuple):
    input_ids: Tensor     # (P, C) long: P rows of capacity C; unused slots hold `pad_id`
    position_ids: Tensor  # (P, C) long: positions within each sequence (0 in unused slots)
    attention_mask: Optional[Tensor | dict]  # (P, 1, C, C) or {layer type: mask}; None: the
    #                                          model infers the blocks from restarting positions
    predicting: Tensor    # (B, R) long: flat index into P*C of the state predicting token (i, t)
    real_tokens: int      # tokens packed (the rest of P*C is padding)
    blocks: Optional[Blocks | dict] = None  # the mask's blocks (modeling/blocks.py), of the
    #                                        same shape as the mask; None: dense attention


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: unit indices per row, each row's lengths summing to <= capacity.
    The one packer of the toolkit: PPO's rows here, SFT's examples (stages/sft.py)."""
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


MAX_WIDTH = 4096  # widest packed row by default: its (C, C) attention mask stays small


def _capacity(lengths: list[int], width_cost: Optional[float], max_width: int
              ) -> tuple[int, list[list[int]]]:
    """The row capacity and its rows (first-fit decreasing) of least cost, slots x (1 + C x
    width_cost), for these unit lengths (the module doc): at least the longest unit, at most
    max_width unless that unit is longer. width_cost None: the longest unit."""
    longest, total = max(max(lengths), 1), sum(lengths)
    if width_cost is None:
        return longest, first_fit(lengths, longest)
    widest = max(longest, min(total, max_width))
    # the longest unit, every eighth of the way to the widest row, and the widest itself
    widths = sorted({longest, widest, *range(longest, widest, max(1, (widest - longest) // 8))})
    laid = [(c, first_fit(lengths, c)) for c in widths]
    return min(laid, key=lambda cr: len(cr[1]) * cr[0] * (1.0 + cr[0] * width_cost))


def _units(prompts: list[tuple[int, ...]], group: bool) -> list[list[int]]:
    """Sample indices per unit: the samples sharing a prompt when `group`, else one each."""
    if not group:
        return [[i] for i in range(len(prompts))]
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    return list(by_prompt.values())


def pack(query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
         pad_id: int = 0, *, group: bool = False, attention: Optional[Attention] = None,
         width_cost: Optional[float] = None, max_width: int = MAX_WIDTH,
         blocks: Optional[bool] = None) -> Packed:
    """Pack query (B, Q) left-padded + response (B, R) right-padded into rows (module doc).

    `group`: samples with the same prompt share one copy of it (needs `attention`, since
    restarting positions cannot express a shared prefix). `attention`: build the explicit mask;
    None leaves the blocks to the model's own detection of restarting position ids.
    `width_cost`: attention's cost per key relative to a token's linear work (module doc), which
    sets the rows' capacity; None: rows of the longest unit's length. `blocks`: whether an SDPA
    mask carries its blocks (modeling/blocks.py); None: where they compute fewer scores. Response
    tokens past a sequence's end (mask 0) point at the sequence's last real state; their results
    are masked out downstream like any padding.
    """
    if group and attention is None:
        raise ValueError("a shared prompt needs an explicit attention mask (attention=...)")
    device = query_ids.device
    q_real, r_real = query_mask.bool().cpu(), response_mask.bool().cpu()
    q_ids, r_ids = query_ids.cpu(), response_ids.cpu()
    prompts = [tuple(q_ids[i][q_real[i]].tolist()) for i in range(len(q_ids))]
    responses = [r_ids[i][r_real[i]].tolist() for i in range(len(r_ids))]
    units = _units(prompts, group)
    lengths = [len(prompts[u[0]]) + sum(len(responses[i]) for i in u) for u in units]
    capacity, rows = _capacity(lengths, width_cost, max_width)
    B, R = response_ids.shape
    n_slots = len(rows) * capacity
    ids = torch.full((n_slots,), pad_id, dtype=torch.long)
    pos = torch.zeros(n_slots, dtype=torch.long)
    unit_of = -1 - torch.arange(n_slots)   # unused slots: a unit of their own, seen by none
    branch = torch.zeros(n_slots, dtype=torch.long)
    predicting = torch.zeros(B, R, dtype=torch.long)
    t = torch.arange(R)
    for r, members in enumerate(rows):
        at = r * capacity
        for u in members:
            prompt = prompts[units[u][0]]
            n_q = len(prompt)
            ids[at:at + n_q] = torch.tensor(prompt, dtype=torch.long)
            pos[at:at + n_q] = torch.arange(n_q)
            unit_of[at:at + n_q] = u
            last_prompt = at + n_q - 1  # predicts response token 0 of every member
            at += n_q
            for j, i in enumerate(units[u]):
                n_r = len(responses[i])
                ids[at:at + n_r] = torch.tensor(responses[i], dtype=torch.long)
                pos[at:at + n_r] = n_q + torch.arange(n_r)
                unit_of[at:at + n_r] = u
                branch[at:at + n_r] = j + 1
                # token t: the prompt's last state for t = 0, else own token t - 1; the padding
                # past the member's end points at its last real token
                k = t.clamp(max=n_r)
                predicting[i] = torch.where(k == 0, last_prompt, at - 1 + k)
                at += n_r
    shape = (len(rows), capacity)
    ids3 = (unit_of.view(shape), branch.view(shape), pos.view(shape))
    mask = None if attention is None else mask_for(*ids3, attention)
    laid = None if attention is None or blocks is False else attention_blocks(
        *ids3, attention, always=bool(blocks))
    return Packed(ids.view(shape).to(device), pos.view(shape).to(device),
                  mask_to(mask, device), predicting.to(device), int(sum(lengths)), laid)


def mask_to(mask, device):
    """An attention mask, one tensor or a dict by layer type (or None), on `device`."""
    if mask is None:
        return None
    if isinstance(mask, dict):
        return {k: v.to(device) for k, v in mask.items()}
    return mask.to(device)


def mask_for(unit: Tensor, branch: Tensor, pos: Tensor, attention: Attention) -> Tensor | dict:
    """The (P, 1, C, C) mask of rows whose tokens carry unit, branch and position ids (P, C):
    query q sees key k when both are in the same unit, pos_k <= pos_q, k is in the prompt
    (branch 0) or in q's own branch, and, with a window W, pos_q - pos_k < W (transformers'
    sliding_window_overlay, kv > q - W). Every query sees at least itself, so no row of the
    softmax is empty. A dict by layer type when the model takes one."""
    def one(window: Optional[int]) -> Tensor:
        ok = allowed(unit[:, :, None], unit[:, None, :], branch[:, :, None],
                     branch[:, None, :], pos[:, :, None], pos[:, None, :], window)
        ok = ok[:, None]  # (P, 1, C, C)
        if attention.implementation == "sdpa":
            return ok
        zero = torch.zeros((), dtype=attention.dtype)
        return torch.where(ok, zero, torch.finfo(attention.dtype).min)

    return _by_layer_type(attention, one)


def _by_layer_type(attention: Attention, one):
    """`one(window)` for every layer: a dict by layer type where the model takes one (the
    sliding layers' window, the full layers' none), else one value with the model's window."""
    if attention.layer_types:
        full = one(None)
        return {kind: one(attention.window) if kind == "sliding_attention" else full
                for kind in set(attention.layer_types)}
    return one(attention.window)


def attention_blocks(unit: Tensor, branch: Tensor, pos: Tensor, attention: Attention,
                     always: bool = False) -> Optional[Blocks | dict]:
    """The blocks of `mask_for`'s mask(s) (modeling/blocks.py), where they compute fewer scores
    than the dense rows (or `always`); only for SDPA (eager attention is the model's own code).
    A dict by layer type where the mask is one."""
    if attention.implementation != "sdpa":
        return None
    P, C = unit.shape

    def one(window: Optional[int]) -> Optional[Blocks]:
        blocks = blocks_for(unit, branch, pos, window)
        return blocks if always or blocks.cost() < P * C * C else None

    return _by_layer_type(attention, one)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` computes them, so scoring sees the same
    positions the sampler saw. (B, L) -> (B, L)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_(min=0)


def padding_share(query_mask: Tensor, response_mask: Tensor) -> float:
    """Share of the padded (B, Q + R) batch that is padding."""
    total = query_mask.numel() + response_mask.numel()
    return 1.0 - float(query_mask.sum() + response_mask.sum()) / max(total, 1)
