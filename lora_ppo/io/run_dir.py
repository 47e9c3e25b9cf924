"""A run directory that holds a run is never clobbered by accident.

A command that starts a run (`train`, `sft`, `train-reward`, `demo`) checks where it will write
before anything is loaded: the output directory must be a directory or creatable as one (not a
file, not under one, writable), and if it already holds files of an earlier run of the same
command the command is refused, unless `--resume` continues that run or `--overwrite` replaces
it (the convention of the tools users know: a second `run` into a used directory asks first).
`--resume latest` works from any state: it continues the newest complete checkpoint, or starts
the run again from step 0 when it never completed one (`earlier_run`).
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
from typing import NamedTuple, Optional

from lora_ppo.errors import UserError
from lora_ppo.io.atomic import remove_dir
from lora_ppo.io.checkpoint import find

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


class Start(NamedTuple):
    """Where a training command starts: the checkpoint it continues, or None for step 0; the
    files of an earlier run that it replaces (removed by `clear` once every check passed); and
    the line to print when `--resume latest` found no complete checkpoint to continue."""

    checkpoint: Optional[Path]
    replaces: list[Path]
    note: Optional[str]


CLI = {"train": "train", "sft": "sft", "reward_model": "train-reward"}


def earlier_run(output_dir: str | Path, command: str, resume: Optional[str], overwrite: bool,
                run_dir: str | Path) -> Start:
    """Where `command` starts in output_dir, and which files of an earlier run it replaces.

    `run_dir/checkpoints` holds the command's checkpoints. An earlier run is continued from its
    newest complete checkpoint with `--resume latest`; when it never completed one (killed
    before or while writing it) `--resume latest` starts it again from step 0 in the same
    directory, replacing only the files that command writes (torchrun-style restarts: a
    scheduler that always re-runs with `--resume latest` gets going again from any state).
    Without `--resume`, an earlier run is refused unless `overwrite`. Every refusal names a
    command that works from that state. Call on every rank before loading anything.
    """
    check_output_dir(output_dir)
    check_flags(resume, overwrite)
    found = [Path(output_dir) / name for name in OWNED[command]
             if _holds(Path(output_dir) / name)]
    cli = CLI[command]
    if resume is not None:
        checkpoint = find(run_dir, resume)
        if checkpoint is not None:
            return Start(checkpoint, [], None)
        return Start(None, found, f"--resume latest: no complete checkpoint in "
                                  f"{Path(run_dir) / 'checkpoints'}; starting this {cli} run "
                                  "from step 0" + (" (replacing the files of the earlier "
                                                   "attempt)" if found else ""))
    if found and not overwrite:
        names = ", ".join(p.name for p in found)
        raise UserError(f"{output_dir} holds an earlier {cli} run ({names}); continue it with "
                        f"`lora-ppo {cli} --resume latest`, or start again with --overwrite "
                        "(deletes it) or another output_dir")
    return Start(None, found, None)


def check_flags(resume: Optional[str], overwrite: bool) -> None:
    if resume is not None and overwrite:
        raise UserError("--resume continues the run in output_dir and --overwrite replaces it; "
                        "pass one of them")


def clear(paths: list[Path]) -> None:
    """Remove the earlier run's files (rank 0, after every check has passed)."""
    for p in paths:
        if p.is_dir():
            remove_dir(p)
        else:
            p.unlink(missing_ok=True)
