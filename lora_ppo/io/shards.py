"""Safetensors checkpoints read and written tensor by tensor, for the streaming merge (merge.py):
where each tensor of a base lives (`TensorIndex`, from the shards' headers, the index file if
sharded), the model's structure from its class on the meta device (which modules are GPT-2
`Conv1D`, which weights are tied, which ones bitsandbytes quantizes), and the output's shards.

Tensors are read with pread (no mmap: mapped pages would count in RSS until the file is closed).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from lora_ppo.errors import UserError, first_line

INDEX = "model.safetensors.index.json"
_FLOATS = {"F64", "F32", "F16", "BF16"}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class TensorIndex(NamedTuple):
    """Where each tensor of a safetensors checkpoint lives: key -> (file, shape, dtype code)."""

    root: Path
    files: list[str]
    tensors: dict[str, tuple[str, list[int], str]]


class Structure(NamedTuple):
    config: object  # the transformers config of the base
    conv1d: set[str]  # modules that are GPT-2 Conv1D (weight stored as (in, out))
    tied: dict[str, str]  # tied parameter -> the one stored (lm_head.weight -> embed_tokens)
    quantized: dict[str, torch.nn.Module]  # weight key -> its bnb module (meta), for `dequantized`


class Shard(NamedTuple):
    name: str
    keys: list[str]


def open_safetensors(path: Path):
    """safe_open with pread (safetensors >= 0.8) so tensors are read, not mapped."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:  # older safetensors: mmap only
        return safe_open(str(path), framework="pt")


def read_index(model_path: str) -> TensorIndex:
    """The base's safetensors files (from the index if sharded) and every tensor's header."""
    root = Path(model_path)
    if not root.is_dir():
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(model_path, local_files_only=True))
        except Exception:
            raise UserError(f"merge reads the base from disk, and {model_path} is neither a "
                            "directory nor in the local hub cache; download it first")
    if (root / INDEX).is_file():
        files = list(dict.fromkeys(json.loads((root / INDEX).read_text())["weight_map"].values()))
    elif (root / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{root} has no model.safetensors or {INDEX}; merge streams safetensors "
                        "only: re-save the base with save_pretrained (safetensors is its default)")
    tensors = {}
    for name in files:
        try:
            with open_safetensors(root / name) as f:
                for key in f.offset_keys():
                    s = f.get_slice(key)
                    tensors[key] = (name, list(s.get_shape()), s.get_dtype())
        except Exception as e:  # safetensors raises its own types for a missing or bad file
            raise UserError(f"cannot read {root / name}: {first_line(e)}")
    return TensorIndex(root, files, tensors)


def model_structure(model_path: str, trust_remote_code: bool, qcfg=None) -> Structure:
    """The model class on the meta device (no memory): Conv1D modules, ties, and with `qcfg`
    the weights bitsandbytes quantizes, decided by transformers' own functions
    (quantizer_bnb_4bit._process_model_before_weight_loading)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise UserError(f"the base {model_path} is a pre-quantized checkpoint (quantization_config "
                        "in its config.json); merge needs the unquantized weights")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    conv1d = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    quantized = {}
    if qcfg is not None:
        import bitsandbytes as bnb
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear
        from transformers.quantizers.base import HfQuantizer

        skip = HfQuantizer.get_modules_to_not_convert(model, qcfg.llm_int8_skip_modules,
                                                      model._keep_in_fp32_modules)
        replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=qcfg)
        quantized = {f"{n}.weight": m for n, m in model.named_modules()
                     if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    return Structure(config, conv1d, tied, quantized)



# -- the output's shards ----------------------------------------------------------------------------

def out_bytes(info: tuple[str, list[int], str], dtype: torch.dtype) -> int:
    _, shape, code = info
    size = dtype.itemsize if code in _FLOATS else _ITEMSIZE.get(code, 8)
    return math.prod(shape) * size


def plan_shards(index: TensorIndex, untied: dict[str, str], dtype: torch.dtype,
                max_shard_bytes: Optional[int]) -> list[Shard]:
    """Output shards: by default one per input file with the same tensors (so the memory of one
    output shard follows the base's own sharding); with `max_shard_bytes`, cut by size. An
    untied parameter goes right after the tensor it copies."""
    groups: list[list[str]] = []
    for name in index.files:
        keys = []
        for key, info in index.tensors.items():
            if info[0] == name and key not in untied:
                keys += [key] + [t for t, s in untied.items() if s == key]
        groups.append(keys)
    if max_shard_bytes is not None:
        flat, groups, size = [k for g in groups for k in g], [[]], 0
        for key in flat:
            b = out_bytes(index.tensors[untied.get(key, key)], dtype)
            if groups[-1] and size + b > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(key)
            size += b
    groups = [g for g in groups if g]
    n = len(groups)
    names = (["model.safetensors"] if n == 1 else
             [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    return [Shard(name, keys) for name, keys in zip(names, groups)]


def write_model_files(index: TensorIndex, structure: Structure, out: Path, dtype: torch.dtype,
                      untied: dict[str, str]) -> None:
    """config.json (the output dtype, and untied embeddings if the merge untied them),
    generation_config.json and any custom modeling code (`*.py`, for trust_remote_code) beside
    the shards, so `AutoModelForCausalLM.from_pretrained(out)` needs nothing else."""
    config = copy.deepcopy(structure.config)
    config.dtype = dtype
    if untied:
        config.tie_word_embeddings = False
    config.save_pretrained(out)
    for p in [index.root / "generation_config.json", *index.root.glob("*.py")]:
        if p.is_file():
            shutil.copy2(p, out / p.name)
