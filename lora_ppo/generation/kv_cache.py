"""In-place surgery on transformers' KV caches, for the decode loop (sampler.py, continuous.py): repeat a
prompt's rows for the rows that answer it, compact a batch, move every row's columns left. Each
works on `cache.layers` (transformers 5's `Cache` of per-layer `keys` / `values`, (batch, heads,
positions, head_dim)); nothing here knows about the model or the sampled tokens.
"""

from __future__ import annotations

import functools
import inspect

from torch import Tensor


@functools.cache
def cache_keyword(forward_cls: type) -> str:
    """transformers 5.x renamed the decoder's `past_key_values` argument (and output) `cache`."""
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def select_rows(cache, index: Tensor) -> None:
    """Repeat the batch rows `index` of every cache layer (a new tensor: a group's prompt
    encoded once, copied to the rows that answer it)."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
            if hasattr(layer, "batch_size"):
                layer.batch_size = len(index)


def keep_rows(cache, keep: Tensor) -> None:
    """Keep the batch rows `keep` (increasing) of every cache layer, moved to the front in
    place: compacting never allocates a second cache (a copy of the kept rows would, for a
    moment, hold both)."""
    kept = keep.tolist()
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        for tensor in (layer.keys, layer.values):
            for j, i in enumerate(kept):  # j <= i: a row moves onto one already moved or dropped
                if i != j:
                    tensor[j].copy_(tensor[i])
        layer.keys, layer.values = layer.keys[:len(kept)], layer.values[:len(kept)]
        if hasattr(layer, "batch_size"):
            layer.batch_size = len(kept)


def continuous_batching_fits(cache) -> bool:
    """A row can be placed mid-way only in plain static layers (not a sliding window's ring)."""
    return all(type(layer).__name__ == "StaticLayer" for layer in cache.layers)


def shift_left(cache, k: int) -> None:
    """Move every layer's columns k to the left (the first k are no live row's)."""
    for layer in cache.layers:
        w = layer.keys.shape[2]
        layer.keys[:, :, :w - k] = layer.keys[:, :, k:].clone()
        layer.values[:, :, :w - k] = layer.values[:, :, k:].clone()
