"""The PPO training loop: setup() (run.py) builds the parts, ppo_step() runs one update in numbered
steps, train() repeats it and logs, evaluates and checkpoints.

    step 1. rollout      sample responses, score log-probs, values, reference log-probs
    step 2. rewards      sequence scores from the reward source; -kl_coef * KL per token
    step 3. advantages   GAE over response tokens, whitened
    step 4. PPO epochs   clipped policy + value losses on the DeepSpeed engine
    step 5. KL control   adapt kl_coef to the observed KL
    step 6. log, evaluate, checkpoint
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple, Optional

import torch

from lora_ppo.config import Config
from lora_ppo.config.load import save_config
from lora_ppo.errors import Interrupted
from lora_ppo.io.metrics import MetricsLogger, PhaseClock
from lora_ppo.io.plot import plot_metrics
from lora_ppo.io.run_dir import clear, earlier_run
from lora_ppo.ppo import checkpoint as ckpt
from lora_ppo.ppo.collect import reward_scores, rollout_step, sample_episodes
from lora_ppo.ppo.dynamic import SamplingStats, sampling_metrics
from lora_ppo.ppo.metrics import (
    PPO_BAR,
    add_logged_metrics,
    log_completions,
    log_extras,
    sequence_kl,
    tool_row,
    update_metrics,
)
from lora_ppo.ppo.rollout import Rollout
from lora_ppo.ppo.run import Run, setup
from lora_ppo.ppo.update import PPOStats, ppo_update
from lora_ppo.rl.advantages import (
    group_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    token_advantages,
)
from lora_ppo.rl.gae import compute_gae
from lora_ppo.rl.masked import masked_whiten
from lora_ppo.rl.rewards import compute_rewards, overlong_penalty, shape_scores
from lora_ppo.runtime.dist import all_gather_cat, all_mean, all_sum_tensor
from lora_ppo.runtime.interrupt import StopSignal


class StepOutput(NamedTuple):
    """One update: the rollout it trained on (rewards and advantages filled), the update's
    statistics, DAPO's sampling statistics (None without dynamic sampling), the KL coefficient
    the rollout's rewards and losses used, the KL observed (None without a reference), and the
    seconds of each phase (generation, scoring, update)."""

    rollout: Rollout
    stats: PPOStats
    sampling: Optional[SamplingStats]
    kl_coef: float
    kl: Optional[float]
    seconds: dict[str, float]


def describe_stops(tokenizer, stop_ids: list[int]) -> str:
    """The run log's line naming the ids a response stops at."""
    names = ", ".join(f"{i} {tokenizer.convert_ids_to_tokens(i)!r}" for i in stop_ids)
    return f"responses stop at token ids: {names}"


def add_rewards(run: Run, ro: Rollout, raw_scores: torch.Tensor, kl_coef: float) -> Rollout:
    """Step 2: shape scores (overlong and EOS penalties, clip, running normalisation); per-token
    rewards are the score on the last real token and, when the KL lives in the reward,
    -kl_coef * KL_t."""
    reward, alg = run.cfg.reward, run.cfg.algorithm
    scores = raw_scores
    if reward.overlong_buffer is not None:  # DAPO's soft overlong punishment (eq. 13)
        scores = scores + overlong_of(run, ro)
    scores = shape_scores(scores, ro.has_eos, missing_eos_penalty=reward.missing_eos_penalty,
                          clip=reward.clip)
    if reward.normalize:
        # Every rank updates its moments with the scores of all ranks, so they stay identical.
        run.moments.update(all_gather_cat(scores))
        scores = run.moments.normalize(scores)
    # Without a reference forward (kl_coef 0) the KL is 0 by construction and is not logged.
    ref = ro.logprobs if ro.ref_logprobs is None else ro.ref_logprobs
    coef = kl_coef if alg.kl_in == "reward" else 0.0
    rewards, kl = compute_rewards(scores, ro.logprobs, ref, ro.action_mask, coef,
                                  alg.kl_estimator)
    return dataclasses.replace(ro, raw_scores=raw_scores, scores=scores, rewards=rewards,
                               kl=None if ro.ref_logprobs is None else kl)


def overlong_of(run: Run, ro: Rollout) -> torch.Tensor:
    """(B,) DAPO's soft overlong penalty of each response (0 below the buffer)."""
    reward = run.cfg.reward
    return overlong_penalty(ro.response_mask.sum(1), run.cfg.rollout.max_new_tokens,
                            reward.overlong_buffer, reward.overlong_penalty)


