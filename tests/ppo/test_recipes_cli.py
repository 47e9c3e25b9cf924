"""Issue 21's options through the real CLI (`python -m lora_ppo train`) on the tiny model, and the
ones that aggregate over ranks under the `deepspeed` launcher with 2 CPU ranks."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli, run_two_ranks, two_rank_yaml
from safetensors.torch import load_file

STOPS = "rollout.stop_token_ids=[" + ",".join(str(i) for i in range(300, 340)) + "]"


def _tiny(model_dir, out, reward, *extra) -> list[str]:
    return [f"model.path={model_dir}", f"output_dir={out}", "quantization.mode=none",
            "data.prompts=builtin:reviews",
            "model.gradient_checkpointing=false", "model.max_prompt_length=16", "lora.r=4",
            "lora.alpha=8", "rollout.prompts_per_update=4", "rollout.samples_per_prompt=4",
            "rollout.generation_batch_size=16", "rollout.max_new_tokens=6", STOPS,
            "ppo.minibatch_size=8", "ppo.micro_batch_size=4", "ppo.total_updates=2",
            "ppo.epochs=1", "ppo.optim.learning_rate=0.01", "deepspeed.config=zero0",
            "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0",
            f"reward.function={reward}", *extra]


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _policy(out) -> dict:
    return load_file(out / "checkpoints" / "step-2" / "policy" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def rewards(tmp_path_factory):
    """`tied`: the same score for every response (every group is dropped by dynamic sampling);
    `parity`: a score that varies within a group only for prompts of odd character sum, so
    ranks holding different prompts keep different numbers of groups; `long`: the length."""
    path = tmp_path_factory.mktemp("rewards") / "rewards.py"
    path.write_text(
        "def tied(prompts, completions, **kw):\n"
        "    return [1.0 for _ in completions]\n"
        "def parity(prompts, completions, completion_ids, **kw):\n"
        "    return [float(len(c) % 2) if sum(map(ord, p)) % 2 else 0.0\n"
        "            for p, c in zip(prompts, completion_ids)]\n"
        "def long(prompts, completions, completion_ids, **kw):\n"
        "    return [len(c) / 6 for c in completion_ids]\n")
    return {name: f"{path}:{name}" for name in ("tied", "parity", "long")}


@pytest.mark.slow
def test_dapo_through_the_cli(tiny_model_dir, tmp_path, rewards):
    """Every DAPO part at once: clip-higher, the token-level loss, no KL, dynamic sampling with
    its cap, truncated responses out of the loss, the soft overlong penalty. Every group ties
    (`tied`), so every round's groups are dropped: 1 + 2 rounds, then the rollout is filled with
    dropped groups. The overlong penalty makes the shaped scores differ, so the policy moves."""
    out = tmp_path / "run"
    res = run_cli("train", *_tiny(
        tiny_model_dir, out, rewards["tied"], "ppo.advantage_estimator=grpo",
        "ppo.loss_aggregation=token_mean", "ppo.cliprange_high=0.28", "ppo.kl_coef=0",
        "rollout.dynamic_sampling=true", "rollout.max_extra_rounds=2",
        "ppo.mask_truncated_completions=true", "reward.overlong_buffer=3"))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(out)
    for r in rows:
        assert r["sampling/rounds"] == 3
        assert r["sampling/frac_dropped_groups"] == 1.0 and r["sampling/frac_filled_groups"] == 1.0
        assert r["sampling/response_tokens"] > 0 and r["objective/overlong_penalty"] <= 0
        assert r["sampling/raw_scores"] == 1.0
        assert r["objective/kl"] is None  # kl_coef 0: no reference forward
    assert rows[-1]["episode"] == 2 * 3 * 4 * 4  # updates x rounds x prompts x samples
    assert any(r["objective/overlong_penalty"] < 0 for r in rows)
    assert any(v.abs().max() > 0 for k, v in _policy(out).items() if "lora_B" in k)


@pytest.mark.slow
def test_gspo_reinforce_pp_baseline_and_batch_scaling_through_the_cli(tiny_model_dir, tmp_path,
                                                                     rewards):
    for name, extra in (
            ("rfpp_gspo", ["ppo.advantage_estimator=reinforce_pp_baseline",
                           "ppo.importance_sampling_level=sequence", "ppo.cliprange=3e-4",
                           "ppo.cliprange_high=4e-4"]),
            ("grpo_batch", ["ppo.advantage_estimator=grpo", "ppo.scale_rewards=batch"])):
        out = tmp_path / name
        res = run_cli("train", *_tiny(tiny_model_dir, out, rewards["long"], *extra))
        assert res.returncode == 0, (name, res.stderr[-3000:])
        rows = _rows(out)
        assert [r["step"] for r in rows] == [1, 2] and rows[-1]["sampling/rounds"] is None
        assert rows[-1]["loss/kl"] is not None  # both put the KL in the loss
        assert all(torch.isfinite(torch.tensor(r["loss/policy"])) for r in rows)
        assert any(v.abs().max() > 0 for k, v in _policy(out).items() if "lora_B" in k), name


@pytest.mark.slow
def test_refused_combinations_exit_2_with_one_line(tiny_model_dir, tmp_path, rewards):
    res = run_cli("train", *_tiny(tiny_model_dir, tmp_path / "run", rewards["long"],
                                  "ppo.advantage_estimator=grpo", "ppo.kl_in=reward"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert "ppo.advantage_estimator=grpo with ppo.kl_in=reward" in lines[-1], res.stderr[-2000:]


@pytest.mark.slow
def test_dynamic_sampling_on_two_ranks(tiny_model_dir, tmp_path, rewards):
    """The ranks hold different prompts, so they keep different numbers of groups per round;
    they must still sample the same number of rounds (a rank that stopped alone would leave the
    other in a collective that never comes), and train the same weights. With the batch std and
    truncated responses out of the loss, which aggregate over ranks too."""
    cfg = two_rank_yaml(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "run",
                        rewards["parity"], advantage_estimator="grpo", scale_rewards="batch",
                        mask_truncated_completions=True, optim={"learning_rate": 0.01})
    run_two_ranks("--module", "lora_ppo", "train", "--config", str(cfg),
                  "rollout.samples_per_prompt=2", "rollout.prompts_per_update=4",
                  "rollout.dynamic_sampling=true", "rollout.max_extra_rounds=3", STOPS)
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(1 <= r["sampling/rounds"] <= 4 for r in rows)
    assert any(0 < r["sampling/frac_dropped_groups"] < 1 for r in rows), rows
    # every round, every rank sampled 4 prompts x 2 samples
    assert rows[-1]["episode"] == sum(r["sampling/rounds"] for r in rows) * 4 * 2 * 2
