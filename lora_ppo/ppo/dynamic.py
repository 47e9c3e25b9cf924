"""DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476, §3.2): train only on groups whose
scores vary, sampling more prompts until the rollout is full.

A group of n samples whose scores are all equal (all right or all wrong) has no score signal:
under GRPO its advantages are 0, and as more prompts become easy (or stay too hard) fewer groups
carry a gradient. DAPO over-samples and filters them (eq. 11, the constraint
0 < |{o_i correct}| < G); verl does it with `filter_groups` and `max_num_gen_batches`.

    round 1..k   every rank samples `rollout.prompts_per_update` fresh prompts x n and scores them
                 (`collect`: the loop's own step 1), keeps the groups whose raw scores vary, up
                 to the groups it still lacks, and sets the rest aside
    stop         when no rank lacks a group (decided on the sum over ranks, so every rank runs
                 the same number of rounds: their sampling and ZeRO-3's gathers stay in step), or
                 after `max_extra_rounds` rounds past the first
    fill         a rank still short takes back groups it set aside, the first ones first: the
                 rollout keeps its size (every rank the same number of minibatches and
                 optimizer steps, the loss normalisers unchanged); those groups carry no score
                 signal, as in a run without dynamic sampling. verl raises an error instead.

Groups never straddle ranks or rounds: each round's rollout holds whole groups, n consecutive
rows, and the rows kept are whole groups. Prompts are consumed as without dynamic sampling, one
`rollout.prompts_per_update x world` slice per round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lora_ppo.ppo.rollout import Rollout
from lora_ppo.rl.advantages import zero_std_groups


class SamplingStats(NamedTuple):
    """One update's dynamic sampling, summed over ranks (the metrics sampling/*)."""

    rounds: int             # rounds sampled (every rank the same)
    groups: float           # groups sampled, all rounds, all ranks
    dropped: float          # groups whose scores did not vary, set aside
    filled: float           # groups set aside and taken back to fill a rollout the cap left short
    response_tokens: float  # response tokens generated, all rounds, all ranks
    score_sum: float        # raw scores of every response sampled, all rounds, all ranks


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout of the rows of `parts`, re-padded to the widest: query columns on the left
    (prompts are left-padded), every other 2-D tensor on the right; ids with `pad_id`, the rest
    with 0. A field is None in the result if it is None in the parts."""
    out = {}
    for f in fields(Rollout):
        values = [getattr(p, f.name) for p in parts]
        if values[0] is None:
            out[f.name] = None
            continue
        if values[0].dim() < 2:
            out[f.name] = torch.cat(values)
            continue
        width = max(v.shape[1] for v in values)
        fill = pad_id if f.name.endswith("_ids") else 0
        left = f.name.startswith("query")
        out[f.name] = torch.cat([F.pad(v, (width - v.shape[1], 0) if left
                                       else (0, width - v.shape[1]), value=fill) for v in values])
    return Rollout(**out)


def _group_rows(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Row indices (k * G,) of groups (k,)."""
    return (groups[:, None] * group_size + torch.arange(group_size, device=groups.device)).flatten()


def sample_until_full(collect: Callable[[], tuple[Rollout, torch.Tensor]], n_groups: int,
                      group_size: int, max_extra_rounds: int, pad_id: int,
                      all_sum: Callable[[list[float]], list[float]]
                      ) -> tuple[Rollout, torch.Tensor, SamplingStats]:
    """Call `collect()` (one round: a rollout of n_groups fresh groups and its raw scores) until
    this rank holds `n_groups` groups whose raw scores vary and so does every other rank, or
    `max_extra_rounds` rounds after the first; fill what is left short with groups whose scores
    did not vary. Returns the rollout (n_groups x group_size rows), its raw scores and the stats.
    `all_sum` sums a list of floats over ranks (runtime/dist.py::all_sum)."""
    kept: list[tuple[Rollout, torch.Tensor]] = []
    aside: list[tuple[Rollout, torch.Tensor]] = []
    have = spare = rounds = sampled = dropped = 0
    tokens = score_sum = 0.0
    while True:
        ro, raw = collect()
        rounds, sampled = rounds + 1, sampled + len(raw) // group_size
        tokens += ro.response_mask.sum().item()
        score_sum += raw.sum().item()
        flat = zero_std_groups(raw, group_size)
        dropped += int(flat.sum())
        varied = (~flat).nonzero().flatten()[:n_groups - have]
        if len(varied):
            rows = _group_rows(varied, group_size).to(ro.query_ids.device)
            kept.append((ro.index(rows), raw[rows.to(raw.device)]))
            have += len(varied)
        tied = flat.nonzero().flatten()[:n_groups - spare]  # never more than a fill can use
        if len(tied):
            rows = _group_rows(tied, group_size).to(ro.query_ids.device)
            aside.append((ro.index(rows), raw[rows.to(raw.device)]))
            spare += len(tied)
        (short,) = all_sum([float(n_groups - have)])
        if short == 0 or rounds > max_extra_rounds:
            break
    filled = n_groups - have  # the cap was hit: top up with the first groups set aside
    kept += _take_groups(aside, filled, group_size)
    rollout = concat_rollouts([ro for ro, _ in kept], pad_id)
    raw_scores = torch.cat([raw for _, raw in kept])
    stats = all_sum([float(sampled), float(dropped), float(filled), tokens, score_sum])
    return rollout, raw_scores, SamplingStats(rounds, *stats)


def _take_groups(parts: list[tuple[Rollout, torch.Tensor]], n: int, group_size: int
                 ) -> list[tuple[Rollout, torch.Tensor]]:
    """The first `n` groups of `parts`, in order."""
    out = []
    for ro, raw in parts:
        if n <= 0:
            break
        k = min(n, len(raw) // group_size)
        rows = torch.arange(k * group_size, device=ro.query_ids.device)
        out.append((ro.index(rows), raw[:k * group_size]))
        n -= k
    return out


METRICS = ("sampling/rounds", "sampling/frac_dropped_groups", "sampling/frac_filled_groups",
           "sampling/response_tokens", "sampling/raw_scores")


def sampling_metrics(stats: SamplingStats | None, rollout_groups: int, group_size: int) -> dict:
    """The sampling/* metrics (docs/metrics.md); None without dynamic sampling.
    `rollout_groups`: the groups of one rollout over all ranks (prompts_per_update x world).
    `sampling/raw_scores` is the mean over every response sampled, kept or dropped: the rollout's
    own `objective/raw_scores` leaves out the tied groups, so it is no estimate of the policy's
    score."""
    if stats is None:
        return dict.fromkeys(METRICS)
    return dict(zip(METRICS, (
        stats.rounds, stats.dropped / max(stats.groups, 1.0), stats.filled / rollout_groups,
        stats.response_tokens, stats.score_sum / max(stats.groups * group_size, 1.0))))
