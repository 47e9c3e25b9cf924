"""`--resume` keeps the run's config.

A resumed run is the run it continues: its config is the one saved with it (the checkpoint's
config.yaml; the run directory's for a run killed before its first checkpoint, which `--resume
latest` starts again from step 0), and the command line's `section.key=value` overrides are the
only changes considered. A change that leaves the run as it was (io/config_changes.py's SAFE)
is accepted and said in one line; any other is refused in one line naming the field, both
values and the fix. A
`--config` file given with `--resume` only says where the run is (its output_dir): where it
differs from the saved config it is ignored, and that is said in one line, so that `lora-ppo
train --config my.yaml --resume latest` continues a run started as `lora-ppo train --config
my.yaml rollout.prompts_per_update=4` at 4 prompts per update.

Runs started from Python (lora_ppo/api.py) record a callable or in-memory data by a
description (IN_MEMORY ...); such a run resumes from Python with the same objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

from lora_ppo.config import Config
from lora_ppo.config.load import load_config
from lora_ppo.errors import UserError
from lora_ppo.io.checkpoint import COMPLETE, CONFIG, STATE, find


class Saved(NamedTuple):
    """The config an earlier run saved, where it was read, and the step it continues from."""

    cfg: Config
    path: Path
    step: int


def run_dir(output_dir: str | Path, command: str) -> Path:
    """Where `command` keeps config.yaml and checkpoints/ (io/run_dir.py::OWNED)."""
    return Path(output_dir) if command == "train" else Path(output_dir) / command


def _checked_json(ck: Path, name: str) -> str:
    """A small file of checkpoint `ck`, checked against its COMPLETE manifest (the whole
    checkpoint is verified when it is loaded; its config is needed before anything loads)."""
    import hashlib

    manifest = json.loads((ck / COMPLETE).read_text())["files"]
    data = (ck / name).read_bytes()
    if name in manifest and hashlib.sha256(data).hexdigest() != manifest[name]["sha256"]:
        raise UserError(f"file {ck / name} has changed since it was written; use an earlier "
                        "checkpoint")
    return data.decode()


def saved_run(output_dir: str | Path, command: str, resume: str) -> Optional[Saved]:
    """What `--resume` continues: the checkpoint's config and step, the run directory's
    config.yaml at step 0 when `--resume latest` finds no complete checkpoint, or None when
    nothing was saved (a fresh start)."""
    rd = run_dir(output_dir, command)
    ck = find(rd, resume)  # a --resume PATH that is not a complete checkpoint is refused here
    if ck is not None:
        path, step = ck / CONFIG, int(json.loads(_checked_json(ck, STATE)).get("step", 0))
        _checked_json(ck, CONFIG)
    elif (rd / CONFIG).is_file():
        path, step = rd / CONFIG, 0
    else:
        return None
    try:
        return Saved(load_config(path), path, step)
    except UserError as e:
        raise UserError(f"{path}, the config the run was saved with, does not load ({e}); "
                        "start again with --overwrite")
