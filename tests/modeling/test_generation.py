"""The policy folded into the base weights for generation (generation/folded.py) is what peft's
own forward computes, for every adapter a user brings: plain LoRA, rsLoRA, DoRA (its magnitude
and weight norm) and lora_bias (into a bias the base may not have), on Llama, GPT-2 (Conv1D:
fan_in_fan_out) and Qwen2 (biases on q/k/v); and the setup's check refuses to fold what does
not fold exactly."""

from __future__ import annotations

import pytest
import torch
from families import build_family_model
from helpers import make_adapter_dir, tiny_config

from lora_ppo.generation.folded import can_fold, folded_policy
from lora_ppo.modeling.actor_critic import POLICY, build_actor_critic
from lora_ppo.modeling.loading import load_base_model, load_tokenizer
from lora_ppo.ppo.seams import check_seams

CPU = torch.device("cpu")
ADAPTERS = {"plain": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True},
            "lora_bias": {"lora_bias": True}, "modules_to_save": {"modules_to_save": ["lm_head"]}}


@pytest.fixture(scope="module")
def family_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fold_families")
    return {"llama": tiny_model_dir,
            **{f: build_family_model(f, root / f, tiny_model_dir) for f in ("gpt2", "qwen2")}}


def _ac(model_dir, out, *overrides):
    cfg = tiny_config(model_dir, out, *overrides)
    tok = load_tokenizer(cfg.model, str(model_dir))
    return build_actor_critic(cfg, load_base_model(cfg, str(model_dir), CPU)), cfg, tok


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("kind", ["plain", "rslora", "dora", "lora_bias"])
def test_the_fold_is_peft_s_forward(family_dirs, tmp_path, family, kind):
    """Logits of the model's own forward with the policy folded equal peft's unmerged forward
    (fp32 round-off); before, a DoRA fold differed by the magnitude / norm factor and a
    lora_bias fold left the bias out (peft refuses DoRA with lora_bias). The base's tensors are
    the same objects afterwards."""
    model = family_dirs[family]
    sft = make_adapter_dir(model, tmp_path / "sft", seed=1, **ADAPTERS[kind])
    ac, _, _ = _ac(model, tmp_path / "run", f"model.init_adapter={sft}")
    assert can_fold(ac.peft_model)
    before = {n: p for n, p in ac.causal_lm.named_parameters()}
    ids = torch.randint(16, 500, (3, 11), generator=torch.Generator().manual_seed(0))
    with ac.role(POLICY, train=False), torch.no_grad():
        unmerged = ac.causal_lm(input_ids=ids).logits
        with folded_policy(ac.peft_model):
            folded = ac.causal_lm(input_ids=ids).logits
        again = ac.causal_lm(input_ids=ids).logits
        with ac.peft_model.disable_adapter():
            base = ac.causal_lm(input_ids=ids).logits
    assert (unmerged - base).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(folded, unmerged, rtol=0, atol=2e-5)
    assert torch.equal(again, unmerged)
    after = dict(ac.causal_lm.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


def _plain_lora_fold(m):
    """What the fold was before: W + get_delta_weight, nothing else."""
    base = m.get_base_layer()
    return base.weight + m.get_delta_weight(POLICY), None


def test_a_fold_that_is_not_exact_is_given_up_with_one_line(tiny_model_dir, tmp_path,
                                                           monkeypatch):
    """The setup's decode check runs the sampler with the fold: a DoRA adapter folded as plain
    LoRA (the old fold) does not decode what the forward scores, so the run generates
    unfolded, said in one line naming the field."""
    sft = make_adapter_dir(tiny_model_dir, tmp_path / "sft", seed=1, use_dora=True)
    ac, cfg, tok = _ac(tiny_model_dir, tmp_path / "run", f"model.init_adapter={sft}")
    assert check_seams(ac, cfg, tok.pad_token_id).decode.fold
    import lora_ppo.generation.folded as folded

    monkeypatch.setattr(folded, "folded_layer", _plain_lora_fold)
    seams = check_seams(ac, cfg, tok.pad_token_id)
    assert not seams.decode.fold and seams.decode.continuous_batching
    assert seams.notes == ("model type llama: the policy folded into the base weights does not "
                           "decode what the forward scores; it generates unfolded "
                           "(rollout.fold_for_generation=false)",)


def test_a_variant_that_is_not_folded_generates_unfolded_with_one_line(tiny_model_dir, tmp_path):
    """aLoRA (peft's ALoraLinearVariant: the adapter acts only after its invocation tokens) has
    no merge that a fold could copy: the run generates unfolded and says so."""
    sft = make_adapter_dir(tiny_model_dir, tmp_path / "sft", seed=1,
                           alora_invocation_tokens=[5, 6])
    ac, cfg, tok = _ac(tiny_model_dir, tmp_path / "run", f"model.init_adapter={sft}")
    assert not can_fold(ac.peft_model)
    seams = check_seams(ac, cfg, tok.pad_token_id)
    assert not seams.decode.fold
    assert seams.notes == ("model.init_adapter: the policy's ALoraLinearVariant layers cannot be "
                           "folded into the base weights exactly; it generates unfolded "
                           "(rollout.fold_for_generation=false)",)
