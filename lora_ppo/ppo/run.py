"""A training run's parts, built once: `setup()` checks what is cheap to check first, loads the
one base, attaches the roles, decides the seams (ppo/seams.py) and wraps the trainable weights in
the DeepSpeed engine. The loop (loop.py) runs the steps on what it returns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lora_ppo.agents.setup import Agents, setup_agents
from lora_ppo.config import Config
from lora_ppo.errors import UserError
from lora_ppo.generation.samples import stop_ids_of
from lora_ppo.io.data import (
    Prompt,
    PromptCycle,
    encode_rows,
    held_out_note,
    hold_out,
    load_prompts,
)
from lora_ppo.io.metrics import check_logging
from lora_ppo.modeling.actor_critic import ActorCritic, build_actor_critic, check_adapter_dir
from lora_ppo.modeling.loading import (
    load_base_model,
    load_tokenizer,
    quantization_mode,
    resolve_model_path,
)
from lora_ppo.ppo.reward_sources import (
    ENVIRONMENT_KEYWORDS,
    KEYWORDS,
    RewardSource,
    check_reward_sources,
    check_signature,
    make_reward_source,
    named_functions,
    with_environment,
)
from lora_ppo.ppo.seam_cache import seams_for
from lora_ppo.ppo.seams import Seams
from lora_ppo.rl.kl import AdaptiveKLController, FixedKLController
from lora_ppo.rl.logprobs import chunk_rows
from lora_ppo.rl.rewards import RunningMoments
from lora_ppo.runtime.dist import DistInfo, broadcast_object, seed_everything, setup_distributed
from lora_ppo.runtime.ds_config import autocast_dtype, run_ds_config, zero_stage
from lora_ppo.runtime.engine import create_engine


@dataclass
class Run:
    """Everything a training run holds; checkpointed by ppo/checkpoint.py."""

    cfg: Config                 # the run's config (resumed: the saved one, io/resume.py)
    dist: DistInfo
    tokenizer: object
    ac: ActorCritic
    engine: object
    reward: RewardSource
    kl_ctl: object
    moments: RunningMoments
    prompts: PromptCycle        # the training prompts, cycled in seeded passes
    eval_prompts: list[Prompt]
    generator: torch.Generator  # minibatch shuffling
    output_dir: Path
    model_path: str
    stop_ids: list[int]         # the ids that end a response (generation/samples.py)
    seams: Seams                # what setup decided for this model: layout, decode path
    chunk_rows: int             # rows of logits per chunk (model.logits_chunk_mib at this vocab)
    synced: bool                # ranks decode in lockstep (ZeRO-3 over several ranks)
    step: int = 0
    episode: int = 0
    agents: Agents = Agents(None, None)  # rollout.tools / environment / rollout_func, checked
    tool_counts: Counter = field(default_factory=Counter)  # the update's tool-call counts so far


def setup(cfg: Config, *, dataset=None, eval_dataset=None, reward_fn: Optional[Callable] = None,
          prompts: Optional[list[Prompt]] = None,
          on_base_loaded: Optional[Callable[[torch.nn.Module], None]] = None) -> Run:
    """Build every part of a run; the cheap checks (model path, DeepSpeed config, reward
    function, prompts) come before the base model is loaded. Writes nothing.

    In place of what the config names, from Python: `dataset` / `eval_dataset` (a
    datasets.Dataset or a list of dicts) for data.prompts / data.eval_prompts, `reward_fn` (a
    callable) for reward.function. `prompts`: the training prompts as token ids (a benchmark that
    feeds exact ids; no held-out prompts then). `on_base_loaded(base)`: called once the base
    model is loaded, before the adapters (a benchmark's memory meter)."""
    model_path = resolve_model_path(cfg.model.path)  # fail on a bad path before anything starts
    dist = setup_distributed()
    seed_everything(cfg.seed + dist.rank)  # ranks sample different responses
    tokenizer = load_tokenizer(cfg.model, model_path)
    quantization = quantization_mode(cfg.quantization, dist.device.type)
    ds_config = run_ds_config(cfg, dist.world_size, dist.device, "ppo", quantization != "none")
    if cfg.model.init_adapter:
        check_adapter_dir(cfg.model.init_adapter, "model.init_adapter")
    agents = setup_agents(cfg.rollout, tokenizer)
    env = agents.toolbox if agents.toolbox is not None and agents.toolbox.factory else None
    check_agents_fit(agents, dist.world_size, zero_stage(ds_config))
    # An environment's get_reward may be the only reward (TRL: reward_funcs may be empty then).
    env_only = (env is not None and env.has_reward and reward_fn is None
                and cfg.reward.kinds == ["function"] and not cfg.reward.function)
    reward_fn = None if env_only else check_reward_sources(cfg, reward_fn)
    check_logging(cfg.logging)
    train_prompts, eval_prompts = (prompts, []) if prompts is not None else read_prompts(
        cfg, tokenizer, dataset, eval_dataset)
    if env is not None and train_prompts:  # reset(**row) takes the row's columns
        env.check_columns([cfg.data.prompt_column, *train_prompts[0].columns])
    if reward_fn is not None:  # now that the columns it will be called with are known
        columns = prompt_columns(cfg, train_prompts, eval_prompts, dataset, eval_dataset)
        keywords = (*KEYWORDS, *(ENVIRONMENT_KEYWORDS if env is not None else ()))
        for name, fn in named_functions(cfg, reward_fn):
            check_signature(fn, name, columns, keywords, agents.rollout_func is not None)
    base = load_base_model(cfg, model_path, dist.device)
    if on_base_loaded is not None:
        on_base_loaded(base)
    stop_ids = stop_ids_of(tokenizer, base.generation_config, cfg.rollout.stop_token_ids)
    ac = build_actor_critic(cfg, base)
    ac.autocast = autocast_dtype(ds_config)  # sampling and scoring run under it as the update
    # Every rank checks its own copy; all take rank 0's decisions, so they decode and lay out
    # batches alike.
    seams, checked = broadcast_object(seams_for(ac, cfg, tokenizer.pad_token_id, model_path))
    if seams.own_logits:
        ac.use_own_logits()
    ac.layout = seams.layout
    if dist.rank == 0:
        for line in (checked, *seams.notes, *data_notes(cfg, train_prompts, eval_prompts,
                                                       eval_dataset, dist.world_size)):
            if line:
                print(line, flush=True)
    samples = cfg.rollout.prompts_per_update * cfg.rollout.samples_per_prompt
    steps_per_update = cfg.ppo.epochs * samples // cfg.ppo.minibatch_size
    engine = create_engine(ac, ds_config=ds_config, optim=cfg.ppo.optim,
                           total_steps=cfg.ppo.total_updates * steps_per_update)
    kl_ctl = (AdaptiveKLController(cfg.ppo.kl_coef, cfg.ppo.target_kl, cfg.ppo.kl_horizon)
              if cfg.ppo.adaptive_kl else FixedKLController(cfg.ppo.kl_coef))
    reward = None if env_only else make_reward_source(cfg, ac, reward_fn)
    if env is not None and env.has_reward:  # one more term, weight 1, as TRL adds it
        reward = with_environment(reward, env.env_name)
    return Run(cfg=cfg, dist=dist, tokenizer=tokenizer, ac=ac, engine=engine,
               reward=reward, kl_ctl=kl_ctl,
               moments=RunningMoments(), prompts=PromptCycle(train_prompts, cfg.seed),
               eval_prompts=eval_prompts, generator=torch.Generator().manual_seed(cfg.seed),
               output_dir=Path(cfg.output_dir), model_path=model_path, stop_ids=stop_ids,
               seams=seams, chunk_rows=chunk_rows(ac.vocab, cfg.model.logits_chunk_mib),
               synced=dist.world_size > 1 and zero_stage(engine.config) == 3, agents=agents)


def check_agents_fit(agents: Agents, world_size: int, stage: int) -> None:
    """Refuse what multi-turn rollouts cannot do yet: tools or an environment with ZeRO-3 over
    several ranks, where every rank must run the same forwards (each gathers the layers'
    weights) and each rank's conversations take turns of their own."""
    if agents.toolbox is not None and world_size > 1 and stage == 3:
        raise UserError(f"rollout.tools / rollout.environment with ZeRO-3 over {world_size} "
                        "ranks: multi-turn rollouts do not decode in lockstep yet; use ZeRO-2 "
                        "(ds_configs/zero2.json) or one rank")


def prompt_columns(cfg: Config, train: list[Prompt], held: list[Prompt], dataset=None,
                   eval_dataset=None) -> dict[str, list[str]]:
    """The columns a reward function is called with, by the dataset (as a message names it:
    the config field and its file, or the dataset in memory): the training prompts', and a
    separate evaluation set's."""
    def where(in_memory, field: str, spec) -> str:
        return (f"{field}={spec}" if in_memory is None
                else f"the {type(in_memory).__name__} in memory")

    out = {}
    if train:
        out[where(dataset, "data.prompts", cfg.data.prompts)] = list(train[0].columns)
    if held and (eval_dataset is not None or cfg.data.eval_prompts):
        out[where(eval_dataset, "data.eval_prompts", cfg.data.eval_prompts)] = list(held[0].columns)
    return out


def data_notes(cfg: Config, train: list[Prompt], held: list[Prompt], eval_dataset,
               world_size: int) -> list[str]:
    """What the run does with the prompts that a user may not expect: some held out for
    evaluation, or fewer than an update takes (each update then cycles through them)."""
    d = cfg.data
    separate = eval_dataset is not None or d.eval_prompts is not None
    notes = [held_out_note(len(train), len(held), separate, "data.prompts", "data.eval_size",
                           "data.eval_prompts")]
    need = cfg.rollout.prompts_per_update * world_size
    if train and len(train) < need:
        notes.append(f"data.prompts has {len(train)} training prompts, fewer than the {need} "
                     f"an update takes (rollout.prompts_per_update x {world_size} rank(s)): "
                     "every update goes through them more than once")
    return [n for n in notes if n]


def read_prompts(cfg: Config, tokenizer, dataset=None, eval_dataset=None
                 ) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, held-out prompts), rendered as the policy reads them (chat template)
    and encoded, each with its row's other columns; from the files the config names, or
    `dataset` / `eval_dataset` in memory."""
    d = cfg.data
    eval_spec = eval_dataset if eval_dataset is not None else d.eval_prompts
    held = (load_prompts(eval_spec, d.prompt_column, "data.eval_prompts")
            if eval_spec is not None and d.eval_every else None)
    train_spec = dataset if dataset is not None else d.prompts
    train, held = hold_out(load_prompts(train_spec, d.prompt_column, "data.prompts"), held,
                           d.eval_size if d.eval_every else 0, cfg.seed, "data.eval_size")
    n = cfg.model.max_prompt_length
    return (encode_rows(tokenizer, train, d.chat_template, n, "data.prompts"),
            encode_rows(tokenizer, held, d.chat_template, n, "data.eval_prompts"))
