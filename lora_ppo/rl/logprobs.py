"""Token log-probabilities and entropies without ever holding (B, T, V) float32 logits.

A vocabulary of 150k makes B*T*V logits the largest tensor of a PPO step (B*T = 16k response
tokens -> 9.8 GB in float32, and log_softmax plus its backward double or triple that). Here rows
are processed in chunks of `chunk_size`, so at most one chunk's (rows, V) float32 copy (and its
temporaries) exists at a time.

The logits the model samples from are not always the LM head's output: some `*ForCausalLM`
forwards post-process them (Cohere multiplies by `logit_scale`, Granite divides by
`logits_scaling`, Gemma 2 and 3 soft-cap them with `final_logit_softcapping`). `LogitsTransform`
carries that, so the distribution scored here is the one the model's own `forward` gives:

    z = softcap * tanh(scale * head(h) / softcap) / temperature    (softcap None: no tanh)
    log p(token) = z[token] - logsumexp(z)
    entropy      = logsumexp(z) - sum(softmax(z) * z) = -sum(p log p)

Without an entropy gradient (PPO's default, ent_coef=0, and SFT) one chunk is one (rows, V)
float32 buffer, forward and backward: `_PickLogProb` takes the head's logits, reduces them to
softmax(z) in place and, in backward, turns that buffer into its own gradient in place,

    d log p(token) / dz = onehot(token) - softmax(z),

(autograd's log_softmax + gather holds about five such buffers at its backward's peak; a
soft-cap adds one buffer, its tanh). The head itself runs under ordinary autograd, so a LoRA on
the head, or ZeRO-3's gathering of its weights around each call, work as in any forward. Each
chunk runs inside a non-reentrant torch.utils.checkpoint, so only the chunk's inputs are kept for
the backward and the logits are made again there, unless one chunk holds all the rows (then its
buffer is kept); otherwise the kept per-chunk logits would add up to B*T*V again. With an entropy
gradient each chunk runs under plain autograd in a checkpoint.

A frozen head (the LM head under LoRA, PPO's usual case) needs no weight gradient, only
d log p / d hidden, which is (N, H): `_PickLogProbFrozenHead` makes it in the forward from the
chunk's softmax, so the chunk's buffer is freed before the next chunk is made and nothing is
kept or made again for the backward. Memory is then one chunk in the forward only, whatever
the rows, and the chunk size no longer trades memory for recomputation. (When one chunk holds
every row its buffer is kept as above: the same peak, and autograd's order of the sums.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


class LogitsTransform(NamedTuple):
    """What a model does to its LM head's output before the softmax (modeling/heads.py reads it
    from the model's config): logits = softcap * tanh(scale * head(h) / softcap)."""

    scale: float = 1.0               # Cohere logit_scale; Granite 1 / logits_scaling
    softcap: Optional[float] = None  # Gemma 2/3 final_logit_softcapping


IDENTITY = LogitsTransform()


def transform_logits(logits: Tensor, temperature: float = 1.0,
                     transform: LogitsTransform = IDENTITY) -> Tensor:
    """z = the model's logits over the temperature, in float32; (..., V) -> (..., V). The one
    formula of the distribution that sampling draws from and scoring scores."""
    z = logits.float()
    if transform.softcap is not None:
        z = torch.tanh(z * (transform.scale / transform.softcap)) * transform.softcap
    elif transform.scale != 1.0:
        z = z * transform.scale
    return z / temperature if temperature != 1.0 else z


