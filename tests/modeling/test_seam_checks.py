"""The setup's seam checks (ppo/seams.py) catch each class of defect they exist for, on the
architecture that has it, and fall back or refuse with one line."""

from __future__ import annotations

import pytest
import torch
from families import build_family_model
from helpers import tiny_config, update_with

from lora_ppo.errors import UserError
from lora_ppo.modeling.actor_critic import build_actor_critic
from lora_ppo.modeling.loading import load_base_model, load_tokenizer
from lora_ppo.modeling.packing import PADDED
from lora_ppo.ppo.seam_cache import seams_for
from lora_ppo.ppo.seams import check_seams
from lora_ppo.rl.logprobs import IDENTITY

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def family_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: build_family_model(f, root / f, tiny_model_dir)
            for f in ("llama", "cohere", "gemma2", "opt", "bloom")}


def _ac(model_dir, out, *overrides):
    cfg = tiny_config(model_dir, out, *overrides)
    tok = load_tokenizer(cfg.model, str(model_dir))
    return build_actor_critic(cfg, load_base_model(cfg, str(model_dir), CPU)), cfg, tok


def test_every_check_passes_on_llama_with_the_fastest_layout(family_dirs, tmp_path):
    ac, cfg, tok = _ac(family_dirs["llama"], tmp_path, "rollout.samples_per_prompt=4",
                       "ppo.advantage_estimator=grpo", "rollout.prompts_per_update=2")
    before = {n: p.detach().clone() for n, p in ac.named_parameters()}
    seams = check_seams(ac, cfg, tok.pad_token_id)
    assert seams.layout.packed and seams.layout.group and seams.layout.attention is not None
    assert seams.decode.continuous_batching and seams.decode.static_kv_cache and seams.notes == ()
    # the random adapter of the check is gone again, bit for bit
    assert all(torch.equal(p, before[n]) for n, p in ac.named_parameters())


def test_an_unknown_logit_post_processing_falls_back_to_the_models_own_logits(family_dirs,
                                                                              tmp_path):
    """Cohere multiplies the head's logits by logit_scale; without it (as lora_ppo did) the
    scored distribution is not the model's. That was refused; now scoring, updates and
    sampling take the model's own forward's logits, padded rows, said in one line with its
    memory."""
    ac, cfg, tok = _ac(family_dirs["cohere"], tmp_path)
    assert not check_seams(ac, cfg, tok.pad_token_id).own_logits  # heads.py knows Cohere's
    ac.logits_transform = IDENTITY
    seams = check_seams(ac, cfg, tok.pad_token_id)
    assert seams.own_logits and ac.own_logits and seams.layout == PADDED
    assert seams.decode.continuous_batching and seams.decode.static_kv_cache  # checked too
    line, = seams.notes
    assert line.startswith("model type cohere: lora_ppo's logits differ from the model's own "
                           "forward by ") and "\n" not in line
    # 4 x 6 x 512 fp32 logits, twice (the logits and what the post-processing keeps)
    assert "take the model's own forward's logits, on padded rows: 0.1 MiB more" in line


@pytest.mark.integration
@pytest.mark.parametrize("family", ["cohere", "gemma2"])
def test_a_family_whose_post_processing_is_unknown_trains_on_its_own_logits(
        family_dirs, tmp_path, monkeypatch, capsys, low_ids_reward, family):
    """A family whose logit post-processing lora_ppo does not know (Cohere's scale, Gemma 2's
    tanh soft-cap, with modeling/heads.py made to forget them) was refused at setup. Now it
    trains, on the real engine: its rollout log-probs are the model's own forward's to 1e-5,
    the first minibatch has ratio 1, the update moves the adapter, and setup says so in one
    line."""
    import lora_ppo.modeling.actor_critic as actor_critic
    from lora_ppo.modeling.packing import position_ids_from_mask
    from lora_ppo.modeling.roles import POLICY
    from lora_ppo.ppo.collect import collect
    from lora_ppo.ppo.loop import add_advantages, add_rewards, setup

    monkeypatch.setattr(actor_critic, "logits_transform", lambda config: IDENTITY)
    monkeypatch.setenv("LORA_PPO_CACHE", str(tmp_path / "cache"))
    run = setup(tiny_config(family_dirs[family], tmp_path / "run", "rollout.max_new_tokens=8",
                            f"reward.function={low_ids_reward}", "ppo.optim.learning_rate=0.01"))
    lines = [x for x in capsys.readouterr().out.splitlines() if "own forward's logits" in x]
    assert len(lines) == 1 and lines[0].startswith(f"model type {family}: ")
    assert run.ac.own_logits and run.ac.layout == PADDED
    ro, raw = collect(run, run.prompts.take(8))
    ro = add_advantages(run, add_rewards(run, ro, raw, run.kl_ctl.value))
    mask = torch.cat([ro.query_mask, ro.response_mask.long()], 1)
    with run.ac.role(POLICY, train=False), torch.no_grad():
        logits = run.ac.causal_lm(input_ids=torch.cat([ro.query_ids, ro.response_ids], 1),
                                  attention_mask=mask,
                                  position_ids=position_ids_from_mask(mask)).logits
    q, r = ro.query_ids.shape[1], ro.response_ids.shape[1]
    theirs = logits[:, q - 1:q - 1 + r].float().log_softmax(-1).gather(
        -1, ro.response_ids[..., None]).squeeze(-1) * ro.response_mask
    assert (ro.logprobs - theirs).abs().max() < 1e-5
    before = {n: p.detach().clone() for n, p in run.ac.named_parameters() if p.requires_grad}
    stats = update_with(run, ro, torch.Generator().manual_seed(0))
    assert abs(stats.ratio - 1.0) < 1e-6 and abs(stats.approx_kl) < 1e-8, stats
    moved = [n for n, p in run.ac.named_parameters() if n in before
             and "lora_B" in n and not torch.equal(p, before[n])]
    assert moved


