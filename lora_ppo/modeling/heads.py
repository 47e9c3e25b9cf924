"""The heads on the one trunk: the LM head as the model itself applies it, and the scalar heads
(values, reward scores).

The LM head. Sampling and scoring run the trunk and then the LM head chunk by chunk
(rl/logprobs.py), never `*ForCausalLM.forward`, so whatever that forward does after the head must
be done here too, or the policy that is trained and KL-constrained is not the model that
`generate`, or an exported adapter, runs. transformers 5.25 post-processes the head's output in
three families: Cohere multiplies by `logit_scale`, Granite divides by `logits_scaling`, Gemma 2
and 3 soft-cap with `final_logit_softcapping` (`logits_transform` reads them). A model that does
something else is caught at setup by ppo/seams.py, which compares these logits with the
model's own `forward().logits`, and then trained on the forward's own logits instead
(modeling/own_logits.py).

The scalar heads compute in fp32 whatever dtype DeepSpeed's mixed precision gave their weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lora_ppo.errors import UserError, first_line
from lora_ppo.rl.logprobs import LogitsTransform

REWARD_HEAD_FILE = "score_head.safetensors"


def logits_transform(config) -> LogitsTransform:
    """What the model's `*ForCausalLM.forward` does to the LM head's output (module doc)."""
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2, Gemma 3
    return LogitsTransform(scale, None if softcap is None else float(softcap))


def frozen_weight(head: nn.Module):
    """The LM head's weight (V, H) when the head is a plain nn.Linear whose parameters take no
    gradient and whose weight is whole on this device (not a ZeRO-3 partition, which its own
    call gathers), else None. Scoring then needs only d log p / d hidden = (...) @ W, which
    rl/logprobs.py makes in the forward, chunk by chunk, instead of keeping or remaking the
    logits for the backward. A LoRA on the head (peft wraps it) takes the general path."""
    if type(head) is not nn.Linear or any(p.requires_grad for p in head.parameters()):
        return None
    w = head.weight
    return None if hasattr(w, "ds_id") or w.numel() == 0 else w


class _FP32Linear(nn.Linear):
    """nn.Linear that computes in fp32 whatever dtype its weights and input are in.

    Under bf16/fp16 DeepSpeed casts every module parameter to the training dtype, the heads'
    too (`DeepSpeedEngine._cast_module_mixed_precision`; their fp32 master copy lives in the
    optimizer). The head still multiplies in fp32, so values and scores keep fp32 precision in
    the sum over the hidden size. A Linear subclass, not a function of the weights in the parent's
    forward, so ZeRO-3 gathers its partitioned weights around its own `__call__`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.linear(x.float(), self.weight.float(), bias)


class ScalarHead(nn.Module):
    """hidden (B, T, H) -> (B, T) float32, computed in fp32 whatever the trunk's dtype."""

    def __init__(self, hidden_size: int, init_std: float = 0.0):
        super().__init__()
        self.linear = _FP32Linear(hidden_size, 1, dtype=torch.float32)
        if init_std > 0:
            nn.init.normal_(self.linear.weight, std=init_std)
        else:
            nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)


def load_scalar_head(path: Path, hidden_size: int, device: torch.device) -> ScalarHead:
    from safetensors.torch import load_file

    head = ScalarHead(hidden_size)
    try:
        state = load_file(str(path))
        head.linear.load_state_dict(state)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UserError(f"cannot load head {path}: {first_line(e)}; re-export it")
    return head.to(device)
