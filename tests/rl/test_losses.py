import math

import pytest
import torch

from lora_ppo.rl.losses import (
    entropy_loss,
    explained_variance,
    kl_loss,
    policy_loss,
    value_loss,
)

E05, EM05, E01 = math.exp(0.5), math.exp(-0.5), math.exp(0.1)  # 1.648721, 0.606531, 1.105171

# cliprange 0.2 -> ratio clipped to [0.8, 1.2].
# (log ratio, advantage, per-token loss, clipped branch taken, d loss / d logprob)
CASES = [
    # ratio e^0.5 = 1.6487 above; A = +1: max(-1.6487, -1.2) = -1.2, clipped -> no gradient
    (0.5, 1.0, -1.2, True, 0.0),
    # ratio above; A = -1: max(1.6487, 1.2) = 1.6487 unclipped; grad = -A * ratio = 1.6487
    (0.5, -1.0, E05, False, E05),
    # ratio e^-0.5 = 0.6065 below; A = +1: max(-0.6065, -0.8) = -0.6065 unclipped; grad -0.6065
    (-0.5, 1.0, -EM05, False, -EM05),
    # ratio below; A = -1: max(0.6065, 0.8) = 0.8, clipped -> no gradient
    (-0.5, -1.0, 0.8, True, 0.0),
    # ratio e^0.1 = 1.1052 inside; A = +1: both branches -1.1052, not strictly larger -> unclipped
    (0.1, 1.0, -E01, False, -E01),
    # ratio inside; A = -1: both 1.1052
    (0.1, -1.0, E01, False, E01),
]


@pytest.mark.parametrize("log_ratio, adv, expected_loss, clipped, expected_grad", CASES)
def test_policy_loss_six_cases_by_hand(log_ratio, adv, expected_loss, clipped, expected_grad):
    old = torch.tensor([[-1.0]])
    logprobs = (old + log_ratio).requires_grad_(True)
    out = policy_loss(logprobs, old, torch.tensor([[adv]]), torch.ones(1, 1), cliprange=0.2)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(expected_loss, abs=1e-6)
    assert out.clipfrac.item() == (1.0 if clipped else 0.0)
    assert logprobs.grad.item() == pytest.approx(expected_grad, abs=1e-6)
    # approx_kl = (ratio - 1) - log ratio
    assert out.approx_kl.item() == pytest.approx(math.exp(log_ratio) - 1 - log_ratio, abs=1e-6)
    assert out.ratio_mean.item() == pytest.approx(math.exp(log_ratio), abs=1e-6)


def test_policy_loss_batch_with_padding():
    # The six cases in one row, plus a padding token holding garbage (-inf logprob, huge adv).
    log_ratio = torch.tensor([[c[0] for c in CASES] + [0.0]])
    adv = torch.tensor([[c[1] for c in CASES] + [1e6]])
    old = torch.zeros(1, 7)
    logprobs = log_ratio.clone()
    logprobs[0, 6] = -float("inf")
    logprobs.requires_grad_(True)
    mask = torch.tensor([[1.0] * 6 + [0.0]])
    out = policy_loss(logprobs, old, adv, mask, cliprange=0.2)
    out.loss.backward()
    # loss = (-1.2 + 1.648721 - 0.606531 + 0.8 - 1.105171 + 1.105171) / 6 = 0.64219 / 6 = 0.107032
    assert out.loss.item() == pytest.approx(0.107032, abs=1e-6)
    # clipped in cases 1 and 4 -> 2/6
    assert out.clipfrac.item() == pytest.approx(2 / 6)
    # approx_kl per token: 0.148721 (x2), 0.106531 (x2), 0.005171 (x2) -> mean 0.086808
    assert out.approx_kl.item() == pytest.approx(0.086808, abs=1e-6)
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[0, 6] == 0
    torch.testing.assert_close(
        logprobs.grad[0, :6], torch.tensor([c[4] for c in CASES]) / 6, atol=1e-6, rtol=0
    )
    assert not out.clipfrac.requires_grad and not out.approx_kl.requires_grad


