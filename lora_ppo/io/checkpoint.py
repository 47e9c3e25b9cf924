"""Checkpoints that resume a run exactly, whatever the run: the protocol PPO (ppo/checkpoint.py)
and the SFT and reward stages (stages/common.py) share. Each writes its own files into it.

Layout of `<run_dir>/checkpoints/step-<N>/`:

    deepspeed/            engine.save_checkpoint(tag="engine", exclude_frozen_parameters=True):
                          trainable weights, optimizer state (one ZeRO partition per rank), LR
                          scheduler and DeepSpeed's step counters; the frozen base is not written
    rank-<k>.pt           per rank: the run's RNG states (and what else it keeps per rank)
    state.json            step, base fingerprint, world size, ZeRO stage, precision, and the
                          run's own counters
    config.yaml           the config of the run
    ...                   the run's weights as plain files: PPO's policy/ and value/ (the adapter
                          layout `lora-ppo export` writes: POLICY_DIR, VALUE_DIR), a stage's
                          adapter/
    COMPLETE              written last: size and sha256 of every other file

Atomic (lora_ppo.io.atomic): everything is written under `.step-<N>.tmp`, fsynced, then renamed to
`step-<N>`; COMPLETE is the last file in it. `find` only picks directories named `step-<N>` that
hold COMPLETE, and `open_checkpoint` checks every file against it, so a crash while writing leaves
the previous checkpoint as the latest and a truncated or corrupted file is an error, not a silent
resume from garbage.

Exactness: with the same seed on CPU in fp32, a resumed run reproduces the uninterrupted run
bit for bit (tests/io/test_checkpoint.py compares adapter weights with torch.equal and every metric
but time and memory with ==): generation samples from the restored torch RNG, minibatches are
shuffled by the restored generator, and the optimizer resumes from its saved moments.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from lora_ppo.config import Config
from lora_ppo.config.load import load_config
from lora_ppo.errors import UserError, first_line
from lora_ppo.io.atomic import check_sealed, fsync_path, remove_dir, replace_dir, seal, sha256_file
from lora_ppo.io.config_changes import check_changes
from lora_ppo.modeling.loading import quantization_mode
from lora_ppo.runtime.engine import gathered_trainable

FORMAT = 1
COMPLETE, STATE, CONFIG = "COMPLETE", "state.json", "config.yaml"
POLICY_DIR, VALUE_DIR, VALUE_HEAD = "policy", "value", "value_head.safetensors"
ENGINE_DIR, ENGINE_TAG = "deepspeed", "engine"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_STEP_DIR = re.compile(r"step-(\d+)")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class Checkpoint(NamedTuple):
    """A verified complete checkpoint directory with its state.json and config."""

    path: Path
    state: dict
    cfg: Config


# -- base-model fingerprint -----------------------------------------------------------------------

def _sample(path: Path, n: int = 1 << 16) -> bytes:
    """The first and last `n` bytes of a file: enough to tell two same-shaped weight files
    apart (the first tensor's data follows a safetensors header), cheap for any size."""
    with open(path, "rb") as f:
        head = f.read(n)
        f.seek(max(0, path.stat().st_size - n))
        return head + f.read(n)


def base_fingerprint(model_path: str) -> dict:
    """Identity of a base model, cheap enough for every save: its path, the sha256 of its
    config.json, and a sha256 over the names, sizes and first and last 64 KiB of its weight files.

    A hub id is looked up in the local hub cache; when it is not there, only the path is known.
    """
    root = Path(model_path)
    if not root.is_dir():
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(model_path, local_files_only=True))
        except Exception:  # not cached (or no hub client): the path alone identifies it
            return {"path": model_path, "config_sha256": None, "weights": None}
    h = hashlib.sha256()
    for p in sorted(root.iterdir()):  # top level only: an output_dir inside it must not count
        if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json")):
            h.update(f"{p.name}:{p.stat().st_size}\n".encode() + _sample(p))
    config = root / "config.json"
    return {"path": model_path,
            "config_sha256": sha256_file(config) if config.is_file() else None,
            "weights": h.hexdigest()}


