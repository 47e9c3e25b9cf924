"""Per-token rewards from sequence scores, and score shaping/normalisation.

The reward model gives one scalar per response; PPO needs one reward per token. As in
Ziegler et al. 2019 (arXiv:1909.08593, eq. 2) and Stiennon et al. 2020 (arXiv:2009.01325, eq. 1),
every token gets the KL penalty -beta * KL_t and the last token also gets the score.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lora_ppo.errors import UserError
from lora_ppo.rl.kl import kl_penalty


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last 1 in each row; mask: (B, T) -> LongTensor (B,).

    Works for masks with holes too (it is the last nonzero, not the row sum - 1).
    A row without any real token raises ValueError naming the row.
    """
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, -1).max(dim=1).values
    empty = (last < 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mask rows {empty} have no real token; every response needs >= 1 token")
    return last


def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: -kl_coef * kl on every real token, plus the score on the last one.

    scores: (B,); logprobs, ref_logprobs, mask: (B, T) -> rewards (B, T), kl (B, T).
    The score lands on the LAST REAL token (the EOS, or the final token when generation hit the
    length limit), never on padding and never one past the end; TRL's PPO trainer does the same
    with `sequence_lengths`. rewards and kl are 0 on padding.
    """
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and mask "
            f"{tuple(mask.shape)} must have the same (B, T) shape"
        )
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(
            f"scores must be (B,) = {tuple(logprobs.shape[:1])}, got {tuple(scores.shape)}"
        )
    real = mask > 0
    kl = kl_penalty(logprobs, ref_logprobs, estimator)
    kl = torch.where(real, kl, torch.zeros_like(kl))
    rewards = -kl_coef * kl
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl


def shape_scores(
    scores: Tensor,
    has_eos: Tensor,
    *,
    missing_eos_penalty: float | None,
    clip: float | None,
) -> Tensor:
    """Penalise responses that never ended, then clip; scores: (B,), has_eos: (B,) bool -> (B,).

    missing_eos_penalty is subtracted where has_eos is False, as TRL's `missing_eos_penalty`
    (truncated answers otherwise get scored as if complete). clip clamps to [-clip, clip], as
    TRL's `score_clip`, to keep outlier scores from dominating the advantages.
    """
    if clip is not None and clip <= 0:
        raise UserError(f"score clip must be > 0 or unset, got {clip}")
    out = scores.clone()
    if missing_eos_penalty is not None:
        out = out - missing_eos_penalty * (~has_eos.bool()).to(out.dtype)
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13), scaled by
    `penalty`; lengths (B,) in tokens -> (B,), to be added to the scores:

        0                                        |y| <= max_len - buffer
        -penalty * (|y| - (max_len - buffer)) / buffer    up to -penalty at |y| = max_len

    (the paper's ((L_max - L_cache) - |y|) / L_cache with L_max = max_len, L_cache = buffer;
    responses never exceed max_len here, so its -1 beyond L_max never applies). As OpenRLHF's
    `overlong_buffer_len` / `overlong_penalty_factor` (experience_maker.py).
    """
    if not 0 < buffer < max_len:
        raise UserError(f"overlong buffer must be in (0, {max_len}), got {buffer}")
    excess = (lengths.float() - (max_len - buffer)).clamp(min=0.0, max=float(buffer))
    return -penalty * excess / buffer


class RunningMoments:
    """Running mean and std of every score seen so far (for score normalisation).

    Batches are merged with the parallel-variance formula of Chan et al. 1979 ("Updating formulae
    and a pairwise algorithm for computing sample variances"), as TRL `RunningMoments`:
        delta = mean_b - mean;  n' = n + n_b
        mean' = mean + delta * n_b / n'
        M2'   = M2 + M2_b + delta^2 * n * n_b / n'
    State is plain Python floats (float64) so it goes into JSON. `std` is the unbiased
    (Bessel-corrected) std of all values seen, equal to torch.std over their concatenation.
    With several ranks, all-reduce the batch moments and call `merge` instead of `update`.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean
        self.count = 0.0

    @property
    def var(self) -> float:
        """Unbiased variance of all values seen (0.0 until two values are seen)."""
        return self.m2 / (self.count - 1) if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def merge(self, batch_mean: float, batch_m2: float, batch_count: float) -> None:
        """Fold in a batch given by its mean, sum of squared deviations and count."""
        if batch_count <= 0:
            return
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean += delta * batch_count / total
        self.m2 += batch_m2 + delta**2 * self.count * batch_count / total
        self.count = total

    @torch.no_grad()
    def update(self, x: Tensor) -> tuple[float, float]:
        """Fold in all entries of x; returns (batch_mean, batch_std), std unbiased (0 if n=1)."""
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            raise ValueError("RunningMoments.update got an empty tensor")
        batch_mean = float(x.mean())
        batch_m2 = float(((x - batch_mean) ** 2).sum())
        self.merge(batch_mean, batch_m2, float(n))
        return batch_mean, math.sqrt(batch_m2 / (n - 1)) if n > 1 else 0.0

    def normalize(self, x: Tensor, eps: float = 1e-8) -> Tensor:
        """(x - mean) / std; when std <= eps (all scores equal so far) only the mean is removed."""
        std = self.std if self.std > eps else 1.0
        return (x - self.mean) / std

    def state_dict(self) -> dict:
        return {"mean": self.mean, "m2": self.m2, "count": self.count}

    def load_state_dict(self, d: dict) -> None:
        self.mean, self.m2, self.count = float(d["mean"]), float(d["m2"]), float(d["count"])