# cliprange_value 0.2; old value 1.0 in all three cases.
VALUE_CASES = [
    # v = 1.1 within 0.2 of old: v_clip = 1.1; R = 2: both (1.1 - 2)^2 = 0.81; loss 0.405, grad
    # 0.5 * 2 * (1.1 - 2) = -0.9, not clipped
    (1.1, 2.0, 0.405, False, -0.9),
    # v = 1.5: v_clip = 1.2; R = 2: (1.5-2)^2 = 0.25 < (1.2-2)^2 = 0.64 -> loss 0.32, clipped,
    # and the clipped branch is constant in v -> grad 0
    (1.5, 2.0, 0.32, True, 0.0),
    # v = 1.5: v_clip = 1.2; R = 0: 2.25 > 1.44 -> loss 1.125, not clipped, grad 1.5
    (1.5, 0.0, 1.125, False, 1.5),
]


@pytest.mark.parametrize("v, ret, expected_loss, clipped, expected_grad", VALUE_CASES)
def test_value_loss_by_hand(v, ret, expected_loss, clipped, expected_grad):
    values = torch.tensor([[v]], requires_grad=True)
    out = value_loss(values, torch.tensor([[1.0]]), torch.tensor([[ret]]), torch.ones(1, 1), 0.2)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(expected_loss, abs=1e-6)
    assert out.clipfrac.item() == (1.0 if clipped else 0.0)
    assert values.grad.item() == pytest.approx(expected_grad, abs=1e-6)


def test_value_loss_batch():
    values = torch.tensor([[c[0] for c in VALUE_CASES] + [100.0]])
    returns = torch.tensor([[c[1] for c in VALUE_CASES] + [-100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = value_loss(values, torch.ones(1, 4), returns, mask, 0.2)
    # (0.405 + 0.32 + 1.125) / 3 = 0.616667; clipfrac 1/3
    assert out.loss.item() == pytest.approx(0.616667, abs=1e-6)
    assert out.clipfrac.item() == pytest.approx(1 / 3)


def test_entropy_loss_by_hand():
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # -(1 + 2 + 4) / 3
    assert entropy_loss(entropy, mask).item() == pytest.approx(-7 / 3)
    # with normalizer 7: -7 / 7
    assert entropy_loss(entropy, mask, normalizer=7).item() == pytest.approx(-1.0)


def test_explained_variance_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    # R - V = [0, 0, 1]: var 2/9; Var[R] = 2/3 -> 1 - (2/9) / (2/3) = 2/3
    assert explained_variance(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), returns, mask) == pytest.approx(
        2 / 3
    )
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 4), returns, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(torch.zeros(1, 4), torch.ones(1, 4), mask))


def test_normalizer_makes_micro_batches_add_up():
    g = torch.Generator().manual_seed(0)
    B, T = 4, 6
    mask = torch.ones(B, T)
    # rows hold 2, 5, 4, 1 tokens: micro-batch rows 0-1 has 7 tokens, rows 2-3 has 5
    mask[0, 2:] = 0
    mask[1, 5:] = 0
    mask[2, 4:] = 0
    mask[3, 1:] = 0
    logprobs = torch.randn(B, T, generator=g).requires_grad_(True)
    old_logprobs = logprobs.detach() + 0.3 * torch.randn(B, T, generator=g)
    advantages = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g).requires_grad_(True)
    old_values = values.detach() + 0.3 * torch.randn(B, T, generator=g)
    returns = torch.randn(B, T, generator=g)
    entropy = torch.rand(B, T, generator=g).requires_grad_(True)

    def total(sl, normalizer=None):
        pg = policy_loss(logprobs[sl], old_logprobs[sl], advantages[sl], mask[sl], 0.2, normalizer)
        vf = value_loss(values[sl], old_values[sl], returns[sl], mask[sl], 0.2, normalizer)
        ent = entropy_loss(entropy[sl], mask[sl], normalizer)
        return pg.loss + 0.1 * vf.loss + 0.01 * ent

    full = total(slice(0, B))
    full_grads = torch.autograd.grad(full, [logprobs, values, entropy])
    n = mask.sum().item()  # 12
    micro = total(slice(0, 2), n) + total(slice(2, 4), n)
    micro_grads = torch.autograd.grad(micro, [logprobs, values, entropy])
    torch.testing.assert_close(micro, full)
    for a, b in zip(micro_grads, full_grads):
        torch.testing.assert_close(a, b)
    # without a normalizer the mean of per-micro-batch means (7 vs 5 tokens) is a different number
    naive = (total(slice(0, 2)) + total(slice(2, 4))) / 2
    assert abs(naive.item() - full.item()) > 1e-3