def add_advantages(run: Run, ro: Rollout) -> Rollout:
    """Step 3: the advantages of ppo.advantage_estimator (formulas and sources: docs/ppo.md).

    gae: GAE over the value function, whitened over the valid tokens of the whole rollout (all
    ranks);
    grpo, dr_grpo, rloo: each sequence's reward (its token rewards' sum) against its group's;
    reinforce_pp: the reward-to-go, whitened over the batch; reinforce_pp_baseline: the same
    after each score's group mean is taken off.
    """
    # Over the policy's tokens: an environment span is no time step (GAE bootstraps across it
    # at the next model token), no part of a reward-to-go's sum, no token of a group's mean.
    ppo, alg, mask = run.cfg.ppo, run.cfg.algorithm, ro.action_mask
    returns = None
    # Whitening takes its mean and std over the rollout of every rank (issue 20 item 8).
    if alg.estimator == "gae":
        advantages, returns = compute_gae(ro.rewards, ro.values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask, shift_mean=True, all_sum=all_sum_tensor)
    elif alg.estimator == "reinforce_pp":
        advantages = reinforce_pp_advantages(ro.rewards, mask, ppo.gamma, all_sum_tensor)
    elif alg.estimator == "reinforce_pp_baseline":
        advantages = reinforce_pp_baseline_advantages(ro.rewards, ro.scores, mask,
                                                      alg.group_size, ppo.gamma, all_sum_tensor)
    else:
        seq_rewards = (ro.rewards * mask).sum(1)  # the score, minus beta * KL if in the reward
        advantages = token_advantages(group_advantages(
            seq_rewards, alg.group_size, alg.estimator, alg.scale_rewards, all_sum_tensor), mask)
    return dataclasses.replace(ro, advantages=advantages, returns=returns)


def update(run: Run, ro: Rollout, kl_coef: float) -> PPOStats:
    """Step 4: the PPO epochs over `ro` on the engine."""
    rollout = run.cfg.rollout
    return ppo_update(run.engine, run.ac, ro, ppo=run.cfg.ppo, algorithm=run.cfg.algorithm,
                      temperature=rollout.temperature, max_new_tokens=rollout.max_new_tokens,
                      chunk_rows=run.chunk_rows, generator=run.generator, kl_coef=kl_coef)


def ppo_step(run: Run, on_phase: Optional[Callable[[str], None]] = None) -> StepOutput:
    """One PPO update, steps 1-5; `on_phase(name)` is called as generation, scoring and the
    update start (the progress bar; a benchmark's meters)."""
    clock = PhaseClock(on_phase)
    kl_coef = run.kl_ctl.value  # this update's: the controller moves only at step 5
    # step 1. rollout: this rank's share of the prompts, each n times in a row (a group, never
    # split across ranks), sampled and scored (more rounds: rollout.dynamic_sampling)
    ro, raw_scores, sampling = rollout_step(run, clock)
    with clock.phase("scoring"):
        # step 2. rewards: score on the last real token, -kl_coef * KL on every token
        ro = add_rewards(run, ro, raw_scores, kl_coef)
        # step 3. advantages
        ro = add_advantages(run, ro)
    # step 4. PPO epochs on the engine
    with clock.phase("update"):
        stats = update(run, ro, kl_coef)
    bs, n, world = run.cfg.rollout.prompts_per_update, run.cfg.rollout.samples_per_prompt, \
        run.dist.world_size
    run.step += 1
    run.episode += n * (bs * world if sampling is None else int(sampling.groups))
    # step 5. KL controller, with the KL observed before this update (Ziegler et al. 2019)
    kl = sequence_kl(ro)
    run.kl_ctl.update(kl, bs * world * n)
    return StepOutput(ro, stats, sampling, kl_coef, kl, clock.seconds)


