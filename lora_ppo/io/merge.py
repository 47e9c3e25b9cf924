"""Streaming merge: a LoRA adapter folded into a safetensors checkpoint one tensor at a time.

Nothing holds the whole model. The base's shards are read tensor by tensor with pread (no mmap:
mapped pages would count in RSS until the file is closed), each tensor gets its update in fp32,
is cast to the output dtype and joins the output shard being built; a full shard is written and
dropped. Peak memory: one output shard + one tensor's working copies (in fp32 only for the
tensors the adapter changes) + the adapter (measured in docs/benchmarks.md). The model's
structure (which modules are GPT-2 `Conv1D`, which weights are tied, which ones bitsandbytes
quantizes) comes from the model class built on the meta device.

The update of a targeted module is peft's `get_delta_weight` (peft/tuners/lora/layer.py):
`transpose(B @ A, fan_in_fan_out) * scaling`, with `scaling = alpha / r` (`alpha / sqrt(r)` with
`use_rslora`) and r, alpha per module from `rank_pattern` / `alpha_pattern` (LoraModel.
_create_and_replace, peft.utils.other.get_pattern_key); `lora_bias` adds `B.bias * scaling` to
the bias (Linear.merge). DoRA (`use_dora`) scales the merged weight by its saved magnitude over
the weight norm, as the variant's merge does (tuners/lora/variants.py DoraLinearVariant.merge_safe,
dora.py get_weight_norm): `m / ||W + delta||_row * (W + delta)`, the norm per output unit of the
layer (a Linear's rows; a Conv1D's or an embedding's columns, as stored), of the very weights
the delta is added to (the `dequantized` view's for a 4-bit run, what training saw). Layouts:

* GPT-2 `Conv1D` stores its weight as (in, out): peft forces `fan_in_fan_out=True` on it (and
  False on nn.Linear, whatever the config says), so the update is transposed iff the module is a
  Conv1D.
* Fused projections (Phi-3 `qkv_proj`, `gate_up_proj`) are one nn.Linear to peft with one A and
  one B: nothing special beyond their shape.
* Embeddings (`lora_embedding_A` (r, vocab), `lora_embedding_B` (dim, r)): the update is
  `(B @ A).T * scaling` (Embedding.get_delta_weight).
* modules_to_save: the adapter's trained copy replaces the module's tensors.
* Tied embeddings: with `lm_head` tied to `embed_tokens` only one tensor is stored, and peft's
  `merge_and_unload` adds an lm_head update to the shared tensor, changing the embeddings too
  (38 logits off on a test model). Here a tie that the adapter touches on either side is undone:
  both tensors are written and the output config says `tie_word_embeddings: false`.

Into which weights (`View`): `original`, the checkpoint's own; or `dequantized`, what a 4-bit or
8-bit policy saw in training: each tensor cast to the load dtype (transformers casts before it
quantizes), and each weight bitsandbytes quantized put through the very `Params4bit` /
`Int8Params` quantization that transformers' loader runs, then dequantized
(`bnb.functional.dequantize_4bit`, `int8_vectorwise_dequant`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from lora_ppo.errors import UserError, first_line

PEFT_PREFIX = "base_model.model."
INDEX = "model.safetensors.index.json"
_FLOATS = {"F64", "F32", "F16", "BF16"}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# LoraConfig fields that change what a merge means (a LoRA variant, weights that are not A and B,
# or a base modified at init): the streaming merge refuses them rather than merge them wrong.
_UNSUPPORTED = ("alora_invocation_tokens", "arrow_config", "use_bdlora",
                "velora_config", "monteclora_config", "kasa_config", "trainable_token_indices",
                "target_parameters", "layer_replication", "ensure_weight_tying", "use_qalora")
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")  # they leave the base alone


class Layout(NamedTuple):
    """Where each tensor of a safetensors checkpoint lives: key -> (file, shape, dtype code)."""

    root: Path
    files: list[str]
    tensors: dict[str, tuple[str, list[int], str]]


class Structure(NamedTuple):
    config: object  # the transformers config of the base
    conv1d: set[str]  # modules that are GPT-2 Conv1D (weight stored as (in, out))
    tied: dict[str, str]  # tied parameter -> the one stored (lm_head.weight -> embed_tokens)
    quantized: dict[str, torch.nn.Module]  # weight key -> its bnb module (meta), for `dequantized`


class Update(NamedTuple):
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float
    transpose: bool  # the checkpoint stores (in, out): Conv1D, embeddings
    magnitude: Optional[torch.Tensor] = None  # (out,) DoRA's lora_magnitude_vector


class Adapter(NamedTuple):
    config: object  # peft LoraConfig
    raw: dict[str, torch.Tensor]  # adapter_model.safetensors as saved
    updates: dict[str, Update]  # by the checkpoint key of the weight
    bias_updates: dict[str, torch.Tensor]  # by bias key: B.bias * scaling
    base_override: dict[str, torch.Tensor]  # `base_layer` copies peft saves with embeddings
    replace: dict[str, torch.Tensor]  # modules_to_save: the trained tensors, final


class View(NamedTuple):
    into: str  # original | dequantized
    load_dtype: torch.dtype  # dequantized: the dtype training loaded the base in
    structure: Structure
    untied: dict[str, str]  # tied parameters written on their own -> the tensor they copy


class Shard(NamedTuple):
    name: str
    keys: list[str]


# -- reading the base and the adapter ---------------------------------------------------------------

def open_safetensors(path: Path):
    """safe_open with pread (safetensors >= 0.8) so tensors are read, not mapped."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:  # older safetensors: mmap only
        return safe_open(str(path), framework="pt")


