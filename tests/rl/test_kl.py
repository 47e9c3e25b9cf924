import json
import math

import pytest
import torch

from lora_ppo.errors import UserError
from lora_ppo.rl.kl import AdaptiveKLController, FixedKLController, kl_penalty

# Token 0: p = 0.5, p_ref = 0.25 -> log(p / p_ref) = log 2 = 0.693147, r = p_ref / p = 0.5
# Token 1: p = 0.25, p_ref = 0.5 -> log(p / p_ref) = -log 2,         r = 2
# Token 2: p = p_ref                -> 0 for every estimator
LOGP = torch.log(torch.tensor([[0.5, 0.25, 0.3]]))
REF = torch.log(torch.tensor([[0.25, 0.5, 0.3]]))
LN2 = math.log(2)


def test_k1_by_hand():
    # k1 = logp - logp_ref
    torch.testing.assert_close(kl_penalty(LOGP, REF, "k1"), torch.tensor([[LN2, -LN2, 0.0]]))


def test_k2_by_hand():
    # k2 = 0.5 * (log 2)^2 = 0.240227 for both signs
    expected = torch.tensor([[0.5 * LN2**2, 0.5 * LN2**2, 0.0]])
    torch.testing.assert_close(kl_penalty(LOGP, REF, "k2"), expected)


def test_k3_by_hand():
    # k3 = (r - 1) - log r: r = 0.5 -> -0.5 + 0.693147 = 0.193147; r = 2 -> 1 - 0.693147 = 0.306853
    expected = torch.tensor([[0.5 - 1 - math.log(0.5), 2 - 1 - math.log(2), 0.0]])
    torch.testing.assert_close(kl_penalty(LOGP, REF, "k3"), expected)
    assert expected[0, 0].item() == pytest.approx(0.193147, abs=1e-6)


def test_unknown_estimator():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(LOGP, REF, "k4")


@pytest.mark.parametrize(
    "kl, expected",
    [
        # e = 9/6 - 1 = 0.5 -> clipped to 0.2; 0.1 * (1 + 0.2 * 64 / 10000) = 0.100128
        (9.0, 0.100128),
        # e = 3/6 - 1 = -0.5 -> clipped to -0.2; 0.1 * (1 - 0.2 * 64 / 10000) = 0.099872
        (3.0, 0.099872),
        # e = 6.6/6 - 1 = 0.1, inside the clip; 0.1 * (1 + 0.1 * 64 / 10000) = 0.100064
        (6.6, 0.100064),
        # e = 0: on target, unchanged
        (6.0, 0.1),
    ],
)
def test_adaptive_controller_by_hand(kl, expected):
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(kl, n_steps=64)
    assert ctl.value == pytest.approx(expected, rel=1e-12)


def test_adaptive_controller_accepts_tensor_kl_and_round_trips_json():
    ctl = AdaptiveKLController(0.2, target=1.0, horizon=100)
    ctl.update(torch.tensor(2.0), n_steps=10)  # e = 0.2 -> 0.2 * 1.02 = 0.204
    assert ctl.value == pytest.approx(0.204)
    other = AdaptiveKLController(0.2, target=1.0, horizon=100)
    other.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert other.value == ctl.value


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=1000)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


@pytest.mark.parametrize("kwargs", [{"target": 0.0}, {"horizon": -1}, {"init_kl_coef": 0.0}])
def test_adaptive_controller_rejects_bad_config(kwargs):
    args = {"init_kl_coef": 0.1, "target": 6.0, "horizon": 10000, **kwargs}
    with pytest.raises(UserError):
        AdaptiveKLController(**args)
