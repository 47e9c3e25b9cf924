"""Critic-free advantages and loss aggregations against numbers derived by hand."""

import math

import pytest
import torch

from lora_ppo.rl.advantages import (
    group_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    token_advantages,
    zero_std_groups,
)
from lora_ppo.rl.losses import loss_normalizers, policy_loss

# Two groups of 4: scores [1, 0, 0, 1] and [2, 2, 2, 2] (all equal: no signal).
SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])


def test_grpo_by_hand():
    # group 1: mean 0.5, unbiased std = sqrt((4 * 0.25) / 3) = 0.57735
    # A = +-0.5 / (0.57735 + 1e-4) = +-0.86588;  group 2: std 0 -> A = 0 / 1e-4 = 0
    adv = group_advantages(SCORES, 4, "grpo")
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))


def test_dr_grpo_by_hand():
    # no std division: A = r - mean = +-0.5;  group 2: 0
    adv = group_advantages(SCORES, 4, "dr_grpo")
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_rloo_by_hand():
    # leave-one-out baseline of sample 0: mean(0, 0, 1) = 1/3 -> A0 = 1 - 1/3 = 2/3
    # sample 1: mean(1, 0, 1) = 2/3 -> A1 = -2/3;  = 4/3 * (r - 0.5) for G = 4
    adv = group_advantages(SCORES, 4, "rloo")
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        group_advantages(SCORES, 1, "rloo")


def test_groups_never_mix():
    # Swapping the second group's values does not change the first group's advantages.
    other = SCORES.clone()
    other[4:] = torch.tensor([5.0, -3.0, 0.0, 1.0])
    for est in ("grpo", "dr_grpo", "rloo"):
        torch.testing.assert_close(group_advantages(other, 4, est)[:4],
                                   group_advantages(SCORES, 4, est)[:4])
    with pytest.raises(ValueError, match="multiple of the group size 3"):
        group_advantages(SCORES, 3, "grpo")


def test_zero_std_groups_and_their_zero_advantages():
    assert zero_std_groups(SCORES, 4).tolist() == [False, True]
    for est in ("grpo", "dr_grpo", "rloo"):
        assert group_advantages(SCORES, 4, est)[4:].abs().max() == 0.0


def test_token_advantages_broadcast_on_real_tokens():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(token_advantages(torch.tensor([0.5, -2.0]), mask),
                               torch.tensor([[0.5, 0.5, 0.0], [-2.0, 0.0, 0.0]]))


