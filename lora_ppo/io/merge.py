"""Streaming merge: a LoRA adapter folded into a safetensors checkpoint one tensor at a time.

Nothing holds the whole model. The base's shards are read tensor by tensor (shards.py), each
tensor gets its update (lora_delta.py: what peft's merge would add) in fp32, is cast to the output
dtype and joins the output shard being built; a full shard is written and dropped. Peak memory:
one output shard + one tensor's working copies (in fp32 only for the tensors the adapter changes)
+ the adapter (measured in docs/benchmarks.md).

Into which weights (`View`): `original`, the checkpoint's own; or `dequantized`, what a 4-bit or
8-bit policy saw in training: each tensor cast to the load dtype (transformers casts before it
quantizes), and each weight bitsandbytes quantized put through the very `Params4bit` /
`Int8Params` quantization that transformers' loader runs, then dequantized
(`bnb.functional.dequantize_4bit`, `int8_vectorwise_dequant`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import bitsandbytes as bnb
import torch
from safetensors.torch import save_file

from lora_ppo.io.lora_delta import Adapter, delta_weight
from lora_ppo.io.shards import INDEX, Shard, Structure, TensorIndex, open_safetensors


class View(NamedTuple):
    into: str  # original | dequantized
    load_dtype: torch.dtype  # dequantized: the dtype training loaded the base in
    structure: Structure
    untied: dict[str, str]  # tied parameters written on their own -> the tensor they copy


def dequantized(w: torch.Tensor, meta: torch.nn.Module) -> torch.Tensor:
    """`w` (out, in) in the load dtype through the quantization transformers' loader applies
    (integrations/bitsandbytes.py Bnb4bitQuantize / Bnb8bitQuantize: a Params4bit or Int8Params
    with the module's settings, moved to the device), then dequantized by bitsandbytes."""
    kwargs = {**meta.weight.__dict__, "module": None}
    if isinstance(meta, bnb.nn.Linear4bit):
        p = bnb.nn.Params4bit(w, requires_grad=False, **kwargs).to(w.device)
        return bnb.functional.dequantize_4bit(p.data, p.quant_state)
    kwargs.pop("SCB", None)
    p = bnb.nn.Int8Params(w.cpu(), requires_grad=False, **kwargs).to(w.device)
    return bnb.functional.int8_vectorwise_dequant(p.CB, p.SCB)


def base_view(t: torch.Tensor, key: str, view: View, fp32: bool = True) -> torch.Tensor:
    """The base tensor the update is added to, in fp32 (non-float tensors pass through).
    `fp32=False` for a tensor nothing is added to: the same values without the fp32 copy
    (every dtype here widens to fp32 exactly, so casting through it changes nothing)."""
    if not t.is_floating_point():
        return t
    if view.into == "original":
        return t.float() if fp32 else t
    t = t.to(view.load_dtype)  # what transformers hands to the quantizer, and keeps otherwise
    meta = view.structure.quantized.get(key)
    if meta is not None:
        conv = key.removesuffix(".weight") in view.structure.conv1d
        t = dequantized((t.T if conv else t).contiguous(), meta)  # bnb quantizes (out, in)
        t = t.T if conv else t
    return t.float() if fp32 else t  # prepare_model_for_kbit_training upcasts the rest to fp32


def merged_tensor(key: str, read: Callable[[str], torch.Tensor], adapter: Adapter, view: View,
                  device: torch.device) -> torch.Tensor:
    """One output tensor on `device`: in fp32 where the adapter changes it, else the base's
    values in their own dtype (the load dtype for `dequantized`), to be cast by the caller."""
    if key in adapter.replace:
        return adapter.replace[key].to(device, torch.float32)
    src = view.untied.get(key, key)
    t = adapter.base_override.get(key)
    changed = key in adapter.updates or key in adapter.bias_updates
    t = base_view((read(src) if t is None else t).to(device), src, view, fp32=changed)
    if key in adapter.updates:
        u = adapter.updates[key]
        t = t + delta_weight(u, device)  # peft: weight.data += delta_weight
        if u.magnitude is not None:  # DoRA (lora_delta.py): per output unit, as stored
            dim = 0 if u.transpose else 1
            t = t * (u.magnitude.to(device, torch.float32) / torch.linalg.norm(t, dim=dim)
                     ).unsqueeze(dim)
    if key in adapter.bias_updates:
        t = t + adapter.bias_updates[key].to(device, torch.float32)
    return t


def write_merged(index: TensorIndex, adapter: Adapter, view: View, shards: list[Shard], out: Path,
                 dtype: torch.dtype, device: torch.device,
                 log: Callable[[str], None] = print) -> int:
    """Build and write each output shard in turn (+ the index when sharded); returns bytes."""
    total, weight_map = 0, {}
    with contextlib.ExitStack() as stack:
        handles = {}

        def read(key: str) -> torch.Tensor:
            name = index.tensors[key][0]
            if name not in handles:
                handles[name] = stack.enter_context(open_safetensors(index.root / name))
            return handles[name].get_tensor(key)

        for i, shard in enumerate(shards):
            t0, tensors, n_merged = time.perf_counter(), {}, 0
            for key in shard.keys:
                t = merged_tensor(key, read, adapter, view, device)
                n_merged += key in adapter.updates or key in adapter.replace
                tensors[key] = (t.to(dtype) if t.is_floating_point() else t).cpu().contiguous()
                del t  # the fp32 working copy: only the output dtype stays for the shard
            save_file(tensors, str(out / shard.name), metadata={"format": "pt"})
            size = sum(t.nbytes for t in tensors.values())
            total += size
            weight_map.update(dict.fromkeys(tensors, shard.name))
            del tensors
            log(f"  shard {i + 1}/{len(shards)} {shard.name}: {len(shard.keys)} tensors "
                f"({n_merged} changed by the adapter), {size / 2**20:.1f} MiB, "
                f"{time.perf_counter() - t0:.1f} s")
    if len(shards) > 1:
        table = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(table, indent=2) + "\n")
    return total