def evaluate(run: Run, logger: MetricsLogger) -> dict:
    """Greedy and sampled responses to the held-out prompts, with their mean scores (sampling
    and the reward source only: no log-probs, values or reference are needed for it)."""
    out, n = {}, run.cfg.logging.num_samples
    custom = run.agents.rollout_func is not None  # its own sampling: no greedy mode
    prompts = ([p for p in run.eval_prompts for _ in range(run.cfg.rollout.samples_per_prompt)]
               if custom else run.eval_prompts)
    for mode in ("sampled",) if custom else ("greedy", "sampled"):
        episodes = sample_episodes(run, prompts, greedy=(mode == "greedy"))
        scores, completions = reward_scores(run, prompts, episodes.samples, episodes)
        out[f"eval/score_{mode}"] = all_mean([scores.mean().item()])[0]
        conv = episodes.conversations
        if conv is None:
            lines = [f"{p.text!r} -> {c!r} (score {s:.3f})" for p, c, s in
                     zip(prompts[:n], completions[:n], scores.tolist())]
        else:  # each conversation, its tool calls and results, then its score
            lines = [f"{conv.show(i)}\n(score {s:.3f})" for i, s in enumerate(scores[:n].tolist())]
            out.update(tool_row(conv.metric_sums(), f"eval/{mode}/"))
        logger.text(f"eval/{mode}", lines, run.step)
    log_extras(run, logger, run.step, "eval/")  # what the reward function logged meanwhile
    return add_logged_metrics(run, out, "eval/")


def train(cfg: Config, resume: Optional[str] = None, overwrite: bool = False, *,
          dataset=None, eval_dataset=None, reward_fn: Optional[Callable] = None) -> Run:
    """Run PPO and return the finished run. `resume`: "latest" or a checkpoint path;
    `overwrite`: replace an earlier run in output_dir (else it is refused, io/run_dir.py).
    `dataset`, `eval_dataset`, `reward_fn`: in-memory data and a callable (or a list) in place
    of what the config names (ppo/run.py::setup). At SIGINT or SIGTERM it stops after the
    current update with a checkpoint and raises errors.Interrupted (runtime/interrupt.py)."""
    # Check the output_dir and find the checkpoint before loading anything, so a bad --resume
    # or a used output_dir fails at once, and nothing is written before every check passed.
    start = earlier_run(cfg.output_dir, "train", resume, overwrite, cfg.output_dir)
    run = setup(cfg, dataset=dataset, eval_dataset=eval_dataset, reward_fn=reward_fn)
    rank0 = run.dist.rank == 0
    if start.checkpoint is not None:
        ckpt.load(run, start.checkpoint)  # refuses a checkpoint this config cannot continue
    if rank0:
        clear(start.replaces)
        run.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.output_dir / "config.yaml")
        if start.checkpoint is not None:
            print(f"resumed from {start.checkpoint} at update {run.step}", flush=True)
        elif start.note:
            print(start.note, flush=True)
        print(describe_stops(run.tokenizer, run.stop_ids), flush=True)
    logger = MetricsLogger(run.output_dir, cfg, cfg.ppo.total_updates, run.step, enabled=rank0,
                           bar_keys=PPO_BAR)
    logger.truncate_after(run.step)
    if cfg.data.eval_every and run.step == 0:
        evaluate(run, logger)  # samples before training, to compare with later evaluations
    with StopSignal() as stop:  # Ctrl-C / SIGTERM: stop after the update, with a checkpoint
        while run.step < cfg.ppo.total_updates:
            out = ppo_step(run, on_phase=logger.phase)  # the bar shows the phase it is in
            # step 6. log, evaluate, checkpoint
            row = update_metrics(run, out.rollout, out.stats, out.kl_coef, out.seconds)
            log_extras(run, logger, run.step)
            if cfg.logging.completions_every and run.step % cfg.logging.completions_every == 0:
                log_completions(run, logger, out.rollout)
            row.update(sampling_metrics(out.sampling,
                                        cfg.rollout.prompts_per_update * run.dist.world_size,
                                        cfg.rollout.samples_per_prompt))
            if cfg.data.eval_every and run.step % cfg.data.eval_every == 0:
                row.update(evaluate(run, logger))
            logger.log(row)
            last = run.step == cfg.ppo.total_updates
            saved = None
            if last or (cfg.checkpoint.every and run.step % cfg.checkpoint.every == 0):
                saved = ckpt.save(run)
            signum = None if last else stop.requested()  # one all-reduce: every rank decides alike
            if signum:
                path = saved or ckpt.save(run)
                logger.close()
                raise Interrupted(signum, run.step, path)
    logger.close()
    if rank0 and logger.path.exists():
        plot_metrics(logger.path, run.output_dir / "metrics.png")
    return run
