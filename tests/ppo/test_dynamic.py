"""DAPO's dynamic sampling (ppo/dynamic.py) on rollouts whose rows are known: which groups are
kept, when the rounds stop, how a short rollout is filled, and how rollouts of different widths
are joined."""

from __future__ import annotations

import torch

from lora_ppo.generation.samples import left_pad
from lora_ppo.ppo.dynamic import concat_rollouts, sample_until_full, sampling_metrics
from lora_ppo.ppo.rollout import Rollout

PAD = 0


def _rollout(query_lens: list[int], resp_lens: list[int], tag: int) -> Rollout:
    """Rows whose token ids are `tag * 10 + row`, so a row can be recognised after joining."""
    ids = [[tag * 10 + i] * q for i, q in enumerate(query_lens)]
    query_ids, query_mask = left_pad(ids, PAD)
    width = max(resp_lens)
    response_mask = (torch.arange(width)[None] < torch.tensor(resp_lens)[:, None]).float()
    response_ids = torch.tensor([[tag * 10 + i] * width for i in range(len(resp_lens))])
    response_ids = response_ids.masked_fill(response_mask == 0, PAD)
    return Rollout(query_ids, query_mask, response_ids, response_mask,
                   has_eos=torch.ones(len(resp_lens), dtype=torch.bool),
                   logprobs=-response_mask, ref_logprobs=None, values=None)


def _rounds(*rounds):
    """A collect() that returns the given (rollout, raw scores) rounds in order."""
    it = iter(rounds)
    return lambda: next(it)


ROUND1 = (_rollout([2, 2, 1, 1], [3, 1, 2, 2], tag=1), torch.tensor([1.0, 1.0, 0.0, 1.0]))
ROUND2 = (_rollout([4, 4, 3, 3], [5, 5, 1, 4], tag=2), torch.tensor([1.0, 1.0, 1.0, 0.0]))
SAME = lambda values: values  # noqa: E731 (one rank: the sum over ranks is the value itself)


def test_groups_whose_scores_tie_are_dropped_until_the_rollout_is_full():
    # Groups of 2. Round 1: group 0 scores 1, 1 (tied: dropped), group 1 scores 0, 1 (kept).
    # Round 2: group 0 (1, 1) ties again, group 1 (1, 0) is kept: two varied groups, it stops.
    ro, raw, stats = sample_until_full(_rounds(ROUND1, ROUND2), n_groups=2, group_size=2,
                                       max_extra_rounds=3, pad_id=PAD, all_sum=SAME)
    assert ro.query_ids[:, -1].tolist() == [12, 13, 22, 23]  # round 1 rows 2-3, round 2 rows 2-3
    assert raw.tolist() == [0.0, 1.0, 1.0, 0.0]
    # joined at the widest: prompts re-padded on the left (width 3), responses on the right (4)
    assert ro.query_mask.tolist() == [[0, 0, 1], [0, 0, 1], [1, 1, 1], [1, 1, 1]]
    assert ro.response_mask.sum(1).tolist() == [2, 2, 1, 4] and ro.response_ids.shape == (4, 4)
    assert ro.response_ids[0].tolist() == [12, 12, PAD, PAD]
    torch.testing.assert_close(ro.logprobs, -ro.response_mask)
    # 4 groups sampled, 2 dropped, none filled; 8 + 15 response tokens generated; scores 3 + 3
    assert stats == (2, 4.0, 2.0, 0.0, 23.0, 6.0)
    m = sampling_metrics(stats, rollout_groups=2, group_size=2)
    assert m["sampling/frac_dropped_groups"] == 0.5 and m["sampling/frac_filled_groups"] == 0.0
    # the mean score of all 8 responses sampled (6 / 8), not of the 4 kept (2 / 4)
    assert m["sampling/raw_scores"] == 0.75 and raw.mean() == 0.5


def test_at_the_cap_the_rollout_is_filled_with_dropped_groups():
    # No extra round allowed: round 1 gives one varied group; the rollout is topped up with the
    # first group set aside (round 1 group 0), so it keeps its 2 groups.
    ro, raw, stats = sample_until_full(_rounds(ROUND1), n_groups=2, group_size=2,
                                       max_extra_rounds=0, pad_id=PAD, all_sum=SAME)
    assert ro.query_ids[:, -1].tolist() == [12, 13, 10, 11]
    assert raw.tolist() == [0.0, 1.0, 1.0, 1.0]
    assert stats == (1, 2.0, 1.0, 1.0, 8.0, 3.0)
    assert sampling_metrics(stats, 2, 2)["sampling/frac_filled_groups"] == 0.5


def test_the_rounds_go_on_while_any_rank_is_short():
    # This rank is full after round 1 when each round gives it 2 varied groups, but the other
    # rank (its shortfall arrives through all_sum) still lacks one: both sample round 2, and this
    # rank keeps nothing more from it.
    varied = (_rollout([1, 1, 1, 1], [1, 1, 1, 1], tag=3), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    other_rank_short = iter([[1.0], [0.0], [8.0, 2.0, 0.0, 8.0, 4.0]])
    ro, raw, stats = sample_until_full(_rounds(varied, ROUND2), n_groups=2, group_size=2,
                                       max_extra_rounds=3, pad_id=PAD,
                                       all_sum=lambda v: [a + b for a, b in
                                                          zip(v, next(other_rank_short))])
    assert stats.rounds == 2 and ro.query_ids[:, -1].tolist() == [30, 31, 32, 33]


def test_concat_keeps_every_field_and_none():
    a, b = ROUND1[0], ROUND2[0]
    joined = concat_rollouts([a, b], PAD)
    assert len(joined) == 8 and joined.values is None and joined.ref_logprobs is None
    assert joined.query_ids.shape == (8, 4) and joined.response_ids.shape == (8, 5)
    assert joined.has_eos.all()
    # the first rollout's rows, moved right by the added left padding, are unchanged
    assert torch.equal(joined.query_ids[:4, 2:], a.query_ids)
    assert torch.equal(joined.response_mask[:4, :3], a.response_mask)
