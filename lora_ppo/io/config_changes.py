"""Which config changes a resumed run may take (SAFE, each with why the run stays what it was)
and the lines that refuse or report them: `check_changes` (a refused change, in one line naming
the field, both values and the fix; an accepted one, said in one line) and `ignored_line` (what
a `--config` file given with `--resume` would have changed). Pure comparisons of configs: no
file is read here (io/resume.py finds the saved config; io/checkpoint.py::check_fit applies
the same rule in-process).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from lora_ppo.config import Config
from lora_ppo.config.load import config_to_dict
from lora_ppo.errors import UserError

# Fields a resume may change, each with why the run stays what it was: the updates done so far
# are not touched, and the ones to come sample, score and step as they would have.
SAFE = {
    "output_dir": "where the run is; the command names it (the directory may have moved)",
    "model.path": "where the base is; the checkpoint's record of the base's config.json and "
                  "weight files is checked against it (io/checkpoint.py::check_base)",
    "ppo.total_updates": "how long the run goes on",
    "sft.train.epochs": "how long the stage goes on; an epoch's order depends only on (seed, epoch)",
    "sft.train.max_steps": "how long the stage goes on",
    "reward_model.train.epochs": "how long the stage goes on; an epoch's order depends only on "
                                 "(seed, epoch)",
    "reward_model.train.max_steps": "how long the stage goes on",
    "checkpoint.every": "when checkpoints are written, not what is trained",
    "checkpoint.keep": "how many checkpoints are kept",
    "logging.tensorboard": "where metrics go",
    "logging.wandb": "where metrics go",
    "logging.wandb_project": "where metrics go",
    "logging.progress": "what the console shows",
    "logging.num_samples": "how many evaluation samples the log shows",
}
# Not safe though they look it: data.eval_every (an evaluation samples from the generator the
# rollouts sample from, and turning it on holds data.eval_size prompts out of the training set);
# batch and chunk sizes (rollout.generation_batch_size, ppo.micro_batch_size, ...: other matmul
# shapes, other round-off, and the decode batch decides which random number goes to which row).

# The sections each command reads; a change elsewhere does not concern its run.
_STAGE = ("output_dir", "seed", "model", "quantization", "lora", "deepspeed", "logging",
          "checkpoint")
READS = {"train": None,  # every section but the stages'
         "sft": (*_STAGE, "sft"), "reward_model": (*_STAGE, "reward_model")}
STAGE_SECTIONS = ("sft", "reward_model")
IN_MEMORY = "<in memory"  # how a description of a Python object in a saved config begins


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def changed(a: Config, b: Config, command: str) -> dict[str, tuple[Any, Any]]:
    """field -> (value in a, value in b) for every field `command` reads that differs."""
    fa, fb = _flat(config_to_dict(a)), _flat(config_to_dict(b))
    reads = READS[command]
    out = {}
    for k in fa:
        top = k.split(".")[0]
        if fa[k] == fb[k] or (top in STAGE_SECTIONS if reads is None else top not in reads):
            continue
        out[k] = (fa[k], fb[k])
    return out


def show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _length_note(cfg: Config, command: str) -> str:
    optim = cfg.ppo.optim if command == "train" else getattr(cfg, command).optim
    if optim.lr_schedule == "constant":
        return ""
    return (f"; the {optim.lr_schedule} learning-rate schedule of the steps to come follows the "
            "new length")


def check_changes(saved: Config, cfg: Config, command: str, step: int, where: Path | str
                  ) -> Optional[str]:
    """Refuse `cfg` as the continuation of the run `saved` describes (at `step`, read from
    `where`) unless every changed field is SAFE; returns the line that names the accepted
    changes, or None when there are none."""
    diff = changed(saved, cfg, command)
    bad = [k for k in diff if k not in SAFE]
    if bad:
        parts = ", ".join(f"{k}={show(diff[k][1])} (the run's: {show(diff[k][0])})"
                          for k in bad)
        raise UserError(f"--resume: {parts} would change the run saved in {where}; a resumed run "
                        "keeps its config: drop the change, or start a new run with --overwrite "
                        "or another output_dir")
    if command == "train" and cfg.ppo.total_updates < step:
        raise UserError(f"--resume: ppo.total_updates={cfg.ppo.total_updates} is below update "
                        f"{step}, where the run continues from; give {step} or more")
    said = [f"{k}={show(b)} (was {show(a)}: {SAFE[k]})" for k, (a, b) in diff.items()
            if k != "output_dir"]
    if not said:
        return None
    note = _length_note(cfg, command) if any(k.endswith(("total_updates", "epochs",
                                                        "max_steps")) for k in diff) else ""
    return "--resume: continuing with " + "; ".join(said) + note


def ignored_line(given: Config, cfg: Config, command: str, config_name: str,
                 where: Path) -> Optional[str]:
    """The line that names where a config given with --resume (`config_name`: "--config
    my.yaml") differs from the saved config: ignored, the saved config is the run's."""
    diff = changed(cfg, given, command)
    diff.pop("output_dir", None)
    if not diff:
        return None
    items = [f"{k} ({show(b)}; the run's: {show(a)})" for k, (a, b) in diff.items()]
    shown = ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")
    return (f"--resume: the run's saved config ({where}) is its config; where {config_name} "
            f"differs it is ignored: {shown} (change a field with section.key=value)")


def in_memory_fields(cfg: Config) -> dict[str, str]:
    """Fields of a saved config that describe Python objects (lora_ppo/api.py), not files."""
    flat = _flat(config_to_dict(cfg))
    out = {}
    for k, v in flat.items():
        values = v if isinstance(v, list) else [v]
        if any(isinstance(x, str) and x.startswith(IN_MEMORY) for x in values):
            out[k] = show(v)
    return out
