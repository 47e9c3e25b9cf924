"""Checkpoints: layout, atomic writes, find/verify/load, exact resume after SIGKILL."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    clean_env,
    run_cli,
    run_two_ranks,
    tiny_config,
    two_rank_yaml,
    write_yaml,
)
from safetensors.torch import load_file, save_file

from lora_ppo.config.load import config_to_dict
from lora_ppo.errors import UserError
from lora_ppo.io import checkpoint as ckpt
from lora_ppo.io.atomic import atomic_output_dir
from lora_ppo.ppo import checkpoint as restore

VOLATILE = ("time/", "memory/", "tokens_per_s")  # wall-clock and RSS differ between runs




@pytest.fixture(scope="module")
def trained(tiny_model_dir, low_ids_reward, tmp_path_factory):
    """Three PPO updates in this process, a checkpoint after each, keep=2."""
    from lora_ppo.ppo.loop import train

    out = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(tiny_model_dir, out, "ppo.total_updates=3", "checkpoint.every=1",
                      "checkpoint.keep=2", "ppo.optim.learning_rate=0.01", "ppo.adaptive_kl=true",
                      "reward.normalize=true", f"reward.function={low_ids_reward}")
    train(cfg)
    return out, cfg


def _fake_checkpoint(path: Path, complete: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "state.json").write_text("{}")
    if complete:
        (path / ckpt.COMPLETE).write_text(json.dumps({"files": {}}))
    return path


def test_find_picks_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 9, 12):
        _fake_checkpoint(root / f"step-{step}")
    _fake_checkpoint(root / "step-13", complete=False)  # killed between rename and ... / copied
    _fake_checkpoint(root / ".step-14.tmp")  # killed while writing: COMPLETE is inside already
    _fake_checkpoint(root / "step-x")
    assert ckpt.find(tmp_path, "latest") == root / "step-12"  # 12 > 9 as numbers, not strings
    assert ckpt.find(tmp_path, str(root / "step-2")) == root / "step-2"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        ckpt.find(tmp_path, str(root / "step-13"))
    # A run killed before (or while writing) its first checkpoint: none to continue, so
    # `--resume latest` starts it again (io/run_dir.py::earlier_run).
    assert ckpt.find(tmp_path / "elsewhere", "latest") is None


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(UserError, match="not empty.*--force"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["b"]


@pytest.mark.integration
def test_layout_keep_and_no_frozen_base(trained):
    out, _ = trained
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]  # keep=2, no leftovers
    step = root / "step-3"
    for rel in ("policy/adapter_config.json", "policy/adapter_model.safetensors",
                "value/value_head.safetensors", "rank-0.pt", "state.json", "config.yaml",
                "COMPLETE", "deepspeed/engine/mp_rank_00_model_states.pt"):
        assert (step / rel).is_file(), rel
    manifest = json.loads((step / "COMPLETE").read_text())["files"]
    assert set(manifest) == {str(p.relative_to(step)) for p in step.rglob("*")
                             if p.is_file() and p.name != "COMPLETE"}
    # exclude_frozen_parameters: the engine state holds only LoRA weights and the value head
    module = torch.load(step / "deepspeed/engine/mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    assert module and all("lora_" in k or k.startswith("value_head.") for k in module)
    state = json.loads((step / "state.json").read_text())
    assert (state["step"], state["episode"], state["world_size"]) == (3, 24, 1)
    assert state["prompts"] == {"epoch": 0, "position": 24}
    assert state["kl_ctl"]["value"] != 0.05  # adaptive KL moved
    assert state["base"]["config_sha256"] and state["base"]["weights"]
    # the adapter dir is a plain PEFT dir with peft's own key names (no adapter name in them)
    keys = load_file(step / "policy/adapter_model.safetensors")
    assert keys and all(k.startswith("base_model.model.") and ".policy." not in k for k in keys)


@pytest.mark.integration
def test_load_restores_the_run(trained, tiny_model_dir, low_ids_reward):
    from lora_ppo.ppo.loop import setup

    out, cfg = trained
    step = out / "checkpoints" / "step-3"
    run = setup(cfg)
    restore.load(run, step)
    assert (run.step, run.episode) == (3, 24)
    assert run.prompts.state_dict() == {"epoch": 0, "position": 24}
    state = json.loads((step / "state.json").read_text())
    assert run.kl_ctl.value == state["kl_ctl"]["value"]
    saved = torch.load(step / "rank-0.pt", weights_only=True)
    assert run.moments.count == 24 and run.moments.state_dict() == saved["moments"]
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])
    assert torch.equal(run.generator.get_state(), saved["rng"]["generator"])
    policy = load_file(step / "policy/adapter_model.safetensors")
    live = restore.live_weights(run.ac)["policy/adapter_model.safetensors"]
    assert any(v.abs().max() > 0 for k, v in policy.items() if "lora_B" in k)  # trained
    for k, v in policy.items():
        assert torch.equal(live[k], v), k
    adam = run.engine.optimizer.state
    assert adam and all(int(s["step"]) == 3 for s in adam.values())  # one step per update


@pytest.mark.integration
def test_corrupt_and_truncated_files_are_refused(trained, tmp_path):
    out, _ = trained
    bad = shutil.copytree(out / "checkpoints" / "step-3", tmp_path / "step-3")
    ckpt.open_checkpoint(bad)
    weights = bad / "policy" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="adapter_model.safetensors is truncated"):
        ckpt.open_checkpoint(bad)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, one byte flipped
    with pytest.raises(UserError, match="is corrupt"):
        ckpt.open_checkpoint(bad)
    (bad / "COMPLETE").unlink()
    with pytest.raises(UserError, match="not a complete lora-ppo checkpoint"):
        ckpt.open_checkpoint(bad)
    weights.write_bytes(data[:-100])
    with pytest.raises(UserError, match="cannot read .*corrupt or truncated"):
        ckpt.read_tensors(weights)  # safetensors itself sees a short file, not a flipped byte


def _other_base(model_dir: Path, out: Path) -> Path:
    """The same architecture and file sizes with different weights (a fine-tuned sibling)."""
    shutil.copytree(model_dir, out)
    f = out / "model.safetensors"
    tensors = load_file(f)
    save_file({k: v + 0.01 for k, v in tensors.items()}, f, metadata={"format": "pt"})
    assert f.stat().st_size == (model_dir / "model.safetensors").stat().st_size
    return out


@pytest.mark.integration
def test_incompatible_checkpoints_are_refused(trained, tmp_path):
    from lora_ppo.ppo.loop import setup

    out, cfg = trained
    step = out / "checkpoints" / "step-3"
    run = setup(tiny_config(Path(cfg.model.path), tmp_path / "r8", "lora.r=8",
                            "value.mode=adapter"))
    # in process too, a resumed run keeps its config (io/resume.py): each change is named
    with pytest.raises(UserError, match=r"^--resume: .*lora\.r=8 \(the run's: 4\), value\.mode="
                                        r"adapter \(the run's: auto\).* would change the run"):
        restore.load(run, step)
    other = _other_base(Path(cfg.model.path), tmp_path / "other")
    with pytest.raises(UserError, match="trained on another base: the weight files"):
        ckpt.check_base(ckpt.open_checkpoint(step), str(other))


def _metrics(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    step = out / "checkpoints" / "step-5"
    return {**load_file(step / "policy/adapter_model.safetensors"),
            **load_file(step / "value/value_head.safetensors")}


def _crash_config(tmp_path, name, model_dir, reward, *, seed, checkpoint_every, **ppo):
    """The crash tests' run: ZeRO-2, fp32, adaptive KL and score normalisation, so every piece
    of a checkpoint's state matters; `ppo` sets total_updates, epochs and optim."""
    return write_yaml(tmp_path / f"{name}.yaml", {
        "output_dir": str(tmp_path / name), "seed": seed,
        "model": {"path": str(model_dir), "gradient_checkpointing": False,
                  "max_prompt_length": 16},
        "quantization": {"mode": "none"}, "lora": {"r": 4, "alpha": 8},
        "reward": {"function": reward, "normalize": True},
        "data": {"prompts": "builtin:reviews"},
        "rollout": {"prompts_per_update": 8, "generation_batch_size": 8, "max_new_tokens": 6},
        "ppo": {"minibatch_size": 4, "micro_batch_size": 2, "adaptive_kl": True,
                "target_kl": 0.01, "kl_horizon": 100, **ppo},
        "deepspeed": {"config": "zero2"},
        "logging": {"progress": False, "tensorboard": False},
        "checkpoint": {"every": checkpoint_every, "keep": 2}})


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(tiny_model_dir, low_ids_reward, tmp_path):
    """Kill a run with SIGKILL once step 2's checkpoint exists; --resume finishes it with the
    same weights and metrics, bit for bit, as a run that was never stopped (CPU, fp32, ZeRO-2).
    Adaptive KL, score normalisation and warmup make every piece of state matter."""
    def config(name):
        return _crash_config(tmp_path, name, tiny_model_dir, low_ids_reward, seed=7,
                             checkpoint_every=1, total_updates=5, epochs=2,
                             optim={"learning_rate": 0.01, "lr_schedule": "cosine",
                                    "warmup_steps": 2})

    cmd = [sys.executable, "-m", "lora_ppo", "train", "--config"]
    env = clean_env()
    full = subprocess.Popen(cmd + [str(config("full"))], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen(cmd + [str(config("killed"))], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "killed" / "checkpoints" / "step-2" / "COMPLETE"
    deadline = time.monotonic() + 300
    while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    _, err = full.communicate(timeout=600)
    assert full.returncode == 0, err[-3000:]

    root = tmp_path / "killed" / "checkpoints"
    latest = ckpt.find(tmp_path / "killed", "latest")
    assert 2 <= int(latest.name.split("-")[1]) < 5
    # What a kill during a later save would leave: a temp dir, a dir without COMPLETE.
    shutil.copytree(latest, root / ".step-9.tmp")
    shutil.copytree(latest, root / "step-8", ignore=shutil.ignore_patterns("COMPLETE"))
    assert ckpt.find(tmp_path / "killed", "latest") == latest

    res = run_cli("train", "--config", str(tmp_path / "killed.yaml"), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-5"]  # leftovers pruned
    a, b = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = _metrics(tmp_path / "full" / "metrics.jsonl"), _metrics(
        tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in mb] == [1, 2, 3, 4, 5]
    assert ma == mb


def _kill_when(cmd: list[str], marker, timeout: float = 300) -> None:
    """Start `cmd` and SIGKILL it as soon as `marker()` is true (polled every 5 ms)."""
    proc = subprocess.Popen(cmd, env=clean_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not marker() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"


@pytest.mark.slow
def test_kill_before_and_during_the_first_checkpoint_then_the_named_command(
        tiny_model_dir, low_ids_reward, tmp_path):
    """A run killed before its first complete checkpoint (after update 1 of 3, the first
    checkpoint due at 2) or while writing it: the plain command is refused with a message that
    names `--resume latest`; that command starts the run again from update 0 in the same
    directory and ends bit for bit where a run that was never stopped ends."""
    def config(name):
        return _crash_config(tmp_path, name, tiny_model_dir, low_ids_reward, seed=3,
                             checkpoint_every=2, total_updates=3, epochs=1,
                             optim={"learning_rate": 0.01})

    cmd = [sys.executable, "-m", "lora_ppo", "train", "--config"]
    full = run_cli("train", "--config", str(config("full")))
    assert full.returncode == 0, full.stderr[-3000:]
    metrics = tmp_path / "before" / "metrics.jsonl"
    _kill_when(cmd + [str(config("before"))],
               lambda: metrics.exists() and metrics.read_text().count("\n") >= 1)
    partial = tmp_path / "during" / "checkpoints" / ".step-2.tmp"
    _kill_when(cmd + [str(config("during"))], partial.exists)
    for name in ("before", "during"):
        out = tmp_path / name
        assert ckpt.find(out, "latest") is None and (out / "config.yaml").is_file()
        refused = run_cli("train", "--config", str(tmp_path / f"{name}.yaml"))
        assert refused.returncode == 2, refused.stderr[-2000:]
        named = refused.stderr.split("`")[1]  # the command the message names
        assert named == "lora-ppo train --resume latest", refused.stderr
        res = run_cli("train", "--config", str(tmp_path / f"{name}.yaml"),
                      *named.split()[2:])
        assert res.returncode == 0, res.stderr[-3000:]
        assert "no complete checkpoint" in res.stdout and "from step 0" in res.stdout
        step = out / "checkpoints" / "step-3"
        for weights in ("policy/adapter_model.safetensors", "value/value_head.safetensors"):
            a, b = load_file(tmp_path / "full" / "checkpoints" / "step-3" / weights), \
                load_file(step / weights)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert _metrics(out / "metrics.jsonl") == _metrics(tmp_path / "full" / "metrics.jsonl")
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]


@pytest.mark.slow
def test_cli_refuses_bad_resumes(trained, tmp_path):
    """A damaged checkpoint, another base: one line on stderr, exit code 2."""
    out, cfg = trained
    cfg_file = write_yaml(tmp_path / "cfg.yaml",
                          {**config_to_dict(cfg), "output_dir": str(tmp_path / "run")})
    bad = shutil.copytree(out / "checkpoints" / "step-3", tmp_path / "bad")
    head = bad / "value" / "value_head.safetensors"
    head.write_bytes(head.read_bytes()[:10])
    other = _other_base(Path(cfg.model.path), tmp_path / "other")
    cases = [
        (["--resume", str(bad)], "value_head.safetensors is truncated"),
        (["--resume", str(out / "checkpoints" / "step-3"), f"model.path={other}"],
         "trained on another base"),
    ]
    for args, message in cases:
        res = run_cli("train", "--config", str(cfg_file), *args)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and message in lines[-1], res.stderr[-2000:]
        assert lines[-1].startswith("lora-ppo: error: ") and "Traceback" not in res.stderr


@pytest.mark.slow
def test_two_ranks_save_and_resume(tiny_model_dir, low_ids_reward, tmp_path):
    """`deepspeed --num_gpus 2` (CPU, gloo, ZeRO-2): each rank writes its optimizer partition
    and RNG file into one checkpoint; resuming from step 1 reproduces step 2 exactly."""
    cfg = two_rank_yaml(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "run",
                        low_ids_reward, checkpoint_every=1,
                        optim={"learning_rate": 0.01})

    def launch(*extra):
        run_two_ranks("--module", "lora_ppo", "train", "--config", str(cfg), *extra)

    launch()
    root = tmp_path / "run" / "checkpoints"
    step1 = root / "step-1"
    names = {str(p.relative_to(step1)) for p in step1.rglob("*") if p.is_file()}
    assert {"rank-0.pt", "rank-1.pt", "deepspeed/engine/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "deepspeed/engine/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names
    r0, r1 = (torch.load(step1 / f"rank-{i}.pt", weights_only=True) for i in (0, 1))
    assert not torch.equal(r0["rng"]["torch"], r1["rng"]["torch"])  # seeded seed + rank
    first = _metrics(tmp_path / "run" / "metrics.jsonl")
    before = load_file(root / "step-2" / "policy/adapter_model.safetensors")
    launch("--resume", str(step1))
    after = load_file(root / "step-2" / "policy/adapter_model.safetensors")
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert _metrics(tmp_path / "run" / "metrics.jsonl") == first
