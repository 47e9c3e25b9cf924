"""DeepSpeed configs: the bundled ds_configs/ files, filled from the training config, checked.

The training config decides batch sizes, accumulation, clipping and precision; a DeepSpeed JSON
says "auto" for them (or agrees), and `fill_ds_config` writes the values in. What DeepSpeed would
silently ignore or get wrong is refused with one line naming the file and the key.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from lora_ppo.config import Config
from lora_ppo.errors import UserError, first_line

logger = logging.getLogger(__name__)

# The repo's ds_configs/ (a checkout or an editable install); a wheel installs the same files
# under <prefix>/share/lora_ppo/ds_configs (pyproject's data-files).
DS_CONFIG_DIR = next((d for d in (Path(__file__).resolve().parents[2] / "ds_configs",
                                  Path(sys.prefix) / "share" / "lora_ppo" / "ds_configs")
                      if d.is_dir()), Path(__file__).resolve().parents[2] / "ds_configs")


PPO_FIELDS = ("ppo.minibatch_size", "ppo.micro_batch_size", "ppo.optim.max_grad_norm")


def training_source(fields: tuple[str, str, str] = PPO_FIELDS) -> dict[str, str]:
    """The training-config field each DeepSpeed key comes from, named in contradiction errors;
    `fields` = the (batch, micro-batch, clipping) fields of the section being trained."""
    batch, micro, clip = fields
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": f"{batch}/{micro}",
        "train_batch_size": f"{batch} * world_size",
        "gradient_clipping": clip,
        "bf16.enabled": "deepspeed.precision",
        "fp16.enabled": "deepspeed.precision",
    }


# Keys where DeepSpeed itself understands "auto"; any other "auto" left after filling is an error.
_DS_OWN_AUTO = {"data_types.keep_in_fp32_modules"}


PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_ds_config(name_or_path: str) -> Path:
    """"zero2" -> <repo>/ds_configs/zero2.json; an existing .json path is returned as is."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return path
    bundled = DS_CONFIG_DIR / f"{name_or_path}.json"
    if "/" not in name_or_path and bundled.is_file():
        return bundled
    names = ", ".join(sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
    raise UserError(f"deepspeed config {name_or_path!r} not found; use one of {names} "
                    "or a path to an existing .json file")


def read_ds_config(name_or_path: str) -> tuple[dict, str]:
    """Resolve and parse a DeepSpeed config; returns (raw dict, source name for messages)."""
    path = resolve_ds_config(name_or_path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); fix the file") from e
    if not isinstance(raw, dict):
        raise UserError(f"{path}: top level must be a JSON object; fix the file")
    source = f"ds_configs/{path.name}" if path.parent == DS_CONFIG_DIR else str(path)
    return raw, source


def _same(value: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        return value is expected
    if isinstance(value, (int, float)):
        return math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-12)
    return False


def _auto_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _auto_paths(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if node == "auto" else []


def fill_ds_config(raw: dict, *, micro_batch_size: int, grad_accum_steps: int, world_size: int,
                   max_grad_norm: float, precision: str, source: str,
                   fields: tuple[str, str, str] = PPO_FIELDS) -> dict:
    """A copy of `raw` with the keys the training config decides set from it.

    Each key is set whether it is "auto" or missing (a missing gradient_accumulation_steps would
    silently default to 1 in DeepSpeed); an explicit value must agree or we raise UserError.
    train_batch_size = micro_batch_size * grad_accum_steps * world_size (DeepSpeed checks this
    identity itself). max_grad_norm <= 0 means no clipping, which DeepSpeed writes as 0.
    The optimizer and scheduler come from the training config (`create_engine`), so a DeepSpeed
    "optimizer"/"scheduler" block, which DeepSpeed would silently ignore, is refused.
    `fields` only names the training-config fields in errors (training_source).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be resolved to one of {PRECISIONS}, got {precision!r}")
    for block in ("optimizer", "scheduler"):
        if block in raw:
            raise UserError(f"{source}: remove the {block!r} block; lora_ppo builds AdamW and "
                            "its LR schedule from the training config (lr, weight_decay, schedule)")
    out = json.loads(json.dumps(raw))  # deep copy of plain JSON data
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": float(max(max_grad_norm, 0.0)),
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
    }
    for key, expected in wanted.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        value = node.get(leaf, "auto")
        if value != "auto" and not _same(value, expected):
            shown = precision if key.endswith(".enabled") else expected
            raise UserError(f"{source}: {key}={json.dumps(value)} contradicts "
                            f"{training_source(fields)[key]} = {shown}; "
                            "write \"auto\" or change one of them")
        node[leaf] = expected
    autocast_dtype(out, precision, source)  # refuses a torch_autocast block that cannot work
    left = [p for p in _auto_paths(out) if p not in _DS_OWN_AUTO]
    if left:
        raise UserError(f"{source}: {', '.join(left)} is \"auto\" but lora_ppo only fills "
                        f"{', '.join(wanted)}; write a value")
    return out


# DeepSpeed's names of the dtypes torch autocast computes in (runtime/config.py DtypeEnum).
AUTOCAST_DTYPES = {name: torch.bfloat16 for name in ("bf16", "bfloat16", "torch.bfloat16")} | {
    name: torch.float16 for name in ("fp16", "float16", "half", "torch.float16")}


def autocast_dtype(ds_config: dict, precision: str = "fp32", source: str = "deepspeed config"
                   ) -> Optional[torch.dtype]:
    """The dtype of the config's torch autocast, or None without one: DeepSpeed 0.19 enters
    `torch.autocast(device, dtype)` around every engine forward when `torch_autocast.enabled`
    (engine.py::forward, runtime/torch_autocast.py::autocast_if_enabled; on a CPU too, as
    `cpu`), with fp32 weights and optimizer: torch's mixed precision. DeepSpeed calls it the
    alternative to its own bf16/fp16 sections ("to use torch's native autocast instead,
    configure the torch_autocast section"), so with deepspeed.precision bf16 or fp16 it is
    refused, as is a dtype it does not name (autocast would pick the device's default)."""
    block = ds_config.get("torch_autocast")
    if not isinstance(block, dict) or block.get("enabled", False) is not True:
        return None
    if precision != "fp32":
        raise UserError(f"{source}: torch_autocast.enabled=true with deepspeed.precision="
                        f"{precision}: torch autocast is DeepSpeed's alternative to its {precision}"
                        " mixed precision, not an addition; set deepspeed.precision=fp32 (fp32 "
                        "weights, forwards under autocast) or remove the torch_autocast block")
    name = block.get("dtype")
    if name not in AUTOCAST_DTYPES:
        raise UserError(f"{source}: torch_autocast.dtype={json.dumps(name)} is not a dtype "
                        "autocast computes in; write \"bfloat16\" or \"float16\"")
    return AUTOCAST_DTYPES[name]


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" on a CUDA device that supports it, else "fp32"; refuses fp16 on CPU."""
    if precision not in ("auto", *PRECISIONS):
        raise UserError(f"precision={precision!r} is not one of auto, fp32, bf16, fp16; pick one")
    on_cuda = device.type == "cuda"
    if precision == "auto":
        # fp32 rather than fp16 on pre-Ampere GPUs: fp16 needs loss scaling, and PPO's
        # exp(logprobs - old_logprobs) ratio is sensitive to the lost mantissa bits.
        return "bf16" if on_cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not on_cuda:
        raise UserError("fp16 needs a GPU; use precision=fp32 on CPU")
    if precision == "bf16" and not on_cuda:
        logger.warning("precision=bf16 on CPU is ~400x slower than fp32 here; "
                       "use precision=fp32 unless you are testing bf16 itself")
    return precision


def zero_stage(ds_config: dict) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it has no zero_optimization block)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def refuse_unsupported(zero_stage: int, quantized: bool, world_size: int) -> None:
    """Refuse ZeRO-3 across several ranks with a bitsandbytes-quantized base.

    ZeRO-3 partitions every module parameter, frozen ones too: it flattens each one, keeps a
    1/world_size slice per rank and all-gathers it around each forward
    (deepspeed/runtime/zero/partition_parameters.py). A bitsandbytes weight is packed integer
    storage whose meaning lives outside the tensor (4-bit: `quant_state`, with per-block absmax
    and the original shape), which ZeRO-3 neither partitions nor gathers; it only moves bytes.
    A 2-rank CPU run of a Linear4bit (nf4) base under DeepSpeed 0.19.8 + bitsandbytes 0.50.2 did
    train correctly, but no upstream test covers it, and the memory win is not there: every rank
    first loads the whole quantized model and only then is it sharded (DeepSpeed issue #5660).
    peft's supported route, bnb_4bit_quant_storage = the training dtype plus loading under
    zero.Init (https://huggingface.co/docs/peft/accelerate/deepspeed, "Use PEFT QLoRA and
    DeepSpeed with ZeRO3"), is not one lora_ppo takes. ZeRO-2 already shards what is large here:
    the optimizer state and gradients of the LoRA weights. One rank partitions nothing, so it
    is allowed.
    """
    if zero_stage == 3 and quantized and world_size > 1:
        raise UserError(f"ZeRO-3 cannot partition a bitsandbytes-quantized base across "
                        f"{world_size} ranks; use ds_config=zero2 (or zero2_offload) with "
                        "quantization, or turn quantization off for zero3")


def run_ds_config(cfg: Config, world_size: int, device: torch.device, section: str,
                  quantized: bool) -> dict:
    """The DeepSpeed config of a run: `cfg.deepspeed.config` filled from the batch sizes and
    optimizer of `section` ("ppo", "sft" or "reward_model"), refused where it cannot work
    (`quantized`: the base is loaded in 4-bit or 8-bit)."""
    if section == "ppo":
        batch, micro = cfg.ppo.minibatch_size, cfg.ppo.micro_batch_size
        names = ("ppo.minibatch_size", "ppo.micro_batch_size")
    else:
        train = getattr(cfg, section).train
        batch, micro = train.batch_size, train.micro_batch_size
        names = (f"{section}.train.batch_size", f"{section}.train.micro_batch_size")
    raw, source = read_ds_config(cfg.deepspeed.config)
    precision = resolve_precision(cfg.deepspeed.precision, device)
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if asked != "no" and asked != precision:
        # `accelerate launch --mixed_precision` only sets this variable, which nothing here reads
        raise UserError(f"accelerate launch --mixed_precision {asked}, but this run trains in "
                        f"{precision} (deepspeed.precision={cfg.deepspeed.precision}); set "
                        f"deepspeed.precision={asked} in the config, or launch without the flag")
    out = fill_ds_config(
        raw, micro_batch_size=micro, grad_accum_steps=batch // micro, world_size=world_size,
        max_grad_norm=getattr(cfg, section).optim.max_grad_norm,
        precision=precision, source=source,
        fields=(*names, f"{section}.optim.max_grad_norm"))
    refuse_unsupported(zero_stage(out), quantized, world_size)
    validate(out, source)
    return out


def _key_path(node: Any, loc: tuple) -> str | None:
    """The dotted path in `node` at which the key path `loc` (a pydantic error's location, relative
    to a sub-model such as the zero_optimization block) ends; None if it is nowhere."""
    if not isinstance(node, dict):
        return None
    head = loc[0] if loc else None
    if head in node:
        rest = _key_path(node[head], loc[1:]) if len(loc) > 1 else ""
        if rest is not None:
            return ".".join(str(x) for x in (head, rest) if x != "")
    for k, v in node.items():
        found = _key_path(v, loc)
        if found is not None:
            return f"{k}.{found}"
    return None


def validate(ds_config: dict, source: str) -> None:
    """DeepSpeed's own validation of a filled config, run before any model is loaded; its
    pydantic error (several lines) becomes one line that names the file and the key."""
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(json.loads(json.dumps(ds_config)))
    except Exception as e:  # pydantic's ValidationError, or DeepSpeed's own asserts
        errors = getattr(e, "errors", None)
        if callable(errors) and errors():
            err = errors()[0]
            key = _key_path(ds_config, tuple(err.get("loc", ()))) or ".".join(
                str(x) for x in err.get("loc", ()))
            raise UserError(f"{source}: {key}={json.dumps(err.get('input'))} is invalid: "
                            f"{err.get('msg', first_line(e))}; fix the file") from None
        raise UserError(f"{source}: DeepSpeed refuses the config: {first_line(e)}; fix the "
                        "file") from None
