"""Loading the config tree (tree.py) from YAML and `section.key=value` overrides, strictly.

An unknown key, a wrong type or a value outside its allowed range (written beside the field,
`Annotated[type, CHECK]`, config/checks.py) fails here, with one line that names the field, the
value and what is allowed (litgpt's strictness); combinations of fields are checked by
`Config.__post_init__`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from lora_ppo.config.checks import Check
from lora_ppo.config.tree import Config
from lora_ppo.errors import UserError, first_line

# Keys that moved into a composed section (ppo.optim, sft.train, ...): an old config is told
# where each went instead of only that it is unknown.
_OPTIM = ("learning_rate", "weight_decay", "lr_schedule", "warmup_steps", "max_grad_norm")
MOVED = {f"ppo.{k}": f"ppo.optim.{k}" for k in _OPTIM}
MOVED["rollout.logprob_chunk_size"] = "model.logits_chunk_mib (a size in MiB, not rows)"
MOVED["rollout.logits_chunk_mib"] = "model.logits_chunk_mib"
MOVED["rollout.merge_for_generation"] = "rollout.fold_for_generation"
MOVED["rollout.batch_size"] = "rollout.prompts_per_update (prompts, not samples)"
for _stage in ("sft", "reward_model"):
    MOVED.update({f"{_stage}.{k}": f"{_stage}.optim.{k}" for k in _OPTIM})
    MOVED.update({f"{_stage}.{k}": f"{_stage}.train.{k}" for k in (
        "epochs", "max_steps", "batch_size", "micro_batch_size", "max_length")})
    MOVED.update({f"{_stage}.eval_{k}": f"{_stage}.eval.{k}" for k in ("data", "size", "every")})


def field_type(tp: Any) -> tuple[Any, list[Check]]:
    """A field's annotation -> (its type, the range checks written beside it with Annotated)."""
    if typing.get_origin(tp) is typing.Annotated:
        base, *extra = typing.get_args(tp)
        return base, [e for e in extra if isinstance(e, Check)]
    return tp, []


# TRL's names for fields lora_ppo has under another name (GRPOConfig 1.16 and PPOConfig 0.11):
# an unknown key that is one of them is told the field to write instead (docs/coming_from_trl.md).
TRL_NAMES = {
    "num_generations": "rollout.samples_per_prompt",
    "max_completion_length": "rollout.max_new_tokens",
    "response_length": "rollout.max_new_tokens",
    "max_prompt_length": "model.max_prompt_length",
    "temperature": "rollout.temperature",
    "generation_batch_size": "rollout.generation_batch_size",
    "beta": "ppo.kl_coef",
    "init_kl_coef": "ppo.kl_coef",
    "kl_coef": "ppo.kl_coef",
    "epsilon": "ppo.cliprange",
    "epsilon_high": "ppo.cliprange_high",
    "cliprange": "ppo.cliprange",
    "cliprange_value": "ppo.cliprange_value",
    "num_iterations": "ppo.epochs",
    "num_ppo_epochs": "ppo.epochs",
    "ppo_epochs": "ppo.epochs",
    "loss_type": "ppo.loss_aggregation",
    "scale_rewards": "ppo.scale_rewards",
    "importance_sampling_level": "ppo.importance_sampling_level",
    "mask_truncated_completions": "ppo.mask_truncated_completions",
    "vllm_importance_sampling_correction": "ppo.sampler_importance_sampling_correction",
    "vllm_importance_sampling_mode": "ppo.sampler_importance_sampling_mode",
    "vllm_importance_sampling_clip_max": "ppo.sampler_importance_sampling_clip_max",
    "vllm_importance_sampling_cap": "ppo.sampler_importance_sampling_clip_max",
    "vllm_importance_sampling_clip_min": "ppo.sampler_importance_sampling_clip_min",
    "entropy_coef": "ppo.ent_coef",
    "vf_coef": "ppo.vf_coef",
    "gamma": "ppo.gamma",
    "lam": "ppo.lam",
    "learning_rate": "ppo.optim.learning_rate",
    "lr_scheduler_type": "ppo.optim.lr_schedule",
    "warmup_steps": "ppo.optim.warmup_steps",
    "weight_decay": "ppo.optim.weight_decay",
    "max_grad_norm": "ppo.optim.max_grad_norm",
    "mini_batch_size": "ppo.minibatch_size",
    "per_device_train_batch_size": "ppo.micro_batch_size",
    "reward_weights": "reward.weights",
    "missing_eos_penalty": "reward.missing_eos_penalty",
    "model_name_or_path": "model.path",
    "model_name": "model.path",
    "sft_model_path": "model.path",
    "num_train_epochs": "ppo.total_updates",
    "max_steps": "ppo.total_updates",
    "total_episodes": "ppo.total_updates",
    "output_dir": "output_dir",
    "seed": "seed",
}


