import pytest
import torch

from lora_ppo.rl.gae import compute_gae

REWARDS = torch.tensor([[0.0, 0.0, 1.0]])
VALUES = torch.tensor([[0.5, 0.6, 0.7]])
FULL = torch.ones(1, 3)


def test_gae_gamma_1_by_hand():
    # gamma = 1, lam = 0.95, V after the last token = 0
    # t=2: delta = 1 + 0 - 0.7 = 0.3;     A2 = 0.3
    # t=1: delta = 0 + 0.7 - 0.6 = 0.1;   A1 = 0.1 + 0.95 * 0.3 = 0.385
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1;   A0 = 0.1 + 0.95 * 0.385 = 0.46575
    # returns = A + V = [0.96575, 0.985, 1.0]
    adv, ret = compute_gae(REWARDS, VALUES, FULL, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.46575, 0.385, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.96575, 0.985, 1.0]]))


def test_gae_gamma_09_by_hand():
    # gamma = 0.9, lam = 0.95, gamma * lam = 0.855
    # t=2: delta = 1 - 0.7 = 0.3;               A2 = 0.3
    # t=1: delta = 0.9 * 0.7 - 0.6 = 0.03;      A1 = 0.03 + 0.855 * 0.3 = 0.2865
    # t=0: delta = 0.9 * 0.6 - 0.5 = 0.04;      A0 = 0.04 + 0.855 * 0.2865 = 0.2849575
    adv, ret = compute_gae(REWARDS, VALUES, FULL, gamma=0.9, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.2849575, 0.2865, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.7849575, 0.8865, 1.0]]))


def test_gae_right_padding_by_hand():
    # mask [1, 1, 0]; padding holds garbage reward 5 and value 9 that must be ignored
    # t=1 is the last real token: delta = 1 + 0 - 0.6 = 0.4;  A1 = 0.4
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1;  A0 = 0.1 + 0.95 * 0.4 = 0.48
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 9.0]])
    adv, ret = compute_gae(rewards, values, torch.tensor([[1.0, 1.0, 0.0]]), 1.0, 0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.48, 0.4, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.98, 1.0, 0.0]]))


def test_gae_hole_is_skipped_by_hand():
    # mask [1, 0, 1]: the hole is not a time step, so this is the 2-step episode
    # rewards [0, 1], values [0.5, 0.7]:
    # t=2: delta = 1 - 0.7 = 0.3; A = 0.3
    # t=0: delta = 0 + 0.7 - 0.5 = 0.2 (bootstraps from t=2, not the hole); A = 0.2 + 0.95 * 0.3
    #      = 0.485
    rewards = torch.tensor([[0.0, 5.0, 1.0]])
    values = torch.tensor([[0.5, 9.0, 0.7]])
    adv, ret = compute_gae(rewards, values, torch.tensor([[1.0, 0.0, 1.0]]), 1.0, 0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.485, 0.0, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.985, 0.0, 1.0]]))


def reference_gae(rewards, values, mask, gamma, lam):
    """Per row, per real step, plain Python floats."""
    B, T = len(rewards), len(rewards[0])
    advantages = [[0.0] * T for _ in range(B)]
    returns = [[0.0] * T for _ in range(B)]
    for b in range(B):
        steps = [t for t in range(T) if mask[b][t] == 1.0]
        next_value, next_adv = 0.0, 0.0
        for t in reversed(steps):
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            advantages[b][t] = delta + gamma * lam * next_adv
            returns[b][t] = advantages[b][t] + values[b][t]
            next_value, next_adv = values[b][t], advantages[b][t]
    return advantages, returns


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_reference_loop(seed, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 9
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.25).double()  # holes
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask[torch.arange(T) >= lengths[:, None]] = 0.0  # right padding
    mask[0] = 1.0  # a full row
    mask[1] = 0.0  # an empty row
    values[mask == 0] = float("nan")  # garbage on padding must not leak
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = reference_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(ref_adv, dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor(ref_ret, dtype=torch.float64))


def test_gae_is_detached():
    values = VALUES.clone().requires_grad_(True)
    adv, ret = compute_gae(REWARDS, values, FULL, 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_over_an_environment_span_by_hand():
    """A trajectory: model token, two environment tokens (a tool's reply: context, not actions),
    two model tokens, padding. With the action mask the environment span is no time step: the
    value after the model's first token is bootstrapped at its next model token (t3), and the
    environment's positions get neither advantage nor return, whatever values sit there.

        gamma 0.9, lam 0.8; model tokens t0, t3, t4; rewards 0, 0.1 (a KL term), 1.0 (score)
        t4: delta = 1.0 + 0.9 * 0 - 0.8 = 0.2                 A4 = 0.2
        t3: delta = 0.1 + 0.9 * 0.8 - 0.6 = 0.22              A3 = 0.22 + 0.72 * 0.2 = 0.364
        t0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04 (V of t3)      A0 = 0.04 + 0.72 * 0.364 = 0.30208
        returns A + V: 0.80208, 0.964, 1.0
    """
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.1, 1.0, 0.0]])
    values = torch.tensor([[0.5, 9.0, -9.0, 0.6, 0.8, 7.0]])  # env and padding values: noise
    action = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 0.0]])
    adv, ret = compute_gae(rewards, values, action, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.30208, 0.0, 0.0, 0.364, 0.2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.80208, 0.0, 0.0, 0.964, 1.0, 0.0]]))
