"""Token log-probabilities and entropies without ever holding (B, T, V) float32 logits.

A vocabulary of 150k makes B*T*V logits the largest tensor of a PPO step (B*T = 16k response
tokens -> 9.8 GB in float32, and log_softmax plus its backward double or triple that). Here rows
are processed in chunks of `chunk_size`, so at most one chunk's (rows, V) float32 copy (and its
temporaries) exists at a time. Under autograd each chunk runs inside a non-reentrant
torch.utils.checkpoint, so only the chunk's inputs are saved and its logits are recomputed in
backward; otherwise the saved per-chunk logits would add up to B*T*V again.

    log p(token) = z[token] - logsumexp(z),      z = logits / temperature
    entropy      = logsumexp(z) - sum(softmax(z) * z)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def chunk_rows(vocab: int, mib: float) -> int:
    """Rows whose fp32 logits (rows, vocab) take `mib` MiB: a chunk size bounded in bytes, so the
    same budget holds for any vocabulary (1024 rows were 0.5 GB at 128k, 16 MB at 4k)."""
    return max(1, int(mib * 2**20) // (4 * vocab))


def _chunk_logprobs(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    """logits: (N, V) any dtype, tokens: (N,) -> float32 (N,)."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    return z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def _chunk_logprobs_entropy(
    logits: Tensor, tokens: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """logits: (N, V) any dtype, tokens: (N,) -> float32 logprobs (N,), entropy (N,)."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)  # (N,)
    logprobs = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    probs = torch.exp(z - lse.unsqueeze(-1))  # (N, V), softmax(z)
    entropy = lse - (probs * z).sum(-1)
    return logprobs, entropy


def _run(fn: Callable, *args: Tensor) -> tuple[Tensor, ...] | Tensor:
    """fn(*args), checkpointed when autograd is recording so its (N, V) temporaries aren't saved."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def logprobs_from_logits(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int = 1024
) -> Tensor:
    """log softmax(logits / temperature) at tokens; logits: (B, T, V), tokens: (B, T) -> (B, T).

    float32 result. Never calls log_softmax over the whole (B, T, V).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, T, V = logits.shape
    flat_logits, flat_tokens = logits.reshape(B * T, V), tokens.reshape(B * T).long()

    def fn(lg: Tensor, tok: Tensor) -> Tensor:
        return _chunk_logprobs(lg, tok, temperature)

    out = [
        _run(fn, flat_logits[i : i + chunk_size], flat_tokens[i : i + chunk_size])
        for i in range(0, B * T, chunk_size)
    ]
    return torch.cat(out).view(B, T)


def logprobs_and_entropy_from_hidden(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    tokens: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = True,
    entropy_grad: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Apply the LM head chunk by chunk and score tokens; the (B, T, V) logits never exist.

    hidden: (B, T, H) final hidden states at the positions that predict `tokens`;
    head: maps (N, H) -> (N, V) logits, e.g. the model's lm_head module;
    tokens: (B, T) -> logprobs (B, T) float32, entropy (B, T) float32 or None (without
    `entropy_grad` it is computed outside autograd: a metric, no backward through it).
    Peak extra memory, forward and backward, is about 5 (chunk_size, V) float32 tensors plus the
    head's weight grad (measured in tests/rl/test_logprobs.py); pick chunk_size for the GPU:
    1024 rows x 150k vocab x 4 B x 5 = 3 GB.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, T, H = hidden.shape
    flat_hidden, flat_tokens = hidden.reshape(B * T, H), tokens.reshape(B * T).long()

    def fn(h: Tensor, tok: Tensor):
        if with_entropy and entropy_grad:
            return _chunk_logprobs_entropy(head(h), tok, temperature)
        logits = head(h)
        logprobs = _chunk_logprobs(logits, tok, temperature)
        if not with_entropy:
            return logprobs
        with torch.no_grad():  # a metric only: no backward runs through its (N, V) ops
            _, entropy = _chunk_logprobs_entropy(logits.detach(), tok, temperature)
        return logprobs, entropy

    logprobs, entropies = [], []
    # One chunk holds everything: autograd may keep its logits (within the same budget), and
    # the backward need not recompute them.
    run = _run if B * T > chunk_size else (lambda f, *a: f(*a))
    for i in range(0, B * T, chunk_size):
        res = run(fn, flat_hidden[i : i + chunk_size], flat_tokens[i : i + chunk_size])
        if with_entropy:
            logprobs.append(res[0])
            entropies.append(res[1])
        else:
            logprobs.append(res)
    entropy = torch.cat(entropies).view(B, T) if with_entropy else None
    return torch.cat(logprobs).view(B, T), entropy
