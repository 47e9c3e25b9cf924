"""The LoRA B weight gradient taken in BLAS's fast order is the same gradient, and only the
trainable adapters get it."""

from __future__ import annotations

import types

import pytest
import torch
from helpers import make_adapter_dir, tiny_config
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lora_ppo.modeling.lora_grad import lora_b_grads_in_fast_order
from lora_ppo.modeling.roles import CRITIC, POLICY, REFERENCE, REWARD
from lora_ppo.ppo.loop import setup


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids).logits
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_fast_order_gives_the_same_gradients(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                            lora_dropout=0.0))
    with torch.no_grad():  # B = 0 at init would give A no gradient at all
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    ids = torch.randint(0, 500, (3, 17), generator=torch.Generator().manual_seed(2))
    plain = _grads(model, ids)
    assert lora_b_grads_in_fast_order(model, ["default"]) == 7 * 2  # 7 linears x 2 layers
    fast = _grads(model, ids)
    assert plain.keys() == fast.keys() and any("lora_B" in n for n in plain)
    for n in plain:
        assert fast[n].is_contiguous()
        torch.testing.assert_close(fast[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.integration
def test_only_the_trainable_adapters_take_it(tiny_model_dir, tmp_path):
    init = make_adapter_dir(tiny_model_dir, tmp_path / "sft", seed=1)
    reward = make_adapter_dir(tiny_model_dir, tmp_path / "rm", seed=2, head=True)
    run = setup(tiny_config(tiny_model_dir, tmp_path / "run", f"model.init_adapter={init}",
                            "value.mode=adapter", f"reward.adapter={reward}",
                            "reward.source=adapter"))
    seen: dict[str, set[bool]] = {}
    for module in run.ac.peft_model.modules():
        for name, b in getattr(module, "lora_B", {}).items():
            seen.setdefault(name, set()).add(isinstance(b.__dict__.get("forward"),
                                                        types.MethodType))
    assert seen == {POLICY: {True}, CRITIC: {True}, REFERENCE: {False}, REWARD: {False}}


def test_under_autocast_the_plain_linear_runs_and_its_gradients_are_autocasts(tiny_model_dir):
    """Under torch.autocast (DeepSpeed's `torch_autocast`) the forward's F.linear ran in bf16
    while the backward multiplied the bf16 gradient by the saved fp32 weight: "expected m1 and
    m2 to have the same dtype" at the first backward. Now the gradients are those of the model
    without the fast order, under the same autocast."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                            lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(2))

    def grads():  # as DeepSpeed runs it: the forward under autocast, the backward outside
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids).logits.float()
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    lora_b_grads_in_fast_order(model, ["default"])
    fast = grads()
    assert any("lora_B" in n for n in fast)
    for n in plain:
        assert fast[n].dtype == torch.float32
        torch.testing.assert_close(fast[n], plain[n], rtol=0, atol=0, msg=n)