def check_base(ck: Checkpoint, model_path: str) -> None:
    """Refuse a checkpoint whose base differs from the model at `model_path`."""
    saved, now = ck.state["base"], base_fingerprint(model_path)
    for key, what in (("config_sha256", "config.json"), ("weights", "weight files")):
        if saved[key] is not None and now[key] is not None and saved[key] != now[key]:
            raise UserError(
                f"checkpoint {ck.path} was trained on another base: the {what} of "
                f"{saved['path']} (then) and {model_path} (now) differ; use the base it was "
                "trained on")
    if saved["config_sha256"] is None and saved["path"] != now["path"]:
        raise UserError(f"checkpoint {ck.path} was trained on base {saved['path']}, not "
                        f"{model_path}; use the base it was trained on")


# -- reading ----------------------------------------------------------------------------------------

def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete `step-<N>` directory under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir()
             if (m := _STEP_DIR.fullmatch(d.name)) and (d / COMPLETE).is_file()]
    return sorted(found)


def find(run_dir: str | Path, resume: str) -> Optional[Path]:
    """`resume="latest"`: the newest complete checkpoint under run_dir/checkpoints, or None when
    the run never completed one (it was killed before or while writing its first: `--resume
    latest` then starts it again from step 0, io/run_dir.py::earlier_run). Anything else is a
    checkpoint directory, which must be complete."""
    if resume == "latest":
        found = complete_checkpoints(Path(run_dir) / "checkpoints")
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise UserError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE} marker); "
                        "give a checkpoints/step-<N> directory, or --resume latest for the newest "
                        "complete one (or a fresh start when there is none)")
    return path


def verify(path: Path) -> None:
    """Check every file against the sizes and sha256 recorded in COMPLETE."""
    if not (path / COMPLETE).is_file():
        raise UserError(f"{path} is not a complete lora-ppo checkpoint (no {COMPLETE}); give a "
                        "checkpoints/step-<N> directory")
    check_sealed(path, COMPLETE, hint="use an earlier checkpoint")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Verify a checkpoint directory and read its state and config. A run's output_dir stands
    for its newest complete checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist; give a checkpoints/step-<N> directory")
    if not (path / COMPLETE).exists() and (path / "checkpoints").is_dir():
        found = complete_checkpoints(path / "checkpoints")
        if not found:
            raise UserError(f"{path} is a run directory without a complete checkpoint; give a "
                            "checkpoints/step-<N> directory, or train until one is written")
        path = found[-1][1]
    verify(path)
    state = json.loads((path / STATE).read_text())
    if state.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} has format {state.get('format')}, this lora-ppo reads "
                        f"format {FORMAT}; use the lora-ppo version that wrote it")
    try:
        cfg = load_config(path / CONFIG)
    except UserError as e:  # e.g. written by a version with other config fields
        raise UserError(f"checkpoint {path}: its {CONFIG} does not load: {e}")
    return Checkpoint(path, state, cfg)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file; a corrupt or truncated one is a UserError."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise UserError(f"cannot read {path}: {first_line(e)}; the file is corrupt or "
                        "truncated")


# -- saving -----------------------------------------------------------------------------------------

def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def rng_state(generator: torch.Generator) -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generator": generator.get_state()}


def set_rng_state(rng: dict, generator: torch.Generator) -> None:
    random.setstate(rng["python"])
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    generator.set_state(rng["generator"])


