"""The LoRA B weight gradient taken in BLAS's fast order is the same gradient, and only the
trainable adapters get it."""

from __future__ import annotations

import types

import pytest
import torch
from helpers import make_adapter_dir, tiny_config
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lora_ppo.modeling.lora_grad import fuse_lora_linears, lora_b_grads_in_fast_order
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
    # the one-node linear: on every LoRA layer, for the trainable adapters only
    from lora_ppo.modeling.lora_grad import _fusable
    layers = [m for m in run.ac.peft_model.modules() if hasattr(m, "_peft_forward")]
    assert layers and {m._fused_adapters for m in layers} == {frozenset({POLICY, CRITIC})}
    x = torch.zeros(1, 2, layers[0].in_features)
    for active, served in ((POLICY, POLICY), (CRITIC, CRITIC), (REWARD, None), (REFERENCE, None)):
        run.ac.peft_model.set_adapter(active)
        assert _fusable(layers[0], x, layers[0]._fused_adapters) == served
    run.ac.peft_model.set_adapter(POLICY)


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


# --- one autograd node per LoRA linear (fuse_lora_linears) --------------------------------------

ADAPTER_KINDS = {  # peft LoraConfig settings: the first two fuse, the others run peft's forward
    "plain": {}, "rslora": {"use_rslora": True},
    "lora_bias": {"lora_bias": True}, "dora": {"use_dora": True},
    "dropout": {"lora_dropout": 0.1},
}


def _family_peft(family: str, kind: str, checkpointing: bool):
    from families import family_config, linear_names

    torch.manual_seed(0)
    config = family_config(family)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    settings = {"lora_dropout": 0.0, **ADAPTER_KINDS[kind]}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=linear_names(family),
                                            **settings))
    with torch.no_grad():  # random non-zero A and B (and lora_B biases, DoRA magnitudes)
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _grads_and_logits(model, ids):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same dropout masks in both (OPT's dropout 0.1, the LoRA's)
    out = model(input_ids=ids).logits
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None}


@pytest.mark.parametrize("family,kind,checkpointing", [
    ("llama", "plain", False), ("llama", "rslora", True), ("opt", "plain", True),
    ("gemma2", "rslora", False), ("phi3", "plain", False), ("bloom", "plain", False),
    ("gpt2", "plain", False),  # Conv1D base layers: peft's forward throughout
    ("llama", "lora_bias", False), ("llama", "dora", False), ("cohere", "dropout", False),
])
def test_the_fused_linear_gives_peft_s_outputs_and_gradients(family, kind, checkpointing):
    """Where it serves (plain LoRA and rsLoRA on nn.Linear bases) the one-node linear gives the
    logits and gradients peft's own forward gives, to round-off, with gradient checkpointing on
    or off; where it does not (Conv1D, lora_bias, DoRA, dropout while training) peft's forward
    runs unchanged, bit for bit."""
    from lora_ppo.modeling.lora_grad import _fusable

    model = _family_peft(family, kind, checkpointing)
    model.train()
    ids = torch.randint(3, 500, (2, 13), generator=torch.Generator().manual_seed(2))
    plain_logits, plain = _grads_and_logits(model, ids)
    layers = [m for m in model.modules() if hasattr(m, "_peft_forward") or (
        hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}))]
    assert fuse_lora_linears(model, ["default"]) == len(layers) > 0
    fused_logits, fused = _grads_and_logits(model, ids)
    probe = torch.zeros(1, 2, layers[0].in_features if hasattr(layers[0], "in_features") else 1)
    serves = [_fusable(m, probe, frozenset({"default"})) is not None for m in layers]
    if kind in ("plain", "rslora") and family != "gpt2":
        assert all(serves)
    else:
        assert not any(serves)
        torch.testing.assert_close(fused_logits, plain_logits, rtol=0, atol=0)
    assert plain.keys() == fused.keys() and any("lora_A" in n for n in plain)
    torch.testing.assert_close(fused_logits, plain_logits, rtol=1e-5, atol=1e-5)
    for n in plain:  # round-off scales with the largest component (sums over every token)
        assert fused[n].is_contiguous()
        scale = float(plain[n].abs().max())
        assert scale > 0, n
        torch.testing.assert_close(fused[n], plain[n], rtol=0, atol=1e-5 * scale, msg=n)


def test_the_fused_linear_steps_aside_for_the_states_peft_handles(tiny_model_dir):
    """Disabled adapters (the reference), a merged adapter (the folded generation), another
    adapter active, a frozen base made trainable, autocast: peft's own forward runs."""
    from lora_ppo.modeling.lora_grad import _fusable

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                            lora_dropout=0.0))
    model.add_adapter("other", LoraConfig(r=4, target_modules="all-linear"))
    fuse_lora_linears(model, ["default"])
    layer = next(m for m in model.modules() if hasattr(m, "_peft_forward"))
    x = torch.zeros(1, 3, layer.in_features)
    names = frozenset({"default"})
    assert _fusable(layer, x, names) == "default"
    with model.disable_adapter():
        assert _fusable(layer, x, names) is None
    model.set_adapter("other")
    assert _fusable(layer, x, names) is None
    model.set_adapter("default")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _fusable(layer, x, names) is None
    assert _fusable(layer, x.bfloat16(), names) is None
    layer.base_layer.weight.requires_grad_(True)
    assert _fusable(layer, x, names) is None
    layer.base_layer.weight.requires_grad_(False)
    layer.merged_adapters = ["default"]
    assert _fusable(layer, x, names) is None
