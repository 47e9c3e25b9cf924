"""Resuming from a checkpoint (lora_ppo/io/checkpoint.py writes and finds them): refuse one this
run cannot continue, restore the engine, check that the restored weights are the saved ones, and
put back RNGs, counters, sampler, KL controller and reward moments."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lora_ppo.config import Config
from lora_ppo.config.load import config_to_dict
from lora_ppo.errors import UserError
from lora_ppo.io.checkpoint import (
    ADAPTER_WEIGHTS,
    ENGINE_DIR,
    ENGINE_TAG,
    MUST_MATCH,
    MUST_MATCH_4BIT,
    POLICY_DIR,
    VALUE_DIR,
    VALUE_HEAD,
    Checkpoint,
    check_base,
    open_checkpoint,
    read_tensors,
    run_facts,
    set_rng_state,
)
from lora_ppo.modeling.actor_critic import CRITIC, POLICY

log = logging.getLogger(__name__)


def _changed(saved: dict, now: dict, prefix: str = "") -> dict[str, tuple]:
    out = {}
    for k in saved.keys() | now.keys():
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_changed(a, b, f"{prefix}{k}."))
        elif a != b:
            out[prefix + k] = (a, b)
    return out


def check_fit(ck: Checkpoint, cfg: Config, model_path: str, fields: tuple[str, ...],
              facts: dict) -> None:
    """Refuse a checkpoint that this run cannot continue: another base, another value of a
    config field in `fields` (they change saved shapes or what the weights mean), or other run
    `facts` (world size, ZeRO stage, precision) than its state.json records. Other changed
    settings are only warned about. Shared by PPO and the SFT / reward-model stages."""
    check_base(ck, model_path)
    changed = _changed(config_to_dict(ck.cfg), config_to_dict(cfg))
    changed.pop("output_dir", None)
    if ck.cfg.quantization.mode == "4bit":
        fields = fields + MUST_MATCH_4BIT
    bad = [f"{k}: {changed[k][0]!r} in the checkpoint, {changed[k][1]!r} now"
           for k in fields if k in changed]
    bad += [f"{k}: {ck.state[k]!r} in the checkpoint, {v!r} now"
            for k, v in facts.items() if k in ck.state and ck.state[k] != v]
    if bad:
        raise UserError(f"checkpoint {ck.path} does not fit this run ({'; '.join(bad)}); resume "
                        "with the settings it was saved with, or start a new output_dir")
    rest = [f"{k} ({a!r} -> {b!r})" for k, (a, b) in sorted(changed.items())]
    if rest:
        log.warning("resuming %s with changed settings: %s", ck.path, ", ".join(rest))


def load_engine_state(ck: Checkpoint, engine) -> None:
    """Trainable weights, optimizer state, LR schedule and DeepSpeed's counters into `engine`
    (the frozen base was never saved, so the module state is loaded non-strictly)."""
    path, _ = engine.load_checkpoint(str(ck.path / ENGINE_DIR), tag=ENGINE_TAG,
                                     load_module_strict=False)
    if path is None:
        raise UserError(f"DeepSpeed could not load {ck.path / ENGINE_DIR}; the checkpoint is "
                        "incomplete")


def saved_weights(ck: Checkpoint) -> dict[str, dict[str, torch.Tensor]]:
    """The adapters' and value head's tensors as saved, by file (relative path)."""
    mode = ck.cfg.algorithm.value_mode
    files = [f"{POLICY_DIR}/{ADAPTER_WEIGHTS}"]
    if mode != "none":
        files.append(f"{VALUE_DIR}/{VALUE_HEAD}")
    if mode == "adapter":
        files.append(f"{VALUE_DIR}/{ADAPTER_WEIGHTS}")
    return {f: read_tensors(ck.path / f) for f in files}


def live_weights(ac) -> dict[str, dict[str, torch.Tensor]]:
    """The live model's tensors under the names of `saved_weights` (ZeRO-3: inside a gather)."""
    from peft import get_peft_model_state_dict

    out = {f"{POLICY_DIR}/{ADAPTER_WEIGHTS}": get_peft_model_state_dict(ac.peft_model,
                                                                        adapter_name=POLICY)}
    if ac.value_head is not None:
        out[f"{VALUE_DIR}/{VALUE_HEAD}"] = ac.value_head.linear.state_dict()
    if ac.value_mode == "adapter":
        out[f"{VALUE_DIR}/{ADAPTER_WEIGHTS}"] = get_peft_model_state_dict(ac.peft_model,
                                                                          adapter_name=CRITIC)
    return out


def _check_restored(ck: Checkpoint, ac) -> None:
    """The engine restored the weights (its module state is loaded non-strictly, because the
    frozen base is not in it): check they equal the PEFT files, so a renamed parameter cannot
    be skipped silently."""
    from lora_ppo.runtime.engine import gathered_trainable

    saved = saved_weights(ck)
    with gathered_trainable(ac):
        live = live_weights(ac)
        for f, tensors in saved.items():
            for name, t in tensors.items():
                if name not in live[f] or not torch.equal(
                        live[f][name].detach().cpu().to(t.dtype), t):
                    raise UserError(f"checkpoint {ck.path}: {name} in {f} does not match the "
                                    "DeepSpeed state beside it; the checkpoint is inconsistent")


def load(run, path: str | Path) -> None:
    """Restore weights, engine, RNGs, counters, sampler, KL controller and moments into `run`."""
    ck = open_checkpoint(path)
    check_fit(ck, run.cfg, run.model_path, MUST_MATCH, run_facts(run.dist, run.engine, run.cfg))
    load_engine_state(ck, run.engine)
    _check_restored(ck, run.ac)
    rank = torch.load(ck.path / f"rank-{run.dist.rank}.pt", weights_only=True)
    run.moments.load_state_dict(rank["moments"])
    run.kl_ctl.load_state_dict(ck.state["kl_ctl"])
    run.sampler.load_state_dict(ck.state["sampler"])
    run.step, run.episode = int(ck.state["step"]), int(ck.state["episode"])
    set_rng_state(rank["rng"], run.generator)  # last: nothing after this may draw numbers
