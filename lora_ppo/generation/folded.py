"""The policy folded into the base weights for generation, and when that (and the sampler's own
log-probs) is exact. ("Folded", not "merged": the weights are put back after generation; a merge
is the export that writes W + BA out, io/merge.py.)

peft runs LoRA unmerged: three matmuls per linear per decoded token. For an unquantized fp32 base
outside ZeRO-3 the sampler runs with the merged weights swapped in as new tensors, and the
original weights are put back afterwards, the same tensors bit for bit (peft's in-place
merge/unmerge does not give W back exactly). Not for bf16 (rounding W + BA to bf16 costs 2^-9 of
W, as much as the update itself), nor under torch autocast (the same rounding, in the matmul),
nor for 4-bit or 8-bit weights, which cannot hold it.

What is folded is what peft's own `Linear.merge` (peft 0.21 tuners/lora/layer.py) folds:

    plain LoRA, rsLoRA  W + get_delta_weight = W + scaling * B @ A  (scaling: alpha / r, or
                        alpha / sqrt(r) with use_rslora; peft computes it per layer)
    DoRA                the variant's merge (tuners/lora/variants.py DoraLinearVariant.
                        merge_safe): m / ||W + scaling * B @ A||_row * (W + scaling * B @ A),
                        the norm per output row as DoRA's forward takes it (dora.py
                        get_weight_norm)
    lora_bias           b + scaling * lora_B.bias; a base layer without a bias gets one for the
                        duration (peft's merge refuses it; here it is exact: x W^T + b)

Any other LoRA variant (aLoRA, Arrow, ...) is not folded: the policy then generates unmerged.
`modules_to_save` copies and LoRA on embeddings are not folded either: they run as peft runs them
(exact). ppo/seams.py checks the folded decode loop against the scoring forward at setup.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

import torch
from torch import Tensor, nn

from lora_ppo.modeling.roles import POLICY

FOLDABLE_VARIANTS = ("DoraLinearVariant",)  # peft variants whose merge is folded exactly


def policy_layers(peft_model: nn.Module) -> list:
    """peft's LoRA Linear layers that hold the policy adapter, with float32 base weights."""
    from peft.tuners.lora import Linear as LoraLinear

    return [m for m in peft_model.modules()
            if isinstance(m, LoraLinear) and POLICY in m.lora_A
            and m.get_base_layer().weight.dtype == torch.float32]


def decodes_in_fp32(peft_model: nn.Module) -> bool:
    """True for an unquantized fp32 policy: there a token decoded with the KV cache gets the
    logits of a full forward over the finished sequence to fp32 round-off (~1e-6), so the
    sampler's log-probs can serve as the rollout's. In bf16 the two differ by ~1e-2 (other
    matmul shapes, other rounding), and the scoring forward must be rerun."""
    layers = policy_layers(peft_model)
    every = [m for m in peft_model.modules()
             if hasattr(m, "lora_A") and POLICY in getattr(m, "lora_A", {})]
    return bool(layers) and len(layers) == len(every)  # every policy linear is fp32


def sampler_agrees(ac) -> bool:
    """Whether the sampler's distribution is the scored one to fp32 round-off: the forwards
    compute in fp32 (the model's float weights in fp32, a 4-bit or 8-bit base with them: the
    base loads in its compute dtype, modeling/loading.py) without torch autocast. Elsewhere
    (bf16, fp16, autocast) the update weighs the one against the other
    (ppo/update.py::sampler_correction)."""
    dtype = ac.causal_lm.get_input_embeddings().weight.dtype
    return ac.autocast is None and dtype == torch.float32


def unfoldable(peft_model: nn.Module) -> Optional[str]:
    """Why the policy cannot be folded exactly (a LoRA variant whose merge is not folded here),
    or None."""
    for m in policy_layers(peft_model):
        variant = getattr(m, "lora_variant", {}).get(POLICY)
        if variant is not None and type(variant).__name__ not in FOLDABLE_VARIANTS:
            return f"{type(variant).__name__} layers"
    return None


def can_fold(peft_model: nn.Module) -> bool:
    """Exact enough only for an unquantized fp32 base (fp32 rounds W + BA at ~1e-7 relative),
    only where the weights are whole on this device (not ZeRO-3), and only for what
    `folded_layer` folds exactly (module doc)."""
    return decodes_in_fp32(peft_model) and unfoldable(peft_model) is None and not any(
        hasattr(m.get_base_layer().weight, "ds_id") for m in policy_layers(peft_model))


def folded_layer(m: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    """Layer `m`'s base weight and bias with the policy adapter merged, as peft's Linear.merge
    would compute them (module doc), in new tensors; the bias is None where the adapter leaves
    it alone. Call under no_grad."""
    base = m.get_base_layer()
    weight = base.weight
    variant = getattr(m, "lora_variant", {}).get(POLICY)
    if variant is None:
        new_weight = weight + m.get_delta_weight(POLICY).to(weight.dtype)  # peft's own update
    else:  # DoRA: peft's merge, on a copy; it caches the norm for an unmerge that never runs
        new_weight = variant.merge_safe(m, POLICY, weight.detach())
        m._cache_pop(f"{POLICY}-weight_norm")
    new_bias = None
    if m.lora_bias.get(POLICY, False):
        bias = base.bias if base.bias is not None else weight.new_zeros(weight.shape[0])
        new_bias = bias + m.lora_B[POLICY].bias.to(weight.dtype) * m.scaling[POLICY]
    return new_weight, new_bias


@contextlib.contextmanager
def folded_policy(peft_model: nn.Module) -> Iterator[None]:
    """The body runs with each policy layer's base weight (and bias, with lora_bias) replaced by
    `folded_layer`'s, so a decoded token costs one matmul per linear instead of three. The merged
    tensors are new and the originals are put back afterwards, untouched. Costs one copy of the
    adapted weights while it lasts."""
    swapped = []
    try:
        with torch.no_grad():
            for m in policy_layers(peft_model):
                base = m.get_base_layer()
                weight, bias = folded_layer(m)
                swapped.append((m, base, base.weight, base.bias, list(m.merged_adapters)))
                base.weight = nn.Parameter(weight, requires_grad=False)
                if bias is not None:
                    base.bias = nn.Parameter(bias, requires_grad=False)
                m.merged_adapters = [POLICY]  # peft's LoRA forward: base layer only
        yield
    finally:
        for m, base, weight, bias, merged in swapped:
            base.weight, base.bias = weight, bias
            m.merged_adapters = merged
