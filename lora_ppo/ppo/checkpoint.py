"""PPO's checkpoints: what a run writes into the protocol of io/checkpoint.py, and how it resumes
from one exactly.

    policy/               the policy adapter, a plain PEFT dir (adapter_config.json,
                          adapter_model.safetensors): the layout `lora-ppo export` writes
    value/                value_head.safetensors (keys weight, bias) and, with value.mode=adapter,
                          the critic adapter as a PEFT dir beside it; absent with value.mode=none
    rank-<k>.pt           every RNG (python, numpy, torch CPU and CUDA, run.generator) and the
                          running reward moments
    state.json            step, episode, KL controller, the prompts' position, the value mode
                          (auto resolved), and the protocol's facts
    deepspeed/, config.yaml, COMPLETE as io/checkpoint.py writes them
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from lora_ppo.config.load import save_config
from lora_ppo.errors import UserError
from lora_ppo.io.checkpoint import (
    ADAPTER_WEIGHTS,
    CONFIG,
    FORMAT,
    POLICY_DIR,
    STATE,
    VALUE_DIR,
    VALUE_HEAD,
    Checkpoint,
    base_fingerprint,
    check_fit,
    load_engine_state,
    open_checkpoint,
    read_tensors,
    rng_state,
    run_facts,
    set_rng_state,
    write_checkpoint,
)
from lora_ppo.modeling.loading import quantization_mode
from lora_ppo.modeling.roles import CRITIC, POLICY
from lora_ppo.ppo.run import Run
from lora_ppo.runtime.engine import gathered_trainable


def ppo_facts(run: Run) -> dict:
    """The protocol's run facts and the value mode with `auto` resolved (compared on resume)."""
    return {**run_facts(run.dist, run.engine,
                        quantization_mode(run.cfg.quantization, run.dist.device.type)),
            "value_mode": run.cfg.algorithm.value_mode}


def save_adapters(ac, out: Path) -> None:
    """policy/ and value/ under `out` from the live model (ZeRO-3: call inside gathered_trainable)."""
    scratch = out / ".peft"
    adapters = [POLICY] + ([CRITIC] if ac.value_mode == "adapter" else [])
    # peft writes a non-default adapter to <dir>/<adapter name>/ (plus a README at <dir>).
    ac.peft_model.save_pretrained(scratch, selected_adapters=adapters)
    (scratch / POLICY).rename(out / POLICY_DIR)
    if ac.value_mode == "adapter":
        (scratch / CRITIC).rename(out / VALUE_DIR)
    elif ac.value_mode == "shared":
        (out / VALUE_DIR).mkdir()
    shutil.rmtree(scratch)
    if ac.value_head is not None:
        head = {k: v.detach().cpu().contiguous()
                for k, v in ac.value_head.linear.state_dict().items()}
        save_file(head, str(out / VALUE_DIR / VALUE_HEAD))


def _write_state(run: Run, path: Path) -> None:
    state = {"format": FORMAT, "step": run.step, "episode": run.episode, **ppo_facts(run),
             "kl_ctl": run.kl_ctl.state_dict(), "prompts": run.prompts.state_dict(),
             "base": base_fingerprint(run.model_path)}
    (path / STATE).write_text(json.dumps(state, indent=1))
    save_config(run.cfg, path / CONFIG)


def save(run: Run) -> Path:
    """`<output_dir>/checkpoints/step-<run.step>`: adapters and heads, the DeepSpeed state, RNG
    and reward moments per rank, state.json and config.yaml (io/checkpoint.py's protocol)."""
    return write_checkpoint(
        run.output_dir / "checkpoints", run.step, run.cfg.checkpoint.keep, run.dist, run.engine,
        {"rng": rng_state(run.generator), "moments": run.moments.state_dict()},
        lambda d: save_adapters(run.ac, d), lambda d: _write_state(run, d))


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
    saved = saved_weights(ck)
    with gathered_trainable(ac):
        live = live_weights(ac)
        for f, tensors in saved.items():
            for name, t in tensors.items():
                if name not in live[f] or not torch.equal(
                        live[f][name].detach().cpu().to(t.dtype), t):
                    raise UserError(f"checkpoint {ck.path}: {name} in {f} does not match the "
                                    "DeepSpeed state beside it; the checkpoint is inconsistent")


def load(run: Run, path: str | Path) -> None:
    """Restore weights, engine, RNGs, counters, the prompts' position, KL controller and
    moments into `run`."""
    ck = open_checkpoint(path)
    check_fit(ck, run.cfg, run.model_path, ppo_facts(run), "train")
    load_engine_state(ck, run.engine)
    _check_restored(ck, run.ac)
    rank = torch.load(ck.path / f"rank-{run.dist.rank}.pt", weights_only=True)
    run.moments.load_state_dict(rank["moments"])
    run.kl_ctl.load_state_dict(ck.state["kl_ctl"])
    run.prompts.load_state_dict(ck.state.get("prompts", ck.state.get("sampler")))  # "sampler":
    # the name checkpoints of lora_ppo 0.1 gave the prompts' position
    run.step, run.episode = int(ck.state["step"]), int(ck.state["episode"])
    set_rng_state(rank["rng"], run.generator)  # last: nothing after this may draw numbers