def _engine_facts(engine) -> dict:
    precision = ("bf16" if engine.bfloat16_enabled() else
                 "fp16" if engine.fp16_enabled() else "fp32")
    return {"zero_stage": int(engine.zero_optimization_stage()), "precision": precision}


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop leftovers of interrupted saves, and
    checkpoints past `step` (after resuming from an earlier one they belong to a history this
    run replaced, like the metrics lines that resume truncated)."""
    for d in root.iterdir():
        m = _STEP_DIR.fullmatch(d.name)
        if d.name.startswith(".step-") or (m and not (d / COMPLETE).is_file()):
            shutil.rmtree(d, ignore_errors=True)
    complete = complete_checkpoints(root)
    for s, d in complete:
        if s > step:
            remove_dir(d)
    for _, d in [(s, d) for s, d in complete if s <= step][:-keep]:
        remove_dir(d)


def write_checkpoint(root: Path, step: int, keep: int, dist, engine, rank_state: dict,
                     write_weights: Callable[[Path], None],
                     write_state: Callable[[Path], None]) -> Path:
    """Write `root/step-<step>` atomically; call on every rank. PPO (`save`) and the SFT and
    reward stages (stage_common.save_checkpoint) share this protocol:

    rank 0 makes `root/.step-<step>.tmp`; every rank saves its DeepSpeed partition (collective,
    without the frozen base); rank 0 writes the weights inside the ZeRO-3 gather
    (`write_weights`); each rank writes `rank_state` to rank-<k>.pt; rank 0 writes state and
    config (`write_state`), seals the directory (COMPLETE: sizes and sha256 of every file),
    renames it into place and prunes to `keep`. A crash at any point leaves the previous
    checkpoint the newest complete one.
    """
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    rank0 = dist.rank == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    engine.save_checkpoint(str(tmp / ENGINE_DIR), tag=ENGINE_TAG, exclude_frozen_parameters=True)
    with gathered_trainable(engine):
        if rank0:
            write_weights(tmp)
    rank_file = tmp / f"rank-{dist.rank}.pt"
    torch.save(rank_state, rank_file)
    fsync_path(rank_file)
    if rank0:
        write_state(tmp)
    _barrier()
    if rank0:
        seal(tmp, COMPLETE)
        replace_dir(tmp, final)  # fsyncs every file, then renames
        _prune(root, step, keep)
    _barrier()
    return final


def run_facts(dist, engine, quantization: str) -> dict:
    """What a checkpoint records of the run besides its config: world size, ZeRO stage,
    precision and the base's quantization (`auto` resolved), compared by check_fit."""
    return {"world_size": dist.world_size, **_engine_facts(engine), "quantization": quantization}


def trained_quantization(ck: Checkpoint) -> str:
    """The quantization the checkpoint's base was trained in: its recorded fact (a checkpoint
    of quantization.mode=auto), else the mode its config names."""
    return ck.state.get("quantization") or quantization_mode(ck.cfg.quantization)


# -- resuming --------------------------------------------------------------------------------------

def check_fit(ck: Checkpoint, cfg: Config, model_path: str, facts: dict, command: str) -> None:
    """Refuse a checkpoint that this run cannot continue: another base, a config that changes
    the run (io/config_changes.py: only SAFE fields may differ), or other run `facts` (world size,
    ZeRO stage, precision) than its state.json records. Shared by PPO and the SFT /
    reward-model stages."""

    check_base(ck, model_path)
    check_changes(ck.cfg, cfg, command, int(ck.state.get("step", 0)), ck.path / CONFIG)
    if "quantization" in facts and "quantization" not in ck.state:  # saved before the fact was
        ck.state["quantization"] = trained_quantization(ck)
    bad = [f"{k}: {ck.state[k]!r} in the checkpoint, {v!r} now"
           for k, v in facts.items() if k in ck.state and ck.state[k] != v]
    if bad:
        raise UserError(f"checkpoint {ck.path} does not fit this run ({'; '.join(bad)}); resume "
                        "with the settings it was saved with, or start a new output_dir")


def load_engine_state(ck: Checkpoint, engine) -> None:
    """Trainable weights, optimizer state, LR schedule and DeepSpeed's counters into `engine`
    (the frozen base was never saved, so the module state is loaded non-strictly)."""
    path, _ = engine.load_checkpoint(str(ck.path / ENGINE_DIR), tag=ENGINE_TAG,
                                     load_module_strict=False)
    if path is None:
        raise UserError(f"DeepSpeed could not load {ck.path / ENGINE_DIR}; the checkpoint is "
                        "incomplete")