def chunk_rows(vocab: int, mib: float) -> int:
    """Rows whose fp32 logits (rows, vocab) take `mib` MiB: a chunk size bounded in bytes, so the
    same budget holds for any vocabulary (1024 rows were 0.5 GB at 128k, 16 MB at 4k)."""
    return max(1, int(mib * 2**20) // (4 * vocab))


def _chunk_logprobs_entropy(logits: Tensor, tokens: Tensor, temperature: float,
                            transform: LogitsTransform) -> tuple[Tensor, Tensor]:
    """Under autograd: logits (N, V) any dtype, tokens (N,) -> float32 logprobs (N,), entropy
    (N,)."""
    z = transform_logits(logits, temperature, transform)
    lse = torch.logsumexp(z, dim=-1)  # (N,)
    logprobs = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    probs = torch.exp(z - lse.unsqueeze(-1))  # (N, V), softmax(z)
    entropy = lse - (probs * z).sum(-1)
    return logprobs, entropy


def _softmax_in_place(z: Tensor, tokens: Tensor) -> Tensor:
    """z: (N, V) float32, overwritten with softmax(z); returns log p(tokens) (N,). Only
    (N,)-sized temporaries."""
    picked = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    top = z.amax(-1, keepdim=True)
    z.sub_(top).exp_()
    total = z.sum(-1, keepdim=True)
    z.div_(total)
    return picked - (top + total.log()).squeeze(-1)


ENTROPY_BLOCKS = 8  # the entropy's temporaries: 1/8 of the chunk's buffer


def _entropy_of(p: Tensor) -> Tensor:
    """-sum(p log p) per row of p (N, V), in blocks of N / ENTROPY_BLOCKS rows: the (rows, V)
    temporary of xlogy is an eighth of the chunk's buffer whatever the chunk size (a fixed 256
    rows was half the buffer of a 512-row chunk)."""
    block = max(1, -(-p.shape[0] // ENTROPY_BLOCKS))
    return torch.cat([-torch.special.xlogy(b, b).sum(-1) for b in p.split(block)])


def _reduce_in_place(logits: Tensor, tokens: Tensor, temperature: float,
                     transform: LogitsTransform, with_entropy: bool
                     ) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """One chunk's logits (N, V) -> (softmax(z) (N, V) float32, made in the logits' own buffer
    when they are float32; the soft-cap's tanh (N, V) or None; log p(tokens) (N,); the entropy
    (N,), or an empty tensor without `with_entropy`), z = transform_logits(logits)."""
    z = logits.detach()
    z = z if z.dtype == torch.float32 else z.float()  # the logits' own buffer when fp32
    cap = transform.softcap
    tanh = None
    if cap is not None:  # z = cap * tanh(scale * x / cap) / T
        tanh = torch.tanh(z.mul_(transform.scale / cap))
        z.copy_(tanh).mul_(cap / temperature)
    elif transform.scale != 1.0:  # rl/logprobs.py::transform_logits' order and rounding
        z.mul_(transform.scale)
        if temperature != 1.0:
            z.div_(temperature)
    elif temperature != 1.0:
        z.div_(temperature)
    logprobs = _softmax_in_place(z, tokens)
    entropy = _entropy_of(z) if with_entropy else torch.empty(0)
    return z, tanh, logprobs, entropy


def _logit_grad_in_place(p: Tensor, tokens: Tensor, g: Tensor, tanh: Optional[Tensor],
                         temperature: float, transform: LogitsTransform) -> Tensor:
    """softmax(z) p (N, V) turned in place into g * d log p(tokens) / dx (N, V), x the head's
    output: g (N, 1) * (onehot - p) * dz/dx, dz/dx = (scale / T) (1 - tanh^2) with a soft-cap,
    scale / T without."""
    p.mul_(-g).scatter_add_(-1, tokens.unsqueeze(-1), g)  # g * (onehot - softmax): dL/dz
    t, scale = temperature, transform.scale
    if tanh is not None:  # dz/dx = (scale / T) * (1 - tanh^2)
        p.mul_(tanh.square_().neg_().add_(1.0))
    if scale != 1.0 or t != 1.0:
        p.mul_(scale / t)
    return p


class _PickLogProb(torch.autograd.Function):
    """log p(tokens) (and the entropy, a metric without gradient) from one chunk's logits (N, V),
    in one float32 buffer: z = transform_logits(logits) is made in the logits' own buffer (when
    they are float32), reduced to softmax(z) in place and kept; the backward turns it into the
    gradient in place. A soft-cap keeps its tanh (N, V) too, for its derivative."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, transform, with_entropy):
        z, tanh, logprobs, entropy = _reduce_in_place(logits, tokens, temperature, transform,
                                                      with_entropy)
        ctx.temperature, ctx.transform, ctx.dtype = temperature, transform, logits.dtype
        ctx.save_for_backward(z, tokens, *([] if tanh is None else [tanh]))
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        p, tokens, *tanh = ctx.saved_tensors
        g = grad_logprobs.unsqueeze(-1).float()
        p = _logit_grad_in_place(p, tokens, g, tanh[0] if tanh else None, ctx.temperature,
                                 ctx.transform)
        return p.to(ctx.dtype), None, None, None, None


class _PickLogProbFrozenHead(torch.autograd.Function):
    """log p(tokens) (and the entropy metric) of one chunk straight from its hidden states
    (N, H), for a head whose weights take no gradient: only d log p / d hidden is needed, and
    it is (N, H), so it is made in the forward and nothing of size (N, V) outlives the chunk.

        d log p(token) / d h = ((onehot - softmax(z)) * dz/dx) @ W    (W: the head's (V, H))

    is the matmul the backward of the head would run, with the per-token factor g = dL / d log p
    (unknown in the forward) applied afterwards: g * (r @ W) instead of (g * r) @ W, the same sum
    in another order (fp32 round-off). The backward is then one (N, 1) x (N, H) product: no
    logits kept, none made again (the other path keeps one chunk's softmax for its backward, or
    checkpoints and recomputes the chunk's logits there)."""

    @staticmethod
    def forward(ctx, hidden, tokens, head, weight, temperature, transform, with_entropy):
        p, tanh, logprobs, entropy = _reduce_in_place(head(hidden), tokens, temperature,
                                                      transform, with_entropy)
        ones = torch.ones_like(logprobs).unsqueeze(-1)
        r = _logit_grad_in_place(p, tokens, ones, tanh, temperature, transform)
        ctx.save_for_backward(r.to(weight.dtype) @ weight)  # (N, H)
        ctx.dtype = hidden.dtype
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        (dh,) = ctx.saved_tensors
        grad = dh * grad_logprobs.unsqueeze(-1).to(dh.dtype)
        return grad.to(ctx.dtype), None, None, None, None, None, None


def logprobs_from_logits(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int = 1024,
    transform: LogitsTransform = IDENTITY,
) -> Tensor:
    """log softmax(z) at tokens, z = transform_logits(logits, temperature); logits: (B, T, V),
    tokens: (B, T) -> (B, T) float32. Never calls log_softmax over the whole (B, T, V)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, T, V = logits.shape
    flat_logits, flat_tokens = logits.reshape(B * T, V), tokens.reshape(B * T).long()

    def fn(lg: Tensor, tok: Tensor) -> Tensor:
        z = transform_logits(lg, temperature, transform)
        return z.gather(-1, tok.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)

    out = [
        _run(fn, flat_logits[i : i + chunk_size], flat_tokens[i : i + chunk_size])
        for i in range(0, B * T, chunk_size)
    ]
    return torch.cat(out).view(B, T)


def _run(fn: Callable, *args: Tensor) -> tuple[Tensor, ...] | Tensor:
    """fn(*args), checkpointed when autograd is recording so its (N, V) temporaries aren't saved."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def logprobs_and_entropy_from_hidden(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    tokens: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = True,
    entropy_grad: bool = True,
    transform: LogitsTransform = IDENTITY,
    frozen_weight: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor | None]:
    """Apply the LM head chunk by chunk and score tokens; the (B, T, V) logits never exist.

    hidden: (B, T, H) final hidden states at the positions that predict `tokens`;
    head: maps (N, H) -> (N, V) logits, e.g. the model's lm_head module (called as a module, so
    its hooks and adapters run); `transform`: the model's own post-processing of those logits;
    tokens: (B, T) -> logprobs (B, T) float32, entropy (B, T) float32 or None (without
    `entropy_grad` it is computed outside autograd: a metric, no backward through it).
    `frozen_weight`: the head's weight (V, H) when no gradient reaches the head's parameters
    (a frozen nn.Linear, whole on this device): then, without `entropy_grad` and with more rows
    than one chunk, each chunk's gradient to its hidden states is made in the forward
    (`_PickLogProbFrozenHead`) and the chunk's logits are freed at once.
    Peak extra memory is about one (chunk_size, V) float32 tensor without `entropy_grad` (two
    with a soft-cap) and about 5 with it, plus the head's weight grad if it has one (measured
    in tests/rl/test_logprobs.py): 1024 rows x 150k vocab x 4 B = 0.6 GB per tensor. With a
    frozen head only the forward holds it, one chunk at a time.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, T, H = hidden.shape
    flat_hidden, flat_tokens = hidden.reshape(B * T, H), tokens.reshape(B * T).long()
    one_buffer = not (with_entropy and entropy_grad)
    several = B * T > chunk_size
    # A frozen head with several chunks makes each chunk's gradient in the forward. One chunk
    # keeps its buffer for the backward instead: the same peak, no recomputation either, and
    # autograd's order of the gradient's sums (the same round-off as before the fused path).
    fused = (several and one_buffer and frozen_weight is not None and torch.is_grad_enabled()
             and hidden.requires_grad)

    def fn(h: Tensor, tok: Tensor):
        if fused:
            return _PickLogProbFrozenHead.apply(h, tok, head, frozen_weight, temperature,
                                                transform, with_entropy)
        if one_buffer:
            return _PickLogProb.apply(head(h), tok, temperature, transform, with_entropy)
        return _chunk_logprobs_entropy(head(h), tok, temperature, transform)

    # One chunk holds everything: autograd may keep its logits (within the same budget), and
    # the backward need not make them again. The fused path keeps nothing of them.
    run = _run if several and not fused else (lambda f, *a: f(*a))
    out = [run(fn, flat_hidden[i : i + chunk_size], flat_tokens[i : i + chunk_size])
           for i in range(0, B * T, chunk_size)]
    logprobs = torch.cat([lp for lp, _ in out]).view(B, T)
    entropy = torch.cat([e for _, e in out]).view(B, T) if with_entropy else None
    return logprobs, entropy