def read_layout(model_path: str) -> Layout:
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
    return Layout(root, files, tensors)


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


def _lora_config(adapter_dir: Path):
    from peft import LoraConfig, PeftConfig

    try:
        cfg = PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as e:
        raise UserError(f"cannot read {adapter_dir}/adapter_config.json: {first_line(e)}")
    if not isinstance(cfg, LoraConfig):
        raise UserError(f"{adapter_dir} is a {cfg.peft_type} adapter; merge folds LoRA only")
    bad = [f for f in _UNSUPPORTED if getattr(cfg, f, None)]
    if cfg.init_lora_weights not in _PLAIN_INITS:
        bad.append(f"init_lora_weights={cfg.init_lora_weights}")
    if bad:
        raise UserError(f"the adapter in {adapter_dir} uses {', '.join(bad)}, which the streaming "
                        "merge does not support; merge it with peft's merge_and_unload instead")
    return cfg


def lora_scale(cfg, module: str, rank: int) -> float:
    """peft's `scaling` for `module`: alpha / r, or alpha / sqrt(r) with rsLoRA; r and alpha from
    rank_pattern / alpha_pattern as LoraModel._create_and_replace resolves them."""
    from peft.utils.other import get_pattern_key

    r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), module), cfg.r)
    alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), module), cfg.lora_alpha)
    if r != rank:
        raise UserError(f"adapter module {module}: adapter_config.json gives rank {r}, its weights "
                        f"rank {rank}; the adapter directory is inconsistent")
    return alpha / math.sqrt(r) if cfg.use_rslora else alpha / r


def _split(key: str) -> tuple[str, str]:
    """`base_model.model.<module>.<part>` -> (module, part) for LoRA parts, (key, "") else."""
    for part in ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A",
                 "lora_embedding_B", "lora_magnitude_vector", "base_layer.weight",
                 "base_layer.bias"):
        if key.endswith("." + part):
            return key[:-len(part) - 1], part
    return key, ""


def read_adapter(adapter_dir: Path, layout: Layout, structure: Structure) -> Adapter:
    """The adapter's updates keyed by the checkpoint tensors they change; every key checked
    against the base (name and shape), so nothing is skipped silently."""
    from lora_ppo.io.checkpoint import ADAPTER_WEIGHTS, read_tensors

    cfg = _lora_config(adapter_dir)
    raw = read_tensors(adapter_dir / ADAPTER_WEIGHTS)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    updates, bias_updates, base_override, replace = {}, {}, {}, {}
    for key, t in raw.items():
        if not key.startswith(PEFT_PREFIX):
            raise UserError(f"adapter key {key} does not start with {PEFT_PREFIX}; not a "
                            "causal-LM LoRA adapter saved by peft")
        module, part = _split(key[len(PEFT_PREFIX):])
        if part:
            parts.setdefault(module, {})[part] = t
        elif ".lora_" in module:
            raise UserError(f"adapter key {key} is not plain LoRA (A, B, bias); not supported")
        else:
            replace[module] = t  # a modules_to_save copy: `<module>.<param>`
    for module, p in parts.items():
        for name in ("weight", "bias"):
            if f"base_layer.{name}" in p:
                base_override[f"{module}.{name}"] = p[f"base_layer.{name}"]
        if "lora_A.weight" in p:
            A, B, transpose = p["lora_A.weight"], p["lora_B.weight"], module in structure.conv1d
        elif "lora_embedding_A" in p:
            A, B, transpose = p["lora_embedding_A"], p["lora_embedding_B"], True
        else:
            continue
        scale = lora_scale(cfg, module, A.shape[0])
        magnitude = p.get("lora_magnitude_vector")
        if cfg.use_dora and (magnitude is None or magnitude.shape != B.shape[:1]):
            raise UserError(f"adapter module {module}: use_dora is set but its magnitude vector "
                            f"is {None if magnitude is None else list(magnitude.shape)}, not "
                            f"[{B.shape[0]}]; the adapter directory is inconsistent")
        updates[f"{module}.weight"] = Update(A, B, scale, transpose, magnitude)
        if "lora_B.bias" in p:
            bias_updates[f"{module}.bias"] = p["lora_B.bias"] * scale
    for key, shape in _expected_shapes(updates, bias_updates, base_override, replace):
        _check_key(key, shape, layout, structure)
    return Adapter(cfg, raw, updates, bias_updates, base_override, replace)


