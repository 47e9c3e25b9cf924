"""The numbers of a decoder-only transformer that memory and FLOPs depend on, read from its
config.json alone, and its parameter counts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from lora_ppo.errors import UserError

# Decoder linears of Llama-family models as (input, output) in units the Arch resolves below.
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Arch:
    """The numbers of a decoder-only transformer that memory and FLOPs depend on."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool  # lm_head shares the embedding matrix
    checkpoint_bytes: int = 4  # bytes per weight in the checkpoint files (its config's dtype)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each decoder linear, per layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, \
            self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def arch_from_config(d: dict, source: str = "config.json") -> Arch:
    """Arch from a transformers config dict (a multimodal one's `text_config` is used)."""
    d = d.get("text_config", d)
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                           "num_attention_heads", "intermediate_size") if k not in d]
    if missing:
        raise UserError(f"{source} has no {', '.join(missing)}; the estimator needs a "
                        "Llama-family decoder config")
    heads = d["num_attention_heads"]
    # transformers writes only fields that differ from PretrainedConfig's defaults, whose
    # tie_word_embeddings is True; head_dim defaults to hidden/heads as in LlamaConfig.
    return Arch(vocab=d["vocab_size"], hidden=d["hidden_size"], layers=d["num_hidden_layers"],
                heads=heads, kv_heads=d.get("num_key_value_heads") or heads,
                head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                intermediate=d["intermediate_size"], tied=bool(d.get("tie_word_embeddings", True)),
                checkpoint_bytes=_DTYPE_BYTES.get(d.get("dtype") or d.get("torch_dtype"), 4))


def read_arch(model_path: str | None) -> Arch:
    """Arch of `model.path`: a local model directory, or a cached hub id."""
    if not model_path:
        raise UserError("model.path is not set; point it at a saved transformers model "
                        "directory")
    path = Path(model_path).expanduser() / "config.json"
    if not path.is_file():
        try:  # a hub id: only config.json is fetched (or read from the local hub cache)
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model_path, "config.json"))
        except Exception:
            raise UserError(f"model.path={model_path}: no config.json found (not a local model "
                            "directory, and not in the hub cache); point it at a model directory")
    try:
        return arch_from_config(json.loads(path.read_text()), str(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); fix the file")


class ParamCounts(NamedTuple):
    linear: int  # decoder linears (what bitsandbytes quantizes)
    other: int   # embeddings, lm_head (unless tied), norms: never quantized

    @property
    def total(self) -> int:
        return self.linear + self.other


def param_counts(arch: Arch) -> ParamCounts:
    linear = arch.layers * sum(i * o for i, o in arch.linears().values())
    other = arch.vocab * arch.hidden * (1 if arch.tied else 2) + (2 * arch.layers + 1) * arch.hidden
    return ParamCounts(linear, other)


def lora_param_count(arch: Arch, r: int, target_modules: list[str]) -> int:
    """Parameters of one LoRA adapter: r * (in + out) per targeted linear (A is r x in, B out x r).

    `all-linear` targets every decoder linear but not lm_head (peft excludes the output layer).
    """
    lin = arch.linears()
    names = list(lin) if target_modules == ["all-linear"] else target_modules
    unknown = [n for n in names if n not in lin]
    if unknown:
        raise UserError(f"lora.target_modules has {', '.join(unknown)}, which the estimator "
                        f"does not know; it knows all-linear, {', '.join(lin)}")
    return arch.layers * sum(r * (lin[n][0] + lin[n][1]) for n in names)