def test_dropout_left_in_a_module_is_refused(family_dirs, tmp_path):
    """OPT keeps dropout probabilities as floats on its layers (0.1 as released);
    disable_dropout zeroes them, and one put back is caught by the train/eval check."""
    ac, cfg, tok = _ac(family_dirs["opt"], tmp_path)
    layer = ac.causal_lm.model.decoder.layers[0]
    assert layer.dropout == 0.0 and ac.causal_lm.model.decoder.dropout == 0.0
    check_seams(ac, cfg, tok.pad_token_id)
    layer.dropout = 0.1
    with pytest.raises(UserError, match=r"model type opt with quantization.mode=none: a "
                                        r"train-mode forward differs from an eval-mode one"):
        check_seams(ac, cfg, tok.pad_token_id)


def test_8bit_runs_one_kernel_in_both_modes(family_dirs, tmp_path):
    """bitsandbytes picks MatMul8bitFp in train mode and MatMul8bitLt in eval mode on a CPU;
    loading.one_8bit_kernel pins the first. Without it the check refuses the run."""
    ac, cfg, tok = _ac(family_dirs["llama"], tmp_path, "quantization.mode=8bit")
    check_seams(ac, cfg, tok.pad_token_id)
    import bitsandbytes as bnb

    for m in ac.modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            m._forward_pre_hooks.clear()
    with pytest.raises(UserError, match="quantization.mode=8bit: a train-mode forward"):
        check_seams(ac, cfg, tok.pad_token_id)


def test_bloom_falls_back_to_padded_rows_with_one_line(family_dirs, tmp_path):
    """ALiBi is built from the 2-D mask: neither an explicit mask nor restarting position ids
    isolate packed sequences, so scoring and updates run padded, said in one line."""
    ac, cfg, tok = _ac(family_dirs["bloom"], tmp_path)
    seams = check_seams(ac, cfg, tok.pad_token_id)
    assert seams.layout == PADDED
    assert seams.notes == ("model type bloom: packed rows do not give the padded forward's "
                           "log-probs; scoring and updates use padded rows",)


def test_the_outcome_is_cached_per_model_and_settings(family_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_PPO_CACHE", str(tmp_path / "cache"))
    model = family_dirs["bloom"]
    ac, cfg, tok = _ac(model, tmp_path)
    first, line = seams_for(ac, cfg, tok.pad_token_id, str(model))
    assert line is not None and line.startswith("seam check (")
    assert len(list((tmp_path / "cache" / "seams").iterdir())) == 1
    again, line = seams_for(ac, cfg, tok.pad_token_id, str(model))
    assert line is None and again == first  # read back, not checked again
    cfg2 = tiny_config(model, tmp_path, "model.padding_free=false")
    _, line = seams_for(ac, cfg2, tok.pad_token_id, str(model))  # other settings: checked
    assert line is not None and len(list((tmp_path / "cache" / "seams").iterdir())) == 2
    cfg3 = tiny_config(model, tmp_path, "model.seam_check=always")
    assert seams_for(ac, cfg3, tok.pad_token_id, str(model))[1] is not None