def _expected_shapes(updates, bias_updates, base_override, replace):
    for key, u in updates.items():
        out, inp = u.B.shape[0], u.A.shape[1]
        yield key, [inp, out] if u.transpose else [out, inp]
    for d in (bias_updates, base_override, replace):
        yield from ((k, list(t.shape)) for k, t in d.items())


def _check_key(key: str, shape: list[int], layout: Layout, structure: Structure) -> None:
    stored = structure.tied.get(key, key) if key not in layout.tensors else key
    if stored not in layout.tensors:
        raise UserError(f"the adapter changes {key}, which the base checkpoint {layout.root} does "
                        "not hold (another model, or a checkpoint whose names transformers converts "
                        "on load); merge the adapter into the base it was trained on")
    if layout.tensors[stored][1] != shape:
        raise UserError(f"the adapter's update of {key} has shape {shape}, the base's tensor "
                        f"{layout.tensors[stored][1]}; merge the adapter into the base it was "
                        "trained on")


# -- the merge of one tensor ------------------------------------------------------------------------

def untied_keys(adapter: Adapter, structure: Structure) -> dict[str, str]:
    """Tied parameters the adapter changes on either side -> the stored tensor they copy."""
    touched = (adapter.updates.keys() | adapter.replace.keys() | adapter.base_override.keys())
    return {t: s for t, s in structure.tied.items() if t in touched or s in touched}


def delta_weight(u: Update, device: torch.device) -> torch.Tensor:
    """peft's get_delta_weight in fp32: transpose(B @ A, fan_in_fan_out) * scaling."""
    d = u.B.to(device, torch.float32) @ u.A.to(device, torch.float32)
    return (d.T if u.transpose else d).mul_(u.scale)  # in place: one (out, in) copy, not two


def dequantized(w: torch.Tensor, meta: torch.nn.Module) -> torch.Tensor:
    """`w` (out, in) in the load dtype through the quantization transformers' loader applies
    (integrations/bitsandbytes.py Bnb4bitQuantize / Bnb8bitQuantize: a Params4bit or Int8Params
    with the module's settings, moved to the device), then dequantized by bitsandbytes."""
    import bitsandbytes as bnb

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
        if u.magnitude is not None:  # DoRA (module doc): per output unit, as stored
            dim = 0 if u.transpose else 1
            t = t * (u.magnitude.to(device, torch.float32) / torch.linalg.norm(t, dim=dim)
                     ).unsqueeze(dim)
    if key in adapter.bias_updates:
        t = t + adapter.bias_updates[key].to(device, torch.float32)
    return t


# -- shards -----------------------------------------------------------------------------------------

def _out_bytes(info: tuple[str, list[int], str], dtype: torch.dtype) -> int:
    _, shape, code = info
    size = dtype.itemsize if code in _FLOATS else _ITEMSIZE.get(code, 8)
    return math.prod(shape) * size


def plan_shards(layout: Layout, untied: dict[str, str], dtype: torch.dtype,
                max_shard_bytes: Optional[int]) -> list[Shard]:
    """Output shards: by default one per input file with the same tensors (so the memory of one
    output shard follows the base's own sharding); with `max_shard_bytes`, cut by size. An
    untied parameter goes right after the tensor it copies."""
    groups: list[list[str]] = []
    for name in layout.files:
        keys = []
        for key, info in layout.tensors.items():
            if info[0] == name and key not in untied:
                keys += [key] + [t for t, s in untied.items() if s == key]
        groups.append(keys)
    if max_shard_bytes is not None:
        flat, groups, size = [k for g in groups for k in g], [[]], 0
        for key in flat:
            b = _out_bytes(layout.tensors[untied.get(key, key)], dtype)
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


def write_merged(layout: Layout, adapter: Adapter, view: View, shards: list[Shard], out: Path,
                 dtype: torch.dtype, device: torch.device,
                 log: Callable[[str], None] = print) -> int:
    """Build and write each output shard in turn (+ the index when sharded); returns bytes."""
    from safetensors.torch import save_file

    total, weight_map = 0, {}
    with contextlib.ExitStack() as stack:
        handles = {}

        def read(key: str) -> torch.Tensor:
            name = layout.tensors[key][0]
            if name not in handles:
                handles[name] = stack.enter_context(open_safetensors(layout.root / name))
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
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return total


def write_model_files(layout: Layout, structure: Structure, out: Path, dtype: torch.dtype,
                      untied: dict[str, str]) -> None:
    """config.json (the output dtype, and untied embeddings if the merge untied them),
    generation_config.json and any custom modeling code (`*.py`, for trust_remote_code) beside
    the shards, so `AutoModelForCausalLM.from_pretrained(out)` needs nothing else."""
    import copy
    import shutil

    config = copy.deepcopy(structure.config)
    config.dtype = dtype
    if untied:
        config.tie_word_embeddings = False
    config.save_pretrained(out)
    for p in [layout.root / "generation_config.json", *layout.root.glob("*.py")]:
        if p.is_file():
            shutil.copy2(p, out / p.name)
