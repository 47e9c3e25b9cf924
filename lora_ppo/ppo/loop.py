"""The PPO training loop: setup() (run.py) builds the parts, train() runs numbered steps.

    step 1. rollout      sample responses, score log-probs, values, reference log-probs
    step 2. rewards      sequence scores from the reward source; -kl_coef * KL per token
    step 3. advantages   GAE over response tokens, whitened
    step 4. PPO epochs   clipped policy + value losses on the DeepSpeed engine
    step 5. KL control   adapt kl_coef to the observed KL
    step 6. log, evaluate, checkpoint
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from lora_ppo.config import Config
from lora_ppo.config.load import save_config
from lora_ppo.io.data import encode_prompts
from lora_ppo.io.metrics import MetricsLogger, peak_memory_mib
from lora_ppo.io.run_dir import clear, earlier_run
from lora_ppo.modeling.generation import decodes_in_fp32
from lora_ppo.ppo.dynamic import SamplingStats, sample_until_full, sampling_metrics
from lora_ppo.ppo.rollout import Rollout, Samples, generate, logprobs_and_values
from lora_ppo.ppo.run import Run, setup
from lora_ppo.ppo.update import PPOStats, ppo_update, sampler_metrics
from lora_ppo.rl.advantages import (
    group_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    token_advantages,
    zero_std_groups,
)
from lora_ppo.rl.gae import compute_gae
from lora_ppo.rl.logprobs import chunk_rows
from lora_ppo.rl.losses import explained_variance
from lora_ppo.rl.masked import masked_mean, masked_whiten
from lora_ppo.rl.rewards import (
    compute_rewards,
    overlong_penalty,
    shape_scores,
)
from lora_ppo.runtime.dist import (
    all_gather_cat,
    all_mean,
    all_sum,
    all_sum_tensor,
)
from lora_ppo.runtime.ds_config import zero_stage

# The progress bar: the reward source's own score (before clipping and normalisation), the KL
# to the reference, the value loss.
PPO_BAR = (("objective/raw_scores", "score"), ("objective/kl", "kl"), ("loss/value", "vf"))


def describe_stops(tokenizer, stop_ids: list[int]) -> str:
    """The run log's line naming the ids a response stops at."""
    names = ", ".join(f"{i} {tokenizer.convert_ids_to_tokens(i)!r}" for i in stop_ids)
    return f"responses stop at token ids: {names}"


def decode(tokenizer, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
            for row, m in zip(ids.cpu(), mask.cpu())]


def sample_responses(run: Run, prompts: list[str], greedy: bool = False) -> Samples:
    """Step 1a: the policy's responses to prompt texts."""
    cfg = run.cfg
    prompt_ids = encode_prompts(run.tokenizer, prompts, cfg.data.chat_template,
                                cfg.model.max_prompt_length)
    return sample_ids(run, prompt_ids, greedy)


def sampler_scores(run: Run, greedy: bool = False) -> bool:
    """Whether the sampler's own log-probs (and shared-head values) stand in for the policy's
    scoring forward: only where the two agree to fp32 round-off (docs/ppo.md, "Doing less work")."""
    return (run.cfg.rollout.sampler_logprobs and not greedy
            and run.ac.value_mode in ("shared", "none") and decodes_in_fp32(run.ac.peft_model))


def sample_ids(run: Run, prompt_ids: list[list[int]], greedy: bool = False) -> Samples:
    """The policy's responses to prompts given as token ids. Under ZeRO-3 each layer's weights
    are gathered around its own forward, one layer at a time (the whole model never is: that is
    what ZeRO-3 is for), and every rank decodes the same number of steps."""
    synced = run.dist.world_size > 1 and zero_stage(run.engine.config) == 3
    return generate(run.ac, prompt_ids, run.cfg.rollout, run.stop_ids,
                    run.tokenizer.pad_token_id, greedy=greedy, synced=synced,
                    score=sampler_scores(run, greedy))


def rollout_of(run: Run, samples: Samples) -> Rollout:
    """Step 1b: old log-probs, values and reference log-probs of the samples."""
    rc = run.cfg.rollout
    return logprobs_and_values(run.ac, samples, temperature=rc.temperature,
                               chunk_size=chunk_rows(run.ac.vocab, rc.logits_chunk_mib),
                               batch_size=rc.generation_batch_size,
                               with_reference=run.cfg.algorithm.uses_reference)


