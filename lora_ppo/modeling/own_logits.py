"""Log-probs from the model's own `*ForCausalLM.forward` logits: the exact path for a family whose
post-processing of the LM head's output lora_ppo does not know (modeling/heads.py knows Cohere's,
Granite's and Gemma's; ppo/seams.py finds the others and takes this path, one line saying
so, `ActorCritic.use_own_logits`).

lora_ppo's usual path runs the trunk, then the head chunk by chunk, then `logits_transform`; here
the model's forward makes the logits, whatever it does after the head, so they are the model's by
construction. What it costs: the forward's (N, V) logits of the N scored positions exist whole,
in its dtype (transformers 5 computes them at those positions only: a boolean `logits_to_keep`),
and its post-processing may keep as much again for its backward; only the log-softmax after it
runs in chunks (sizing/memory.py::own_logits_bytes counts it). Rows are padded, not packed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lora_ppo.modeling.packing import position_ids_from_mask
from lora_ppo.rl.logprobs import logprobs_and_entropy_from_hidden


def model_logits(ac, ids: Tensor, mask: Tensor, keep: Tensor) -> Tensor:
    """(N, V): the model's own forward's logits at the N True places of `keep` (B, L), computed
    there only where the forward takes a boolean `logits_to_keep` (transformers 5's
    slice_logits_to_keep), else at every position and then picked."""
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
              use_cache=False)
    if ac.keep_mask:
        try:
            logits = ac.causal_lm(**kw, logits_to_keep=keep).logits
            if logits.shape[:-1] == (int(keep.sum()),):
                return logits
        except (TypeError, IndexError, RuntimeError):
            pass
        ac.keep_mask = False  # an older forward: logits at every position
    return ac.causal_lm(**kw).logits[keep]


def own_logprobs(ac, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, real: Tensor,
                 **kw) -> tuple[Tensor, Tensor | None, Tensor]:
    """Log-probs (1, N) and entropies (1, N) or None of the `real` (B, R) response tokens from
    the model's own logits, query (B, Q) left-padded, response (B, R); and the trunk's states
    (B, R, H) predicting each response token, read off the decoder's output by a forward hook
    (the shared value head's input: no second trunk forward). `kw`: temperature, chunk_size,
    with_entropy, entropy_grad of rl/logprobs.py."""
    ids = torch.cat([query_ids, response_ids], 1)
    mask = torch.cat([query_mask, real.long()], 1)
    q, r = query_ids.shape[1], response_ids.shape[1]
    keep = torch.zeros_like(mask, dtype=torch.bool)
    keep[:, q - 1:q - 1 + r] = real  # position q-1+t predicts response token t
    states = {}

    def read(module, args, out) -> None:  # returns None: the output stays the module's
        states["h"] = out.last_hidden_state

    hook = ac.causal_lm.get_decoder().register_forward_hook(read)
    try:
        logits = model_logits(ac, ids, mask, keep)
    finally:
        hook.remove()
    # a copy per chunk: rl/logprobs.py's _PickLogProb works in its input's buffer, and the
    # model's post-processing may keep these very logits for its backward
    copy = (lambda x: x.clone() if x.dtype == torch.float32 else x.float())
    lp, ent = logprobs_and_entropy_from_hidden(logits[None], copy, response_ids[real][None], **kw)
    return lp, ent, states["h"][:, q - 1:q - 1 + r]