def test_kl_loss_k3_by_hand_and_a_padded_slot_gives_a_finite_gradient():
    # Two real tokens with log ratio logp - logp_ref = 0.5 and -0.5, then a padded slot whose
    # log-prob holds -1000 (a real value seen in padded rows: far below the ~-88 where exp
    # overflows in fp32).
    # k3 = exp(-lr) - 1 + lr: lr = 0.5 -> 0.606531 - 0.5 = 0.106531; lr = -0.5 -> 1.648721 - 1.5
    # = 0.148721; mean 0.127626. d k3 / d logp = 1 - exp(-lr): 0.393469 and -0.648721, over 2.
    logprobs = torch.tensor([[-1.0, -2.0, -1000.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss = kl_loss(logprobs, ref, mask, "k3")
    loss.backward()
    assert loss.item() == pytest.approx((0.106531 + 0.148721) / 2, abs=1e-6)
    assert torch.isfinite(logprobs.grad).all(), logprobs.grad  # NaN before issue 20 item 10
    torch.testing.assert_close(logprobs.grad,
                               torch.tensor([[0.393469 / 2, -0.648721 / 2, 0.0]]),
                               atol=1e-6, rtol=0)


def test_clip_higher_by_hand():
    # DAPO's clip-higher, eps_low 0.2, eps_high 0.28. Ratio e^0.22 = 1.246077, A = +1: the
    # symmetric clip caps it at 1.2 (loss -1.2, no gradient); with eps_high 0.28 it is inside
    # (loss -1.246077, d loss / d logp = -1.246077). Ratio e^-0.5 = 0.606531, A = -1: clipped at
    # 1 - 0.2 = 0.8 either way (loss 0.8, no gradient).
    old = torch.zeros(1, 2)
    for high, loss0, grad0 in ((None, -1.2, 0.0), (0.28, -math.exp(0.22), -math.exp(0.22))):
        logp = torch.tensor([[0.22, -0.5]], requires_grad=True)
        out = policy_loss(logp, old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2,
                          normalizer=1.0, cliprange_high=high)
        out.loss.backward()
        assert out.loss.item() == pytest.approx(loss0 + 0.8, abs=1e-6)
        torch.testing.assert_close(logp.grad, torch.tensor([[grad0, 0.0]]))
        assert out.clipfrac.item() == (1.0 if high is None else 0.5)


def test_sequence_level_ratio_by_hand():
    # GSPO: one response of log ratios 0.1 and 0.3 (and a padded slot holding garbage): the
    # sequence ratio is exp(mean) = e^0.2 = 1.221403 on both tokens. A = -1, cliprange 0.2:
    # max(1.221403, 1.2) = 1.221403, unclipped; token mean 1.221403. d loss / d logp_t =
    # -A s / |y| = 1.221403 / 2 = 0.610701 on both tokens (GSPO eq. 10), 0 on padding.
    old = torch.zeros(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logp = torch.tensor([[0.1, 0.3, -1000.0]], requires_grad=True)
    out = policy_loss(logp, old, -torch.ones(1, 3), mask, 0.2, level="sequence")
    out.loss.backward()
    s = math.exp(0.2)
    assert out.loss.item() == pytest.approx(s, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[s / 2, s / 2, 0.0]]))
    assert out.ratio_mean.item() == pytest.approx(s, abs=1e-6)
    # approx_kl stays per token: (e^0.1 - 1 - 0.1 + e^0.3 - 1 - 0.3) / 2 = (0.005171 +
    # 0.049859) / 2 = 0.027515
    assert out.approx_kl.item() == pytest.approx(0.027515, abs=1e-6)
    # A = +1 with GSPO's ranges 3e-4 / 4e-4: s = e^0.2 is far above 1 + 4e-4 -> clipped, no
    # gradient; a response of mean log ratio 2e-4 (s = 1.0002) is inside -> gradient -s / 2
    logp = torch.tensor([[0.1, 0.3, 0.0], [1e-4, 3e-4, 0.0]], requires_grad=True)
    out = policy_loss(logp, torch.zeros(2, 3), torch.ones(2, 3), torch.cat([mask, mask]), 3e-4,
                      cliprange_high=4e-4, level="sequence")
    out.loss.backward()
    s2 = math.exp(2e-4)
    # per token losses: -(1 + 4e-4) twice, -s2 twice, mean over 4 tokens
    assert out.loss.item() == pytest.approx(-(2 * (1 + 4e-4) + 2 * s2) / 4, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0],
                                                        [-s2 / 4, -s2 / 4, 0.0]]))
    assert out.clipfrac.item() == pytest.approx(0.5)
