"""What generation hands back, and the rules that shape it: left-padded prompts, responses cut
after their first stop token, and which ids stop a response.

Layout of every batch (B samples):

    query_ids      (B, Q)  left-padded prompts (generation appends on the right)
    response_ids   (B, R)  right-padded responses, cut after the first EOS/stop token
    response_mask  (B, R)  1.0 on real response tokens (the EOS included), 0.0 on padding
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from torch import Tensor


class Samples(NamedTuple):
    """Sampled responses to left-padded prompts (CPU tensors), with the sampler's own log-probs
    (not greedy) and, where they stand for the scoring forward (`generate(score=True)`), its
    shared-head values."""

    query_ids: Tensor       # (B, Q) long
    query_mask: Tensor      # (B, Q) long
    response_ids: Tensor    # (B, R) long, padding after the first stop token (multi-turn:
    #                         after the last, every turn's and the environment's tokens before)
    response_mask: Tensor   # (B, R) float
    has_eos: Tensor         # (B,) bool
    logprobs: Optional[Tensor] = None  # (B, R) the sampler's log-probs of the drawn tokens
    values: Optional[Tensor] = None    # (B, R) shared-head values on the same states
    scored: bool = False  # the sampler's log-probs (and values) stand for the scoring forward
    env_mask: Optional[Tensor] = None  # (B, R) float: 1 on the environment's tokens (tool
    #                                    results between turns), context and no action; None:
    #                                    single-turn, every real response token is the model's


def left_pad(seqs, pad_id: int) -> tuple[Tensor, Tensor]:
    """Lists of ids -> (ids (B, L), mask (B, L)) padded on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def truncate_after_stop(response_ids: Tensor, stop_ids: Sequence[int], pad_id: int
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """Cut each response after its first stop token. (B, R) -> ids, mask (float), has_eos (B,).

    The stop token itself stays (it is an action the policy took and gets the score).
    """
    is_stop = torch.isin(response_ids, torch.tensor(list(stop_ids), device=response_ids.device))
    # Tokens strictly after the first stop: cumulative count of stops before this position > 0.
    after = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
    mask = (~after).float()
    ids = response_ids.masked_fill(after, pad_id)
    return ids, mask, is_stop.any(-1)


def stop_ids_of(tokenizer, generation_config, extra: Sequence[int]) -> list[int]:
    """The ids that end a response: the tokenizer's EOS, every id of the checkpoint's
    `generation_config.json` `eos_token_id` (an int or a list: Llama 3 and Qwen 2.5 instruct
    checkpoints list `<|eot_id|>` and `<|end_of_text|>`, `<|im_end|>` and `<|endoftext|>`), and
    `rollout.stop_token_ids`; in that order, each once."""
    listed = getattr(generation_config, "eos_token_id", None) if generation_config else None
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    return list(dict.fromkeys([tokenizer.eos_token_id, *listed, *extra]))
