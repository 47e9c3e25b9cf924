"""A training run's parts, built once: `setup()` checks what is cheap to check first, loads the
one base, attaches the roles, decides the seams (modeling/seams.py) and wraps the trainable
weights in the DeepSpeed engine. The loop (loop.py) runs the steps on what it returns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_ppo.config import Config
from lora_ppo.io.data import PromptSampler, hold_out, load_prompts, render_prompt
from lora_ppo.modeling.actor_critic import ActorCritic, build_actor_critic, check_adapter_dir
from lora_ppo.modeling.loading import load_base_model, load_tokenizer, resolve_model_path
from lora_ppo.modeling.seams import seams_for
from lora_ppo.ppo.reward_sources import RewardSource, check_reward_sources, make_reward_source
from lora_ppo.ppo.rollout import stop_ids_of
from lora_ppo.rl.kl import AdaptiveKLController, FixedKLController
from lora_ppo.rl.rewards import RunningMoments
from lora_ppo.runtime.dist import DistInfo, broadcast_object, seed_everything, setup_distributed
from lora_ppo.runtime.ds_config import autocast_dtype, run_ds_config
from lora_ppo.runtime.engine import create_engine


@dataclass
class Run:
    """Everything a training run holds; checkpointed by lora_ppo.io.checkpoint."""

    cfg: Config
    dist: DistInfo
    tokenizer: object
    ac: ActorCritic
    engine: object
    reward: RewardSource
    kl_ctl: object
    moments: RunningMoments
    sampler: PromptSampler
    eval_prompts: list[str]
    generator: torch.Generator  # minibatch shuffling
    output_dir: Path
    model_path: str
    stop_ids: list[int]         # the ids that end a response (rollout.py::stop_ids_of)
    step: int = 0
    episode: int = 0


def setup(cfg: Config) -> Run:
    """Build every part of a run; the cheap checks (model path, DeepSpeed config, reward
    function, prompts) come before the base model is loaded. Writes nothing."""
    model_path = resolve_model_path(cfg.model.path)  # fail on a bad path before anything starts
    dist = setup_distributed()
    seed_everything(cfg.seed + dist.rank)  # ranks sample different responses
    tokenizer = load_tokenizer(cfg.model, model_path)
    ds_config = run_ds_config(cfg, dist.world_size, dist.device, "ppo")
    if cfg.model.init_adapter:
        check_adapter_dir(cfg.model.init_adapter, "model.init_adapter")
    reward_fn = check_reward_sources(cfg)
    train_prompts, eval_prompts = read_prompts(cfg, tokenizer)
    base = load_base_model(cfg, model_path, dist.device)
    stop_ids = stop_ids_of(tokenizer, base.generation_config, cfg.rollout.stop_token_ids)
    ac = build_actor_critic(cfg, base)
    ac.autocast = autocast_dtype(ds_config)  # sampling and scoring run under it as the update
    # Every rank checks its own copy; all take rank 0's decisions, so they decode and lay out
    # batches alike.
    seams, checked = broadcast_object(seams_for(ac, cfg, tokenizer.pad_token_id, model_path))
    if seams.own_logits:
        ac.use_own_logits()
    ac.layout = seams.layout
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(
        cfg.rollout, continuous_batching=seams.continuous_batching,
        static_kv_cache=seams.static_kv_cache, merge_for_generation=seams.merge_for_generation))
    if dist.rank == 0:
        for line in (checked, *seams.notes):
            if line:
                print(line, flush=True)
    samples = cfg.rollout.batch_size * cfg.rollout.samples_per_prompt
    steps_per_update = cfg.ppo.epochs * samples // cfg.ppo.minibatch_size
    engine = create_engine(ac, ds_config=ds_config, optim=cfg.ppo.optim,
                           total_steps=cfg.ppo.total_updates * steps_per_update)
    kl_ctl = (AdaptiveKLController(cfg.ppo.kl_coef, cfg.ppo.target_kl, cfg.ppo.kl_horizon)
              if cfg.ppo.adaptive_kl else FixedKLController(cfg.ppo.kl_coef))
    return Run(cfg=cfg, dist=dist, tokenizer=tokenizer, ac=ac, engine=engine,
               reward=make_reward_source(cfg, ac, reward_fn), kl_ctl=kl_ctl,
               moments=RunningMoments(),
               sampler=PromptSampler(train_prompts, cfg.seed), eval_prompts=eval_prompts,
               generator=torch.Generator().manual_seed(cfg.seed),
               output_dir=Path(cfg.output_dir), model_path=model_path, stop_ids=stop_ids)


def read_prompts(cfg: Config, tokenizer) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts), rendered as the policy reads them (chat template)."""
    d = cfg.data

    def read(spec: str, field: str) -> list[str]:
        return [render_prompt(tokenizer, p, d.chat_template)
                for p in load_prompts(spec, d.prompt_column, field)]

    held = read(d.eval_prompts, "data.eval_prompts") if d.eval_prompts and d.eval_every else None
    return hold_out(read(d.prompts, "data.prompts"), held, d.eval_size if d.eval_every else 0,
                    cfg.seed, "data.eval_size")
