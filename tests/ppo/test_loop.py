"""The PPO update on a real DeepSpeed engine, the CLI, and the real `deepspeed` launcher."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import (
    run_cli,
    tiny_config,
    train_on_two_ranks,
    two_rank_yaml,
    update_with,
    write_yaml,
)

from lora_ppo.io.metrics import REQUIRED
from lora_ppo.ppo.collect import collect
from lora_ppo.ppo.loop import add_advantages, add_rewards, setup


def _trainable(run):
    return {n: p.detach().clone() for n, p in run.ac.named_parameters() if p.requires_grad}


@pytest.mark.integration
def test_gradient_accumulation_matches_one_big_micro_batch(tiny_model_dir, tmp_path, low_ids_reward):
    """micro 2 x accumulation 4 == micro 8 x accumulation 1 after one optimizer step (ZeRO-2)."""
    runs = {}
    for micro in (2, 8):
        cfg = tiny_config(tiny_model_dir, tmp_path / str(micro), "deepspeed.config=zero2",
                          "rollout.prompts_per_update=8", "ppo.minibatch_size=8",
                          f"ppo.micro_batch_size={micro}", "ppo.epochs=1", "ppo.optim.learning_rate=0.01",
                          f"reward.function={low_ids_reward}")
        runs[micro] = setup(cfg)  # same seed: same LoRA init
    r2, r8 = runs[2], runs[8]
    assert r2.engine.gradient_accumulation_steps() == 4 and r8.engine.gradient_accumulation_steps() == 1
    init = _trainable(r8)
    for n, p in _trainable(r2).items():
        assert torch.equal(p, init[n])
    prompts = r8.prompts.take(8)
    ro, raw = collect(r8, prompts)
    assert raw.std() > 0  # a real learning signal
    ro = add_advantages(r8, add_rewards(r8, ro, raw, r8.kl_ctl.value))
    s2 = update_with(r2, ro, torch.Generator().manual_seed(0))
    s8 = update_with(r8, ro, torch.Generator().manual_seed(0))
    assert s2.optimizer_steps == s8.optimizer_steps == 1
    w2, w8 = _trainable(r2), _trainable(r8)
    assert any(not torch.equal(w8[n], init[n]) for n in w8)  # the step changed something
    for n in w8:
        torch.testing.assert_close(w2[n], w8[n], rtol=0, atol=1e-5)
    assert abs(s2.policy_loss - s8.policy_loss) < 1e-5


def _finite(row):
    return all(v is None or not isinstance(v, float) or math.isfinite(v) for v in row.values())


@pytest.mark.slow
def test_it_learns_and_logs_every_metric(peaked_model_dir, tmp_path, low_ids_reward):
    """A simple reward (share of tokens with id < 64) rises clearly within 30 updates while the
    KL to the reference stays finite and positive; every line has every metric, all finite."""
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "cfg.yaml", {
        "output_dir": str(out), "seed": 0,
        "model": {"path": str(peaked_model_dir), "gradient_checkpointing": False,
                  "max_prompt_length": 16},
        "quantization": {"mode": "none"}, "lora": {"r": 8, "alpha": 16},
        "reward": {"function": low_ids_reward}, "data": {"prompts": "builtin:reviews"},
        "rollout": {"prompts_per_update": 16, "generation_batch_size": 16, "max_new_tokens": 8},
        "ppo": {"total_updates": 30, "epochs": 2, "minibatch_size": 8, "micro_batch_size": 8,
                "optim": {"learning_rate": 0.003}, "kl_coef": 0.02},
        "deepspeed": {"config": "zero0"}, "logging": {"progress": False, "tensorboard": True},
        "checkpoint": {"every": 0}})
    res = run_cli("train", "--config", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    for r in rows:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
    assert all(_finite(r) for r in rows[1:])  # step 1 may have undefined explained variance
    first = sum(r["objective/scores"] for r in rows[:5]) / 5
    last = sum(r["objective/scores"] for r in rows[-5:]) / 5
    assert last > first + 0.1, (first, last)
    kls = [r["objective/kl"] for r in rows[-10:]]
    assert all(math.isfinite(k) and k > 0 for k in kls), kls
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero0", "zero1", "zero2", "zero2_offload", "zero3"])
def test_every_ds_config_runs_a_ppo_update(tiny_model_dir, tmp_path, low_ids_reward, ds_config):
    out = tmp_path / "run"
    res = run_cli("train", f"model.path={tiny_model_dir}", f"output_dir={out}",
                  "data.prompts=builtin:reviews", "quantization.mode=none",
                  "model.max_prompt_length=16", "lora.r=4",
                  "rollout.prompts_per_update=4", "rollout.generation_batch_size=4",
                  "rollout.max_new_tokens=4", "ppo.minibatch_size=4", "ppo.micro_batch_size=2",
                  "ppo.total_updates=1", "ppo.epochs=1", f"deepspeed.config={ds_config}",
                  f"reward.function={low_ids_reward}", "logging.progress=false",
                  "logging.tensorboard=false", "checkpoint.every=0")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["step"] == 1


@pytest.mark.slow
def test_deepspeed_launcher_two_ranks_end_identical(tiny_model_dir, tmp_path, low_ids_reward):
    """`deepspeed --num_gpus 2` on CPU (gloo, ZeRO-2): two PPO updates, identical adapters."""
    cfg = two_rank_yaml(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "run",
                        low_ids_reward, optim={"learning_rate": 0.003})
    r0, r1 = train_on_two_ranks(cfg, tmp_path / "dump")
    assert r0["world_size"] == r1["world_size"] == 2 and r0["step"] == r1["step"] == 2
    assert any(w.abs().max() > 0 for n, w in r0["weights"].items() if "lora_B" in n)
    for n, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][n]), n


def test_progress_bar_shows_the_reward_sources_own_score(tmp_path):
    """With reward.normalize the score PPO trains on is about 0; the bar shows the source's."""
    from lora_ppo.config.load import load_config
    from lora_ppo.io.metrics import MetricsLogger
    from lora_ppo.ppo.metrics import PPO_BAR

    cfg = load_config(None, ["logging.tensorboard=false"])
    logger = MetricsLogger(tmp_path, cfg, total=1, bar_keys=PPO_BAR)
    logger.log({"step": 1, "objective/raw_scores": 3.25, "objective/scores": 0.01,
                "objective/kl": 0.5, "loss/value": 0.125})
    assert "score=3.25" in logger.bar.postfix and "kl=0.5" in logger.bar.postfix
    logger.close()


