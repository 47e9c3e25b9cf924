"""A run directory that holds a run is never clobbered by accident.

A command that starts a run (`train`, `sft`, `train-reward`, `demo`) checks where it will write
before anything is loaded: the output directory must be a directory or creatable as one (not a
file, not under one, writable), and if it already holds files of an earlier run of the same
command the command is refused, unless `--resume` continues that run or `--overwrite` replaces
it (the convention of the tools users know: a second `run` into a used directory asks first).
Nothing is written before every check of the command has passed; with `--overwrite` the earlier
run's files are removed only then (`clear`), each directory through a trash name so that a crash
halfway leaves no half-deleted run (atomic.remove_dir).

One output_dir can hold the whole pipeline: each command owns only its own names in it (PPO the
top-level run files, SFT `sft/` and `adapter/`, the reward model `reward_model/` and
`reward_adapter/`), so the stages and PPO never refuse each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from lora_ppo.errors import UserError
from lora_ppo.io.atomic import remove_dir

# What each command writes into output_dir (names relative to it).
OWNED = {
    "train": ("metrics.jsonl", "checkpoints", "config.yaml", "tensorboard", "metrics.png"),
    "sft": ("sft", "adapter"),
    "reward_model": ("reward_model", "reward_adapter"),
}


def check_output_dir(path: str | Path, field: str = "output_dir") -> None:
    """Refuse a path that is a file, lies under a file, or cannot be created or written."""
    p = Path(path).expanduser().absolute()
    for q in (p, *p.parents):
        if not q.exists():
            continue
        if not q.is_dir():
            where = "is" if q == p else f"lies under {q}, which is"
            raise UserError(f"{field}={path} {where} a file, not a directory; choose another "
                            f"{field}")
        if not os.access(q, os.W_OK | os.X_OK):
            raise UserError(f"{field}={path}: {q} is not writable; choose another {field}")
        return


def _holds(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def earlier_run(output_dir: str | Path, command: str, resume: Optional[str],
                overwrite: bool) -> list[Path]:
    """The files of an earlier run of `command` in output_dir that `--overwrite` will replace.

    Raises UserError when there are some and neither `resume` nor `overwrite` says what to do
    with them, or when both are given. Call on every rank before loading anything; remove what
    it returns with `clear` once every other check has passed.
    """
    check_output_dir(output_dir)
    if resume is not None and overwrite:
        raise UserError("--resume continues the run in output_dir and --overwrite replaces it; "
                        "pass one of them")
    found = [Path(output_dir) / name for name in OWNED[command]
             if _holds(Path(output_dir) / name)]
    if not found or resume is not None:
        return []
    if not overwrite:
        names = ", ".join(p.name for p in found)
        cli = {"train": "train", "sft": "sft", "reward_model": "train-reward"}[command]
        raise UserError(f"{output_dir} holds an earlier {cli} run ({names}); continue it with "
                        f"`lora-ppo {cli} --resume latest`, or start again with --overwrite "
                        "(deletes it) or another output_dir")
    return found


def clear(paths: list[Path]) -> None:
    """Remove the earlier run's files (rank 0, after every check has passed)."""
    for p in paths:
        if p.is_dir():
            remove_dir(p)
        else:
            p.unlink(missing_ok=True)
