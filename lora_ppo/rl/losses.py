"""PPO losses: clipped surrogate, clipped value loss, entropy bonus, KL penalty, explained variance.

Every loss is sum_i sum_t per_token[i, t] * mask[i, t] / normalizer_i. The normalizer is one
number for all rows (default mask.sum(): the token mean) or one per row (B,); `loss_normalizers`
gives it for the aggregations lora_ppo offers, computed over the whole minibatch, so that the
micro-batches' losses add up to the minibatch's exactly whatever the split (a per-micro-batch
mean would weight short micro-batches more):

    token_mean            1 / (tokens of the minibatch,          every token weighs the same
                          all ranks)                             (DAPO's token-level loss)
    seq_mean_token_mean   1 / (sequences * own length)           every sequence weighs the same
                                                                 (GRPO, Shao et al. 2024, eq. 3)
    constant              1 / (sequences * max_new_tokens)       Dr. GRPO (Liu et al. 2025, §3.2):
                                                                 no length normalisation
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lora_ppo.rl.kl import kl_penalty
from lora_ppo.rl.masked import masked_mean, masked_sum, masked_var


class PolicyLossOut(NamedTuple):
    loss: Tensor  # scalar, with grad
    clipfrac: Tensor  # scalar, share of tokens where the clipped branch was taken
    approx_kl: Tensor  # scalar, k3 estimate of KL(old || new)
    ratio_mean: Tensor  # scalar, mean of pi/pi_old over real tokens


class ValueLossOut(NamedTuple):
    loss: Tensor  # scalar, with grad
    clipfrac: Tensor  # scalar, share of tokens where the clipped value error was larger


AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "constant")
Normalizer = float | Tensor | None


@torch.no_grad()
def loss_normalizers(mask: Tensor, aggregation: str, accum_steps: int = 1,
                     max_len: int | None = None, global_tokens: float | None = None,
                     world_size: int = 1) -> Tensor:
    """Per-row normalizers (B,) of a whole minibatch whose response mask is `mask` (B, T).

    Divided by `accum_steps`, because DeepSpeed divides every micro-batch loss by the
    accumulation steps again in `engine.backward`; slice the result like the micro-batches.

    `global_tokens`: the tokens of this minibatch on all `world_size` ranks together (token_mean
    only; None: `mask.sum()`, one rank). DeepSpeed averages the ranks' gradients, so each rank
    divides its token sum by global_tokens / world_size, and the step is the gradient of the
    token mean over the whole global minibatch, however the tokens fall on the ranks (issue 20
    item 7; TRL's `dapo` loss and verl's `agg_loss` count the global tokens too). Dividing by
    the rank's own count instead minimised the mean of per-rank token means. The other two
    aggregations are exact on several ranks as they are: every rank holds the same number of
    sequences, so the average over ranks of per-rank sequence means is the global one.
    """
    n_seqs, lengths = mask.shape[0], mask.sum(1).clamp(min=1.0)
    if aggregation == "token_mean" and global_tokens is not None:
        norm = torch.full((n_seqs,), max(float(global_tokens), 1.0) / world_size,
                          device=mask.device)
    elif aggregation == "token_mean":
        norm = mask.sum().clamp(min=1.0).expand(n_seqs)
    elif aggregation == "seq_mean_token_mean":
        norm = lengths * n_seqs
    elif aggregation == "constant":
        if max_len is None:
            raise ValueError("the constant aggregation needs max_len (rollout.max_new_tokens)")
        norm = torch.full((n_seqs,), float(max_len * n_seqs), device=mask.device)
    else:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; use one of "
                         f"{', '.join(AGGREGATIONS)}")
    return norm.float() / accum_steps


def _token_mean(per_token: Tensor, mask: Tensor, normalizer: Normalizer) -> Tensor:
    if normalizer is None:
        return masked_sum(per_token, mask) / mask.sum()
    if isinstance(normalizer, Tensor) and normalizer.dim() == 1:
        return (masked_sum(per_token, mask, dim=1) / normalizer.to(per_token.dtype)).sum()
    return masked_sum(per_token, mask) / normalizer


IMPORTANCE_LEVELS = ("token", "sequence")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float,
    normalizer: Normalizer = None,
    cliprange_high: float | None = None,
    level: str = "token",
    weights: Tensor | None = None,
) -> PolicyLossOut:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, eq. 7), as a loss.

    All inputs (B, T). Per token: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high)), with
    ratio = exp(logprobs - old_logprobs) and eps_high = `cliprange_high` or `cliprange` (DAPO's
    clip-higher, Yu et al. 2025 eq. 10: eps_low 0.2, eps_high 0.28). `level="sequence"`: every
    token of response i takes the response's ratio s_i = exp(mean_t log ratio_t), the geometric
    mean of its token ratios, clipped once per response (GSPO, Zheng et al. 2025,
    arXiv:2507.18071, eq. 7; its gradient flows to every token, eq. 10). Stats are detached
    scalars; `approx_kl` is of the token ratios, `ratio_mean` of the ratios the loss used.
    `weights` (B, T), constants: each token's loss times its importance weight for the sampler's
    distribution (rl/sampler_correction.py, TRL's per_token_loss * importance_sampling_ratio).
    """
    real = mask > 0
    # Zero the log-ratio on padding first so exp() of garbage there can't give inf * 0 = NaN grads.
    log_ratio = torch.where(real, logprobs - old_logprobs, 0.0)
    if level == "sequence":
        seq = log_ratio.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
        ratio = torch.exp(seq).expand_as(log_ratio)
    elif level == "token":
        ratio = torch.exp(log_ratio)
    else:
        raise ValueError(f"unknown importance sampling level {level!r}; use one of "
                         f"{', '.join(IMPORTANCE_LEVELS)}")
    high = cliprange if cliprange_high is None else cliprange_high
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + high)
    per_token = torch.maximum(pg_losses, pg_losses_clipped)
    if weights is not None:
        per_token = per_token * weights.detach()
    loss = _token_mean(per_token, mask, normalizer)
    with torch.no_grad():
        # clipfrac as in baselines ppo2 / lm-human-preferences: the clipped branch is the max.
        clipfrac = masked_mean((pg_losses_clipped > pg_losses).to(ratio.dtype), mask)
        # approx_kl, k3 estimator of KL(old || new): http://joschu.net/blog/kl-approx.html
        token_ratio = ratio if level == "token" else torch.exp(log_ratio)
        approx_kl = masked_mean((token_ratio - 1) - log_ratio, mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossOut(loss, clipfrac, approx_kl, ratio_mean)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float,
    normalizer: Normalizer = None,
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
    loss = 0.5 * _token_mean(torch.maximum(vf_losses, vf_losses_clipped), mask, normalizer)
    with torch.no_grad():
        clipfrac = masked_mean((vf_losses_clipped > vf_losses).to(values.dtype), mask)
    return ValueLossOut(loss, clipfrac)


def entropy_loss(entropy: Tensor, mask: Tensor, normalizer: Normalizer = None) -> Tensor:
    """Minus the mean entropy; entropy, mask: (B, T) -> scalar. Caller scales by ent_coef."""
    return -_token_mean(entropy, mask, normalizer)


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str = "k3",
            normalizer: Normalizer = None) -> Tensor:
    """The KL penalty as a loss term (GRPO, Shao et al. 2024, eq. 3-4: beta * D_KL with the k3
    estimator r - log r - 1, r = pi_ref / pi_theta, which is >= 0 per token and unbiased);
    all inputs (B, T), gradients through `logprobs` only. Caller scales by kl_coef.

    Padding is neutralised before the estimator, as in `policy_loss`: k3's expm1(-log ratio)
    overflows to inf where a padded log-prob is below about -88, and `where`'s backward then
    multiplies its zero gradient by inf (NaN) even though the forward dropped the slot."""
    real = mask > 0
    logprobs = torch.where(real, logprobs, 0.0)
    ref_logprobs = torch.where(real, ref_logprobs.detach(), 0.0)
    return _token_mean(kl_penalty(logprobs, ref_logprobs, estimator), mask, normalizer)


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
