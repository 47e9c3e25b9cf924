"""Token log-probabilities and entropies without ever holding (B, T, V) float32 logits.

A vocabulary of 150k makes B*T*V logits the largest tensor of a PPO step (B*T = 16k response
tokens -> 9.8 GB in float32, and log_softmax plus its backward double or triple that). Here rows
are processed in chunks of `chunk_size`, so at most one chunk's (rows, V) float32 copy (and its
temporaries) exists at a time.

From hidden states without an entropy gradient (PPO's default, ent_coef=0, and SFT) one chunk is
one (rows, V) float32 buffer, forward and backward: `_HeadChunk` reduces the logits in place and,
in backward, makes them again and turns them into their own gradient in place,

    d log p(token) / dz = onehot(token) - softmax(z),

(autograd's log_softmax + gather holds about five such buffers at its backward's peak). With an
entropy gradient each chunk runs inside a non-reentrant torch.utils.checkpoint instead. Either
way only the chunk's inputs are kept for the backward and the logits are recomputed there, unless
one chunk holds all the rows; otherwise the kept per-chunk logits would add up to B*T*V again.

    log p(token) = z[token] - logsumexp(z),      z = logits / temperature
    entropy      = logsumexp(z) - sum(softmax(z) * z) = -sum(p log p)
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


def _softmax_in_place(z: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """z: (N, V) float32 logits, overwritten with softmax(z / T); returns log p(tokens) (N,) and
    logsumexp(z / T) (N,). Only (N,)-sized temporaries."""
    if temperature != 1.0:
        z.div_(temperature)
    picked = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    top = z.amax(-1, keepdim=True)
    z.sub_(top).exp_()
    total = z.sum(-1, keepdim=True)
    z.div_(total)
    lse = (top + total.log()).squeeze(-1)
    return picked - lse, lse


ENTROPY_BLOCKS = 8  # the entropy's temporaries: 1/8 of the chunk's buffer


def _entropy_of(p: Tensor) -> Tensor:
    """-sum(p log p) per row of p (N, V), in blocks of N / ENTROPY_BLOCKS rows: the (rows, V)
    temporary of xlogy is an eighth of the chunk's buffer whatever the chunk size (a fixed 256
    rows was half the buffer of a 512-row chunk)."""
    block = max(1, -(-p.shape[0] // ENTROPY_BLOCKS))
    return torch.cat([-torch.special.xlogy(b, b).sum(-1) for b in p.split(block)])


class _HeadChunk(torch.autograd.Function):
    """log p(tokens) (and the entropy, as a metric without gradient) of one chunk of rows through
    `head`, in one (N, V) float32 buffer. `keep`: hold the softmax for the backward instead of
    making the logits again (when one chunk holds every row). `params`: the head's trainable
    parameters, so that autograd sees their gradients."""

    @staticmethod
    def forward(ctx, h, tokens, head, temperature, keep, with_entropy, *params):
        with torch.set_grad_enabled(keep):  # autograd of the head only to keep it for backward
            h_in = h.detach().requires_grad_(ctx.needs_input_grad[0] and keep)
            logits = head(h_in)
        z = logits.detach().float()  # the logits' own buffer when they are float32
        logprobs, lse = _softmax_in_place(z, tokens, temperature)
        entropy = _entropy_of(z) if with_entropy else torch.empty(0)
        ctx.head, ctx.temperature, ctx.params = head, temperature, params
        ctx.kept = (logits, h_in, z) if keep else None
        ctx.save_for_backward(h, tokens, lse)
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        h, tokens, lse = ctx.saved_tensors
        if ctx.kept is not None:
            logits, h_in, p = ctx.kept
            ctx.kept = None
        else:
            with torch.enable_grad():
                h_in = h.detach().requires_grad_(ctx.needs_input_grad[0])
                logits = ctx.head(h_in)
            p = logits.detach().float()
            if ctx.temperature != 1.0:
                p.div_(ctx.temperature)
            p.sub_(lse.unsqueeze(-1)).exp_()
        g = grad_logprobs.unsqueeze(-1).float()
        p.mul_(-g).scatter_add_(-1, tokens.unsqueeze(-1), g)  # g * (onehot - softmax)
        if ctx.temperature != 1.0:
            p.div_(ctx.temperature)
        inputs = ([h_in] if ctx.needs_input_grad[0] else []) + list(ctx.params)
        grads = list(torch.autograd.grad(logits, inputs, p.to(logits.dtype), allow_unused=True))
        grad_h = grads.pop(0) if ctx.needs_input_grad[0] else None
        return (grad_h, None, None, None, None, None, *grads)


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
    Peak extra memory, forward and backward, is about one (chunk_size, V) float32 tensor without
    `entropy_grad` and about 5 with it, plus the head's weight grad if it has one (measured in
    tests/rl/test_logprobs.py): 1024 rows x 150k vocab x 4 B = 0.6 GB per tensor.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, T, H = hidden.shape
    flat_hidden, flat_tokens = hidden.reshape(B * T, H), tokens.reshape(B * T).long()
    if not (with_entropy and entropy_grad):
        grad = torch.is_grad_enabled()
        params = ([q for q in head.parameters() if q.requires_grad]
                  if grad and isinstance(head, torch.nn.Module) else [])
        keep = grad and B * T <= chunk_size
        out = [_HeadChunk.apply(flat_hidden[i : i + chunk_size], flat_tokens[i : i + chunk_size],
                                head, temperature, keep, with_entropy, *params)
               for i in range(0, B * T, chunk_size)]
        logprobs = torch.cat([lp for lp, _ in out]).view(B, T)
        entropy = torch.cat([e for _, e in out]).view(B, T) if with_entropy else None
        return logprobs, entropy

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
