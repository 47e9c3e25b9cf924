"""Matmul FLOPs of each phase of a PPO update, from the architecture alone (estimate.Arch).

benchmarks/bench.py divides them by the measured time of each phase to report achieved FLOP/s as a
share of the machine's matmul peak; tests/sizing/test_estimate.py checks `forward_flops` against
torch's FLOP counter on a real model.
"""

from __future__ import annotations

from lora_ppo.sizing.arch import Arch, param_counts


def forward_flops(arch: Arch, batch: int, seq: int, *, lora_params: int, logit_rows: int) -> float:
    """Matmul FLOPs of one forward of `batch` sequences of `seq` tokens, the LM head applied to
    `logit_rows` positions: 2 per multiply-add on weights (linears + LoRA) and the attention's
    QK^T and AV, 4 * seq^2 * nh * hd per layer and sequence (full square, as Megatron and PaLM
    count)."""
    pc = param_counts(arch)
    tokens = batch * seq
    attn = 4 * arch.layers * seq * seq * arch.heads * arch.head_dim * batch
    head = 2.0 * arch.hidden * arch.vocab * logit_rows
    return 2.0 * (pc.linear + lora_params) * tokens + attn + head


def generation_flops(arch: Arch, batch: int, prompt_len: int, new_tokens: int,
                     lora_params: int) -> float:
    """Prefill of the prompts, then one token per step with the KV cache; logits only for the
    last position of each forward (transformers' generate, logits_to_keep=1)."""
    total = forward_flops(arch, batch, prompt_len, lora_params=lora_params, logit_rows=batch)
    per_tok = 2.0 * (param_counts(arch).linear + lora_params) * batch + 2.0 * arch.hidden * \
        arch.vocab * batch
    for t in range(1, new_tokens):
        ctx = prompt_len + t
        total += per_tok + 4 * arch.layers * ctx * arch.heads * arch.head_dim * batch
    return total


def scoring_flops(arch: Arch, batch: int, prompt_len: int, resp_len: int, lora_params: int,
                  value_adapter: bool, reference_adapter: bool, policy: bool = True,
                  reference: bool = True) -> float:
    """Policy and reference forwards over prompt+response with logits on the response; in
    value.mode=adapter one more critic forward (no logits). `policy=False`: the sampler's own
    log-probs stood in for the policy's forward (ppo/collect.py::sampler_scores); `reference=False`:
    no KL needs the reference."""
    seq, rows = prompt_len + resp_len, batch * resp_len
    total = forward_flops(arch, batch, seq, lora_params=lora_params, logit_rows=rows) * policy
    if reference:
        total += forward_flops(arch, batch, seq,
                               lora_params=lora_params if reference_adapter else 0,
                               logit_rows=rows)
    if value_adapter:
        total += forward_flops(arch, batch, seq, lora_params=lora_params, logit_rows=0)
    return total


def update_flops(arch: Arch, batch: int, prompt_len: int, resp_len: int, lora_params: int,
                 value_adapter: bool, epochs: int, grad_ckpt: bool) -> tuple[float, float]:
    """(model FLOPs, executed FLOPs) of `epochs` passes of forward + backward over `batch` samples.

    Backward of a frozen base computes input gradients only (one matmul per linear, as many FLOPs
    as its forward), of LoRA both input and weight gradients (2x), of attention 2x its forward.
    Model FLOPs count each of these once (the MFU convention, PaLM appendix B); executed FLOPs add
    what is recomputed: every logits chunk (lora_ppo.rl.logprobs checkpoints them) and, with
    gradient checkpointing, the whole trunk forward.
    """
    seq, rows = prompt_len + resp_len, batch * resp_len
    n_fwd = 2 if value_adapter else 1
    head = 2.0 * arch.hidden * arch.vocab * rows
    trunk = n_fwd * forward_flops(arch, batch, seq, lora_params=lora_params, logit_rows=0)
    attn = n_fwd * 4.0 * arch.layers * seq * seq * arch.heads * arch.head_dim * batch
    lora_w = n_fwd * 2.0 * lora_params * batch * seq  # LoRA weight gradients
    model = trunk + head + (trunk + attn + lora_w + head)  # forward + backward
    executed = model + head + (trunk if grad_ckpt else 0.0)
    return epochs * model, epochs * executed
