"""One base, four roles: real peft adapters and real bitsandbytes layers on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from helpers import make_adapter_dir, tiny_config

from lora_ppo.modeling.actor_critic import build_actor_critic
from lora_ppo.modeling.loading import load_base_model, load_tokenizer
from lora_ppo.modeling.roles import CRITIC, POLICY, REFERENCE, REWARD

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"sft": make_adapter_dir(tiny_model_dir, root / "sft", seed=1),
            "reward": make_adapter_dir(tiny_model_dir, root / "reward", seed=2, head=True)}


def _model(tiny_model_dir, tmp_path, *overrides):
    cfg = tiny_config(tiny_model_dir, tmp_path, *overrides)
    return cfg, build_actor_critic(cfg, load_base_model(cfg, str(tiny_model_dir), CPU))


def _batch(tiny_model_dir):
    tok = load_tokenizer(tiny_config(tiny_model_dir, "x").model, str(tiny_model_dir))
    q = tok(["review of the pizza place :", "my review of the movie : it"], padding=True,
            return_tensors="pt")
    r = tok(["the food was great", "was bad"], add_special_tokens=False, padding=True,
            padding_side="right", return_tensors="pt")
    return q["input_ids"], q["attention_mask"], r["input_ids"], r["attention_mask"].float()


def _logprobs(ac, batch, role=POLICY):
    with torch.no_grad():
        lp, _, _ = ac(*batch, temperature=1.0, chunk_size=64, with_values=False,
                                  role=role)
    return lp * batch[3]


def _perturb_policy(ac):
    with torch.no_grad():
        for name, p in ac.named_parameters():
            if f"lora_B.{POLICY}." in name:
                p.normal_(std=0.3)


def _base_storages(module):
    return {p.untyped_storage().data_ptr() for n, p in module.named_parameters()
            if "lora_" not in n and "head.linear" not in n}


def test_all_roles_share_one_copy_of_the_base(tiny_model_dir, adapters, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path)
    plain = load_base_model(cfg, str(tiny_model_dir), CPU)
    n_plain = len(_base_storages(plain))
    numel_plain = sum(p.numel() for p in plain.parameters())
    _, ac = _model(tiny_model_dir, tmp_path, f"model.init_adapter={adapters['sft']}",
                   "value.mode=adapter", "reward.source=adapter",
                   f"reward.adapter={adapters['reward']}")
    assert set(ac.adapters()) == {POLICY, REFERENCE, CRITIC, REWARD}
    assert len(_base_storages(ac)) == n_plain
    base_numel = sum(p.numel() for n, p in ac.named_parameters()
                     if "lora_" not in n and "head.linear" not in n)
    assert base_numel == numel_plain
    # Only the policy and critic LoRA weights and the value head train.
    trainable = {n for n, p in ac.named_parameters() if p.requires_grad}
    assert trainable and all(f".{POLICY}." in n or f".{CRITIC}." in n or n.startswith("value_head")
                             for n in trainable)
    assert any(n.startswith("value_head") for n in trainable)
    assert ac.value_head.linear.weight.dtype == torch.float32


def test_reference_is_the_plain_base_before_and_after_policy_changes(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path)
    batch = _batch(tiny_model_dir)
    plain = build_actor_critic(cfg, load_base_model(cfg, str(tiny_model_dir), CPU))
    expected = _logprobs(plain, batch, REFERENCE)
    _, ac = _model(tiny_model_dir, tmp_path)
    torch.testing.assert_close(_logprobs(ac, batch, REFERENCE), expected, rtol=0, atol=1e-6)
    # LoRA B starts at zero: the policy is the base at first.
    torch.testing.assert_close(_logprobs(ac, batch, POLICY), expected, rtol=0, atol=1e-6)
    _perturb_policy(ac)
    assert (_logprobs(ac, batch, POLICY) - expected).abs().max() > 1e-2
    torch.testing.assert_close(_logprobs(ac, batch, REFERENCE), expected, rtol=0, atol=1e-6)


def test_reference_is_the_sft_adapter_when_training_starts_from_one(tiny_model_dir, adapters,
                                                                     tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    batch = _batch(tiny_model_dir)
    _, ac = _model(tiny_model_dir, tmp_path, f"model.init_adapter={adapters['sft']}")
    # The SFT model loaded the plain-peft way, independently of lora_ppo.
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                    adapters["sft"]).eval()
    ids = torch.cat([batch[0], batch[2]], 1)
    mask = torch.cat([batch[1], batch[3].long()], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = sft(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    q, r = batch[0].shape[1], batch[2].shape[1]
    sft_lp = torch.log_softmax(logits[:, q - 1:q - 1 + r], -1).gather(
        -1, batch[2].unsqueeze(-1)).squeeze(-1) * batch[3]
    raw = _logprobs(ac, batch, REFERENCE)
    torch.testing.assert_close(raw, sft_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logprobs(ac, batch, POLICY), sft_lp, rtol=0, atol=1e-5)
    _perturb_policy(ac)
    assert (_logprobs(ac, batch, POLICY) - sft_lp).abs().max() > 1e-2
    torch.testing.assert_close(_logprobs(ac, batch, REFERENCE), sft_lp, rtol=0, atol=1e-5)
    # The reference adapter stays frozen.
    assert not any(p.requires_grad for n, p in ac.named_parameters() if f".{REFERENCE}." in n)


@pytest.mark.integration
def test_role_switch_restores_adapter_and_mode_after_an_exception(tiny_model_dir, adapters,
                                                                   tmp_path):
    _, ac = _model(tiny_model_dir, tmp_path, "value.mode=adapter")
    ac.train()
    trainable = [n for n, p in ac.named_parameters() if p.requires_grad]
    for role in (CRITIC, REFERENCE):
        with pytest.raises(RuntimeError, match="boom"):
            with ac.role(role, train=False):
                assert not ac.training
                raise RuntimeError("boom")
        assert ac.peft_model.active_adapter == POLICY and ac.training
    # peft's set_adapter flips requires_grad; the role switch must leave the trainable set alone.
    assert [n for n, p in ac.named_parameters() if p.requires_grad] == trainable


@pytest.mark.integration
@pytest.mark.parametrize("mode, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_base_trains_only_the_policy_adapter(wide_model_dir, tmp_path, mode, layer):
    cfg, ac = _model(wide_model_dir, tmp_path, f"quantization.mode={mode}", "value.mode=adapter")
    kinds = {type(m).__name__ for m in ac.modules()}
    assert layer in kinds, kinds
    before = {n: p.detach().clone() for n, p in ac.named_parameters()}
    batch = _batch(wide_model_dir)
    opt = torch.optim.AdamW(ac.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    ac.train()
    lp, _, _ = ac(*batch, temperature=1.0, chunk_size=64, with_values=False)
    (-(lp * batch[3]).sum()).backward()
    opt.step()
    changed = {n for n, p in ac.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(f".{POLICY}." in n for n in changed), changed


def test_4bit_footprint_is_well_below_fp32(wide_model_dir, tmp_path):
    cfg = tiny_config(wide_model_dir, tmp_path)
    fp32 = load_base_model(cfg, str(wide_model_dir), CPU).get_memory_footprint()
    cfg4 = tiny_config(wide_model_dir, tmp_path, "quantization.mode=4bit")
    q4 = load_base_model(cfg4, str(wide_model_dir), CPU).get_memory_footprint()
    assert q4 < 0.4 * fp32, (q4, fp32)


def test_missing_pad_token_is_eos_and_padding_is_left(tiny_model_dir):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_model_dir).pad_token is None
    tok = load_tokenizer(tiny_config(tiny_model_dir, "x").model, str(tiny_model_dir))
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"


@pytest.mark.integration
def test_4bit_gradients_are_the_same_after_a_no_grad_rollout_pass(wide_model_dir, tmp_path):
    # bitsandbytes repacks 4-bit weights for CPU inference on the first eval no-grad forward and
    # the repacked op has no autograd: without keep_4bit_differentiable_on_cpu the update after a
    # rollout silently loses the gradient through every frozen base weight.
    cfg, ac = _model(wide_model_dir, tmp_path, "quantization.mode=4bit")
    _perturb_policy(ac)
    batch = _batch(wide_model_dir)

    def grads():
        ac.zero_grad(set_to_none=True)
        ac.train()
        lp, _, _ = ac(*batch, temperature=1.0, chunk_size=64, with_values=False)
        (-(lp * batch[3]).sum()).backward()
        return {n: p.grad.clone() for n, p in ac.named_parameters() if p.grad is not None}

    before = grads()
    ac.eval()
    _logprobs(ac, batch)  # what a rollout does: eval mode, no grad
    after = grads()
    assert before.keys() == after.keys() and len(before) > 0
    for n in before:
        torch.testing.assert_close(after[n], before[n], msg=n)
