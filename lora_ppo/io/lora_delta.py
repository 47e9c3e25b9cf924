"""What a peft LoRA adapter changes in its base, as peft itself would merge it: the update of each
targeted tensor, read from the adapter's files and checked against the base's tensors.

The update of a targeted module is peft's `get_delta_weight` (peft/tuners/lora/layer.py):
`transpose(B @ A, fan_in_fan_out) * scaling`, with `scaling = alpha / r` (`alpha / sqrt(r)` with
`use_rslora`) and r, alpha per module from `rank_pattern` / `alpha_pattern` (LoraModel.
_create_and_replace, peft.utils.other.get_pattern_key); `lora_bias` adds `B.bias * scaling` to
the bias (Linear.merge). DoRA (`use_dora`) scales the merged weight by its saved magnitude over
the weight norm, as the variant's merge does (tuners/lora/variants.py DoraLinearVariant.merge_safe,
dora.py get_weight_norm): `m / ||W + delta||_row * (W + delta)`, the norm per output unit of the
layer (a Linear's rows; a Conv1D's or an embedding's columns, as stored), of the very weights
the delta is added to (merge.py's `dequantized` view for a 4-bit run, what training saw).
Layouts:

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
  (38 logits off on a test model). Here a tie that the adapter touches on either side is undone
  (`untied_keys`): both tensors are written and the output config says
  `tie_word_embeddings: false`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from peft import LoraConfig, PeftConfig
from peft.utils.other import get_pattern_key

from lora_ppo.errors import UserError, first_line
from lora_ppo.io.checkpoint import ADAPTER_WEIGHTS, read_tensors
from lora_ppo.io.shards import Structure, TensorIndex

PEFT_PREFIX = "base_model.model."
# LoraConfig fields that change what a merge means (a LoRA variant, weights that are not A and B,
# or a base modified at init): the streaming merge refuses them rather than merge them wrong.
_UNSUPPORTED = ("alora_invocation_tokens", "arrow_config", "use_bdlora",
                "velora_config", "monteclora_config", "kasa_config", "trainable_token_indices",
                "target_parameters", "layer_replication", "ensure_weight_tying", "use_qalora")
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")  # they leave the base alone


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


def read_lora_config(adapter_dir: Path):
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


def lora_scale(cfg: LoraConfig, module: str, rank: int) -> float:
    """peft's `scaling` for `module`: alpha / r, or alpha / sqrt(r) with rsLoRA; r and alpha from
    rank_pattern / alpha_pattern as LoraModel._create_and_replace resolves them."""
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


def read_adapter(adapter_dir: Path, index: TensorIndex, structure: Structure) -> Adapter:
    """The adapter's updates keyed by the checkpoint tensors they change; every key checked
    against the base (name and shape), so nothing is skipped silently."""
    cfg = read_lora_config(adapter_dir)
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
        _check_key(key, shape, index, structure)
    return Adapter(cfg, raw, updates, bias_updates, base_override, replace)


def _expected_shapes(updates, bias_updates, base_override, replace):
    for key, u in updates.items():
        out, inp = u.B.shape[0], u.A.shape[1]
        yield key, [inp, out] if u.transpose else [out, inp]
    for d in (bias_updates, base_override, replace):
        yield from ((k, list(t.shape)) for k, t in d.items())


def _check_key(key: str, shape: list[int], index: TensorIndex, structure: Structure) -> None:
    stored = structure.tied.get(key, key) if key not in index.tensors else key
    if stored not in index.tensors:
        raise UserError(f"the adapter changes {key}, which the base checkpoint {index.root} does "
                        "not hold (another model, or a checkpoint whose names transformers converts "
                        "on load); merge the adapter into the base it was trained on")
    if index.tensors[stored][1] != shape:
        raise UserError(f"the adapter's update of {key} has shape {shape}, the base's tensor "
                        f"{index.tensors[stored][1]}; merge the adapter into the base it was "
                        "trained on")


def untied_keys(adapter: Adapter, structure: Structure) -> dict[str, str]:
    """Tied parameters the adapter changes on either side -> the stored tensor they copy."""
    touched = (adapter.updates.keys() | adapter.replace.keys() | adapter.base_override.keys())
    return {t: s for t, s in structure.tied.items() if t in touched or s in touched}


def delta_weight(u: Update, device: torch.device) -> torch.Tensor:
    """peft's get_delta_weight in fp32: transpose(B @ A, fan_in_fan_out) * scaling."""
    d = u.B.to(device, torch.float32) @ u.A.to(device, torch.float32)
    return (d.T if u.transpose else d).mul_(u.scale)  # in place: one (out, in) copy, not two
