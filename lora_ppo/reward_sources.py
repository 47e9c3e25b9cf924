"""Where sequence scores come from: a Python function, or the reward adapter on the one base.

A reward function follows TRL's convention, so existing ones work unchanged:

    def my_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]

It also receives `prompt_ids` and `completion_ids` (lists of token-id lists) as keywords.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from lora_ppo.errors import UserError
from lora_ppo.modeling.actor_critic import ActorCritic
from lora_ppo.rl.rewards import last_token_index


class RewardError(UserError):
    """A reward function raised, returned the wrong length, or gave NaN/inf."""


class RewardSource(Protocol):
    name: str

    def __call__(self, prompts: list[str], completions: list[str], rollout_tensors: dict
                 ) -> torch.Tensor:
        """Scores (B,) float32."""


def load_function(spec: str) -> Callable:
    """`package.module:function` or `path/to/file.py:function` -> the function."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise UserError(f"reward.function={spec!r} must be 'module:function' or 'file.py:function'")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise UserError(f"reward.function={spec!r}: file {target} does not exist")
            mod_spec = importlib.util.spec_from_file_location(f"lora_ppo_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(target)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"reward.function={spec!r}: importing {target} failed: "
                        f"{type(e).__name__}: {e}")
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"reward.function={spec!r}: {target} has no function {name!r}")
    return fn


def check_scores(scores: Sequence, n: int, name: str) -> torch.Tensor:
    """A list of n finite floats -> tensor; otherwise a RewardError naming the sample."""
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward {name} must return a list of floats: {e}")
    if len(values) != n:
        raise RewardError(f"reward {name} returned {len(values)} scores for {n} samples")
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise RewardError(f"reward {name} returned {v} for sample {i}; rewards must be finite")
    return torch.tensor(values, dtype=torch.float32)


class FunctionReward:
    def __init__(self, spec: str):
        self.name = spec
        self.fn = load_function(spec)

    def __call__(self, prompts, completions, rollout_tensors) -> torch.Tensor:
        ids = {"prompt_ids": rollout_tensors["prompt_ids"],
               "completion_ids": rollout_tensors["completion_ids"]}
        try:
            out = self.fn(prompts=prompts, completions=completions, **ids)
        except Exception as e:
            # Find the failing sample so the message points at it, not at the whole batch.
            idx = _first_failing_sample(self.fn, prompts, completions, ids)
            where = f" on sample {idx} (completion {completions[idx]!r:.80})" if idx is not None else ""
            raise RewardError(f"reward function {self.name} raised {type(e).__name__}: {e}{where}")
        return check_scores(out, len(prompts), f"function {self.name}")


def _first_failing_sample(fn, prompts, completions, ids):
    for i in range(len(prompts)):
        try:
            fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
               **{k: v[i:i + 1] for k, v in ids.items()})
        except Exception:
            return i
    return None


class AdapterReward:
    """The frozen reward adapter + score head of the one base, scored at the last real token."""

    name = "adapter"

    def __init__(self, ac: ActorCritic, batch_size: int):
        self.ac, self.batch_size = ac, batch_size

    @torch.no_grad()
    def __call__(self, prompts, completions, rollout_tensors) -> torch.Tensor:
        q_ids, q_mask = rollout_tensors["query_ids"], rollout_tensors["query_mask"]
        r_ids, r_mask = rollout_tensors["response_ids"], rollout_tensors["response_mask"]
        was_training = self.ac.training
        self.ac.eval()
        scores = []
        try:
            for s in range(0, q_ids.shape[0], self.batch_size):
                sl = slice(s, s + self.batch_size)
                ids = torch.cat([q_ids[sl], r_ids[sl]], 1)
                mask = torch.cat([q_mask[sl], r_mask[sl].long()], 1)
                last = q_ids.shape[1] + last_token_index(r_mask[sl])
                scores.append(self.ac.score(ids, mask, last).float().cpu())
        finally:
            self.ac.train(was_training)
        return check_scores(torch.cat(scores).tolist(), len(prompts), "adapter")


def make_reward_source(cfg, ac: ActorCritic) -> RewardSource:
    if cfg.reward.source == "adapter":
        return AdapterReward(ac, cfg.rollout.generation_batch_size)
    return FunctionReward(cfg.reward.function)
