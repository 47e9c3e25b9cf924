"""GRPO, Dr. GRPO, RLOO and REINFORCE++ on the one base: no value function anywhere, groups of
samples kept together, the KL in the loss or the reward, and no reference forward at kl_coef 0."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_two_ranks, tiny_config, two_rank_yaml, update_with
from safetensors.torch import load_file

from lora_ppo.errors import UserError
from lora_ppo.io import checkpoint as ckpt
from lora_ppo.ppo import checkpoint as ppo_checkpoint
from lora_ppo.ppo.collect import collect
from lora_ppo.ppo.loop import add_advantages, add_rewards, setup

STOPS = "rollout.stop_token_ids=[" + ",".join(str(i) for i in range(300, 340)) + "]"


def _grpo(model_dir, out, reward, *extra):
    return setup(tiny_config(model_dir, out, "ppo.advantage_estimator=grpo",
                             "rollout.samples_per_prompt=4", "rollout.prompts_per_update=4",
                             "rollout.generation_batch_size=16", "ppo.minibatch_size=8",
                             "ppo.micro_batch_size=4", "ppo.optim.learning_rate=0.01",
                             f"reward.function={reward}", "rollout.max_new_tokens=6", STOPS,
                             *extra))


def _rollout(run, prompts):
    n = run.cfg.rollout.samples_per_prompt
    grouped = [p for p in prompts for _ in range(n)]
    ro, raw = collect(run, grouped)
    return add_advantages(run, add_rewards(run, ro, raw, run.kl_ctl.value))


@pytest.mark.integration
def test_grpo_builds_no_value_function_and_updates_only_the_policy(tiny_model_dir, tmp_path,
                                                                  low_ids_reward):
    run = _grpo(tiny_model_dir, tmp_path / "run", low_ids_reward)
    assert run.cfg.algorithm.value_mode == "none" and run.ac.value_head is None
    trainable = [n for n, p in run.ac.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".policy." in n for n in trainable)
    ro = _rollout(run, run.prompts.take(4))
    assert len(ro) == 16 and ro.values is None and ro.returns is None
    # Each group of 4 consecutive samples answers one prompt; GRPO's advantages of a group sum
    # to 0 (every token of a sample carries its sample's advantage).
    q = ro.query_ids.view(4, 4, -1)
    assert all(torch.equal(g[0], g[i]) for g in q for i in range(4))
    seq = ro.advantages.sum(1) / ro.response_mask.sum(1)
    assert seq.view(4, 4).sum(1).abs().max() < 1e-4
    before = {n: p.detach().clone() for n, p in run.ac.named_parameters() if p.requires_grad}
    stats = update_with(run, ro, run.generator)
    # the k3 KL term: 0 on the first minibatch (policy == reference), >= 0 after a step
    assert stats.value_loss is None and stats.kl_loss is not None and 0 <= stats.kl_loss < 0.05
    changed = [n for n, p in run.ac.named_parameters() if p.requires_grad
               and not torch.equal(p.detach(), before[n])]
    assert changed
    # Nothing of a value function is checkpointed.
    run.step = 1
    path = ppo_checkpoint.save(run)
    assert not (path / ckpt.VALUE_DIR).exists() and (path / ckpt.POLICY_DIR).is_dir()


@pytest.mark.parametrize("estimator, kl_in", [("dr_grpo", "loss"), ("rloo", "reward"),
                                              ("reinforce_pp", "reward")])
@pytest.mark.integration
def test_every_estimator_runs_an_update(tiny_model_dir, tmp_path, low_ids_reward, estimator,
                                        kl_in):
    run = _grpo(tiny_model_dir, tmp_path / "run", low_ids_reward,
                f"ppo.advantage_estimator={estimator}")
    assert run.cfg.algorithm.kl_in == kl_in
    ro = _rollout(run, run.prompts.take(4))
    assert torch.isfinite(ro.advantages).all() and ro.advantages.abs().max() > 0
    stats = update_with(run, ro, run.generator)
    assert (stats.kl_loss is None) == (kl_in == "reward")
    assert abs(stats.ratio - 1.0) < 0.5


@pytest.mark.integration
def test_kl_coef_zero_skips_the_reference_forward(tiny_model_dir, tmp_path, low_ids_reward):
    run = _grpo(tiny_model_dir, tmp_path / "run", low_ids_reward, "ppo.kl_coef=0")
    entered = []
    disable = run.ac.peft_model.disable_adapter

    def counting():
        entered.append(1)
        return disable()

    run.ac.peft_model.disable_adapter = counting  # the reference is the base, adapters disabled
    try:
        ro = _rollout(run, run.prompts.take(4))
    finally:
        run.ac.peft_model.disable_adapter = disable
    assert ro.ref_logprobs is None and ro.kl is None and not entered
    stats = update_with(run, ro, run.generator)
    assert stats.kl_loss is None


@pytest.mark.parametrize("overrides, message", [
    (["ppo.advantage_estimator=grpo"], "rollout.samples_per_prompt=1; set it to 2 or more"),
    (["value.mode=none"], "value.mode=none leaves ppo.advantage_estimator=gae without"),
    (["ppo.advantage_estimator=rloo", "rollout.samples_per_prompt=2", "value.mode=shared"],
     "value.mode=shared trains a value function that ppo.advantage_estimator=rloo never uses"),
    (["rollout.samples_per_prompt=3", "rollout.prompts_per_update=8", "ppo.minibatch_size=16"],
     "rollout.prompts_per_update=8 x rollout.samples_per_prompt=3 = 24 samples is not a multiple"),
    # issue 20 item 9: the KL noise of a tied group divided by its near-zero std
    (["ppo.advantage_estimator=grpo", "rollout.samples_per_prompt=4", "ppo.kl_in=reward"],
     "ppo.advantage_estimator=grpo with ppo.kl_in=reward divides each sample's KL penalty by "
     "its group's std (ppo.scale_rewards=group), near 0 when the scores tie"),
    (["ppo.advantage_estimator=rloo", "rollout.samples_per_prompt=4", "ppo.scale_rewards=batch"],
     "ppo.scale_rewards=batch applies to ppo.advantage_estimator=grpo only; rloo defines"),
    (["rollout.dynamic_sampling=true"],
     "rollout.dynamic_sampling=true drops groups of samples whose scores tie, but "
     "rollout.samples_per_prompt=1"),
    (["reward.overlong_buffer=6"],
     "reward.overlong_buffer=6 must be below rollout.max_new_tokens=6"),
    (["ppo.advantage_estimator=reinforce_pp_baseline"],
     "ppo.advantage_estimator=reinforce_pp_baseline compares the samples of a prompt"),
])
def test_impossible_combinations_are_refused(tiny_model_dir, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(tiny_model_dir, tmp_path, *overrides)


def test_grpo_with_the_kl_in_the_reward_is_allowed_where_no_std_divides_it(tiny_model_dir,
                                                                          tmp_path):
    for extra in (["ppo.scale_rewards=none"], ["ppo.kl_coef=0"]):
        cfg = tiny_config(tiny_model_dir, tmp_path, "ppo.advantage_estimator=grpo",
                          "rollout.samples_per_prompt=4", "ppo.kl_in=reward", *extra)
        assert cfg.algorithm.kl_in == "reward"
    rf = tiny_config(tiny_model_dir, tmp_path, "ppo.advantage_estimator=reinforce_pp_baseline",
                     "rollout.samples_per_prompt=4").algorithm
    # REINFORCE++-baseline's own defaults: KL in the loss with k2 (Hu et al. 2025 v2, OpenRLHF)
    assert (rf.kl_in, rf.kl_estimator, rf.loss_aggregation) == ("loss", "k2", "token_mean")


def test_value_mode_none_predicts_less_memory_than_a_value_head():
    from lora_ppo.builtin.specs import builtin_arch
    from lora_ppo.config.load import load_config
    from lora_ppo.sizing.memory import estimate_memory

    arch = builtin_arch("builtin:demo")
    shared = estimate_memory(load_config(None, ["value.mode=adapter"]), arch)
    none = estimate_memory(load_config(None, ["ppo.advantage_estimator=grpo",
                                              "rollout.samples_per_prompt=4",
                                              "rollout.prompts_per_update=16"]), arch)
    for phase in ("generation", "scoring", "update"):
        assert none.phases[phase] < shared.phases[phase], phase


@pytest.mark.slow
def test_grpo_on_two_ranks_and_resume(tiny_model_dir, low_ids_reward, tmp_path):
    """The critic-free path through the CLI under the `deepspeed` launcher with 2 ranks (a group
    never straddles them: each rank takes whole prompts), then resumed from its step-1
    checkpoint: step 2 is reproduced bit for bit."""
    cfg = two_rank_yaml(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "run", low_ids_reward,
                        checkpoint_every=1, advantage_estimator="grpo",
                        optim={"learning_rate": 0.01})
    grouped = ["rollout.samples_per_prompt=2", "rollout.prompts_per_update=4"]
    run_two_ranks("--module", "lora_ppo", "train", "--config", str(cfg), *grouped)
    root = tmp_path / "run" / "checkpoints"
    final = load_file(root / "step-2" / "policy" / "adapter_model.safetensors")
    assert not (root / "step-2" / "value").exists()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["loss/value"] is None and rows[-1]["objective/frac_zero_std_groups"] is not None
    assert rows[-1]["episode"] == 2 * 4 * 2 * 2  # updates x prompts x samples x ranks
    run_two_ranks("--module", "lora_ppo", "train", "--config", str(cfg), *grouped,
                  "--resume", str(root / "step-1"))
    again = load_file(root / "step-2" / "policy" / "adapter_model.safetensors")
    assert final.keys() == again.keys()
    assert any(v.abs().max() > 0 for k, v in final.items() if "lora_B" in k)
    for k in final:
        assert torch.equal(final[k], again[k]), k


@pytest.mark.integration
def test_a_critic_free_checkpoint_exports_without_a_value_function(tiny_model_dir, tmp_path,
                                                                   low_ids_reward):
    from lora_ppo.io.export import export

    run = _grpo(tiny_model_dir, tmp_path / "run", low_ids_reward)
    run.step = 1
    out = export(ppo_checkpoint.save(run), tmp_path / "exported")
    assert (out / "adapter_model.safetensors").is_file() and not (out / "value").exists()
    assert json.loads((out / "manifest.json").read_text())["value_mode"] == "none"