def collect_rollout(run: Run, prompts: list[str], greedy: bool = False) -> Rollout:
    """Step 1: sample responses, then score their log-probs and values."""
    return rollout_of(run, sample_responses(run, prompts, greedy))


def compute_scores(run: Run, prompts: list[str], samples: Samples | Rollout
                   ) -> tuple[torch.Tensor, list[str]]:
    """Raw sequence scores (B,) from the reward source, and the decoded completions; needs only
    the token ids and masks (an evaluation scores samples without any forward of its own)."""
    completions = decode(run.tokenizer, samples.response_ids, samples.response_mask)
    tensors = {"query_ids": samples.query_ids, "query_mask": samples.query_mask,
               "response_ids": samples.response_ids, "response_mask": samples.response_mask,
               "prompt_ids": [row[m.bool()].tolist() for row, m in
                              zip(samples.query_ids.cpu(), samples.query_mask.cpu())],
               "completion_ids": [row[m.bool()].tolist() for row, m in
                                  zip(samples.response_ids.cpu(), samples.response_mask.cpu())]}
    scores = run.reward(prompts, completions, tensors)
    return scores.to(samples.response_mask.device), completions


def collect_round(run: Run) -> tuple[Rollout, torch.Tensor]:
    """One round of step 1: this rank's share of the next prompts, each n times in a row (a
    group, never split across ranks), sampled and scored; the rollout and its raw scores."""
    bs, n = run.cfg.rollout.batch_size, run.cfg.rollout.samples_per_prompt
    mine = run.sampler.take(bs * run.dist.world_size)[run.dist.rank * bs:(run.dist.rank + 1) * bs]
    prompts = [p for p in mine for _ in range(n)]
    ro = collect_rollout(run, prompts)
    raw_scores, _ = compute_scores(run, prompts, ro)
    return ro, raw_scores


def rollout_step(run: Run) -> tuple[Rollout, torch.Tensor, Optional[SamplingStats]]:
    """Step 1: one round, or with rollout.dynamic_sampling as many as it takes for every group's
    scores to vary (ppo/dynamic.py, DAPO)."""
    rc = run.cfg.rollout
    if not rc.dynamic_sampling:
        return (*collect_round(run), None)
    return sample_until_full(lambda: collect_round(run), rc.batch_size, rc.samples_per_prompt,
                             rc.max_extra_rounds, run.tokenizer.pad_token_id, all_sum)


def add_rewards(run: Run, ro: Rollout, raw_scores: torch.Tensor) -> Rollout:
    """Step 2: shape scores (overlong and EOS penalties, clip, running normalisation); per-token
    rewards are the score on the last real token and, when the KL lives in the reward,
    -kl_coef * KL_t."""
    rc, alg = run.cfg.reward, run.cfg.algorithm
    scores = raw_scores
    if rc.overlong_buffer is not None:  # DAPO's soft overlong punishment (eq. 13)
        scores = scores + overlong_of(run, ro)
    scores = shape_scores(scores, ro.has_eos, missing_eos_penalty=rc.missing_eos_penalty,
                          clip=rc.clip)
    if rc.normalize:
        # Every rank updates its moments with the scores of all ranks, so they stay identical.
        run.moments.update(all_gather_cat(scores))
        scores = run.moments.normalize(scores)
    ro.raw_scores, ro.scores = raw_scores, scores
    # Without a reference forward (kl_coef 0) the KL is 0 by construction and is not logged.
    ref = ro.logprobs if ro.ref_logprobs is None else ro.ref_logprobs
    coef = run.kl_ctl.value if alg.kl_in == "reward" else 0.0
    ro.rewards, kl = compute_rewards(scores, ro.logprobs, ref, ro.response_mask, coef,
                                     alg.kl_estimator)
    ro.kl = None if ro.ref_logprobs is None else kl
    return ro


def overlong_of(run: Run, ro: Rollout) -> torch.Tensor:
    """(B,) DAPO's soft overlong penalty of each response (0 below the buffer)."""
    rc = run.cfg.reward
    return overlong_penalty(ro.response_mask.sum(1), run.cfg.rollout.max_new_tokens,
                            rc.overlong_buffer, rc.overlong_penalty)


