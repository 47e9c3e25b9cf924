"""The PPO update: `ppo.epochs` passes over a rollout in shuffled minibatches on a DeepSpeed engine.

Each minibatch is split into micro-batches; `engine.backward` runs per micro-batch and
`engine.step` at every micro-batch, which DeepSpeed turns into an optimizer step only at the
accumulation boundary (the last micro-batch of the minibatch, since
gradient_accumulation_steps = minibatch_size / micro_batch_size).

Losses are token means over the whole minibatch, not per micro-batch: each micro-batch's token
sum is divided by (minibatch tokens / accumulation steps), and DeepSpeed divides by the
accumulation steps again in `engine.backward`, so micro 2 x accumulation 4 gives the gradient of
micro 8 x accumulation 1 exactly, even when micro-batches hold different numbers of tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lora_ppo.rl.losses import entropy_loss, policy_loss, value_loss
from lora_ppo.rl.masked import masked_mean
from lora_ppo.rollout import Rollout, policy_outputs


class PPOStats(NamedTuple):
    """Means over every micro-batch of the update (token-weighted within each)."""

    policy_loss: float
    value_loss: float
    entropy: float
    approx_kl: float
    clipfrac: float
    value_clipfrac: float
    ratio: float
    epochs: int  # epochs actually run (fewer when early_stop_kl stopped them)
    optimizer_steps: int


def micro_batch_loss(engine, ac, mb: Rollout, pc, rc, token_count: float):
    """Forward one micro-batch under the policy (and critic); return loss and its stats."""
    logprobs, entropy, values = policy_outputs(
        ac, mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask,
        temperature=rc.temperature, chunk_size=rc.logprob_chunk_size, with_entropy=True)
    mask = mb.response_mask
    pl = policy_loss(logprobs, mb.logprobs, mb.advantages, mask, pc.cliprange, token_count)
    vl = value_loss(values, mb.values, mb.returns, mask, pc.cliprange_value, token_count)
    ent = entropy_loss(entropy, mask, token_count)  # = -mean entropy over the minibatch
    # PPO objective (Schulman et al. 2017 eq. 9): L_clip - c1 L_vf + c2 S, as a loss to minimise.
    loss = pl.loss + pc.vf_coef * vl.loss + pc.ent_coef * ent
    stats = torch.stack([
        pl.loss.detach(), vl.loss.detach(), masked_mean(entropy.detach(), mask),
        torch.as_tensor(pl.approx_kl), torch.as_tensor(pl.clipfrac), torch.as_tensor(vl.clipfrac),
        torch.as_tensor(pl.ratio_mean)]).float().cpu()
    return loss, stats


def ppo_update(engine, ac, rollout: Rollout, cfg, generator: torch.Generator) -> PPOStats:
    """Run the PPO epochs over `rollout` (advantages and returns already filled)."""
    pc, rc = cfg.ppo, cfg.rollout
    n, mb_size, micro = len(rollout), pc.minibatch_size, pc.micro_batch_size
    accum = mb_size // micro
    ac.train()  # dropout is off (loading.disable_dropout); train mode enables checkpointing
    all_stats: list[torch.Tensor] = []
    epochs_run, steps = 0, 0
    for _ in range(pc.epochs):
        epoch_stats = []
        perm = torch.randperm(n, generator=generator).to(rollout.query_ids.device)
        for start in range(0, n, mb_size):
            mb_idx = perm[start:start + mb_size]
            mb_tokens = rollout.response_mask[mb_idx].sum().clamp(min=1.0).item()
            for m in range(0, mb_size, micro):
                mb = rollout.index(mb_idx[m:m + micro])
                loss, stats = micro_batch_loss(engine, ac, mb, pc, rc, mb_tokens / accum)
                engine.backward(loss)
                engine.step()  # an optimizer step only at the accumulation boundary
                epoch_stats.append(stats)
            steps += 1
        epochs_run += 1
        all_stats += epoch_stats
        approx_kl = torch.stack(epoch_stats)[:, 3].mean().item()
        # Early stop on the approximate KL to the rollout policy (Spinning Up PPO, `target_kl`).
        if pc.early_stop_kl is not None and approx_kl > pc.early_stop_kl:
            break
    # Each micro-batch loss is accum * (its token sum / minibatch tokens), so their plain mean
    # is the minibatch token mean.
    s = torch.stack(all_stats).mean(0)
    return PPOStats(policy_loss=s[0].item(), value_loss=s[1].item(),
                    entropy=s[2].item(), approx_kl=s[3].item(), clipfrac=s[4].item(),
                    value_clipfrac=s[5].item(), ratio=s[6].item(), epochs=epochs_run,
                    optimizer_steps=steps)
