"""The PPO update: `ppo.epochs` passes over a rollout in shuffled minibatches on a DeepSpeed engine.

Each minibatch is split into micro-batches. Every micro-batch's forward goes through the engine
(`engine(...)` runs `ActorCritic.forward`): under ZeRO-3 DeepSpeed advances its micro-step in
`engine.forward` (`DeepSpeedZeroOptimizer_Stage3.clear_backward_seen_flag`), and a forward that
bypasses it makes each micro-batch's gradient partition overwrite the previous one instead of
adding to it. `engine.backward` runs per micro-batch and `engine.step` after each, which
DeepSpeed turns into an optimizer step only at the accumulation boundary (the last micro-batch
of the minibatch, since gradient_accumulation_steps = minibatch_size / micro_batch_size).

Losses are aggregated over the whole minibatch, not per micro-batch (ppo.loss_aggregation; by
default the token mean): each micro-batch divides its token sums by the minibatch's normalizers
divided by the accumulation steps (rl/losses.py::loss_normalizers), and DeepSpeed divides by the
accumulation steps again in `engine.backward`, so micro 2 x accumulation 4 gives the gradient of
micro 8 x accumulation 1 exactly, even when micro-batches hold different numbers of tokens. With
several ranks the minibatch is the union of the ranks' k-th minibatches (DeepSpeed averages
their gradients at each step), and the token mean counts the tokens of all of them, so 2 ranks
give the gradient of 1 rank holding the same global minibatch. The
statistics (approx_kl, clipfrac, ratio, entropy, value clipfrac) are token-weighted over the
update, so they do not depend on the split either.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from lora_ppo.generation.folded import sampler_agrees
from lora_ppo.ppo.rollout import Rollout
from lora_ppo.rl.losses import entropy_loss, kl_loss, loss_normalizers, policy_loss, value_loss
from lora_ppo.rl.masked import masked_sum
from lora_ppo.rl.sampler_correction import sampler_weights
from lora_ppo.runtime.dist import all_sum, world_size

# Token-weighted statistics, summed as stat * tokens over micro-batches (see MicroStats).
_WEIGHTED = ("entropy", "approx_kl", "clipfrac", "value_clipfrac", "ratio")
_NAN = float("nan")


class PPOStats(NamedTuple):
    """Token means over the whole update (losses: means of the minibatch means). The value
    terms are None without a value function, `kl_loss` None unless the KL is in the loss."""

    policy_loss: float
    value_loss: Optional[float]
    kl_loss: Optional[float]
    entropy: float
    approx_kl: float
    clipfrac: float
    value_clipfrac: Optional[float]
    ratio: float
    epochs: int  # epochs actually run (fewer when early_stop_kl stopped them)
    optimizer_steps: int


class MicroStats(NamedTuple):
    """One micro-batch: its losses as computed, its token count, and token sums of the rest
    (NaN for a term the algorithm does not have)."""

    policy_loss: float  # sum / normalizer (loss_normalizers): the mean over a minibatch's
    value_loss: float   # micro-batches is the minibatch's aggregated loss
    kl_loss: float
    tokens: float
    entropy: float      # the rest: sums over its tokens (mean * tokens)
    approx_kl: float
    clipfrac: float
    value_clipfrac: float
    ratio: float


def micro_batch_loss(engine, micro: Rollout, ppo, algorithm, normalizer: torch.Tensor, *,
                     temperature: float, chunk_rows: int, kl_coef: float
                     ) -> tuple[torch.Tensor, MicroStats]:
    """Forward one micro-batch through the engine; its loss and statistics.

    `normalizer` (B,) is this micro-batch's slice of the minibatch's loss normalizers
    (rl/losses.py::loss_normalizers, already divided by the accumulation steps).
    """
    # Entropy is a metric unless ent_coef > 0: then no backward runs through it.
    logprobs, entropy, values = engine(
        micro.query_ids, micro.query_mask, micro.response_ids, micro.response_mask,
        temperature=temperature, chunk_size=chunk_rows, with_entropy=True,
        entropy_grad=ppo.ent_coef > 0)
    mask = loss_mask(micro, ppo.mask_truncated_completions)
    pl = policy_loss(logprobs, micro.logprobs, micro.advantages, mask, ppo.cliprange, normalizer,
                     ppo.cliprange_high, ppo.importance_sampling_level,
                     sampler_correction(engine.module, micro, ppo))
    # PPO objective (Schulman et al. 2017 eq. 9): L_clip - c1 L_vf + c2 S, as a loss to minimise;
    # GRPO adds beta * KL to the reference (Shao et al. 2024, eq. 3) when the KL is in the loss.
    loss = pl.loss
    if ppo.ent_coef:
        loss = loss + ppo.ent_coef * entropy_loss(entropy, mask, normalizer)
    zero = torch.zeros((), device=mask.device)
    v_loss, v_clip, kl_term = zero + _NAN, zero + _NAN, zero + _NAN
    if values is not None:
        vl = value_loss(values, micro.values, micro.returns, mask, ppo.cliprange_value,
                        normalizer)
        loss = loss + ppo.vf_coef * vl.loss
        v_loss, v_clip = vl.loss.detach(), vl.clipfrac
    if algorithm.kl_in == "loss" and micro.ref_logprobs is not None:
        kl_term = kl_loss(logprobs, micro.ref_logprobs, mask, algorithm.kl_estimator, normalizer)
        loss = loss + kl_coef * kl_term
        kl_term = kl_term.detach()
    n = mask.sum()
    stats = torch.stack([  # one device-to-host copy for all of them
        pl.loss.detach(), v_loss, kl_term, n, masked_sum(entropy.detach(), mask),
        pl.approx_kl * n, pl.clipfrac * n, v_clip * n, pl.ratio_mean * n]).float()
    return loss, MicroStats(*stats.tolist())


def sampler_correction(ac, ro: Rollout, ppo) -> Optional[torch.Tensor]:
    """(B, R) importance weights pi_old / pi_sampler of `ro`'s tokens (ppo.sampler_importance_
    sampling_*; rl/sampler_correction.py), or None where none apply: the correction is off, the
    rollout has no sampler log-probs, or the sampler's distribution is the scored one (an fp32
    policy without autocast: its log-probs are the old log-probs, every weight 1)."""
    if (not ppo.sampler_importance_sampling_correction or ro.sampler_logprobs is None
            or sampler_agrees(ac)):
        return None
    return sampler_weights(ro.logprobs, ro.sampler_logprobs, ro.action_mask,
                           ppo.sampler_importance_sampling_mode,
                           ppo.sampler_importance_sampling_clip_max,
                           ppo.sampler_importance_sampling_clip_min)


def loss_mask(ro: Rollout, mask_truncated: bool) -> torch.Tensor:
    """(B, R): the response tokens that enter the losses and their normalisers: every one, or
    with ppo.mask_truncated_completions only those of responses that ended with EOS (DAPO's
    overlong filtering, Yu et al. 2025 §3.4; TRL's mask_truncated_completions). The forward still
    sees every token."""
    if not mask_truncated:
        return ro.action_mask
    return ro.action_mask * ro.has_eos[:, None].to(ro.response_mask.dtype)


def _token_mean(stats: list[MicroStats], key: str) -> float:
    return sum(getattr(s, key) for s in stats) / max(sum(s.tokens for s in stats), 1.0)


def _or_none(x: float) -> Optional[float]:
    return None if math.isnan(x) else x


def minibatches(n: int, size: int, lengths: torch.Tensor, generator: torch.Generator,
                group: int = 1) -> list[torch.Tensor]:
    """One epoch's minibatches of `size` sample indices, shuffled by `generator`.

    Within a minibatch the samples are ordered by length (descending), so the micro-batches cut
    from it pack (or pad) tightly; the minibatch's gradient is the same sum whatever its order.
    `group` > 1 (a shared-prompt layout, `size` a multiple of it): whole groups of `group`
    consecutive samples are shuffled and ordered by their total length, members kept together,
    so a micro-batch holds whole groups whose prompt one packed row encodes once.
    """
    device = lengths.device
    if group == 1:
        perm = torch.randperm(n, generator=generator).to(device)
        return [idx[lengths[idx].argsort(descending=True, stable=True)]
                for idx in perm.split(size)]
    members = torch.arange(n, device=device).view(-1, group)
    totals = lengths.view(-1, group).sum(1)
    perm = torch.randperm(n // group, generator=generator).to(device)
    return [members[g[totals[g].argsort(descending=True, stable=True)]].reshape(-1)
            for g in perm.split(size // group)]


def ppo_update(engine, ac, rollout: Rollout, *, ppo, algorithm, temperature: float,
               max_new_tokens: int, chunk_rows: int, generator: torch.Generator,
               kl_coef: float) -> PPOStats:
    """Run the PPO epochs over `rollout` (advantages, and returns with a value function,
    already filled). `ppo`: the config's PPOConfig; `algorithm`: its resolved Algorithm;
    `temperature` and `max_new_tokens` of the rollout; `chunk_rows`: rows of logits per chunk;
    `generator`: the minibatch shuffle's; `kl_coef` weighs the KL loss term when the KL is in
    the loss (algorithm.kl_in)."""
    n, mb_size, micro_size = len(rollout), ppo.minibatch_size, ppo.micro_batch_size
    accum = mb_size // micro_size
    ac.train()  # dropout is off (build_actor_critic); train mode enables checkpointing
    all_stats: list[MicroStats] = []
    epochs_run, steps = 0, 0
    lengths = rollout.query_mask.sum(1) + rollout.response_mask.sum(1)  # each sample's tokens
    in_loss = loss_mask(rollout, ppo.mask_truncated_completions)
    world = world_size()
    group = algorithm.group_size if ac.layout.group and mb_size % algorithm.group_size == 0 else 1
    for _ in range(ppo.epochs):
        epoch_stats: list[MicroStats] = []
        batches = minibatches(n, mb_size, lengths, generator, group)
        # The token count of each minibatch over all ranks, for the global token mean: one
        # all-reduce per epoch for all its minibatches (rl/losses.py::loss_normalizers).
        global_tokens = all_sum([in_loss[idx].sum().item() for idx in batches])
        for mb_idx, mb_tokens in zip(batches, global_tokens):
            mb_norms = loss_normalizers(in_loss[mb_idx], algorithm.loss_aggregation, accum,
                                        max_new_tokens, mb_tokens, world)
            for m in range(0, mb_size, micro_size):
                micro = rollout.index(mb_idx[m:m + micro_size])
                loss, stats = micro_batch_loss(
                    engine, micro, ppo, algorithm, mb_norms[m:m + micro_size],
                    temperature=temperature, chunk_rows=chunk_rows, kl_coef=kl_coef)
                engine.backward(loss)
                engine.step()  # an optimizer step only at the accumulation boundary
                epoch_stats.append(stats)
            steps += 1
        epochs_run += 1
        all_stats += epoch_stats
        if ppo.early_stop_kl is not None:
            # Early stop on the approximate KL to the rollout policy (Spinning Up PPO,
            # `target_kl`), token-weighted over every rank: each rank must take the same
            # decision, or they enter different collectives.
            kl_sum, tokens = all_sum([sum(s.approx_kl for s in epoch_stats),
                                      sum(s.tokens for s in epoch_stats)])
            if kl_sum / max(tokens, 1.0) > ppo.early_stop_kl:
                break
    # Every minibatch has `accum` micro-batches, so the plain mean of the micro-batch losses is
    # the mean over minibatches of their aggregated losses.
    def mean(key: str) -> float:
        return sum(getattr(s, key) for s in all_stats) / len(all_stats)

    weighted = {k: _token_mean(all_stats, k) for k in _WEIGHTED}
    weighted["value_clipfrac"] = _or_none(weighted["value_clipfrac"])
    return PPOStats(policy_loss=mean("policy_loss"), value_loss=_or_none(mean("value_loss")),
                    kl_loss=_or_none(mean("kl_loss")), **weighted, epochs=epochs_run,
                    optimizer_steps=steps)