def add_advantages(run: Run, ro: Rollout) -> Rollout:
    """Step 3: the advantages of ppo.advantage_estimator (formulas and sources: docs/ppo.md).

    gae: GAE over the value function, whitened over the valid tokens of the whole rollout (all
    ranks);
    grpo, dr_grpo, rloo: each sequence's reward (its token rewards' sum) against its group's;
    reinforce_pp: the reward-to-go, whitened over the batch; reinforce_pp_baseline: the same
    after each score's group mean is taken off.
    """
    pc, alg, mask = run.cfg.ppo, run.cfg.algorithm, ro.response_mask
    # Whitening takes its mean and std over the rollout of every rank (issue 20 item 8).
    if alg.estimator == "gae":
        ro.advantages, ro.returns = compute_gae(ro.rewards, ro.values, mask, pc.gamma, pc.lam)
        if pc.whiten_advantages:
            ro.advantages = masked_whiten(ro.advantages, mask, shift_mean=True,
                                          all_sum=all_sum_tensor)
    elif alg.estimator == "reinforce_pp":
        ro.advantages = reinforce_pp_advantages(ro.rewards, mask, pc.gamma, all_sum_tensor)
    elif alg.estimator == "reinforce_pp_baseline":
        ro.advantages = reinforce_pp_baseline_advantages(ro.rewards, ro.scores, mask,
                                                         alg.group_size, pc.gamma, all_sum_tensor)
    else:
        seq_rewards = (ro.rewards * mask).sum(1)  # the score, minus beta * KL if in the reward
        ro.advantages = token_advantages(group_advantages(
            seq_rewards, alg.group_size, alg.estimator, alg.scale_rewards, all_sum_tensor), mask)
    return ro


def _mean_or_none(x: Optional[torch.Tensor], mask: torch.Tensor) -> Optional[float]:
    return None if x is None else masked_mean(x, mask).item()


def update_metrics(run: Run, ro: Rollout, stats: PPOStats, t_rollout: float, t_update: float
                   ) -> dict:
    """The row logged for one update; every formula is in docs/metrics.md. A metric that the
    algorithm does not have (values without a value function, KL without a reference) is None."""
    mask, alg = ro.response_mask, run.cfg.algorithm
    seq_kl = None if ro.kl is None else (ro.kl * mask).sum(1)
    kl_in_reward = seq_kl is not None and alg.kl_in == "reward"
    local = {
        "objective/kl": None if seq_kl is None else seq_kl.mean().item(),
        "objective/kl_coef": run.kl_ctl.value,
        "objective/entropy": (-ro.logprobs * mask).sum(1).mean().item(),
        "objective/scores": ro.scores.mean().item(),
        "objective/raw_scores": ro.raw_scores.mean().item(),
        "objective/rlhf_reward": (ro.scores - run.kl_ctl.value * seq_kl).mean().item()
        if seq_kl is not None else ro.scores.mean().item(),
        "objective/non_score_reward": (-run.kl_ctl.value * seq_kl).mean().item()
        if kl_in_reward else None,
        "objective/frac_zero_std_groups": zero_std_groups(ro.scores, alg.group_size).float()
        .mean().item() if alg.group_size > 1 else None,
        "policy/approx_kl": stats.approx_kl, "policy/clipfrac": stats.clipfrac,
        "policy/entropy": stats.entropy, "policy/ratio": stats.ratio,
        "loss/policy": stats.policy_loss, "loss/value": stats.value_loss,
        "loss/kl": stats.kl_loss, "val/clipfrac": stats.value_clipfrac,
        "val/explained_variance": None if ro.values is None
        else explained_variance(ro.values, ro.returns, mask),
        "val/mean": _mean_or_none(ro.values, mask),
        "objective/overlong_penalty": None if run.cfg.reward.overlong_buffer is None
        else overlong_of(run, ro).mean().item(),
        "response/length": mask.sum(1).mean().item(),
        "response/eos_frac": ro.has_eos.float().mean().item(),
    }
    for kind, part in getattr(run.reward, "components", {}).items():  # several reward sources
        local[f"objective/score_{kind}"] = part.float().mean().item()
    names = list(local)
    nan = float("nan")  # None crosses the all-reduce as NaN and is logged as null
    row = dict(zip(names, all_mean([nan if local[k] is None else local[k] for k in names])))
    row.update(sampler_metrics(run.ac, ro, run.cfg.ppo))  # the sampled vs the scored policy
    tokens = (mask.sum() + ro.query_mask.sum()).item() * run.dist.world_size
    row.update({
        "step": run.step, "episode": run.episode, "lr": run.engine.get_lr()[0],
        "ppo/epochs": stats.epochs, "time/rollout_s": t_rollout, "time/update_s": t_update,
        "tokens_per_s": tokens / max(t_rollout + t_update, 1e-9),
        "memory/peak_mib": peak_memory_mib(run.dist.device),
    })
    return row


