"""The PPO update: `ppo.epochs` passes over a rollout in shuffled minibatches on a DeepSpeed engine.

Each minibatch is split into micro-batches. Every micro-batch's forward goes through the engine
(`engine(...)` runs `ActorCritic.forward`): under ZeRO-3 DeepSpeed advances its micro-step in
`engine.forward` (`DeepSpeedZeroOptimizer_Stage3.clear_backward_seen_flag`), and a forward that
bypasses it makes each micro-batch's gradient partition overwrite the previous one instead of
adding to it. `engine.backward` runs per micro-batch and `engine.step` after each, which
DeepSpeed turns into an optimizer step only at the accumulation boundary (the last micro-batch
of the minibatch, since gradient_accumulation_steps = minibatch_size / micro_batch_size).

Losses are token means over the whole minibatch, not per micro-batch: each micro-batch's token
sum is divided by (minibatch tokens / accumulation steps), and DeepSpeed divides by the
accumulation steps again in `engine.backward`, so micro 2 x accumulation 4 gives the gradient of
micro 8 x accumulation 1 exactly, even when micro-batches hold different numbers of tokens. The
statistics (approx_kl, clipfrac, ratio, entropy, value clipfrac) are token-weighted the same way,
so they do not depend on the split either.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lora_ppo.ppo.rollout import Rollout
from lora_ppo.rl.losses import entropy_loss, policy_loss, value_loss
from lora_ppo.rl.masked import masked_sum
from lora_ppo.runtime.dist import all_sum

# Token-weighted statistics, summed as stat * tokens over micro-batches (see MicroStats).
_WEIGHTED = ("entropy", "approx_kl", "clipfrac", "value_clipfrac", "ratio")


class PPOStats(NamedTuple):
    """Token means over the whole update (losses: means of the minibatch token means)."""

    policy_loss: float
    value_loss: float
    entropy: float
    approx_kl: float
    clipfrac: float
    value_clipfrac: float
    ratio: float
    epochs: int  # epochs actually run (fewer when early_stop_kl stopped them)
    optimizer_steps: int


class MicroStats(NamedTuple):
    """One micro-batch: its losses as computed, its token count, and token sums of the rest."""

    policy_loss: float  # token sum / (minibatch tokens / accum): the mean over a minibatch's
    value_loss: float   # micro-batches is the minibatch token mean
    tokens: float
    entropy: float      # the rest: sums over its tokens (mean * tokens)
    approx_kl: float
    clipfrac: float
    value_clipfrac: float
    ratio: float


def micro_batch_loss(engine, mb: Rollout, pc, rc, token_count: float
                     ) -> tuple[torch.Tensor, MicroStats]:
    """Forward one micro-batch through the engine; its loss and statistics.

    `token_count` is the minibatch's token count / accumulation steps (see the module doc).
    """
    logprobs, entropy, values = engine(
        mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask,
        temperature=rc.temperature, chunk_size=rc.logprob_chunk_size, with_entropy=True)
    mask = mb.response_mask
    pl = policy_loss(logprobs, mb.logprobs, mb.advantages, mask, pc.cliprange, token_count)
    vl = value_loss(values, mb.values, mb.returns, mask, pc.cliprange_value, token_count)
    ent = entropy_loss(entropy, mask, token_count)  # = -mean entropy over the minibatch
    # PPO objective (Schulman et al. 2017 eq. 9): L_clip - c1 L_vf + c2 S, as a loss to minimise.
    loss = pl.loss + pc.vf_coef * vl.loss + pc.ent_coef * ent
    n = mask.sum()
    stats = torch.stack([  # one device-to-host copy for all of them
        pl.loss.detach(), vl.loss.detach(), n, masked_sum(entropy.detach(), mask),
        pl.approx_kl * n, pl.clipfrac * n, vl.clipfrac * n, pl.ratio_mean * n]).float()
    return loss, MicroStats(*stats.tolist())


def _token_mean(stats: list[MicroStats], key: str) -> float:
    return sum(getattr(s, key) for s in stats) / max(sum(s.tokens for s in stats), 1.0)


def ppo_update(engine, ac, rollout: Rollout, cfg, generator: torch.Generator) -> PPOStats:
    """Run the PPO epochs over `rollout` (advantages and returns already filled)."""
    pc, rc = cfg.ppo, cfg.rollout
    n, mb_size, micro = len(rollout), pc.minibatch_size, pc.micro_batch_size
    accum = mb_size // micro
    ac.train()  # dropout is off (build_actor_critic); train mode enables checkpointing
    all_stats: list[MicroStats] = []
    epochs_run, steps = 0, 0
    for _ in range(pc.epochs):
        epoch_stats: list[MicroStats] = []
        perm = torch.randperm(n, generator=generator).to(rollout.query_ids.device)
        for start in range(0, n, mb_size):
            mb_idx = perm[start:start + mb_size]
            mb_tokens = rollout.response_mask[mb_idx].sum().clamp(min=1.0).item()
            for m in range(0, mb_size, micro):
                mb = rollout.index(mb_idx[m:m + micro])
                loss, stats = micro_batch_loss(engine, mb, pc, rc, mb_tokens / accum)
                engine.backward(loss)
                engine.step()  # an optimizer step only at the accumulation boundary
                epoch_stats.append(stats)
            steps += 1
        epochs_run += 1
        all_stats += epoch_stats
        if pc.early_stop_kl is not None:
            # Early stop on the approximate KL to the rollout policy (Spinning Up PPO,
            # `target_kl`), token-weighted over every rank: each rank must take the same
            # decision, or they enter different collectives.
            kl_sum, tokens = all_sum([sum(s.approx_kl for s in epoch_stats),
                                      sum(s.tokens for s in epoch_stats)])
            if kl_sum / max(tokens, 1.0) > pc.early_stop_kl:
                break
    # Every minibatch has `accum` micro-batches, so the plain mean of the micro-batch losses is
    # the mean over minibatches of their token means.
    return PPOStats(
        policy_loss=sum(s.policy_loss for s in all_stats) / len(all_stats),
        value_loss=sum(s.value_loss for s in all_stats) / len(all_stats),
        **{k: _token_mean(all_stats, k) for k in _WEIGHTED},
        epochs=epochs_run, optimizer_steps=steps)
