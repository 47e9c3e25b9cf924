"""Critic-free advantages: a baseline from the other samples of the same prompt, or none.

The rollout holds n samples per prompt, each group of n consecutive (`rollout.samples_per_prompt`).
`seq_rewards` (B,) is one reward per sample: the score, minus beta times the sequence KL when the
KL lives in the reward (`ppo.kl_in=reward`). With G = n and group g = rows g*G .. g*G+G-1:

    grpo     A_i = (r_i - mean_g r) / (std_g r + eps)      Shao et al. 2024 (DeepSeekMath), §4.1.2
    dr_grpo  A_i = r_i - mean_g r                          Liu et al. 2025 ("Understanding
                                                           R1-Zero-Like Training"), §3.2: no std
    rloo     A_i = r_i - mean_{j != i} r_j                 Ahmadian et al. 2024, eq. 6 (= G/(G-1)
             = G / (G - 1) * (r_i - mean_g r)              times the GRPO numerator)

and every response token gets its sequence's advantage (the outcome-supervision setting of all
three). grpo's divisor is `scale` (ppo.scale_rewards, TRL's scale_rewards): `group` as above,
`batch` the std of every r of the rollout (all ranks: `all_sum`), `none` no division.
REINFORCE++ (Hu 2025, arXiv:2501.03262) keeps PPO's per-token rewards (-beta * kl_t on every
token, the score on the last) and uses the reward-to-go as the advantage, whitened over the whole
batch instead of by a critic or a group: `reinforce_pp_advantages`. REINFORCE++-baseline (Hu et
al. 2025 v2, §3; OpenRLHF `reinforce_baseline`) first subtracts the group's mean score from each
score: `reinforce_pp_baseline_advantages`.

std is the unbiased (Bessel-corrected) group std and eps = 1e-4, as TRL's GRPOTrainer
(`std_grouped_rewards = rewards.view(-1, G).std(dim=1)`, `advantages / (std + 1e-4)`).

A group whose scores are all equal carries no score signal (`zero_std_groups` finds them,
rollout.dynamic_sampling drops them). What it still gets, precisely (issue 20 item 9):
  grpo, dr_grpo, rloo with the KL in the loss or kl_coef 0: A_i = 0 exactly, so no gradient from
      the policy loss; the KL loss term still acts on its tokens. grpo with the KL in the reward
      is refused (its std would be that of the KL noise, near 0) unless scale is `none`.
  dr_grpo, rloo with the KL in the reward: A_i = -beta (KL_i - mean_g KL) (rloo: times
      G / (G - 1)): the KL penalty relative to the group, no score signal.
  reinforce_pp_baseline: every centred score is 0, but the whitening subtracts the batch's
      token-weighted mean m (not 0 when lengths differ): A = -m / std, plus the whitened KL
      reward-to-go when the KL is in the reward.
  reinforce_pp (no group baseline) and gae: whatever the whitened reward-to-go / GAE give.
Every function imports only torch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lora_ppo.rl.masked import AllSum, masked_var, masked_whiten
from lora_ppo.rl.rewards import last_token_index

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
SCALES = ("group", "batch", "none")
CRITIC_FREE = (*GROUP_ESTIMATORS, "reinforce_pp", "reinforce_pp_baseline")
ESTIMATORS = ("gae", *CRITIC_FREE)
GRPO_EPS = 1e-4


def _groups(x: Tensor, group_size: int) -> Tensor:
    """(B,) -> (B / G, G); B must be a multiple of G (a group never straddles two calls)."""
    if x.dim() != 1 or x.shape[0] % group_size:
        raise ValueError(f"expected (B,) with B a multiple of the group size {group_size}, got "
                         f"{tuple(x.shape)}")
    return x.view(-1, group_size)


@torch.no_grad()
def group_advantages(seq_rewards: Tensor, group_size: int, estimator: str, scale: str = "group",
                     all_sum: Optional[AllSum] = None) -> Tensor:
    """Sequence advantages (B,) of `seq_rewards` (B,) by the group baseline of `estimator`;
    `scale` is grpo's divisor, `all_sum` (rl/masked.py) makes `batch` that of every rank."""
    r = _groups(seq_rewards.float(), group_size)
    mean = r.mean(dim=1, keepdim=True)
    if estimator == "grpo" and scale == "batch":  # TRL: nanstd over the gathered rewards
        std = masked_var(r, torch.ones_like(r), unbiased=True, all_sum=all_sum).sqrt()
        adv = (r - mean) / (std + GRPO_EPS)
    elif estimator == "grpo" and scale == "none":
        adv = r - mean
    elif estimator == "grpo":
        if scale != "group":
            raise ValueError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
        adv = (r - mean) / (std + GRPO_EPS)
    elif estimator == "dr_grpo":
        adv = r - mean
    elif estimator == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs at least 2 samples per prompt (a leave-one-out baseline)")
        adv = r - (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    else:
        raise ValueError(f"unknown group estimator {estimator!r}; use one of "
                         f"{', '.join(GROUP_ESTIMATORS)}")
    return adv.reshape(-1)


@torch.no_grad()
def zero_std_groups(scores: Tensor, group_size: int) -> Tensor:
    """(B / G,) bool: groups whose scores are all equal (no learning signal from the score)."""
    s = _groups(scores.float(), group_size)
    return (s == s[:, :1]).all(dim=1)


@torch.no_grad()
def reinforce_pp_advantages(rewards: Tensor, mask: Tensor, gamma: float = 1.0,
                            all_sum: Optional[AllSum] = None) -> Tensor:
    """REINFORCE++: rewards (B, T) -> advantages (B, T), 0 on padding.

    A_t = sum_{k >= t, real} gamma^(k - t) r_k (the reward-to-go over real tokens, no critic),
    then whitened over every real token of the batch (Hu 2025, eq. 9-10: global advantage
    normalisation in place of a per-prompt baseline); `all_sum` (rl/masked.py) makes the batch
    that of every rank.
    """
    real = mask > 0
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        step = torch.where(real[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(real[:, t], step, 0.0)
        running = step
    return masked_whiten(returns, mask, shift_mean=True, all_sum=all_sum)


@torch.no_grad()
def reinforce_pp_baseline_advantages(rewards: Tensor, scores: Tensor, mask: Tensor,
                                     group_size: int, gamma: float = 1.0,
                                     all_sum: Optional[AllSum] = None) -> Tensor:
    """REINFORCE++-baseline: rewards (B, T) (the score on the last real token, -beta * kl_t on
    every token when the KL is in the reward), scores (B,), mask (B, T) -> advantages (B, T).

    The group's mean score is taken off each score on its last token, then the advantage is
    REINFORCE++'s: the reward-to-go, whitened over every real token of the batch (all ranks with
    `all_sum`). As OpenRLHF `experience_maker.py` (`reinforce_baseline`: `rewards - rewards.mean(
    -1)` per prompt, then `compute_reward` adds the token KL, `get_cumulative_returns`, and the
    whitening over all experiences). With the KL in the loss the reward-to-go is s_i - mean_g s on
    every token and this equals verl's `compute_reinforce_plus_plus_baseline_outcome_advantage`
    (the centred score on every token, `masked_whiten` over the batch). Both peers put the KL
    in the loss (k2) in their recipes; lora_ppo's `auto` does the same.
    """
    baseline = _groups(scores.to(rewards.dtype), group_size).mean(dim=1, keepdim=True)
    baseline = baseline.expand(-1, group_size).reshape(-1)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    centred = rewards.clone()
    centred[rows, last_token_index(mask)] -= baseline
    return reinforce_pp_advantages(centred, mask, gamma, all_sum)


def token_advantages(seq_advantages: Tensor, mask: Tensor) -> Tensor:
    """Every real response token gets its sequence's advantage: (B,), (B, T) -> (B, T)."""
    return seq_advantages[:, None].to(mask.dtype) * mask
