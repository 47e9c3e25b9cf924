"""Where sequence scores come from: a Python function, the reward adapter on the one base, a
separate sequence-classification model, or a weighted sum of several (reward.sources).

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

from lora_ppo.errors import UserError, first_line
from lora_ppo.modeling.actor_critic import ActorCritic, check_adapter_dir
from lora_ppo.modeling.heads import REWARD_HEAD_FILE
from lora_ppo.modeling.loading import resolve_compute_dtype
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
    if not spec:
        raise UserError("reward.function is not set; give 'module:function' or "
                        "'file.py:function' (or another reward.source)")
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
    def __init__(self, spec: str, fn: Callable | None = None):
        self.name = spec
        self.fn = fn if fn is not None else load_function(spec)

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

    def __init__(self, ac: ActorCritic, generation_batch_size: int):
        self.ac, self.generation_batch_size = ac, generation_batch_size

    @torch.no_grad()
    def __call__(self, prompts, completions, rollout_tensors) -> torch.Tensor:
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
    def __call__(self, prompts, completions, rollout_tensors) -> torch.Tensor:
        texts = [p + c for p, c in zip(prompts, completions)]
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

    def __call__(self, prompts, completions, rollout_tensors) -> torch.Tensor:
        total = torch.zeros(len(prompts))
        for kind, source, weight in self.parts:
            scores = source(prompts, completions, rollout_tensors).float().cpu()
            self.components[kind] = scores
            total += weight * scores
        return total


def check_reward_sources(cfg, function: Callable | None = None) -> Callable | None:
    """Fail before the base model loads: import the reward function (a missing file or name or a
    syntax error is found now, not after the model and engine are set up) and check that the
    reward adapter and model directories are there. Returns the function, or None. `function`:
    a callable given in Python, which stands in for reward.function."""
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
    return function if function is not None else load_function(r.function)


def _make_one(kind: str, cfg, ac: ActorCritic, function: Callable | None) -> RewardSource:
    if kind == "adapter":
        return AdapterReward(ac, cfg.rollout.generation_batch_size)
    if kind == "model":
        return ModelReward(cfg.reward.model, cfg.reward.model_tokenizer, cfg.reward.model_label,
                           cfg.rollout.generation_batch_size, ac.device,
                           resolve_compute_dtype(cfg.quantization.compute_dtype, ac.device),
                           cfg.model.trust_remote_code)
    name = cfg.reward.function or getattr(function, "__qualname__", "function")
    return FunctionReward(name, function)


def make_reward_source(cfg, ac: ActorCritic, function: Callable | None = None) -> RewardSource:
    """One source as is; several (reward.sources) as their weighted sum. `function`: the reward
    function `check_reward_sources` already imported (else it is imported here)."""
    kinds, weights = cfg.reward.kinds, cfg.reward.kind_weights
    if len(kinds) == 1 and weights[0] == 1.0:
        return _make_one(kinds[0], cfg, ac, function)
    return WeightedReward([(k, _make_one(k, cfg, ac, function), w)
                           for k, w in zip(kinds, weights)])
