"""The Python entry points: `lora_ppo.train`, `lora_ppo.train_sft`, `lora_ppo.train_reward`.

For those who live in Python, as TRL's users do (`GRPOTrainer(reward_funcs=[fn],
train_dataset=ds).train()`), with TRL's names where they mean the same:

    import lora_ppo
    run = lora_ppo.train("grpo", reward_funcs=[correct, short], reward_weights=[1.0, 0.1],
                         train_dataset=ds, overrides={"output_dir": "out/grpo"})

They run the code the CLI runs (the CLI calls `run_command`): the config (a Config, a YAML
path, a preset name, a dict of sections, or nothing) with `section.key=value` overrides, the
`builtin:` names resolved, the same checks and the same one-line UserError for bad input; a
resumed run keeps its saved config (io/resume.py). Python objects stand in for the config
fields they replace, and config.yaml records them truthfully: a function importable by its
module and name as `module:name` (a spec the CLI loads too), anything else (a function of
`__main__`, a lambda, a closure, rows in memory) as a description, `<in memory: ...>`, with the
rows' count and sha256, so that a resume from Python with the same objects is checked to be
one.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from lora_ppo.config import Config
from lora_ppo.config.load import build_config, config_to_dict, override_tree, read_yaml
from lora_ppo.errors import UserError
from lora_ppo.io.config_changes import IN_MEMORY, check_changes, ignored_line, in_memory_fields
from lora_ppo.io.resume import saved_run
from lora_ppo.io.run_dir import check_flags

PRESETS = Path(__file__).resolve().parent / "builtin" / "presets"
# What each command runs, and which config field each Python object stands in for.
ENTRY = {"train": "lora_ppo.ppo.loop:train", "sft": "lora_ppo.stages.sft:train_sft",
         "reward_model": "lora_ppo.stages.reward_model:train_reward"}
FIELDS = {"train": {"train_dataset": "data.prompts", "eval_dataset": "data.eval_prompts",
                    "reward_funcs": "reward.function"},
          "sft": {"train_dataset": "sft.data", "eval_dataset": "sft.eval.data"},
          "reward_model": {"train_dataset": "reward_model.data",
                           "eval_dataset": "reward_model.eval.data"}}


def train(config: Config | str | Path | dict | None = None, *,
          reward_funcs: Callable | Sequence[Callable] | None = None,
          reward_weights: Sequence[float] | None = None, train_dataset=None, eval_dataset=None,
          resume: Optional[str] = None, overwrite: bool = False,
          overrides: list[str] | dict | None = None):
    """PPO (or GRPO, ...: ppo.advantage_estimator) as `lora-ppo train` runs it; returns the
    finished run (ppo/run.py::Run: `run.ac.peft_model` is the policy).

    config: a Config, a YAML path, a preset name (`grpo`), a dict of sections, or None for the
        defaults; overrides: `["ppo.total_updates=50"]` or `{"ppo.total_updates": 50}`.
    reward_funcs: a function or a list (TRL's convention, `fn(prompts, completions, **kwargs)
        -> list[float]`), in place of reward.function; several are summed with
        reward_weights (default all 1), as TRL sums them.
    train_dataset, eval_dataset: a datasets.Dataset or a list of dicts with the column
        data.prompt_column, in place of data.prompts and data.eval_prompts.
    resume: "latest" or a checkpoint directory; the run keeps its saved config, overrides are
        the only changes considered; give the same Python objects as the run was started with.
    overwrite: replace an earlier run in output_dir (else it is refused).
    Bad input raises UserError (one line); Ctrl-C stops after the current update with a
    checkpoint and raises errors.Interrupted (a KeyboardInterrupt).
    """
    return run_command("train", config, overrides, resume, overwrite,
                       objects={"reward_funcs": reward_funcs, "train_dataset": train_dataset,
                                "eval_dataset": eval_dataset},
                       reward_weights=reward_weights)[1]


def train_sft(config: Config | str | Path | dict | None = None, *, train_dataset=None,
              eval_dataset=None, resume: Optional[str] = None, overwrite: bool = False,
              overrides: list[str] | dict | None = None) -> Path:
    """SFT as `lora-ppo sft` runs it; returns the adapter directory. train_dataset /
    eval_dataset: rows with sft.prompt_column and sft.response_column, in place of sft.data
    and sft.eval.data; the rest as `train`."""
    return run_command("sft", config, overrides, resume, overwrite,
                       objects={"train_dataset": train_dataset, "eval_dataset": eval_dataset})[1]


def train_reward(config: Config | str | Path | dict | None = None, *, train_dataset=None,
                 eval_dataset=None, resume: Optional[str] = None, overwrite: bool = False,
                 overrides: list[str] | dict | None = None) -> Path:
    """The reward adapter as `lora-ppo train-reward` trains it; returns its directory.
    train_dataset / eval_dataset: preference rows (reward_model.prompt_column, chosen_column,
    rejected_column), in place of reward_model.data and reward_model.eval.data."""
    return run_command("reward_model", config, overrides, resume, overwrite,
                       objects={"train_dataset": train_dataset, "eval_dataset": eval_dataset})[1]


def run_command(command: str, config, overrides, resume: Optional[str], overwrite: bool, *,
                objects: Optional[dict] = None, reward_weights=None):
    """Everything the CLI's training commands and the functions above do: the config, the
    Python objects, the resumed run's config, then the entry point of ENTRY. Returns the
    config used and what the entry point returned."""
    check_flags(resume, overwrite)  # before the saved config is read
    objects = {k: v for k, v in (objects or {}).items() if v is not None}
    cfg, notes = prepare(command, config, overrides, resume, objects, reward_weights)
    if os.environ.get("RANK", "0") == "0":
        for line in notes:
            print(line, flush=True)
    module, _, name = ENTRY[command].partition(":")
    entry = getattr(importlib.import_module(module), name)
    kwargs = {"dataset": objects.get("train_dataset"),
              "eval_dataset": objects.get("eval_dataset")}
    if command == "train":
        funcs = objects.get("reward_funcs")
        # one function without a weight is reward.function's plain case (no sum, no per-function
        # metric); several, or a weight, are TRL's weighted sum (reward_sources.FunctionSum)
        single = funcs is not None and not isinstance(cfg.reward.function, list)
        kwargs["reward_fn"] = funcs[0] if single else funcs
    return cfg, entry(cfg, resume=resume, overwrite=overwrite, **kwargs)


def prepare(command: str, config, overrides, resume: Optional[str], objects: dict,
            reward_weights=None) -> tuple[Config, list[str]]:
    """The config the run uses, and the lines to say about it: the given one (config +
    overrides + Python objects), or with `resume` the run's saved config with the overrides
    (io/resume.py)."""
    from lora_ppo.builtin.specs import resolve_builtins

    if command == "train" and "reward_funcs" in objects:
        objects["reward_funcs"] = _functions(objects["reward_funcs"])
    described = describe(command, objects, reward_weights)
    tree = override_tree(overrides)
    given = _with(resolve_builtins(build_config(_config_data(config), tree)), described)
    _check_objects(command, given, objects)
    if resume is None:
        return given, []
    saved = saved_run(given.output_dir, command, resume)
    if saved is None:  # nothing saved: `--resume latest` starts the run (io/run_dir.py)
        return given, []
    missing = {k: v for k, v in in_memory_fields(saved.cfg).items() if k not in described}
    if missing:
        raise UserError(f"the run in {given.output_dir} was started from Python with "
                        f"{' and '.join(missing)} in memory (its config.yaml describes them); "
                        f"resume it from Python with the same objects: lora_ppo.{_PY[command]}"
                        "(..., resume=\"latest\")")
    data = {**config_to_dict(saved.cfg), "output_dir": given.output_dir}
    cfg = _with(resolve_builtins(build_config(data, tree)), described)
    notes = [check_changes(saved.cfg, cfg, command, saved.step, saved.path)]
    if config is not None:
        notes.append(ignored_line(given, cfg, command, _name(config), saved.path))
    return cfg, [n for n in notes if n]


_PY = {"train": "train", "sft": "train_sft", "reward_model": "train_reward"}


def _config_data(config) -> dict:
    """The sections of `config`: a Config, a dict, a YAML path, a preset name, or None."""
    if config is None:
        return {}
    if isinstance(config, Config):
        return config_to_dict(config)
    if isinstance(config, dict):
        return config
    if not isinstance(config, (str, Path)):
        raise UserError(f"config must be a Config, a YAML path, a preset name or a dict, not "
                        f"{type(config).__name__}")
    return read_yaml(config_path(str(config)))


def config_path(value: str) -> str:
    """A preset name (`grpo`) or a YAML path."""
    if Path(value).exists() or value.endswith((".yaml", ".yml")):
        return value
    preset = PRESETS / f"{value}.yaml"
    if preset.is_file():
        return str(preset)
    names = ", ".join(p.stem for p in sorted(PRESETS.glob("*.yaml")))
    raise UserError(f"--config {value}: no such file and no such preset (presets: {names})")


def _name(config) -> str:
    return f"--config {config}" if isinstance(config, (str, Path)) else \
        f"the {type(config).__name__} given"


def _functions(funcs) -> list[Callable]:
    funcs = list(funcs) if isinstance(funcs, (list, tuple)) else [funcs]
    for f in funcs:
        if isinstance(f, str):
            raise UserError(f"reward_funcs: {f!r} is a string; give functions (a file's "
                            "function goes in reward.function as 'file.py:name', a reward model "
                            "in reward.model with reward.source=model)")
        if not callable(f):
            raise UserError(f"reward_funcs: {f!r} is not callable; give a function or a list "
                            "of functions f(prompts, completions, **kwargs) -> list[float]")
    if not funcs:
        raise UserError("reward_funcs=[] names no function; give one or more")
    return funcs


def describe_function(fn: Callable) -> str:
    """`module:name` when importing module and taking name gives this very function (the CLI
    can then load it too); otherwise a description `<in memory: module.qualname>`."""
    module, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if module and qual and module != "__main__" and "." not in qual and "<" not in qual:
        try:
            if getattr(importlib.import_module(module), qual, None) is fn:
                return f"{module}:{qual}"
        except Exception:  # a module that does not import again by name: described instead
            pass
    return f"{IN_MEMORY}: {module}.{qual or type(fn).__name__}>"


def describe_rows(data, name: str) -> str:
    """`<in memory: Dataset of 512 rows, sha256 1a2b3c4d5e6f>`: what was used, and enough to
    tell it from other data on resume."""
    from lora_ppo.io.data import in_memory_rows

    rows = in_memory_rows(data, {}, name)
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
    return f"{IN_MEMORY}: {type(data).__name__} of {len(rows)} rows, sha256 {digest[:12]}>"


def describe(command: str, objects: dict, reward_weights) -> dict[str, Any]:
    """field -> the value config.yaml records for each Python object given."""
    out: dict[str, Any] = {}
    for name, obj in objects.items():
        if name not in FIELDS[command]:
            raise UserError(f"{_PY[command]}() takes no {name}")
        field = FIELDS[command][name]
        if name == "reward_funcs":
            specs = [describe_function(f) for f in obj]
            out[field] = specs[0] if len(obj) == 1 and reward_weights is None else specs
        else:
            out[field] = describe_rows(obj, name)
    if reward_weights is not None:
        if "reward_funcs" not in objects:
            raise UserError("reward_weights without reward_funcs; give both, or set "
                            "reward.function_weights with reward.function")
        if len(reward_weights) != len(objects["reward_funcs"]):
            raise UserError(f"reward_weights has {len(reward_weights)} entries for "
                            f"{len(objects['reward_funcs'])} reward_funcs; give one per function")
        out["reward.function_weights"] = [float(w) for w in reward_weights]
    return out


def _with(cfg: Config, fields: dict[str, Any]) -> Config:
    """`cfg` with the dotted fields set, checked as a config is."""
    if not fields:
        return cfg
    data = config_to_dict(cfg)
    for key, value in fields.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return build_config(data)


def _check_objects(command: str, cfg: Config, objects: dict) -> None:
    if command == "train" and "reward_funcs" in objects and "function" not in cfg.reward.kinds:
        raise UserError(f"reward_funcs given, but reward.source={cfg.reward.source} does not use "
                        "a function; set reward.source=function or add function to "
                        "reward.sources")
    if "eval_dataset" in objects and command == "train" and not cfg.data.eval_every:
        raise UserError("eval_dataset given, but data.eval_every=0 never evaluates; set "
                        "data.eval_every (updates between evaluations)")
