"""The row `lora-ppo train` logs for each update; every name and formula is in docs/metrics.md."""

from __future__ import annotations

from typing import Optional

import torch

from lora_ppo.agents import tool_metrics
from lora_ppo.io.metrics import MetricsLogger, peak_memory_mib
from lora_ppo.ppo.collect import decode
from lora_ppo.ppo.reward_sources import RewardError, function_source
from lora_ppo.ppo.rollout import Rollout
from lora_ppo.ppo.run import Run
from lora_ppo.ppo.update import PPOStats, sampler_correction
from lora_ppo.rl.advantages import zero_std_groups
from lora_ppo.rl.losses import explained_variance
from lora_ppo.rl.masked import masked_mean
from lora_ppo.rl.rewards import overlong_penalty
from lora_ppo.rl.sampler_correction import sampler_mismatch
from lora_ppo.runtime.dist import all_gather_cat, all_gather_objects, all_mean, all_sum

# The progress bar: the reward source's own score (before clipping and normalisation), the KL
# to the reference, the value loss.
PPO_BAR = (("objective/raw_scores", "score"), ("objective/kl", "kl"), ("loss/value", "vf"))


def sequence_kl(ro: Rollout) -> Optional[float]:
    """Mean over the rollout's responses (and ranks) of sum_t KL_t: what the adaptive KL
    controller steers (Ziegler et al. 2019) and `objective/kl` logs; None without a reference."""
    if ro.kl is None:
        return None
    return all_mean([(ro.kl * ro.action_mask).sum(1).mean().item()])[0]


def _mean_or_none(x: Optional[torch.Tensor], mask: torch.Tensor) -> Optional[float]:
    return None if x is None else masked_mean(x, mask).item()


def update_metrics(run: Run, ro: Rollout, stats: PPOStats, beta: float,
                   seconds: dict[str, float]) -> dict:
    """The row logged for one update: its rollout, the update's statistics, the KL coefficient
    `beta` the update used and the seconds of each phase. A metric that the algorithm does not
    have (values without a value function, KL without a reference) is None."""
    mask, alg, reward = ro.action_mask, run.cfg.algorithm, run.cfg.reward
    seq_kl = None if ro.kl is None else (ro.kl * mask).sum(1)
    kl_in_reward = seq_kl is not None and alg.kl_in == "reward"
    local = {
        "objective/kl": None if seq_kl is None else seq_kl.mean().item(),
        "objective/kl_coef": beta,
        "objective/entropy": (-ro.logprobs * mask).sum(1).mean().item(),
        "objective/scores": ro.scores.mean().item(),
        "objective/raw_scores": ro.raw_scores.mean().item(),
        "objective/rlhf_reward": (ro.scores - beta * seq_kl).mean().item()
        if seq_kl is not None else ro.scores.mean().item(),
        "objective/non_score_reward": (-beta * seq_kl).mean().item() if kl_in_reward else None,
        "objective/frac_zero_std_groups": zero_std_groups(ro.scores, alg.group_size).float()
        .mean().item() if alg.group_size > 1 else None,
        "policy/approx_kl": stats.approx_kl, "policy/clipfrac": stats.clipfrac,
        "policy/entropy": stats.entropy, "policy/ratio": stats.ratio,
        "loss/policy": stats.policy_loss, "loss/value": stats.value_loss,
        "loss/kl": stats.kl_loss, "val/clipfrac": stats.value_clipfrac,
        "val/explained_variance": None if ro.values is None
        else explained_variance(ro.values, ro.returns, mask),
        "val/mean": _mean_or_none(ro.values, mask),
        "objective/overlong_penalty": None if reward.overlong_buffer is None
        else overlong_penalty(ro.response_mask.sum(1), run.cfg.rollout.max_new_tokens,
                              reward.overlong_buffer, reward.overlong_penalty).mean().item(),
        "response/length": mask.sum(1).mean().item(),
        "response/eos_frac": ro.has_eos.float().mean().item(),
    }
    for kind, part in getattr(run.reward, "components", {}).items():  # several reward sources
        local[f"objective/score_{kind}"] = part.float().mean().item()
    for name, part in getattr(run.reward, "by_function", {}).items():  # several functions
        local[f"rewards/{name}/mean"] = part.float().mean().item()
    names = list(local)
    nan = float("nan")  # None crosses the all-reduce as NaN and is logged as null
    row = dict(zip(names, all_mean([nan if local[k] is None else local[k] for k in names])))
    row.update(sampler_metrics(run.ac, ro, run.cfg.ppo))  # the sampled vs the scored policy
    tokens = (ro.response_mask.sum() + ro.query_mask.sum()).item() * run.dist.world_size
    t_rollout = seconds.get("generation", 0.0) + seconds.get("scoring", 0.0)
    t_update = seconds.get("update", 0.0)
    row.update({
        "step": run.step, "episode": run.episode, "lr": run.engine.get_lr()[0],
        "ppo/epochs": stats.epochs, "time/rollout_s": t_rollout, "time/update_s": t_update,
        "time/generation_s": seconds.get("generation", 0.0),
        "time/scoring_s": seconds.get("scoring", 0.0),
        "tokens_per_s": tokens / max(t_rollout + t_update, 1e-9),
        "memory/peak_mib": peak_memory_mib(run.dist.device),
    })
    row.update(trl_names(ro, alg.group_size))
    row.update(tool_row(run.tool_counts) if run.agents.toolbox is not None else {})
    run.tool_counts.clear()
    return add_logged_metrics(run, row)


