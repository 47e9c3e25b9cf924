import json

import pytest
import torch

from lora_ppo.errors import UserError
from lora_ppo.rl.kl import kl_penalty
from lora_ppo.rl.rewards import (
    RunningMoments,
    compute_rewards,
    last_token_index,
    overlong_penalty,
    shape_scores,
)


def test_last_token_index():
    mask = torch.tensor(
        [
            [1.0, 1.0, 0.0, 0.0],  # EOS at 1, then padding
            [1.0, 1.0, 1.0, 1.0],  # no EOS: full
            [1.0, 0.0, 0.0, 0.0],  # one token
            [1.0, 0.0, 1.0, 0.0],  # a hole: last real is 2, not sum - 1 = 1
        ]
    )
    assert last_token_index(mask).tolist() == [1, 3, 0, 2]


def test_last_token_index_empty_row():
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        last_token_index(mask)


# Row 0: EOS at t=2, padding at t=3.  Row 1: no EOS, mask full.  Row 2: a one-token response.
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
# k1 KL per token = logprobs - ref_logprobs; padding holds large garbage (9, 7) that must vanish.
KL = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.4, 0.1, 0.2, 0.3], [0.6, 7.0, 7.0, 7.0]])
LOGPROBS = -torch.arange(12, dtype=torch.float32).view(3, 4) / 10
REF_LOGPROBS = LOGPROBS - KL
SCORES = torch.tensor([1.0, 2.0, 3.0])


def test_compute_rewards_placement_by_hand():
    rewards, kl = compute_rewards(SCORES, LOGPROBS, REF_LOGPROBS, MASK, kl_coef=0.5)
    # -0.5 * kl on every real token; score added on the last real token; 0 on padding
    # row 0: [-0.05, -0.1, -0.15 + 1.0, 0]
    # row 1: [-0.2, -0.05, -0.1, -0.15 + 2.0]
    # row 2: [-0.3 + 3.0, 0, 0, 0]
    expected = torch.tensor(
        [[-0.05, -0.1, 0.85, 0.0], [-0.2, -0.05, -0.1, 1.85], [2.7, 0.0, 0.0, 0.0]]
    )
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(kl, KL * MASK)


def test_compute_rewards_zero_coef_is_only_scores():
    rewards, _ = compute_rewards(SCORES, LOGPROBS, REF_LOGPROBS, MASK, kl_coef=0.0)
    expected = torch.zeros(3, 4)
    expected[0, 2], expected[1, 3], expected[2, 0] = 1.0, 2.0, 3.0
    torch.testing.assert_close(rewards, expected)


def test_compute_rewards_other_estimator():
    rewards, kl = compute_rewards(SCORES, LOGPROBS, REF_LOGPROBS, MASK, 0.5, estimator="k3")
    k3 = kl_penalty(LOGPROBS, REF_LOGPROBS, "k3") * MASK
    torch.testing.assert_close(kl, k3)
    assert (kl >= 0).all()
    torch.testing.assert_close(rewards[1, :3], -0.5 * k3[1, :3])


def test_compute_rewards_shape_errors():
    with pytest.raises(ValueError, match="scores must be"):
        compute_rewards(SCORES[:2], LOGPROBS, REF_LOGPROBS, MASK, 0.1)


def test_shape_scores_by_hand():
    scores = torch.tensor([1.0, -2.0, 5.0])
    has_eos = torch.tensor([True, False, True])
    # penalty 1 on row 1 only: [1, -3, 5]; clip to [-3, 3]: [1, -3, 3]
    out = shape_scores(scores, has_eos, missing_eos_penalty=1.0, clip=3.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -3.0, 3.0]))
    # both off: unchanged copy
    same = shape_scores(scores, has_eos, missing_eos_penalty=None, clip=None)
    torch.testing.assert_close(same, scores)
    assert same is not scores


def test_running_moments_by_hand():
    rm = RunningMoments()
    # batch [1, 2, 3]: mean 2, unbiased std 1
    assert rm.update(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx((2.0, 1.0))
    # batch [5]: mean 5, std reported as 0 for a single value
    assert rm.update(torch.tensor([5.0])) == pytest.approx((5.0, 0.0))
    # all seen [1, 2, 3, 5]: mean 2.75; squared deviations 3.0625 + 0.5625 + 0.0625 + 5.0625 = 8.75
    # unbiased var 8.75 / 3 = 2.916667, std 1.707825
    assert rm.mean == pytest.approx(2.75)
    assert rm.std == pytest.approx(1.707825, abs=1e-6)
    assert rm.count == 4
    torch.testing.assert_close(
        rm.normalize(torch.tensor([2.75, 4.457825])), torch.tensor([0.0, 1.0])
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_running_moments_matches_concatenation(seed):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(n, generator=g, dtype=torch.float64) * 4 + 3 for n in (7, 1, 32, 5)]
    rm = RunningMoments()
    for b in batches:
        rm.update(b)
    everything = torch.cat(batches)
    assert rm.mean == pytest.approx(everything.mean().item(), rel=1e-12)
    assert rm.std == pytest.approx(everything.std().item(), rel=1e-12)
    # state survives JSON
    other = RunningMoments()
    other.load_state_dict(json.loads(json.dumps(rm.state_dict())))
    assert (other.mean, other.std, other.count) == (rm.mean, rm.std, rm.count)


def test_running_moments_normalize_guards_zero_std():
    rm = RunningMoments()
    rm.update(torch.tensor([2.0, 2.0]))
    assert rm.std == 0.0
    torch.testing.assert_close(rm.normalize(torch.tensor([2.0, 3.0])), torch.tensor([0.0, 1.0]))


def test_overlong_penalty_by_hand():
    # DAPO eq. 13 with L_max = 10, L_cache = 4: no penalty up to 10 - 4 = 6 tokens, then
    # (6 - |y|) / 4: 7 -> -0.25, 8 -> -0.5, 10 -> -1; scaled by the penalty 0.5: half of it
    lengths = torch.tensor([3.0, 6.0, 7.0, 8.0, 10.0])
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4),
                               torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4, penalty=0.5),
                               torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5]))
    with pytest.raises(UserError, match="overlong buffer must be in"):
        overlong_penalty(lengths, 10, 10)
