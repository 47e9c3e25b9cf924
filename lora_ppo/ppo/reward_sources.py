"""Where sequence scores come from: a Python function, the reward adapter on the one base, a
separate sequence-classification model, or a weighted sum of several (reward.sources).

The reward functions themselves (TRL's convention, several summed, the checks) are in
ppo/reward_functions.py; here are the sources a run scores with and how they combine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional, Protocol

import torch

from lora_ppo.config import Config
from lora_ppo.errors import UserError, first_line
from lora_ppo.io.data import Prompt
from lora_ppo.modeling.actor_critic import ActorCritic, check_adapter_dir
from lora_ppo.modeling.heads import REWARD_HEAD_FILE
from lora_ppo.modeling.loading import resolve_compute_dtype
from lora_ppo.ppo.reward_functions import (
    FunctionReward,
    FunctionSum,
    RewardError,
    check_scores,
    function_name,
    load_function,
    named_functions,
)
from lora_ppo.rl.rewards import last_token_index


class RewardSource(Protocol):
    name: str

    def __call__(self, prompts: Sequence[Prompt], completions: list[str], rollout_tensors: dict,
                 state=None) -> torch.Tensor:
        """Scores (B,) float32 of the samples: their prompts, decoded completions, and token
        ids and masks; `state`: the trainer state a reward function gets."""


def function_source(source) -> Optional[FunctionReward | FunctionSum]:
    """The function source (FunctionReward, or FunctionSum for several functions) of a reward
    source, alone or in a weighted sum; None if it has none. Its `log` holds what the functions
    passed to log_metric and log_extra."""
    kinds = (FunctionReward, FunctionSum)
    if isinstance(source, kinds):
        return source
    return next((s for _, s, _ in getattr(source, "parts", ()) if isinstance(s, kinds)), None)


class EnvironmentReward:
    """The environment's `get_reward()` of each sample (rollout.environment), one more term with
    weight 1, as TRL 1.16 appends it to `reward_funcs`; logged as rewards/<its class name>/mean."""

    def __init__(self, env_name: str):
        self.name = env_name
        self.by_function: dict[str, torch.Tensor] = {}

    def __call__(self, prompts, completions, rollout_tensors, state=None) -> torch.Tensor:
        turns = rollout_tensors.get("conversations")
        values = None if turns is None else turns.env_rewards()
        if values is None:
            raise RewardError(f"environment {self.name}: these samples have no environment to "
                              "take get_reward() from")
        scores = check_scores(values, len(prompts), f"environment {self.name}")
        self.by_function = {self.name: scores}
        return scores


def with_environment(source: Optional[RewardSource], env_name: str) -> RewardSource:
    """`source` plus the environment's get_reward (weight 1), or the environment's alone."""
    env = EnvironmentReward(env_name)
    if source is None:
        return env
    kind = source.name if isinstance(source, (AdapterReward, ModelReward)) else "function"
    parts = source.parts if isinstance(source, WeightedReward) else [(kind, source, 1.0)]
    return WeightedReward([*parts, ("environment", env, 1.0)])


class AdapterReward:
    """The frozen reward adapter + score head of the one base, scored at the last real token."""

    name = "adapter"

    def __init__(self, ac: ActorCritic, generation_batch_size: int):
        self.ac, self.generation_batch_size = ac, generation_batch_size

    @torch.no_grad()
    def __call__(self, prompts, completions, rollout_tensors, state=None) -> torch.Tensor:
        q_ids, q_mask = rollout_tensors["query_ids"], rollout_tensors["query_mask"]
        r_ids, r_mask = rollout_tensors["response_ids"], rollout_tensors["response_mask"]
        was_training = self.ac.training
        self.ac.eval()
        scores = []
        try:
            for s in range(0, q_ids.shape[0], self.generation_batch_size):
                sl = slice(s, s + self.generation_batch_size)
                ids = torch.cat([q_ids[sl], r_ids[sl]], 1)
                mask = torch.cat([q_mask[sl], r_mask[sl].long()], 1)
                last = q_ids.shape[1] + last_token_index(r_mask[sl])
                scores.append(self.ac.reward_scores(ids, mask, last).float().cpu())
        finally:
            self.ac.train(was_training)
        return check_scores(torch.cat(scores).tolist(), len(prompts), "adapter")


# -- added with the SFT / reward-model stages: a separate reward model, weighted sums ---------------

class ModelReward:
    """A separate sequence-classification reward model (AutoModelForSequenceClassification).

    It reads text, not the policy's token ids: prompt + decoded completion is re-tokenised with
    the reward model's own tokenizer, so its vocabulary may differ from the policy's. Batches
    are right-padded (a BERT-style model pools its first token; a decoder pools the last token
    that is not the pad id, transformers' `*ForSequenceClassification`); text is cut from the
    left to the model's length, keeping the end of the response. Frozen, eval mode, compute dtype.
    """

    name = "model"

    def __init__(self, path: str, tokenizer_path: str | None, label: int,
                 generation_batch_size: int,
                 device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path,
                                                           trust_remote_code=trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load reward.model={path}: {first_line(e)}")
        self.model.to(device).eval().requires_grad_(False)
        tok, cfg = self.tokenizer, self.model.config
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        if cfg.pad_token_id is None:
            cfg.pad_token_id = tok.pad_token_id  # else transformers refuses batches > 1
        tok.padding_side, tok.truncation_side = "right", "left"
        if not 0 <= label < cfg.num_labels:
            raise UserError(f"reward.model_label={label} but reward.model={path} has "
                            f"{cfg.num_labels} logit(s); use 0..{cfg.num_labels - 1}")
        self.label, self.generation_batch_size, self.device = label, generation_batch_size, device
        self.max_length = min(tok.model_max_length,
                              getattr(cfg, "max_position_embeddings", None) or 1 << 30)

    def _logits(self, texts: list[str], padded: bool) -> tuple[torch.Tensor, dict]:
        enc = self.tokenizer(texts, padding=padded, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        return self.model(**enc).logits[:, self.label].float().cpu(), enc

    @torch.no_grad()
    def __call__(self, prompts, completions, rollout_tensors, state=None) -> torch.Tensor:
        # The prompt as the policy read it (a conversation: rendered by the policy's template).
        texts = [p.text + c for p, c in zip(prompts, completions)]
        scores = []
        for s in range(0, len(texts), self.generation_batch_size):
            chunk = texts[s:s + self.generation_batch_size]
            logits, enc = self._logits(chunk, padded=True)
            ids, mask = enc["input_ids"], enc["attention_mask"]
            last = ids[torch.arange(len(chunk)), mask.sum(1) - 1]
            # A row whose own last token is the pad id (pad = EOS and a tokenizer that appends
            # EOS) would be pooled one token early; score it alone, with no pad id, at -1.
            pad_id, self.model.config.pad_token_id = self.model.config.pad_token_id, None
            try:
                for i in (last == pad_id).nonzero().flatten().tolist():
                    logits[i] = self._logits([chunk[i]], padded=False)[0][0]
            finally:
                self.model.config.pad_token_id = pad_id
            scores.append(logits)
        return check_scores(torch.cat(scores).tolist(), len(prompts), "model")


class WeightedReward:
    """sum_k weight_k * score_k over several sources; `components` keeps the last raw scores of
    each (by kind) for logging."""

    name = "weighted"

    def __init__(self, parts: list[tuple[str, RewardSource, float]]):
        self.parts = parts
        self.components: dict[str, torch.Tensor] = {}

    def __call__(self, prompts, completions, rollout_tensors, state=None) -> torch.Tensor:
        total = torch.zeros(len(prompts))
        for kind, source, weight in self.parts:
            scores = source(prompts, completions, rollout_tensors, state).float().cpu()
            self.components[kind] = scores
            total += weight * scores
        return total

    @property
    def by_function(self) -> dict[str, torch.Tensor]:
        """The last raw scores of each of several reward functions (FunctionSum) among the parts."""
        return {k: v for _, source, _ in self.parts
                for k, v in getattr(source, "by_function", {}).items()}


def check_reward_sources(cfg: Config, function: Callable | list[Callable] | None = None
                         ) -> Callable | list[Callable] | None:
    """Fail before the base model loads: import the reward function (a missing file or name or a
    syntax error is found now, not after the model and engine are set up) and check that the
    reward adapter and model directories are there. Returns the function (a list of them when
    reward.function is a list), or None. `function`: a callable (or a list) given in Python,
    which stands in for reward.function."""
    r = cfg.reward
    if "adapter" in r.kinds:
        check_adapter_dir(r.adapter, "reward.adapter")
        if not (Path(r.adapter) / REWARD_HEAD_FILE).is_file():
            raise UserError(f"reward.adapter={r.adapter} has no {REWARD_HEAD_FILE}; point it at "
                            "the reward_adapter/ directory `lora-ppo train-reward` writes")
    if "model" in r.kinds and Path(r.model).exists() and not (Path(r.model) / "config.json").is_file():
        raise UserError(f"reward.model={r.model} has no config.json; point it at a saved "
                        "sequence-classification model directory")
    if "function" not in r.kinds:
        return None
    if function is not None:
        return function
    if isinstance(r.function, list):  # several functions, summed with reward.function_weights
        return [load_function(spec) for spec in r.function]
    return load_function(r.function)


def _make_one(kind: str, cfg: Config, ac: ActorCritic, function: Callable | list[Callable] | None
              ) -> RewardSource:
    if kind == "adapter":
        return AdapterReward(ac, cfg.rollout.generation_batch_size)
    if kind == "model":
        return ModelReward(cfg.reward.model, cfg.reward.model_tokenizer, cfg.reward.model_label,
                           cfg.rollout.generation_batch_size, ac.device,
                           resolve_compute_dtype(cfg.quantization.compute_dtype, ac.device),
                           cfg.model.trust_remote_code)
    if not isinstance(cfg.reward.function, list) and not isinstance(function, list):
        return FunctionReward(function_name(cfg, function), function)
    parts = named_functions(cfg, function)
    weights = cfg.reward.function_weights or [1.0] * len(parts)
    return FunctionSum([(FunctionReward(name, fn), w) for (name, fn), w in zip(parts, weights)])


def make_reward_source(cfg: Config, ac: ActorCritic, function: Callable | list[Callable] | None = None
                       ) -> RewardSource:
    """One source as is; several (reward.sources) as their weighted sum. `function`: the reward
    function `check_reward_sources` already imported (else it is imported here)."""
    kinds, weights = cfg.reward.kinds, cfg.reward.kind_weights
    if len(kinds) == 1 and weights[0] == 1.0:
        return _make_one(kinds[0], cfg, ac, function)
    return WeightedReward([(k, _make_one(k, cfg, ac, function), w)
                           for k, w in zip(kinds, weights)])
