"""Per-token KL estimators between the policy and the reference model, and the KL coefficient.

The KL penalty keeps the policy close to the reference (Ziegler et al. 2019, arXiv:1909.08593,
eq. 2). Tokens are sampled from the policy, so each estimator below is a single-sample estimate
of KL(policy || ref) at that token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lora_ppo.errors import UserError

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate; logprobs, ref_logprobs: (B, T) -> (B, T).

    With log r = ref_logprobs - logprobs (http://joschu.net/blog/kl-approx.html):
      k1 = -log r = logp - logp_ref          unbiased, high variance, can be negative
      k2 = 0.5 * (log r)^2                   biased, low variance, >= 0
      k3 = (r - 1) - log r                   unbiased, low variance, >= 0
    Padding is not masked here; callers mask the result.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # r = p_ref / p = exp(-log_ratio); k3 = r - 1 - log r = exp(-lr) - 1 + lr
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use one of {', '.join(KL_ESTIMATORS)}")


class FixedKLController:
    """A constant KL coefficient beta; `update` does nothing."""

    def __init__(self, value: float):
        if value < 0:
            raise UserError(f"KL coefficient must be >= 0, got {value}; set it to 0 or more")
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op, so fixed and adaptive controllers are interchangeable in the loop."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (arXiv:1909.08593, sec. 2.2).

    beta is nudged so that the measured KL tracks `target`: the proportional error is clipped to
    +-0.2 and applied at a rate of n_steps / horizon. Copied from lm-human-preferences
    `AdaptiveKLController` (lm_human_preferences/train_policy.py), also TRL's:

        e = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + e * n_steps / horizon

    n_steps is the number of episodes (rollouts) since the last update, as in both references.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef <= 0:
            raise UserError(f"adaptive init_kl_coef must be > 0, got {init_kl_coef}")
        if target <= 0:
            raise UserError(f"adaptive KL target must be > 0, got {target}; e.g. 6.0")
        if horizon <= 0:
            raise UserError(f"adaptive KL horizon must be > 0, got {horizon}; e.g. 10000")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Multiply value by 1 + clip(kl/target - 1, -0.2, 0.2) * n_steps / horizon."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        """Only the coefficient is state; target and horizon come from the config on resume."""
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])