@pytest.mark.integration
def test_what_a_trl_user_looks_for_while_it_runs(tiny_model_dir, tmp_path):
    """TRL 1.16's names beside ours (reward, reward_std, frac_reward_zero_std, completions/*),
    a few completions printed every logging.completions_every updates, and the phase an update
    is in on the progress bar."""
    out = tmp_path / "run"
    res = run_cli("train", f"model.path={tiny_model_dir}", f"output_dir={out}",
                  "quantization.mode=none", "model.max_prompt_length=16", "lora.r=4",
                  "reward.function=lora_ppo.builtin.rewards:positive_sentiment",
                  "data.prompts=builtin:reviews", "ppo.advantage_estimator=grpo",
                  "rollout.samples_per_prompt=4", "rollout.prompts_per_update=2",
                  "rollout.max_new_tokens=6", "ppo.minibatch_size=8", "ppo.micro_batch_size=8",
                  "ppo.total_updates=4", "deepspeed.config=zero0", "logging.tensorboard=false",
                  "logging.completions_every=2", "logging.num_samples=3",
                  "logging.progress=true")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["reward"] == pytest.approx(r["objective/raw_scores"], abs=1e-6)
        assert r["completions/mean_length"] == pytest.approx(r["response/length"])
        assert r["completions/clipped_ratio"] == pytest.approx(1 - r["response/eos_frac"])
        assert r["completions/min_length"] <= r["completions/mean_length"] <= 6
        assert r["reward_std"] >= 0 and 0 <= r["frac_reward_zero_std"] <= 1
    shown = [ln for ln in res.stdout.splitlines() if ln.startswith("[completions] ")]
    assert len(shown) == 2 * 3 and all(" -> " in ln and "(score " in ln for ln in shown), \
        res.stdout  # updates 2 and 4, three samples each
    for phase in ("generation", "scoring", "update"):
        assert f"ppo [{phase}]" in res.stderr, res.stderr[-2000:]