def evaluate(run: Run, logger: MetricsLogger) -> dict:
    """Greedy and sampled responses to the held-out prompts, with their mean scores (sampling
    and the reward source only: no log-probs, values or reference are needed for it)."""
    out = {}
    for mode in ("greedy", "sampled"):
        samples = sample_responses(run, run.eval_prompts, greedy=(mode == "greedy"))
        scores, completions = compute_scores(run, run.eval_prompts, samples)
        out[f"eval/score_{mode}"] = all_mean([scores.mean().item()])[0]
        n = run.cfg.logging.num_samples
        logger.text(f"eval/{mode}", [f"{p!r} -> {c!r} (score {s:.3f})" for p, c, s in
                                     zip(run.eval_prompts[:n], completions[:n], scores.tolist())],
                    run.step)
    return out


def train(cfg: Config, resume: Optional[str] = None, overwrite: bool = False) -> Run:
    """Run PPO and return the finished run. `resume`: "latest" or a checkpoint path;
    `overwrite`: replace an earlier run in output_dir (else it is refused, io/run_dir.py)."""
    from lora_ppo.io import checkpoint as ckpt
    from lora_ppo.io import resume as restore

    # Check the output_dir and find the checkpoint before loading anything, so a bad --resume
    # or a used output_dir fails at once, and nothing is written before every check passed.
    start = earlier_run(cfg.output_dir, "train", resume, overwrite, cfg.output_dir)
    run = setup(cfg)
    rank0 = run.dist.rank == 0
    if start.checkpoint is not None:
        restore.load(run, start.checkpoint)  # refuses a checkpoint this config cannot continue
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
    world, bs, n = run.dist.world_size, cfg.rollout.batch_size, cfg.rollout.samples_per_prompt
    while run.step < cfg.ppo.total_updates:
        # step 1. rollout: this rank's share of the prompts, each n times in a row (a group,
        # never split across ranks), sampled and scored (more rounds: rollout.dynamic_sampling)
        t0 = time.perf_counter()
        ro, raw_scores, sampling = rollout_step(run)
        t_rollout = time.perf_counter() - t0
        # step 2. rewards: score on the last real token, -kl_coef * KL on every token
        ro = add_rewards(run, ro, raw_scores)
        # step 3. advantages
        ro = add_advantages(run, ro)
        # step 4. PPO epochs on the engine
        t1 = time.perf_counter()
        stats = ppo_update(run.engine, run.ac, ro, cfg, run.generator, run.kl_ctl.value)
        t_update = time.perf_counter() - t1
        run.step += 1
        run.episode += n * (bs * world if sampling is None else int(sampling.groups))
        row = update_metrics(run, ro, stats, t_rollout, t_update)
        row.update(sampling_metrics(sampling, bs * world, n))
        # step 5. KL controller, with the KL observed before this update (Ziegler et al. 2019)
        run.kl_ctl.update(row["objective/kl"], bs * world * n)
        # step 6. log, evaluate, checkpoint
        if cfg.data.eval_every and run.step % cfg.data.eval_every == 0:
            row.update(evaluate(run, logger))
        logger.log(row)
        last = run.step == cfg.ppo.total_updates
        if last or (cfg.checkpoint.every and run.step % cfg.checkpoint.every == 0):
            ckpt.save(run)
    logger.close()
    if rank0 and logger.path.exists():
        from lora_ppo.io.plot import plot_metrics

        plot_metrics(logger.path, run.output_dir / "metrics.png")
    return run
