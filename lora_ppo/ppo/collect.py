"""Step 1 of the loop, the rollout: this rank's share of the next prompts, each n times in a row
(a group, never split across ranks), sampled by the generation engine, scored under the policy,
value function and reference (rollout.py) and by the reward source; with
rollout.dynamic_sampling, as many rounds as it takes (dynamic.py). With tools or an environment
the responses are conversations, with rollout.rollout_func the function's (episodes.py).

    sample_episodes   the policy's responses to prompts (lora_ppo/generation), with their
                      conversations or a rollout function's fields
    generate_samples  the responses alone
    score_samples     old log-probs, values and reference log-probs (rollout.py)
    reward_scores     the reward source's raw sequence scores
    collect           the three, for one round of prompts
    rollout_step      one round, or DAPO's dynamic sampling over several
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from lora_ppo.generation.folded import decodes_in_fp32
from lora_ppo.generation.generate import generate
from lora_ppo.generation.samples import Samples
from lora_ppo.io.data import Prompt
from lora_ppo.io.metrics import PhaseClock
from lora_ppo.ppo.dynamic import SamplingStats, sample_until_full
from lora_ppo.ppo.episodes import Episodes, custom_rollout, tool_rollout
from lora_ppo.ppo.rollout import Rollout, logprobs_and_values
from lora_ppo.ppo.run import Run
from lora_ppo.runtime.dist import all_sum


def sampler_scores(run: Run, greedy: bool = False) -> bool:
    """Whether the sampler's own log-probs (and shared-head values) stand in for the policy's
    scoring forward: only where the two agree to fp32 round-off (docs/ppo.md, "Doing less work")."""
    return (run.cfg.rollout.sampler_logprobs and not greedy
            and run.ac.value_mode in ("shared", "none") and decodes_in_fp32(run.ac.peft_model))


def sample_episodes(run: Run, prompts: Sequence[Prompt], greedy: bool = False) -> Episodes:
    """The policy's responses to `prompts` (a group's prompt n times in a row): conversations
    with the run's tools and environment, or rollout.rollout_func's samples (episodes.py), or
    one response each. Under ZeRO-3 each layer's weights are gathered around its own forward,
    one layer at a time (the whole model never is: that is what ZeRO-3 is for), and every rank
    decodes the same number of steps (`run.synced`)."""
    if run.agents.rollout_func is not None:
        return custom_rollout(run, prompts)
    if run.agents.toolbox is not None:
        return tool_rollout(run, prompts, greedy, sampler_scores(run, greedy))
    return Episodes(generate(run.ac, [p.ids for p in prompts], run.cfg.rollout,
                             run.seams.decode, run.stop_ids, run.tokenizer.pad_token_id,
                             greedy=greedy, synced=run.synced, score=sampler_scores(run, greedy)))


def generate_samples(run: Run, prompts: Sequence[Prompt], greedy: bool = False) -> Samples:
    return sample_episodes(run, prompts, greedy).samples


def score_samples(run: Run, samples: Samples) -> Rollout:
    """Old log-probs, values and reference log-probs of the samples."""
    rollout = run.cfg.rollout
    return logprobs_and_values(run.ac, samples, temperature=rollout.temperature,
                               chunk_size=run.chunk_rows,
                               batch_size=run.cfg.ppo.micro_batch_size,
                               with_reference=run.cfg.algorithm.uses_reference)


def decode(tokenizer, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
            for row, m in zip(ids.cpu(), mask.cpu())]


def reward_scores(run: Run, prompts: Sequence[Prompt], samples: Samples | Rollout,
                  episodes: Optional[Episodes] = None) -> tuple[torch.Tensor, list[str]]:
    """Raw sequence scores (B,) from the reward source, and the decoded completions; needs only
    the token ids and masks (an evaluation scores samples without any forward of its own). A
    reward function gets each prompt with its row's columns (reward_functions.reward_kwargs); the
    samples' `episodes`: their conversations (completions as messages, the environments) or a
    rollout function's extra fields."""
    completions = decode(run.tokenizer, samples.response_ids, samples.response_mask)
    tensors = {"conversations": None if episodes is None else episodes.conversations,
               "columns": {} if episodes is None else dict(episodes.columns),
               "query_ids": samples.query_ids, "query_mask": samples.query_mask,
               "response_ids": samples.response_ids, "response_mask": samples.response_mask,
               "prompt_ids": [row[m.bool()].tolist() for row, m in
                              zip(samples.query_ids.cpu(), samples.query_mask.cpu())],
               "completion_ids": [row[m.bool()].tolist() for row, m in
                                  zip(samples.response_ids.cpu(), samples.response_mask.cpu())]}
    scores = run.reward(prompts, completions, tensors, trainer_state(run))
    return scores.to(samples.response_mask.device), completions


def trainer_state(run: Run):
    """TRL's `trainer_state` keyword for a reward function: transformers' TrainerState, with
    global_step the updates done so far, max_steps ppo.total_updates and epoch the passes over
    the training prompts so far (fractional), as a schedule on training progress reads them."""
    from transformers import TrainerState

    cycle, cfg = run.prompts, run.cfg
    return TrainerState(epoch=cycle.epoch + cycle.position / len(cycle.prompts),
                        global_step=run.step, max_steps=cfg.ppo.total_updates, logging_steps=1,
                        eval_steps=cfg.data.eval_every, save_steps=cfg.checkpoint.every,
                        is_local_process_zero=run.dist.local_rank == 0,
                        is_world_process_zero=run.dist.rank == 0)


def collect(run: Run, prompts: Sequence[Prompt], clock: Optional[PhaseClock] = None
            ) -> tuple[Rollout, torch.Tensor]:
    """The rollout of `prompts` and its raw scores: generation, then scoring (the forwards and
    the reward source), each timed by `clock`."""
    clock = clock or PhaseClock()
    with clock.phase("generation"):
        episodes = sample_episodes(run, prompts)
    with clock.phase("scoring"):
        ro = score_samples(run, episodes.samples)
        raw_scores, _ = reward_scores(run, prompts, ro, episodes)
    if episodes.conversations is not None:  # tools/* of the update (ppo/metrics.py)
        run.tool_counts.update(episodes.conversations.metric_sums())
    return ro, raw_scores


def next_prompts(run: Run) -> list[Prompt]:
    """This rank's share of the next rollout.prompts_per_update x world prompts, each
    rollout.samples_per_prompt times in a row (a group, never split across ranks)."""
    bs, n = run.cfg.rollout.prompts_per_update, run.cfg.rollout.samples_per_prompt
    mine = run.prompts.take(bs * run.dist.world_size)[run.dist.rank * bs:(run.dist.rank + 1) * bs]
    return [p for p in mine for _ in range(n)]


def rollout_step(run: Run, clock: PhaseClock
                 ) -> tuple[Rollout, torch.Tensor, Optional[SamplingStats]]:
    """Step 1: one round, or with rollout.dynamic_sampling as many as it takes for every group's
    scores to vary (ppo/dynamic.py, DAPO)."""
    rollout = run.cfg.rollout
    if not rollout.dynamic_sampling:
        return (*collect(run, next_prompts(run), clock), None)
    return sample_until_full(lambda: collect(run, next_prompts(run), clock), rollout.prompts_per_update,
                             rollout.samples_per_prompt, rollout.max_extra_rounds,
                             run.tokenizer.pad_token_id, all_sum)
