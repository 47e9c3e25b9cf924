"""The sampler's distribution against the scored one: importance weights that correct for it,
and how far apart the two are.

The rollout's tokens are drawn from the decode loop's distribution pi_s (KV cache, other matmul
shapes), while PPO's old log-probs come from the scoring forward pi_old. In fp32 the two agree
to round-off (~1e-6: the sampler's log-probs are the old log-probs there); in bf16 they differ by
~1e-2 per token. The policy-gradient estimate is then of tokens that pi_old did not draw: the
training-inference mismatch of "Your Efficient RL Framework Secretly Brings You Off-Policy RL
Training" (Yao et al. 2025, truncated importance sampling) and "When Speed Kills Stability"
(Liu, Li et al. 2025; verl's rollout correction). Each token's loss is weighted by

    w = pi_old / pi_s                        token level: one ratio per token
    w = prod_t pi_old / pi_s                 sequence level: one ratio per response, on every
                                             one of its tokens (the sum of its log-ratios)

    truncate   w <- clamp(w, clip_min, clip_max)                 (TIS; clip_min None: no bound)
    mask       w <- w where clip_min <= w <= clip_max, else 0    (MIS / IcePop: the token or
                                                                  response leaves the gradient)

as TRL's GRPOTrainer does with vLLM's log-probs (`vllm_importance_sampling_mode` token_truncate,
token_mask, sequence_truncate, sequence_mask; `vllm_importance_sampling_clip_max` 3.0,
`_clip_min` None; trl/trainer/grpo_trainer.py `_generate_and_score_completions`); OpenRLHF's
`--vllm_is_correction_type` tis (token truncate) and icepop (token mask) are two of the four.
The weights are constants (no gradient) multiplying the per-token clipped surrogate loss; masked
tokens stay in the loss normalizer, as in TRL.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@torch.no_grad()
def sampler_weights(logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor,
                    mode: str = "sequence_mask", clip_max: Optional[float] = 3.0,
                    clip_min: Optional[float] = None) -> Tensor:
    """Importance weights pi_old / pi_s of `mode` (module doc); logprobs (pi_old), sampler_logprobs
    (pi_s), mask: (B, T) -> (B, T) float32, 0 on padding."""
    if mode not in MODES:
        raise ValueError(f"unknown sampler importance sampling mode {mode!r}; use one of "
                         f"{', '.join(MODES)}")
    real = mask > 0
    log_ratio = torch.where(real, logprobs.float() - sampler_logprobs.float(), 0.0)
    if mode.startswith("sequence"):
        log_ratio = log_ratio.sum(1, keepdim=True)  # (B, 1): the response's probability ratio
    ratio = torch.exp(log_ratio)
    if mode.endswith("truncate"):
        w = ratio if clip_min is None and clip_max is None else ratio.clamp(clip_min, clip_max)
    else:
        low = -math.inf if clip_min is None else clip_min
        high = math.inf if clip_max is None else clip_max
        w = torch.where((ratio >= low) & (ratio <= high), ratio, 0.0)
    return w.expand(mask.shape) * real


class Mismatch(NamedTuple):
    """Sums over one rollout's real tokens (divide by `tokens` for the token means)."""

    kl: float          # sum of k3 = (r - 1) - log r, r = pi_old / pi_s: KL(pi_s || pi_old)
    abs_diff: float    # sum of |log pi_old - log pi_s|
    max_abs_diff: float
    tokens: float


@torch.no_grad()
def sampler_mismatch(logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> Mismatch:
    """How far the scored distribution is from the sampled one on the sampled tokens; all (B, T).
    The tokens were drawn from pi_s, so the mean of k3 over them estimates KL(pi_s || pi_old)
    without bias and is >= 0 per token (joschu.net/blog/kl-approx.html)."""
    real = mask > 0
    log_r = torch.where(real, logprobs.float() - sampler_logprobs.float(), 0.0)
    k3 = torch.expm1(log_r) - log_r  # 0 on padding
    diff = log_r.abs()
    return Mismatch(float(k3.sum()), float(diff.sum()),
                    float(diff.max()) if diff.numel() else 0.0, float(real.sum()))
