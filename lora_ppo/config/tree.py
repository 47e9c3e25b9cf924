"""The root of the one typed config tree for every command, and its cross-field checks.

Each section is a dataclass (sections.py and run_sections.py for `train`, stages.py for `sft`
and `train-reward`); the string under each field is its documentation (read by
`reference.field_docs`, so docs/config.md is generated from the code and cannot drift).
Defaults suit a 7B model in 4-bit on one 24 GB GPU; `precision: auto` and `compute_dtype: auto`
pick fp32 on a CPU, where bf16 matmul is some 400x slower.

Impossible combinations of fields fail in `Config.__post_init__`; per-field types and ranges are
checked while loading (load.py, strict in the litgpt manner). Either way the error is one line
that names the field, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from lora_ppo.config.run_sections import (
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    LoggingConfig,
)
from lora_ppo.config.sections import (
    LoraConfig,
    ModelConfig,
    PPOConfig,
    QuantizationConfig,
    RewardConfig,
    RolloutConfig,
    ValueConfig,
)
from lora_ppo.config.stages import RewardModelConfig, SFTConfig
from lora_ppo.errors import UserError


class Algorithm(NamedTuple):
    """The PPO variant a config asks for, with every `auto` resolved (Config.algorithm)."""

    estimator: str         # gae, grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline
    value_mode: str        # shared, adapter, none
    kl_in: str             # reward, loss
    kl_estimator: str      # k1, k2, k3
    loss_aggregation: str  # token_mean, seq_mean_token_mean, constant
    group_size: int        # samples per prompt
    uses_reference: bool   # False with kl_coef 0 (not adaptive): no reference forward at all
    scale_rewards: str     # group, batch, none: grpo's divisor (none for the other estimators)


# the estimators whose papers put the KL in the loss (REINFORCE++-baseline: Hu et al. 2025 v2)
_LOSS_KL = ("grpo", "dr_grpo", "reinforce_pp_baseline")
_AGGREGATION = {"grpo": "seq_mean_token_mean", "dr_grpo": "constant"}  # else token_mean


@dataclass
class Config:
    output_dir: str = "outputs/run"
    """Where metrics, logs and checkpoints go."""
    seed: int = 0
    """Seed of python, numpy, torch and sampling."""
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    value: ValueConfig = field(default_factory=ValueConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)

    def __post_init__(self) -> None:
        # Only cross-field checks here; per-field checks run in `_build` with the field's path.
        if self.ppo.minibatch_size % self.ppo.micro_batch_size:
            raise UserError(
                f"ppo.minibatch_size={self.ppo.minibatch_size} is not a multiple of "
                f"ppo.micro_batch_size={self.ppo.micro_batch_size}: gradient accumulation must end "
                "on minibatch edges; make it a multiple"
            )
        n = self.rollout.samples_per_prompt
        samples = self.rollout.prompts_per_update * n
        if samples % self.ppo.minibatch_size:
            what = f"rollout.prompts_per_update={self.rollout.prompts_per_update}" + (
                f" x rollout.samples_per_prompt={n} = {samples} samples" if n > 1 else "")
            raise UserError(f"{what} is not a multiple of ppo.minibatch_size="
                            f"{self.ppo.minibatch_size}: every minibatch must be full; make it a "
                            "multiple")
        for name, off in (("top_k", 0), ("top_p", 1.0)):
            value = getattr(self.rollout, name)
            if value != off:
                raise UserError(
                    f"rollout.{name}={value} is not supported: PPO scores the full softmax at the "
                    "temperature, and a truncated policy's KL to the reference is infinite where "
                    f"their supports differ; remove it (rollout.{name}={off}) and use "
                    "rollout.temperature")
        if self.reward.source == "adapter" and not self.reward.adapter:
            raise UserError(
                "reward.source=adapter needs reward.adapter=<dir of a reward adapter>; set it or use "
                "reward.source=function"
            )
        if self.data.eval_every and self.data.eval_size < 1:
            raise UserError(f"data.eval_size={self.data.eval_size} must be >= 1 when "
                            f"data.eval_every={self.data.eval_every}")
        self._check_reward_sources()
        self._check_stages()
        self._check_algorithm()

    @property
    def algorithm(self) -> Algorithm:
        p, estimator = self.ppo, self.ppo.advantage_estimator
        kl_in = p.kl_in if p.kl_in != "auto" else ("loss" if estimator in _LOSS_KL else "reward")
        return Algorithm(
            estimator=estimator,
            value_mode=(self.value.mode if self.value.mode != "auto"
                        else "shared" if estimator == "gae" else "none"),
            kl_in=kl_in,
            kl_estimator=(p.kl_estimator if p.kl_estimator != "auto"
                          else "k1" if kl_in == "reward"
                          else "k2" if estimator == "reinforce_pp_baseline" else "k3"),
            loss_aggregation=(p.loss_aggregation if p.loss_aggregation != "auto"
                              else _AGGREGATION.get(estimator, "token_mean")),
            group_size=self.rollout.samples_per_prompt,
            uses_reference=p.kl_coef > 0 or p.adaptive_kl,
            scale_rewards=(p.scale_rewards if p.scale_rewards != "auto"
                           else "group" if estimator == "grpo" else "none"))

    def _check_algorithm(self) -> None:
        a, n = self.algorithm, self.rollout.samples_per_prompt
        if a.estimator == "gae" and a.value_mode == "none":
            raise UserError("value.mode=none leaves ppo.advantage_estimator=gae without the value "
                            "function GAE needs; use value.mode=shared or adapter, or a critic-free "
                            "estimator (grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline)")
        if a.estimator != "gae" and a.value_mode != "none":
            raise UserError(f"value.mode={a.value_mode} trains a value function that ppo."
                            f"advantage_estimator={a.estimator} never uses; leave value.mode out "
                            "(auto) or set it to none")
        if a.estimator in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline") and n < 2:
            raise UserError(f"ppo.advantage_estimator={a.estimator} compares the samples of a "
                            f"prompt, but rollout.samples_per_prompt={n}; set it to 2 or more "
                            "(GRPO papers use 4 to 64)")
        self._check_recipes()

    def _check_recipes(self) -> None:
        """The DAPO / GSPO / TRL-style options: each where its estimator defines it."""
        a, p, r = self.algorithm, self.ppo, self.rollout
        low, high = p.sampler_importance_sampling_clip_min, p.sampler_importance_sampling_clip_max
        if low is not None and high is not None and low >= high:
            raise UserError(f"ppo.sampler_importance_sampling_clip_min={low} must be below "
                            f"ppo.sampler_importance_sampling_clip_max={high}; lower it")
        if p.scale_rewards != "auto" and a.estimator != "grpo":
            raise UserError(f"ppo.scale_rewards={p.scale_rewards} applies to ppo.advantage_estimator"
                            f"=grpo only; {a.estimator} defines its own scaling: leave "
                            "ppo.scale_rewards out (auto)")
        if (a.estimator == "grpo" and a.kl_in == "reward" and a.uses_reference
                and a.scale_rewards != "none"):
            # Issue 20 item 9: a tied group's rewards differ only by the KL noise, and dividing
            # by their std blew that noise up to advantages of +-1.
            raise UserError(f"ppo.advantage_estimator=grpo with ppo.kl_in=reward divides each "
                            f"sample's KL penalty by its group's std (ppo.scale_rewards="
                            f"{a.scale_rewards}), near 0 when the scores tie (scores 1,1,1,1 gave "
                            "advantages up to +-1): use ppo.kl_in=loss, or ppo.advantage_estimator="
                            "dr_grpo or rloo (or ppo.scale_rewards=none)")
        if r.dynamic_sampling and r.samples_per_prompt < 2:
            raise UserError("rollout.dynamic_sampling=true drops groups of samples whose scores "
                            f"tie, but rollout.samples_per_prompt={r.samples_per_prompt}; set it "
                            "to 2 or more")
        if r.rollout_func and (r.environment or r.tools):
            other = "rollout.environment" if r.environment else "rollout.tools"
            raise UserError(f"rollout.rollout_func={r.rollout_func!r} and {other} are both set; "
                            "a rollout function runs its own tools: keep one")
        buffer = self.reward.overlong_buffer
        if buffer is not None and buffer >= r.max_new_tokens:
            raise UserError(f"reward.overlong_buffer={buffer} must be below rollout."
                            f"max_new_tokens={r.max_new_tokens}: the penalty starts "
                            "overlong_buffer tokens before the cap (DAPO: 4096 of 20480)")

    def _check_reward_sources(self) -> None:
        r = self.reward
        if r.sources and len(set(r.sources)) != len(r.sources):
            raise UserError(f"reward.sources={r.sources} names a source twice; list each once")
        if r.weights and len(r.weights) != len(r.sources):
            raise UserError(f"reward.weights has {len(r.weights)} entries but reward.sources has "
                            f"{len(r.sources)}; give one weight per source")
        if r.sources and r.source != "function" and r.source not in r.sources:
            raise UserError(f"reward.source={r.source} is not in reward.sources={r.sources}; "
                            "with reward.sources set, leave reward.source out")
        n = len(r.function) if isinstance(r.function, list) else 1
        if isinstance(r.function, list) and not r.function:
            raise UserError("reward.function=[] names no function; give 'module:function' or a "
                            "list of them")
        if r.function_weights and len(r.function_weights) != n:
            raise UserError(f"reward.function_weights has {len(r.function_weights)} entries but "
                            f"reward.function names {n} function(s); give one weight per function")
        if "adapter" in r.kinds and not r.adapter:
            raise UserError("reward source 'adapter' needs reward.adapter=<dir of a reward adapter>; "
                            "set it or drop the source")
        if "model" in r.kinds and not r.model:
            raise UserError("reward source 'model' needs reward.model=<dir of a sequence-"
                            "classification model>; set it or drop the source")

    def _check_stages(self) -> None:
        for name in ("sft", "reward_model"):
            t = getattr(self, name).train
            if t.batch_size % t.micro_batch_size:
                raise UserError(f"{name}.train.batch_size={t.batch_size} is not a multiple of "
                                f"{name}.train.micro_batch_size={t.micro_batch_size}; make it a "
                                "multiple")
            if t.max_length <= self.model.max_prompt_length:
                raise UserError(f"{name}.train.max_length={t.max_length} leaves no room for a "
                                f"response after model.max_prompt_length="
                                f"{self.model.max_prompt_length}; raise the first or lower the "
                                "second")
        if self.reward_model.margin_column and self.reward_model.margin:
            raise UserError(f"reward_model.margin={self.reward_model.margin} and reward_model."
                            f"margin_column={self.reward_model.margin_column} both set a margin; "
                            "keep one")

    @property
    def grad_accum_steps(self) -> int:
        return self.ppo.minibatch_size // self.ppo.micro_batch_size
