"""Reductions over the real tokens of right-padded response tensors.

Every function takes `x: (B, T)` (or any shape) and `mask` of the same shape, 1.0 on real response
tokens and 0.0 on padding. Padding entries are selected away with `torch.where`, not multiplied by
0, so a NaN or inf left in a padded slot never leaks into the result or its gradient.

`masked_var` and `masked_whiten` take an optional `all_sum`: a function that returns the sum of
a tensor over every process holding a part of the batch (the caller supplies it; with it the
mean and variance are those of the whole batch, issue 20 item 8). This module stays torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

AllSum = Callable[[Tensor], Tensor]  # (k,) -> (k,): the sum over every part of the batch


def _zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """x with padding entries replaced by 0 (gradient flows only to real entries)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x over mask==1 entries; a scalar when dim is None, else reduced along dim."""
    x = _zero_padding(x, mask)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over mask==1 entries; a scalar when dim is None, else reduced along dim.

    An all-padding mask (or row, with dim) gives NaN (0/0), as torch.mean of an empty tensor does.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return masked_sum(x, mask) / mask.sum()
    return masked_sum(x, mask, dim) / mask.sum(dim)


def _global_moments(x: Tensor, mask: Tensor, all_sum: AllSum) -> tuple[Tensor, Tensor, float]:
    """Mean, biased variance and count of x over the real entries of every part of the batch:
    two all-sums (sum and count, then the squared deviations from the global mean, the two-pass
    formula, as stable as the one-part one)."""
    sums = all_sum(torch.stack([masked_sum(x, mask), mask.sum()]))
    mean = sums[0] / sums[1]
    sq = all_sum(masked_sum((x - mean) ** 2, mask).reshape(1))[0]
    return mean, sq / sums[1], float(sums[1])


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True,
               all_sum: Optional[AllSum] = None) -> Tensor:
    """Variance of x over mask==1 entries, a scalar; with `all_sum`, over every part of the batch.

    unbiased=True applies Bessel's correction n/(n-1) as TRL's `masked_var` does; it needs at least
    two real entries, so fewer raises ValueError instead of returning inf/NaN.
    """
    mask = mask.to(x.dtype)
    if all_sum is not None:
        _, var, n = _global_moments(x, mask, all_sum)
        return _bessel(var, n) if unbiased else var
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered**2, mask)
    return _bessel(var, float(mask.sum())) if unbiased else var


def _bessel(var: Tensor, n: float) -> Tensor:
    """The unbiased variance from the biased one of n entries: var * n / (n - 1)."""
    if n < 2:
        raise ValueError(
            f"masked_var(unbiased=True) needs at least 2 real tokens, the mask has {n:g}; "
            "use a larger batch or unbiased=False"
        )
    return var * (n / (n - 1))


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, unbiased: bool = True,
    all_sum: Optional[AllSum] = None,
) -> Tensor:
    """Whiten x over its real entries: (x - mean) / sqrt(var + eps), 0 on padding.

    With shift_mean=False the mean is added back, so only the scale changes (used for rewards,
    where the sign of the mean carries information). Same as lm-human-preferences `whiten`
    (lm_human_preferences/utils/core.py) and TRL `masked_whiten`, computed over real tokens only
    so padding does not pull the mean toward 0. TRL's default unbiased=True is kept;
    lm-human-preferences uses tf.nn.moments, i.e. unbiased=False. With `all_sum` the mean and
    variance are those of every part of the batch (all ranks), so a sample's advantage does not
    depend on which rank holds it.

    x, mask: (B, T) -> (B, T)
    """
    mask = mask.to(x.dtype)
    if all_sum is not None:
        mean, var, n = _global_moments(x, mask, all_sum)
        var = _bessel(var, n) if unbiased else var
    else:
        mean = masked_mean(x, mask)
        var = masked_var(x, mask, unbiased=unbiased)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_padding(whitened, mask)