def _did_you_mean(key: str, fields, prefix: str) -> str:
    """The hint after an unknown key: the field of TRL's name, else the closest field name."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf in TRL_NAMES:
        return f"; did you mean {TRL_NAMES[leaf]} (TRL's {leaf})?"
    close = difflib.get_close_matches(leaf, list(fields), n=1, cutoff=0.75)
    return f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number",
            str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    ok = False
    if origin is Literal:
        ok = value in typing.get_args(tp)
    elif origin is typing.Union:
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except UserError:
                continue
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        ok = value is None
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        ok = isinstance(value, str)
    if not ok:
        raise UserError(f"{path}={value!r} is not {type_name(tp)}; fix it in the config")
    return value


def _build(cls: type, data: Any, prefix: str, default: Any = None) -> Any:
    """`default` (an instance of `cls`, else cls()) with the keys of `data` replaced, recursively:
    a partial nested section keeps its parent's defaults (sft.optim's learning rate is SFT's)."""
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'config'} must be a mapping of keys to values, got {data!r}")
    default = cls() if default is None else default
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix + '.' if prefix else ''}{unknown[0]}"
        if key in MOVED:
            raise UserError(f"config key '{key}' moved to '{MOVED[key]}'; write it there")
        where = f"section '{prefix}'" if prefix else "the top level"
        raise UserError(f"unknown config key '{key}' in {where}{_did_you_mean(key, fields, prefix)}"
                        f" (allowed keys: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        tp, checks = field_type(hints[name])
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, path, getattr(default, name))
            continue
        value = _coerce(value, tp, path)
        for check in checks:
            if value is not None and not check.ok(value):
                raise UserError(f"{path}={value!r} is out of range: must be {check.allowed}")
        kwargs[name] = value
    return dataclasses.replace(default, **kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """`["ppo.epochs=2", "model.path=/m"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}' is not of the form section.key=value")
        _put(tree, key, yaml.safe_load(raw) if raw != "" else "", item)
    return tree


def _put(tree: dict, key: str, value: Any, item: str) -> None:
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{item}' sets a key under a value")
    node[leaf] = value


def override_tree(overrides: list[str] | dict | None) -> dict:
    """Overrides as a nested dict, from `section.key=value` strings (the CLI) or a dict (Python),
    nested ({"ppo": {"epochs": 2}}) or dotted ({"ppo.epochs": 2}); a dict's values are taken as
    they are, not parsed (no config field holds a mapping, so every dict is a section)."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        tree: dict = {}

        def walk(prefix: str, node: dict) -> None:
            for key, value in node.items():
                if not isinstance(key, str) or not key:
                    raise UserError(f"override key {key!r} is not a 'section.key' string")
                if isinstance(value, dict):
                    walk(f"{prefix}{key}.", value)
                else:
                    _put(tree, prefix + key, value, prefix + key)

        walk("", overrides)
        return tree
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        raise UserError(f"overrides must be a list of 'section.key=value' strings or a dict, not "
                        f"{overrides!r}")
    return parse_overrides(list(overrides))


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict:
    """The mapping a YAML config file holds; one line naming the problem otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path} is a directory; pass --config <file.yaml>")
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass --config <file.yaml>")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not valid YAML: {first_line(e)}")
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: the top level must be a mapping of sections "
                        f"(model:, ppo:, ...), not a {type(data).__name__}; fix the file")
    return data


def build_config(data: dict, overrides: list[str] | dict | None = None) -> Config:
    """A Config from a mapping of sections (a YAML file's, or a saved config's) with
    `overrides` (override_tree) applied, checked strictly."""
    return _build(Config, _merge(data, override_tree(overrides)), "")


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None
                ) -> Config:
    """Read a YAML file (or only defaults when `path` is None) and apply `section.key=value`."""
    return build_config(read_yaml(path) if path is not None else {}, overrides)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    """config.yaml, whole or not at all (a temp file renamed over it: a run killed while writing
    it leaves the previous one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
