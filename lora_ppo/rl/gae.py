"""Generalised Advantage Estimation (Schulman et al. 2015, arXiv:1506.02438, eq. 16).

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t      (the value target, the lambda-return)

The episode ends at the last real token, so V after it is 0 (no bootstrap), as in
lm-human-preferences `PPOTrainer.loss` and TRL. Positions with mask == 0 are not time steps:
the recursion steps over them, so V_{t+1} and A_{t+1} are those of the next REAL token.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Advantages and returns; rewards, values, mask: (B, T) -> advantages (B, T), returns (B, T).

    Both are 0 where mask == 0, whatever rewards/values hold there. Advantages are NOT whitened
    here (the caller applies masked_whiten). Runs under no_grad: they are fixed targets.
    """
    if not (rewards.shape == values.shape == mask.shape):
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
            f"{tuple(mask.shape)} must have the same (B, T) shape"
        )
    real = mask > 0
    B, T = rewards.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)  # V of next real token
    next_adv = torch.zeros_like(next_value)  # A of next real token
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        # On a hole or padding keep the carried values, so the recursion skips this step.
        next_value = torch.where(real[:, t], values[:, t], next_value)
        next_adv = torch.where(real[:, t], adv_t, next_adv)
        advantages[:, t] = torch.where(real[:, t], adv_t, 0.0)
    returns = torch.where(real, advantages + values, 0.0)
    return advantages, returns
