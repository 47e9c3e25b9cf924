"""The policy folded into the base weights for generation, and when that (and the sampler's own
log-probs) is exact. ("Folded", not "merged": the weights are put back after generation; a merge
is the export that writes W + BA out, io/merge.py.)

peft runs LoRA unmerged: three matmuls per linear per decoded token. For an unquantized fp32 base
outside ZeRO-3 the sampler runs with W + scale B A swapped in as new tensors, and the original
weights are put back afterwards, the same tensors bit for bit (peft's in-place merge/unmerge
does not give W back exactly). Not for bf16 (rounding W + BA to bf16 costs 2^-9 of W, as much as
the update itself) nor for 4-bit or 8-bit weights, which cannot hold it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lora_ppo.modeling.roles import POLICY


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


def can_fold(peft_model: nn.Module) -> bool:
    """Exact enough only for an unquantized fp32 base (fp32 rounds W + BA at ~1e-7 relative),
    and only where the weights are whole on this device (not ZeRO-3)."""
    return decodes_in_fp32(peft_model) and not any(
        hasattr(m.get_base_layer().weight, "ds_id") for m in policy_layers(peft_model))


@contextlib.contextmanager
def folded_policy(peft_model: nn.Module) -> Iterator[None]:
    """The body runs with W + scale * B @ A in place of each policy layer's base weight, so a
    decoded token costs one matmul per linear instead of three. The merged weights are new
    tensors and the originals are put back afterwards, untouched. Costs one copy of the adapted
    weights while it lasts."""
    swapped = []
    try:
        with torch.no_grad():
            for m in policy_layers(peft_model):
                base = m.get_base_layer()
                weight = base.weight
                delta = m.get_delta_weight(POLICY).to(weight.dtype)  # peft's own update
                base.weight = nn.Parameter(weight + delta, requires_grad=False)
                swapped.append((m, base, weight, list(m.merged_adapters)))
                m.merged_adapters = [POLICY]  # peft's LoRA forward: base layer only
        yield
    finally:
        for m, base, weight, merged in swapped:
            base.weight = weight
            m.merged_adapters = merged
