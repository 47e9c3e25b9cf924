"""The run's precision end to end: the sampler's log-probs are kept with every rollout, their
mismatch with the scored distribution is logged, the importance-sampling correction enters the
loss where the two differ (bf16, autocast) and nowhere else (fp32), and a DeepSpeed config with
torch autocast trains through the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from helpers import run_cli, tiny_config, write_yaml

from lora_ppo.ppo.collect import collect
from lora_ppo.ppo.loop import add_advantages, add_rewards, setup
from lora_ppo.ppo.metrics import sampler_metrics
from lora_ppo.ppo.update import loss_normalizers, micro_batch_loss, sampler_correction

STOPS = "rollout.stop_token_ids=[" + ",".join(str(i) for i in range(300, 340)) + "]"
# Every weight above 1e-9 is masked: the policy loss is 0 wherever the correction applies.
MASK_ALL = ("ppo.sampler_importance_sampling_mode=token_mask",
            "ppo.sampler_importance_sampling_clip_max=1e-9")


def _rollout(run, n=8):
    ro, raw = collect(run, run.prompts.take(n))
    return add_advantages(run, add_rewards(run, ro, raw, run.kl_ctl.value))


def _policy_loss(run, ro) -> float:
    """The first micro-batch's policy loss as the update computes it (forward only), every
    advantage +1: at ratio 1 each token's loss is -A * ratio = -1, so the token mean is -1 and
    0 where every weight is 0."""
    ro = dataclasses.replace(ro, advantages=ro.response_mask.clone())
    micro = ro.index(torch.arange(run.cfg.ppo.micro_batch_size))
    norms = loss_normalizers(micro.response_mask, "token_mean")
    _, stats = micro_batch_loss(run.engine, micro, run.cfg.ppo, run.cfg.algorithm, norms,
                                temperature=run.cfg.rollout.temperature,
                                chunk_rows=run.chunk_rows, kl_coef=0.0)
    return stats.policy_loss


@pytest.mark.integration
@pytest.mark.parametrize("value_mode", ["shared", "adapter"])
def test_in_fp32_the_sampler_is_the_scored_policy_and_nothing_is_corrected(
        tiny_model_dir, tmp_path, value_mode):
    """fp32: the sampler's log-probs are kept; with value.mode=shared they are the old log-probs
    (KL 0 exactly), with a critic adapter the scoring forward reruns and agrees to round-off.
    The correction is off there, whatever its settings: the policy loss is not zeroed."""
    run = setup(tiny_config(tiny_model_dir, tmp_path / "run", f"value.mode={value_mode}",
                            "rollout.max_new_tokens=8", STOPS, *MASK_ALL))
    ro = _rollout(run)
    assert ro.sampler_logprobs is not None and ro.sampler_logprobs.shape == ro.logprobs.shape
    assert sampler_correction(run.ac, ro, run.cfg.ppo) is None
    m = sampler_metrics(run.ac, ro, run.cfg.ppo)
    if value_mode == "shared":
        assert torch.equal(ro.sampler_logprobs, ro.logprobs) and m["rollout/sampler_kl"] == 0.0
    assert m["sampling/sampling_logp_difference/max"] < 1e-5 and m["rollout/sampler_kl"] < 1e-10
    assert m["sampling/importance_sampling_ratio/mean"] is None
    assert _policy_loss(run, ro) == pytest.approx(-1.0, abs=1e-5)


@pytest.mark.integration
def test_in_bf16_the_mismatch_is_logged_and_the_correction_enters_the_loss(tiny_model_dir,
                                                                          tmp_path):
    """bf16 (DeepSpeed's precision; ~400x slower than fp32 on a CPU, so 8 short samples): the
    decode loop and the scoring forward round differently, the sampler's log-probs differ from
    the old ones, the KL between them is logged with TRL's metrics, and the weights are in the
    loss: masking every token zeroes it; without the correction it is not zero."""
    run = setup(tiny_config(tiny_model_dir, tmp_path / "run", "deepspeed.precision=bf16",
                            "rollout.max_new_tokens=6", STOPS, *MASK_ALL))
    ro = _rollout(run)
    m = sampler_metrics(run.ac, ro, run.cfg.ppo)
    assert m["sampling/sampling_logp_difference/max"] > 1e-4 and m["rollout/sampler_kl"] > 0
    assert m["sampling/importance_sampling_ratio/max"] == 0.0  # every weight masked
    w = sampler_correction(run.ac, ro, run.cfg.ppo)
    assert w is not None and torch.equal(w, torch.zeros_like(w))
    assert _policy_loss(run, ro) == 0.0
    off = dataclasses.replace(run.cfg.ppo, sampler_importance_sampling_correction=False)
    run.cfg = dataclasses.replace(run.cfg, ppo=off)
    assert sampler_metrics(run.ac, ro, off)["sampling/importance_sampling_ratio/mean"] is None
    assert _policy_loss(run, ro) == pytest.approx(-1.0, abs=2e-2)  # bf16: ratio 1 +- 1e-2


@pytest.mark.integration
def test_a_torch_autocast_deepspeed_config_trains_through_the_cli(tiny_model_dir, tmp_path,
                                                                 low_ids_reward):
    """DeepSpeed 0.19 runs the engine's forwards under torch.autocast on a CPU too: the LoRA B
    fast-order backward died at the first backward ("expected m1 and m2 to have the same
    dtype"). Now it trains; the rollout ran under the same autocast (the sampler's log-probs
    differ from the scored ones, and the correction applied)."""
    ds = tmp_path / "autocast.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2},
                              "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}))
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "cfg.yaml", {
        "output_dir": str(out), "model": {"path": str(tiny_model_dir),
                                          "gradient_checkpointing": False,
                                          "max_prompt_length": 16,
                                          # blocked attention's scores are the decode loop's
                                          # own here (bf16 included): the sampler's log-probs
                                          # would equal the scored ones, and the correction
                                          # path would go untested
                                          "block_attention": False},
        "quantization": {"mode": "none"}, "lora": {"r": 4},
        "reward": {"function": low_ids_reward}, "data": {"prompts": "builtin:reviews"},
        "rollout": {"prompts_per_update": 4, "generation_batch_size": 4, "max_new_tokens": 4},
        "ppo": {"total_updates": 1, "epochs": 1, "minibatch_size": 4, "micro_batch_size": 2},
        "deepspeed": {"config": str(ds)}, "logging": {"progress": False, "tensorboard": False},
        "checkpoint": {"every": 0}})
    res = run_cli("train", "--config", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    row = json.loads((out / "metrics.jsonl").read_text())
    assert row["step"] == 1 and math.isfinite(row["loss/policy"])
    assert 0.9 < row["policy/ratio"] < 1.1
    assert row["sampling/sampling_logp_difference/max"] > 0
    assert row["sampling/importance_sampling_ratio/mean"] is not None
