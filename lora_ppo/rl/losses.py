"""PPO losses: clipped surrogate, clipped value loss, entropy bonus, and explained variance.

Every loss is sum(per_token * mask) / token_count, token_count defaulting to mask.sum(). Passing
the token count of the whole minibatch to each micro-batch makes the accumulated gradient equal
the full-minibatch token mean exactly, whatever the micro-batch split (a per-micro-batch mean
would weight short micro-batches more).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lora_ppo.rl.masked import masked_mean, masked_sum, masked_var


class PolicyLossOut(NamedTuple):
    loss: Tensor  # scalar, with grad
    clipfrac: Tensor  # scalar, share of tokens where the clipped branch was taken
    approx_kl: Tensor  # scalar, k3 estimate of KL(old || new)
    ratio_mean: Tensor  # scalar, mean of pi/pi_old over real tokens


class ValueLossOut(NamedTuple):
    loss: Tensor  # scalar, with grad
    clipfrac: Tensor  # scalar, share of tokens where the clipped value error was larger


def _token_mean(per_token: Tensor, mask: Tensor, token_count: float | None) -> Tensor:
    denom = mask.sum() if token_count is None else token_count
    return masked_sum(per_token, mask) / denom


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float,
    token_count: float | None = None,
) -> PolicyLossOut:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, eq. 7), as a loss.

    All inputs (B, T). Per token: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), with
    ratio = exp(logprobs - old_logprobs). Stats are detached scalars.
    """
    real = mask > 0
    # Zero the log-ratio on padding first so exp() of garbage there can't give inf * 0 = NaN grads.
    log_ratio = torch.where(real, logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = _token_mean(torch.maximum(pg_losses, pg_losses_clipped), mask, token_count)
    with torch.no_grad():
        # clipfrac as in baselines ppo2 / lm-human-preferences: the clipped branch is the max.
        clipfrac = masked_mean((pg_losses_clipped > pg_losses).to(ratio.dtype), mask)
        # approx_kl, k3 estimator of KL(old || new): http://joschu.net/blog/kl-approx.html
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossOut(loss, clipfrac, approx_kl, ratio_mean)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float,
    token_count: float | None = None,
) -> ValueLossOut:
    """Clipped value loss; all inputs (B, T).

    Per token 0.5 * max((v - R)^2, (v_old + clip(v - v_old, -c, c) - R)^2), as OpenAI baselines
    ppo2 (`vpredclipped`) and lm-human-preferences `PPOTrainer.loss`: the value head may not move
    more than c from its rollout value in a direction that lowers the loss.
    """
    c = cliprange_value
    values_clipped = old_values + torch.clamp(values - old_values, -c, c)
    vf_losses = (values - returns) ** 2
    vf_losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * _token_mean(torch.maximum(vf_losses, vf_losses_clipped), mask, token_count)
    with torch.no_grad():
        clipfrac = masked_mean((vf_losses_clipped > vf_losses).to(values.dtype), mask)
    return ValueLossOut(loss, clipfrac)


def entropy_loss(entropy: Tensor, mask: Tensor, token_count: float | None = None) -> Tensor:
    """Minus the token-mean entropy; entropy, mask: (B, T) -> scalar. Caller scales by ent_coef."""
    return -_token_mean(entropy, mask, token_count)


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var[R - V] / Var[R] over real tokens; values, returns, mask: (B, T) -> float.

    1 is a perfect value head, 0 no better than a constant, < 0 worse (cleanrl ppo.py
    `explained_var`). NaN when Var[R] == 0, where it is undefined.
    """
    var_returns = float(masked_var(returns, mask, unbiased=False))
    if var_returns == 0.0:
        return float("nan")
    return 1.0 - float(masked_var(returns - values, mask, unbiased=False)) / var_returns
