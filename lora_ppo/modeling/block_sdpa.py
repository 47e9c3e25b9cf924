"""Hands a packed batch's attention blocks (modeling/blocks.py) to transformers' attention.

The blocks travel with the mask they describe (`attach`): transformers hands a prepared 4-D mask
to every layer as it was given (masking_utils' `_preprocess_mask_arguments` returns it as is; a
dict by layer type is indexed per layer), and gradient checkpointing's recompute receives the
same tensor, so the attention function finds the blocks where it finds the mask. `sdpa` in
transformers' attention registry is wrapped once (`install`), the registry being where every
model that uses it looks it up at each forward. With a mask that carries no blocks (decoding,
padded forwards, any model but ours), or an argument the blocked path does not implement
(softcap, a position bias, attention sinks, attention weights asked for), the wrapper calls
transformers' own function with the same arguments.

The same wrapper narrows a decode step's keys (`key_window`): the continuous batch (generation/
continuous.py) decodes into a static cache as wide as its longest possible row, and every step's
attention read every column of it, most of them masked for every row (not yet written, or no
live row's). Inside `key_window(width, lo, hi)` a call whose keys are `width` columns wide takes
only columns lo .. hi-1, with its mask sliced alike, provided the mask holds no True outside
them (checked): the softmax over the columns left out was exp(-inf) = 0 of every row's. With a
cascade plan (generation/shared_prompts.py), a one-query call on the planned cache
layer's keys reads each group's shared prompt once (modeling/cascade.py) and each row's own
columns after it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lora_ppo.modeling import blocks as blocks_mod
from lora_ppo.modeling import cascade
from lora_ppo.modeling.blocks import Blocks, attend

_BLOCKS = WeakIdKeyDictionary()  # mask tensor -> its Blocks, as long as the mask lives
_WINDOW = contextvars.ContextVar("lora_ppo_key_window", default=None)  # (width, lo, hi)
_UNSUPPORTED = ("softcap", "position_bias", "s_aux", "sinks", "output_attentions")


def attach(mask, blocks):
    """Let the attention function find `blocks` beside `mask` (one tensor or a dict by layer
    type, with `blocks` of the same shape, None where a mask has none); returns the mask."""
    if mask is None or blocks is None:
        return mask
    if isinstance(mask, dict):
        for kind, m in mask.items():
            attach(m, blocks.get(kind))
        return mask
    install()
    _BLOCKS[mask] = blocks.to(mask.device)
    return mask


def attached(mask) -> Optional[Blocks]:
    return _BLOCKS.get(mask) if isinstance(mask, Tensor) else None


@contextlib.contextmanager
def key_window(width: int, lo: int, hi: int, shared=None) -> Iterator[None]:
    """Attention calls in the body whose keys are `width` wide read only columns lo .. hi-1
    (module doc); with `shared` (a cascade.Plan and, by the data pointer of a cache layer's
    keys, that layer's stacked prompts) a decode step's call reads each shared prompt once."""
    install()
    token = _WINDOW.set((width, lo, hi, shared))
    try:
        yield
    finally:
        _WINDOW.reset(token)


def _narrowed(key: Tensor, value: Tensor, mask) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """The key window's columns of key, value and mask, or None where it does not apply."""
    window = _WINDOW.get()
    if window is None or not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        return None
    width, lo, hi, _ = window
    if key.shape[2] != width or mask.shape[-1] != width or (lo, hi) == (0, width):
        return None
    if mask[..., :lo].any() or mask[..., hi:].any():
        return None
    return key[:, :, lo:hi], value[:, :, lo:hi], mask[..., lo:hi]


def _cascaded(query: Tensor, key: Tensor, value: Tensor, dropout: float,
              scale: Optional[float]) -> Optional[Tensor]:
    """A decode step's attention with each shared prompt read once (cascade.attend), where the
    key window carries a plan for this layer's keys; else None."""
    window = _WINDOW.get()
    if window is None or window[3] is None or query.shape[2] != 1 or dropout:
        return None
    width, _, hi, (plan, stacks) = window
    stacked = stacks.get(key.data_ptr())
    if stacked is None or key.shape[2] != width:
        return None
    return cascade.attend(query, key[:, :, plan.lo:hi], value[:, :, plan.lo:hi], *stacked, plan,
                          scale)


def _given(kwargs: dict, key: str) -> bool:
    value = kwargs.get(key)
    return value is not None and value is not False


def _repeated(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: as transformers' repeat_kv
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    return key, value


def _attend(blocks: Blocks, query: Tensor, key: Tensor, value: Tensor, dropout: float,
            scale: Optional[float]) -> Tensor:
    return attend(blocks, query, *_repeated(query, key, value), dropout, scale)


class _Kept(torch.autograd.Function):
    """The blocked attention on the CPU without dropout or autocast: the flash kernel's own
    forward, whose outputs and log-sum-exps (a bucket's output is about the size of its
    queries) are kept with the layer's query, key and value, and its own backward on the
    blocks gathered again; no second forward (_Recomputed's), the memory of the dense path."""

    @staticmethod
    def forward(ctx, query, key, value, blocks, scale):
        ctx.blocks, ctx.scale = blocks, scale
        with torch.no_grad():
            out, kept = blocks_mod.attend_keeping(blocks, query, *_repeated(query, key, value),
                                                  scale)
        ctx.save_for_backward(query, key, value, *(t for pair in kept for t in pair))
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, *flat = ctx.saved_tensors
        kept = list(zip(flat[::2], flat[1::2]))
        gq, gk, gv = blocks_mod.attend_backward(ctx.blocks, grad, query,
                                                *_repeated(query, key, value), kept, ctx.scale)
        groups = query.shape[1] // key.shape[1]
        if groups > 1:  # the repeated heads' gradients summed onto their key/value head
            P, _, C, _ = gk.shape
            gk = gk.reshape(P, key.shape[1], groups, C, -1).sum(2)
            gv = gv.reshape(P, value.shape[1], groups, C, -1).sum(2)
        return gq, gk, gv, None, None


def _keeps(query: Tensor, dropout: float) -> bool:
    """Whether `_Kept` serves: the CPU flash kernel, no dropout, no autocast."""
    return (query.device.type == "cpu" and not dropout
            and not torch.is_autocast_enabled("cpu")
            and query.dtype in (torch.float32, torch.bfloat16, torch.float16))


class _Recomputed(torch.autograd.Function):
    """The blocked attention, keeping only the layer's own query, key and value for the
    backward, which makes the gathered keys and values (a prompt's, once per branch) again: the
    memory of the dense path. A Function rather than torch.utils.checkpoint, which nested in
    the model's own gradient checkpointing made the whole layer again in the backward (a 4-bit
    PPO update took a third longer). Dropout draws the same mask again (the RNG state is kept),
    autocast runs again as it ran."""

    @staticmethod
    def forward(ctx, query, key, value, blocks, dropout, scale):
        device = query.device.type
        ctx.blocks, ctx.dropout, ctx.scale = blocks, dropout, scale
        ctx.autocast = (device, torch.is_autocast_enabled(device),
                        torch.get_autocast_dtype(device))
        ctx.rng = None if dropout == 0 else (
            torch.cuda.get_rng_state(query.device) if device == "cuda" else torch.get_rng_state())
        ctx.save_for_backward(query, key, value)
        with torch.no_grad():
            return _attend(blocks, query, key, value, dropout, scale)

    @staticmethod
    def backward(ctx, grad):
        inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        device, enabled, dtype = ctx.autocast
        cuda = [inputs[0].device] if device == "cuda" else []
        with (torch.random.fork_rng(devices=cuda, enabled=ctx.rng is not None),
              torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled)):
            if ctx.rng is not None:
                (torch.cuda.set_rng_state(ctx.rng, cuda[0]) if cuda
                 else torch.set_rng_state(ctx.rng))
            out = _attend(ctx.blocks, *inputs, ctx.dropout, ctx.scale)
        grads = torch.autograd.grad(out, inputs, grad)
        return (*grads, None, None, None)


def _wrap(sdpa: Callable) -> Callable:
    def sdpa_blocked(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     is_causal=None, **kwargs):
        unsupported = any(_given(kwargs, k) for k in _UNSUPPORTED)
        out = None if unsupported else _cascaded(query, key, value, dropout, scaling)
        if out is not None:
            return out, None
        blocks = None if unsupported else attached(attention_mask)
        narrowed = None if unsupported or blocks is not None else _narrowed(
            key, value, attention_mask)
        if narrowed is not None:  # a decode step's key window
            key, value, attention_mask = narrowed
        if (blocks is None or (query.shape[0], query.shape[2]) != (blocks.rows, blocks.width)
                or key.shape[2] != blocks.width):
            return sdpa(module, query, key, value, attention_mask, dropout=dropout,
                        scaling=scaling, is_causal=is_causal, **kwargs)
        if not torch.is_grad_enabled():
            return _attend(blocks, query, key, value, dropout, scaling), None
        if _keeps(query, dropout):
            return _Kept.apply(query, key, value, blocks, scaling), None
        return _Recomputed.apply(query, key, value, blocks, dropout, scaling), None

    sdpa_blocked.lora_ppo_blocks = True
    return sdpa_blocked


def install() -> None:
    """Wrap transformers' `sdpa` attention function once (module doc); idempotent."""
    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if not getattr(current, "lora_ppo_blocks", False):
        AttentionInterface.register("sdpa", _wrap(current))
