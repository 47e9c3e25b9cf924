"""The launch scripts in scripts/: usage errors, and the whole RLHF chain under the real
`deepspeed` launcher with two CPU ranks per stage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, clean_env
from test_pipeline import _pipeline_yaml


def _bash(*args: str, env: dict | None = None, timeout: int = 60):
    return subprocess.run(["bash", *args], capture_output=True, text=True, cwd=REPO,
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
def test_gpu_check_refuses_cleanly_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check would run")
    res = _bash("scripts/gpu_check.sh", str(tmp_path / "gpu.json"))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("gpu_check: "), res
    assert not (tmp_path / "gpu.json").exists()


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
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    cfg = _pipeline_yaml(tmp_path / "cfg.yaml", tiny_model_dir, out)
    res = _bash("scripts/rlhf.sh", str(cfg), env={"NUM_GPUS": "2", "MASTER_PORT": "29571"},
                timeout=900)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert log.count("exits successfully") == 3 * 2, log[-3000:]  # sft, reward, PPO x 2 ranks
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "reward_adapter" / "score_head.safetensors").is_file()
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2]
    assert AutoModelForCausalLM.from_pretrained(out / "merged") is not None


@pytest.mark.integration
def test_curves_bins_runs_by_generated_tokens(tmp_path):
    # Run a: 2 updates of 4 responses of length 10 (40 tokens each); run b: 1 update of 8
    # responses of length 10 (80 tokens). An eval row (no raw score) is skipped.
    def write(name, rows):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    a = write("a", [{"objective/raw_scores": 1.0, "objective/kl": 0.1, "response/length": 10.0,
                     "episode": 4},
                    {"eval/score": 9.0},
                    {"objective/raw_scores": 3.0, "objective/kl": 0.3, "response/length": 10.0,
                     "episode": 8}])
    b = write("b", [{"objective/raw_scores": 5.0, "objective/kl": 0.5, "response/length": 10.0,
                     "episode": 8}])
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "curves.py"), f"a={a}", f"b={b}",
                          "--bins", "2"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "| generated tokens | a score | a KL | b score | b KL |"
    assert lines[2] == "| 0-40 | 1.000 | 0.100 | - | - |"
    assert lines[3] == "| 40-80 | 3.000 | 0.300 | 5.000 | 0.500 |"


@pytest.mark.integration
def test_curves_counts_what_dynamic_sampling_dropped(tmp_path):
    # With dynamic sampling an update generated more than its rollout holds: 4 kept responses of
    # length 10, but 100 response tokens over its rounds (sampling/response_tokens), and its
    # score is that of every response sampled (sampling/raw_scores 1.0, not the rollout's 9.0);
    # a null (no dynamic sampling) falls back to length x responses and the rollout's score.
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"objective/raw_scores": 9.0, "objective/kl": 0.1, "response/length": 10.0, "episode": 12,
         "sampling/response_tokens": 100.0, "sampling/raw_scores": 1.0},
        {"objective/raw_scores": 2.0, "objective/kl": 0.2, "response/length": 10.0, "episode": 16,
         "sampling/response_tokens": None, "sampling/raw_scores": None}]))
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "curves.py"), f"d={path}",
                          "--bins", "2"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    # tokens so far: 100, then 100 + 10 x 4 = 140; bins of 70
    assert res.stdout.splitlines()[2:] == ["| 0-70 | - | - |", "| 70-140 | 1.500 | 0.150 |"]


@pytest.mark.integration
def test_dapo_vs_grpo_usage_error_is_one_line_and_exit_2(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "dapo_vs_grpo.py"), "--out",
                          str(tmp_path), "--updates", "0"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and res.stderr.strip() == (
        "dapo_vs_grpo.py: --updates 0: must be >= 1"), res.stderr


@pytest.mark.integration
def test_curves_bad_input_is_one_line_and_exit_2(tmp_path):
    empty = tmp_path / "eval_only.jsonl"
    empty.write_text(json.dumps({"eval/score": 1.0}) + "\n")
    for arg in ("no-label", f"a={tmp_path / 'missing.jsonl'}", f"a={empty}"):
        res = subprocess.run([sys.executable, str(REPO / "scripts" / "curves.py"), arg],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "Traceback" not in res.stderr


@pytest.mark.integration
@pytest.mark.parametrize("side", ["lora_ppo", "lora_ppo_grpo"])
def test_bench_vs_trl_runs_its_lora_ppo_side(side, tiny_model_dir, tmp_path):
    """The side the driver (and scripts/gpu_check.py) runs in its own process: it reaches into
    lora_ppo's setup, so a move of a name there must break this test, not the benchmark."""
    if side == "lora_ppo":
        w = {"model": "tiny", "batch": 4, "mini": 2, "prompt_len": 8, "prompt_min": 4,
             "gen_len": 6, "stop_ids": 20, "steps": 2}
    else:
        w = {"model": "tiny", "prompts": 2, "n": 2, "micro": 2, "prompt_len": 8, "gen_len": 6,
             "stop_ids": 20, "grad_ckpt": False, "steps": 2}
    out = tmp_path / "side.json"
    res = subprocess.run(
        [sys.executable, "scripts/bench_vs_trl.py", "--side", side, "--model-dir",
         str(tiny_model_dir), "--workload-json", json.dumps(w), "--random-prompts",
         "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**clean_env(), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    steps = json.loads(out.read_text())["steps"]
    assert len(steps) == 2 and all(s["gen_tokens"] > 0 for s in steps)
