"""The setup's seam decisions, cached per model, settings and library versions under
$LORA_PPO_CACHE/seams (`model.seam_check=auto`): a model already checked starts at once;
`always` checks again (ppo/seams.py), `off` trusts the preferred layout and decode path."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import time
from pathlib import Path
from typing import Optional

import torch

from lora_ppo.config import Config
from lora_ppo.generation.generate import DecodePath
from lora_ppo.io.atomic import atomic_write_text
from lora_ppo.io.checkpoint import base_fingerprint
from lora_ppo.modeling.actor_critic import ActorCritic
from lora_ppo.modeling.loading import quantization_mode
from lora_ppo.modeling.packing import Attention, Layout
from lora_ppo.ppo.seams import SEAM_VERSION, Seams, check_seams, preferred


def _key(ac: ActorCritic, cfg: Config, model_path: str) -> str:
    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    adapter = cfg.model.init_adapter
    facts = {
        "seam_version": SEAM_VERSION, "base": base_fingerprint(model_path), "versions": versions,
        "quantization": [quantization_mode(cfg.quantization, ac.device.type),
                         cfg.quantization.quant_type,
                         cfg.quantization.double_quant],
        "dtype": str(ac.causal_lm.get_input_embeddings().weight.dtype),
        "precision": [cfg.deepspeed.precision, str(ac.autocast)],
        "device": ac.device.type,
        "attn": getattr(ac.causal_lm.config, "_attn_implementation", None),
        "lora": [cfg.lora.r, cfg.lora.target_modules],
        "init_adapter": None if not adapter else hashlib.sha256(
            (Path(adapter) / "adapter_config.json").read_bytes()).hexdigest(),
        "wanted": [cfg.model.padding_free, cfg.model.shared_prompt, cfg.model.block_attention,
                   cfg.rollout.samples_per_prompt > 1, cfg.rollout.continuous_batching,
                   cfg.rollout.static_kv_cache, cfg.rollout.fold_for_generation],
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def _cache_dir() -> Path:
    return Path(os.environ.get("LORA_PPO_CACHE") or Path.home() / ".cache" / "lora_ppo") / "seams"


def _to_json(s: Seams) -> dict:
    a = s.layout.attention
    return {"packed": s.layout.packed, "group": s.layout.group, "blocks": s.layout.blocks,
            "attention": None if a is None else [a.implementation, a.window, list(a.layer_types),
                                                 str(a.dtype).removeprefix("torch.")],
            "continuous_batching": s.decode.continuous_batching,
            "static_kv_cache": s.decode.static_kv_cache, "fold": s.decode.fold,
            "notes": list(s.notes), "own_logits": s.own_logits}


def _from_json(d: dict) -> Seams:
    a = d["attention"]
    attention = None if a is None else Attention(a[0], a[1], tuple(a[2]), getattr(torch, a[3]))
    return Seams(Layout(d["packed"], d["group"], attention, d.get("blocks", False)),
                 DecodePath(d["continuous_batching"], d["static_kv_cache"], d["fold"]),
                 tuple(d["notes"]), d["own_logits"])


def seams_for(ac: ActorCritic, cfg: Config, pad_id: int, model_path: str) -> tuple[Seams, Optional[str]]:
    """The seams of this model and settings (`model.seam_check`): cached, checked, or trusted;
    and a progress line when the checks ran."""
    mode = cfg.model.seam_check
    if mode == "off":
        best = preferred(ac, cfg)[0][1]
        rollout = cfg.rollout
        return Seams(best, DecodePath(rollout.continuous_batching, rollout.static_kv_cache,
                                      rollout.fold_for_generation)), None
    path = _cache_dir() / f"{_key(ac, cfg, model_path)}.json"
    if mode == "auto" and path.is_file():
        try:
            return _from_json(json.loads(path.read_text())), None
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # an unreadable entry is checked again and rewritten
    t0 = time.perf_counter()
    seams = check_seams(ac, cfg, pad_id)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(_to_json(seams), indent=1))
    except OSError:
        pass  # a read-only cache only costs the check next time
    return seams, (f"seam check ({time.perf_counter() - t0:.1f} s): the model's logits, its "
                   "train and eval modes, the packed rows and the decode loop agree")
