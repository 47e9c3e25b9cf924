"""The launch scripts in scripts/: usage errors, and the whole RLHF chain under the real
`deepspeed` launcher with two CPU ranks per stage. (benchmarks/: test_bench.py, test_benchmarks.py)"""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import REPO, clean_env
from test_pipeline import _pipeline_yaml


def _bash(*args: str, env: dict | None = None, timeout: int = 60, cwd=REPO):
    return subprocess.run(["bash", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**clean_env(), **(env or {})})


@pytest.mark.slow
def test_setup_on_a_set_up_checkout_installs_the_pinned_versions_and_says_so():
    """scripts/setup.sh again on this checkout: it keeps the venv, installs what
    constraints.txt pins and ends with one line naming the versions (what CI prints)."""
    res = _bash("scripts/setup.sh", timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    last = res.stdout.strip().splitlines()[-1]
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert last.startswith("lora_ppo setup: ") and f"peft {pins['peft']}" in last, last


@pytest.mark.integration
def test_update_constraints_parses():
    """update_constraints.sh rebuilds a venv and runs the whole suite in it: no run of it is
    cheap enough for a test, so only its syntax is checked (the other scripts run below)."""
    res = _bash("-n", str(REPO / "scripts" / "update_constraints.sh"))
    assert res.returncode == 0, res.stderr


@pytest.mark.integration
def test_usage_errors_exit_2(tmp_path):
    res = _bash("scripts/launch.sh")
    assert res.returncode == 2 and "scripts/launch.sh train --config" in res.stderr
    res = _bash("scripts/launch.sh", "pretrain", "--config", "x.yaml")
    assert res.returncode == 2 and "unknown stage 'pretrain'" in res.stderr
    res = _bash("scripts/launch.sh", "train", env={"HOSTFILE": str(tmp_path / "nope")})
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = _bash("scripts/rlhf.sh", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "config file not found" in res.stderr


@pytest.mark.slow
def test_rlhf_script_runs_every_stage_on_two_ranks(tiny_model_dir, tmp_path):
    """Run from the user's directory with a relative config path and output_dir: the scripts
    keep the user's paths (they used to cd to the checkout, and each rank then missed the
    config)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    _pipeline_yaml(tmp_path / "cfg.yaml", tiny_model_dir, Path("out"))
    res = _bash(str(REPO / "scripts" / "rlhf.sh"), "cfg.yaml",
                env={"NUM_GPUS": "2", "MASTER_PORT": "29571"}, timeout=900, cwd=tmp_path)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert log.count("exits successfully") == 3 * 2, log[-3000:]  # sft, reward, PPO x 2 ranks
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "reward_adapter" / "score_head.safetensors").is_file()
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2]
    assert AutoModelForCausalLM.from_pretrained(out / "merged") is not None