def test_reinforce_pp_by_hand():
    # rewards per token (KL penalty on every token, score on the last real one), gamma = 1:
    # row 0 [-0.1, -0.1, 0.9] -> reward-to-go [0.7, 0.8, 0.9]
    # row 1 [-0.2, 1.8, pad]  -> [1.6, 1.8, 0]
    # whitened over the 5 real values: mean 1.16, unbiased var = 0.233, std 0.48270
    rewards = torch.tensor([[-0.1, -0.1, 0.9], [-0.2, 1.8, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = reinforce_pp_advantages(rewards, mask)
    togo = torch.tensor([[0.7, 0.8, 0.9], [1.6, 1.8, 0.0]])
    mean = 5.8 / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in (0.7, 0.8, 0.9, 1.6, 1.8)) / 4)
    torch.testing.assert_close(adv, (togo - mean) / std * mask, atol=1e-4, rtol=0)


def test_loss_normalizers_by_hand():
    # a minibatch of 2 sequences, 3 and 1 real tokens, 2 accumulation steps, max_new_tokens 5
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(loss_normalizers(mask, "token_mean", 2), torch.tensor([2.0, 2.0]))
    # per sequence: own length * 2 sequences / 2 steps
    torch.testing.assert_close(loss_normalizers(mask, "seq_mean_token_mean", 2),
                               torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(loss_normalizers(mask, "constant", 2, max_len=5),
                               torch.tensor([5.0, 5.0]))


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "constant"])
def test_micro_batches_add_up_to_the_minibatch_for_every_aggregation(aggregation):
    """Each micro-batch's loss with its slice of the minibatch's normalizers, summed over the
    micro-batches and divided by the accumulation steps (as DeepSpeed does), is the minibatch's
    loss in one piece."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0] * 5, [1.0, 1.0, 0, 0, 0], [1.0] * 3 + [0, 0], [1.0, 0, 0, 0, 0]])
    logprobs, old = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    adv = torch.randn(4, 5, generator=g)
    whole = policy_loss(logprobs, old, adv, mask, 0.2,
                        loss_normalizers(mask, aggregation, 1, max_len=5)).loss
    norm = loss_normalizers(mask, aggregation, 2, max_len=5)
    parts = [policy_loss(logprobs[s], old[s], adv[s], mask[s], 0.2, norm[s]).loss
             for s in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(sum(parts) / 2, whole)
    # seq_mean_token_mean weighs each sequence equally: the 1-token row counts as much as the
    # 5-token row (token_mean would weigh it 1/11)
    if aggregation == "seq_mean_token_mean":
        per_seq = [policy_loss(logprobs[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1],
                               0.2).loss for i in range(4)]
        torch.testing.assert_close(whole, sum(per_seq) / 4)


def test_token_mean_over_two_ranks_is_the_global_token_mean():
    """Issue 20 item 7: responses of 1, 2, 2, 3 tokens on rank 0 and 6, 6, 6, 6 on rank 1. The
    global minibatch holds 8 + 24 = 32 tokens, so every token's loss weighs 1/32. DeepSpeed
    averages the ranks' gradients (x 1/2), so each rank divides by 32 / 2 = 16: 1/16 x 1/2 =
    1/32. Each rank's own count gave rank 0's tokens 1/8 x 1/2 = 1/16 and rank 1's 1/24 x 1/2 =
    1/48, three times less."""
    mask0 = (torch.arange(6)[None] < torch.tensor([1, 2, 2, 3])[:, None]).float()
    mask1 = torch.ones(4, 6)
    adv = torch.ones(4, 6)  # ratio 1 and A = 1: d loss / d logp = -weight of the token

    def grad(mask, norm):
        logp = torch.zeros(4, 6, requires_grad=True)
        policy_loss(logp, logp.detach(), adv, mask, 0.2, norm).loss.backward()
        return logp.grad

    def averaged_over_ranks(**kw):  # what DeepSpeed's gradient all-reduce makes of two ranks
        g0 = grad(mask0, loss_normalizers(mask0, "token_mean", **kw))
        g1 = grad(mask1, loss_normalizers(mask1, "token_mean", **kw))
        return torch.cat([g0, g1]) / 2

    whole = torch.cat([mask0, mask1])
    torch.testing.assert_close(averaged_over_ranks(global_tokens=32.0, world_size=2),
                               -whole / 32)
    per_rank = averaged_over_ranks()  # each rank's own token count, as before the fix
    torch.testing.assert_close(per_rank[:4], -mask0 / 16)
    torch.testing.assert_close(per_rank[4:], -mask1 / 48)
    # seq_mean_token_mean and constant need no global count: each rank holds 4 of the 8
    # sequences, so the average of the ranks' sequence means is the mean over all 8
    for agg, per_seq in (("seq_mean_token_mean", whole.sum(1)), ("constant", torch.full((8,), 6.))):
        g = torch.cat([grad(m, loss_normalizers(m, agg, max_len=6)) for m in (mask0, mask1)]) / 2
        torch.testing.assert_close(g, -whole / (8 * per_seq[:, None]))


def test_grpo_scale_rewards_batch_and_none_by_hand():
    # SCORES: group means 0.5 and 2 -> centred +-0.5 and 0. Batch std (TRL's scale_rewards=batch,
    # unbiased, over all 8): mean 1.25, squared deviations 0.0625 + 1.5625 + 1.5625 + 0.0625 +
    # 4 x 0.5625 = 5.5, / 7 = 0.785714, std 0.886405 -> +-0.5 / (0.886405 + 1e-4) = +-0.564017
    a = 0.5 / (math.sqrt(5.5 / 7) + 1e-4)
    torch.testing.assert_close(group_advantages(SCORES, 4, "grpo", "batch"),
                               torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    torch.testing.assert_close(group_advantages(SCORES, 4, "grpo", "none"),
                               group_advantages(SCORES, 4, "dr_grpo"))
    # the default is GRPO's group std, unchanged
    torch.testing.assert_close(group_advantages(SCORES, 4, "grpo", "group"),
                               group_advantages(SCORES, 4, "grpo"))


def test_reinforce_pp_baseline_by_hand_kl_in_the_loss():
    # Two groups of 2: scores 1, 0 (mean 0.5) and 3, 3 (mean 3, tied). With the KL in the loss
    # the token rewards are the score on the last real token only; minus the group mean: 0.5,
    # -0.5, 0, 0, and the reward-to-go puts it on every token of its response:
    # row 0 (2 tokens) [0.5, 0.5], row 1 (1) [-0.5], row 2 (3) [0, 0, 0], row 3 (1) [0].
    # Whitened over the 7 real tokens: mean 0.5 / 7 = 0.071429, squared deviations
    # 2 x 0.183673 + 0.326531 + 4 x 0.005102 = 0.714286, unbiased / 6 = 0.119048, std 0.345033:
    # row 0 -> 1.242118, row 1 -> -1.656157, the tied group -> -0.207020 (not 0: the whitening
    # subtracts the token-weighted batch mean)
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]])
    scores = torch.tensor([1.0, 0.0, 3.0, 3.0])
    rewards = torch.zeros(4, 3)
    rewards[0, 1], rewards[1, 0], rewards[2, 2], rewards[3, 0] = 1.0, 0.0, 3.0, 3.0
    adv = reinforce_pp_baseline_advantages(rewards, scores, mask, group_size=2)
    a, b, c = 1.242118, -1.656157, -0.207020
    torch.testing.assert_close(adv, torch.tensor([[a, a, 0], [b, 0, 0], [c, c, c], [c, 0, 0]]),
                               atol=1e-5, rtol=0)


def test_reinforce_pp_baseline_by_hand_kl_in_the_reward():
    # One group of 2, scores 1 and 0 (mean 0.5), -beta KL_t = -0.1 per token of row 0, -0.2 on
    # row 1's one token (OpenRLHF's order: the group mean comes off the score, the token KL is
    # added to the rewards): rewards [-0.1, 0.9], [-0.2] -> centred [-0.1, 0.4], [-0.7] ->
    # reward-to-go [0.3, 0.4], [-0.7] -> mean 0, unbiased var (0.09 + 0.16 + 0.49) / 2 = 0.37,
    # std 0.608276 -> [0.493197, 0.657596], [-1.150793]
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    rewards = torch.tensor([[-0.1, 0.9], [-0.2, 0.0]])
    adv = reinforce_pp_baseline_advantages(rewards, torch.tensor([1.0, 0.0]), mask, group_size=2)
    torch.testing.assert_close(adv, torch.tensor([[0.493197, 0.657596], [-1.150793, 0.0]]),
                               atol=1e-5, rtol=0)
