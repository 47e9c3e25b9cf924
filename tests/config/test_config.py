"""Config: defaults, overrides, and one-line errors for bad input (in-process and via the CLI)."""

from __future__ import annotations

import pytest
from helpers import run_cli, write_yaml

from lora_ppo.config import Config
from lora_ppo.config.load import load_config, parse_overrides
from lora_ppo.config.reference import field_docs
from lora_ppo.errors import UserError


def test_defaults_load_and_every_field_is_documented():
    cfg = load_config()
    assert isinstance(cfg, Config)
    # quantization: 4-bit on a GPU, none on a CPU unless asked (4-bit was the default on a CPU)
    from lora_ppo.modeling.loading import quantization_mode

    assert cfg.quantization.mode == "auto" and cfg.grad_accum_steps == 4
    assert quantization_mode(cfg.quantization, "cuda") == "4bit"
    assert quantization_mode(cfg.quantization, "cpu") == "none"
    import dataclasses

    from lora_ppo.config.reference import _sections

    sections = _sections(cfg, "top level")
    assert {t for t, _ in sections} >= {"ppo.optim", "sft.train", "sft.optim", "sft.eval",
                                         "reward_model.optim"}
    for title, section in sections:
        docs = field_docs(type(section))
        leaves = [x.name for x in dataclasses.fields(section)
                  if not dataclasses.is_dataclass(getattr(section, x.name))]
        missing = [name for name in leaves if not docs.get(name)]
        assert not missing, f"{title}: undocumented fields {missing}"
    # A nested section keeps its parent's defaults when only some of its keys are given.
    sft = load_config(None, ["sft.optim.warmup_steps=3"]).sft.optim
    assert (sft.learning_rate, sft.lr_schedule, sft.warmup_steps) == (2e-4, "cosine", 3)


def test_yaml_and_overrides(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"ppo": {"epochs": 2}, "lora": {"r": 4}})
    cfg = load_config(path, ["ppo.epochs=3", "lora.target_modules=[q_proj,v_proj]",
                             "reward.clip=2"])
    assert cfg.ppo.epochs == 3 and cfg.lora.r == 4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.reward.clip == 2.0 and isinstance(cfg.reward.clip, float)
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize("overrides, expected", [
    (["ppo.epoch=2"], "unknown config key 'ppo.epoch'"),
    (["ppo.learning_rate=1e-5"], "'ppo.learning_rate' moved to 'ppo.optim.learning_rate'"),
    (["sft.eval_size=3"], "'sft.eval_size' moved to 'sft.eval.size'"),
    (["nosuch.key=1"], "unknown config key 'nosuch'"),
    (["ppo.epochs=two"], "ppo.epochs='two' is not an integer"),
    (["lora.r=0"], "lora.r=0 is out of range"),
    (["quantization.mode=3bit"], "quantization.mode='3bit' is not one of 'auto', 'none', '8bit', '4bit'"),
    (["ppo.minibatch_size=6", "ppo.micro_batch_size=4"], "ppo.minibatch_size=6 is not a multiple"),
    (["rollout.prompts_per_update=20"],
     "rollout.prompts_per_update=20 is not a multiple of ppo.minibatch_size=16"),
    (["reward.source=adapter"], "reward.source=adapter needs reward.adapter"),
    (["ppo.gamma=1.5"], "ppo.gamma=1.5 is out of range"),
    (["ppo"], "not of the form section.key=value"),
])
def test_bad_values_name_field_value_and_fix(overrides, expected):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("args, expected", [
    (["ppo.epoch=2"], "unknown config key 'ppo.epoch'"),
    (["ppo.epochs=two"], "is not an integer"),
    (["lora.r=0"], "lora.r=0 is out of range"),
    (["model.path=/no/such/model"], "model.path=/no/such/model does not exist"),
])
@pytest.mark.integration
def test_cli_bad_config_is_one_line_and_exit_2(args, expected, tmp_path):
    res = run_cli("train", f"output_dir={tmp_path / 'out'}", *args)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("lora-ppo: error:") and expected in lines[-1], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()  # nothing written on bad input


@pytest.mark.integration
def test_cli_missing_config_file(tmp_path):
    res = run_cli("train", "--config", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_the_trl_grpo_preset_has_trl_1_16s_grpo_defaults():
    """presets/trl_grpo.yaml: TRL 1.16 GRPOConfig's loss_type=dapo (the global token mean),
    beta=0 (no reference forward), epsilon 0.2 with no epsilon_high, scale_rewards=group,
    num_iterations 1, num_generations 8, linear lr decay, one optimizer step per generation."""
    from lora_ppo.cli import PRESETS
    from lora_ppo.config.load import load_config

    cfg = load_config(PRESETS / "trl_grpo.yaml", [])
    alg, p, r = cfg.algorithm, cfg.ppo, cfg.rollout
    assert (alg.estimator, alg.loss_aggregation, alg.scale_rewards) == ("grpo", "token_mean", "group")
    assert not alg.uses_reference and p.kl_coef == 0
    assert (p.cliprange, p.cliprange_high, p.importance_sampling_level) == (0.2, None, "token")
    assert p.epochs == 1 and r.samples_per_prompt == 8 and r.temperature == 1.0
    assert p.minibatch_size == r.prompts_per_update * r.samples_per_prompt  # steps_per_generation = 1
    assert p.optim.lr_schedule == "linear" and not p.mask_truncated_completions


def test_trls_field_names_point_at_lora_ppos():
    """A TRL config's vllm_importance_sampling_* keys are told the field to write."""
    with pytest.raises(UserError, match=r"did you mean ppo.sampler_importance_sampling_mode "
                                        r"\(TRL's vllm_importance_sampling_mode\)"):
        load_config(None, ["ppo.vllm_importance_sampling_mode=token_mask"])
    with pytest.raises(UserError, match=r"ppo.sampler_importance_sampling_clip_min=4.0 must be "
                                        r"below ppo.sampler_importance_sampling_clip_max=3.0"):
        load_config(None, ["ppo.sampler_importance_sampling_clip_min=4.0"])