def trl_names(ro: Rollout, group_size: int) -> dict:
    """What TRL 1.16's GRPOTrainer logs under its own names, where the idea is the same
    (`_generate_and_score_completions`, `_calculate_rewards`): over the samples of every rank,
    `reward` the mean raw score (the weighted sum of the reward functions) and `reward_std` its
    standard deviation (Bessel-corrected, as TRL's nanstd), `frac_reward_zero_std` the share of
    groups whose raw scores are all equal, and the completions' lengths in tokens (the
    environment's included, as TRL counts them) with `clipped_ratio` the share cut by
    rollout.max_new_tokens (no stop id)."""
    raw = all_gather_cat(ro.raw_scores.float().cpu())
    lengths = all_gather_cat(ro.response_mask.sum(1).float().cpu())
    clipped = all_gather_cat((~ro.has_eos.bool()).float().cpu())
    return {"reward": raw.mean().item(),
            "reward_std": raw.std().item() if len(raw) > 1 else None,
            "frac_reward_zero_std": zero_std_groups(raw, group_size).float().mean().item()
            if group_size > 1 else None,
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": clipped.mean().item()}


def tool_row(counts: dict, prefix: str = "") -> dict:
    """tools/* (agents/conversations.py::tool_metrics) of this rank's conversations' counts
    (Conversations.metric_sums, summed over the update's rounds), summed over ranks first."""
    names = sorted(counts)
    total = dict(zip(names, all_sum([float(counts[k]) for k in names])))
    return {prefix + k: v for k, v in tool_metrics(total).items()} if names else {}


def add_logged_metrics(run: Run, row: dict, prefix: str = "") -> dict:
    """`row` with what the reward function passed to `log_metric` since the last row (TRL 1.16's
    callable): each name (`prefix` before it) the mean of its values over the calls and ranks,
    as TRL averages them per logging step. A name of lora_ppo's own row is refused."""
    fn = function_source(run.reward)
    if fn is None:
        return row
    logged = fn.log.take_metrics()
    names = sorted(set().union(*all_gather_objects(list(logged))))  # every rank, the same order
    if not names:
        return row
    clash = [n for n in names if prefix + n in row]
    if clash:
        raise RewardError(f"reward function {fn.name} passed {clash[0]!r} to log_metric, the name "
                          "of a metric lora_ppo logs itself; choose another name")
    sums = all_sum([x for n in names for x in (sum(logged.get(n, ())), len(logged.get(n, ())))])
    return {**row, **{prefix + n: total / count
                      for n, total, count in zip(names, sums[0::2], sums[1::2])}}


def log_extras(run: Run, logger: MetricsLogger, step: int, prefix: str = "") -> None:
    """What the reward function passed to `log_extra` since the last call (TRL 1.16's callable,
    which adds columns to TRL's completions table): the first logging.num_samples values of
    each column on this rank, printed above the progress bar and written to TensorBoard."""
    fn = function_source(run.reward)
    extra = fn.log.take_extra() if fn is not None else {}
    n = run.cfg.logging.num_samples
    lines = [f"{column}: " + ", ".join(repr(v) for v in values[:n])
             for column, values in extra.items()]
    if lines and n:
        logger.text(f"{prefix}reward/log_extra", lines, step)


SAMPLER_METRICS = ("rollout/sampler_kl", "sampling/sampling_logp_difference/mean",
                   "sampling/sampling_logp_difference/max", "sampling/importance_sampling_ratio/min",
                   "sampling/importance_sampling_ratio/mean", "sampling/importance_sampling_ratio/max")


def sampler_metrics(ac, ro: Rollout, ppo) -> dict:
    """The sampled distribution against the scored one over every rank's rollout (formulas in
    docs/metrics.md): the KL, TRL's log-prob differences, and TRL's importance-weight stats
    where the correction applies (per token, or per response at the sequence level)."""
    out = dict.fromkeys(SAMPLER_METRICS)
    if ro.sampler_logprobs is None:
        return out
    m = sampler_mismatch(ro.logprobs, ro.sampler_logprobs, ro.action_mask)
    w = sampler_correction(ac, ro, ppo)
    real = ro.action_mask > 0
    if w is not None and ppo.sampler_importance_sampling_mode.startswith("sequence"):
        w, real = w[:, :1], real.any(1, keepdim=True)  # one weight per response
    w = ro.response_mask.new_zeros(0) if w is None else w[real]
    kl, diff, tokens, w_sum, w_n = all_sum([m.kl, m.abs_diff, m.tokens, float(w.sum()),
                                            float(w.numel())])
    inf = float("inf")
    local = torch.tensor([m.max_abs_diff, float(w.max()) if w.numel() else -inf,
                          -float(w.min()) if w.numel() else -inf], device=ro.response_mask.device)
    top = all_gather_cat(local[None]).amax(0).tolist()  # maxima over ranks
    out.update({"rollout/sampler_kl": kl / max(tokens, 1.0),
                "sampling/sampling_logp_difference/mean": diff / max(tokens, 1.0),
                "sampling/sampling_logp_difference/max": top[0]})
    if w_n:
        out.update({"sampling/importance_sampling_ratio/min": -top[2],
                    "sampling/importance_sampling_ratio/mean": w_sum / w_n,
                    "sampling/importance_sampling_ratio/max": top[1]})
    return out


def log_completions(run: Run, logger: MetricsLogger, ro: Rollout) -> None:
    """The first logging.num_samples samples of the update's rollout on this rank, prompt ->
    completion (the environment's tokens included) and raw score, above the progress bar and
    in TensorBoard (TRL's log_completions)."""
    n = run.cfg.logging.num_samples
    if not n:
        return
    prompts = decode(run.tokenizer, ro.query_ids[:n], ro.query_mask[:n])
    completions = decode(run.tokenizer, ro.response_ids[:n], ro.response_mask[:n])
    logger.text("completions", [f"{p!r} -> {c!r} (score {s:.3f})" for p, c, s in
                                zip(prompts, completions, ro.raw_scores[:n].tolist())], run.step)
