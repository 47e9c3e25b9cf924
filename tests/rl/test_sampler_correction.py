"""Importance weights for the sampler's distribution (rl/sampler_correction.py), each mode by
hand, and their place in the policy loss."""

import math

import pytest
import torch

from lora_ppo.rl.losses import policy_loss
from lora_ppo.rl.sampler_correction import sampler_mismatch, sampler_weights

LN2, LN4 = math.log(2), math.log(4)
# Two responses, the second one token shorter. log(pi_old / pi_s) per token:
#   row 0: [ln 2, 0, -ln 2]  -> ratios [2, 1, 0.5]; the response's: 2 * 1 * 0.5 = 1
#   row 1: [ln 4, ln 2, pad] -> ratios [4, 2];      the response's: 4 * 2 = 8
SAMPLER = torch.full((2, 3), -1.0)
OLD = SAMPLER + torch.tensor([[LN2, 0.0, -LN2], [LN4, LN2, 7.0]])  # 7.0 on padding: ignored
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])

CASES = [
    # clip_max 3, no lower bound
    # token_truncate: min(r, 3) per token -> row 1's 4 becomes 3
    ("token_truncate", 3.0, None, [[2, 1, 0.5], [3, 2, 0]]),
    # token_mask: r > 3 -> 0 (row 1's first token leaves the gradient)
    ("token_mask", 3.0, None, [[2, 1, 0.5], [0, 2, 0]]),
    # sequence_truncate: row 0's ratio 1 on every token; row 1's 8 -> 3 on its two tokens
    ("sequence_truncate", 3.0, None, [[1, 1, 1], [3, 3, 0]]),
    # sequence_mask: row 1's 8 > 3 -> the whole response out
    ("sequence_mask", 3.0, None, [[1, 1, 1], [0, 0, 0]]),
    # with clip_min 0.6: truncate lifts row 0's 0.5 to 0.6, mask drops it
    ("token_truncate", 3.0, 0.6, [[2, 1, 0.6], [3, 2, 0]]),
    ("token_mask", 3.0, 0.6, [[2, 1, 0], [0, 2, 0]]),
    # no bounds at all: the plain ratios (importance sampling without truncation)
    ("token_mask", None, None, [[2, 1, 0.5], [4, 2, 0]]),
    ("sequence_truncate", None, None, [[1, 1, 1], [8, 8, 0]]),
]


@pytest.mark.parametrize("mode, clip_max, clip_min, expected", CASES)
def test_sampler_weights_by_hand(mode, clip_max, clip_min, expected):
    w = sampler_weights(OLD, SAMPLER, MASK, mode, clip_max, clip_min)
    assert w.shape == (2, 3) and w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float32))


def test_equal_distributions_give_weight_one_and_no_mismatch():
    """Where the sampler's log-probs are the scored ones (fp32), every mode is the identity."""
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        assert torch.equal(sampler_weights(SAMPLER, SAMPLER, MASK, mode), MASK)
    m = sampler_mismatch(SAMPLER, SAMPLER, MASK)
    assert m.kl == 0.0 and m.abs_diff == 0.0 and m.max_abs_diff == 0.0 and m.tokens == 5


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown sampler importance sampling mode 'tis'"):
        sampler_weights(OLD, SAMPLER, MASK, "tis")


def test_mismatch_by_hand():
    # k3 = (r - 1) - ln r:  r=2: 1 - 0.693147 = 0.306853;  r=1: 0;  r=0.5: -0.5 + 0.693147 =
    # 0.193147;  r=4: 3 - 1.386294 = 1.613706;  r=2: 0.306853.  Sum 2.420558 over 5 tokens.
    # |ln r|: ln2 + 0 + ln2 + ln4 + ln2 = 5 ln 2 = 3.465736; the largest ln 4 = 1.386294.
    m = sampler_mismatch(OLD, SAMPLER, MASK)
    assert m.kl == pytest.approx(2.420558, abs=1e-5)
    assert m.abs_diff == pytest.approx(5 * LN2, abs=1e-5)
    assert m.max_abs_diff == pytest.approx(LN4, abs=1e-6) and m.tokens == 5


def test_the_weight_multiplies_the_token_loss_and_its_gradient():
    # ratio e^0.1 = 1.105171 inside the clip, A = +1: loss -1.105171, d loss / d logp = -1.105171
    # (see test_losses.py). Weight 0.5: loss -0.552585, gradient -0.552585; the weight itself
    # carries no gradient. Weight 0 (masked): loss 0 and no gradient, the token still counted.
    for w, want in ((0.5, -0.5 * math.exp(0.1)), (0.0, 0.0)):
        old = torch.tensor([[-1.0, -1.0]])
        logprobs = (old + torch.tensor([[0.1, 0.1]])).requires_grad_(True)
        weights = torch.tensor([[w, 1.0]], requires_grad=True)
        out = policy_loss(logprobs, old, torch.ones(1, 2), torch.ones(1, 2), cliprange=0.2,
                          normalizer=1.0, weights=weights)
        out.loss.backward()
        # token 0 alone: the loss is the sum of the two tokens' losses (normalizer 1)
        assert out.loss.item() == pytest.approx(want - math.exp(0.1), abs=1e-6)
        assert logprobs.grad[0, 0].item() == pytest.approx(want, abs=1e-6)
        assert weights.grad is None and out.ratio_mean.item() == pytest.approx(math.exp(0.1))

