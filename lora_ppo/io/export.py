"""`lora-ppo export` and `lora-ppo merge`: a checkpoint out of the toolkit's hands.

export  the policy adapter as a standard PEFT directory (`PeftModel.from_pretrained(base, out)`),
        `value/` beside it (value head, and the critic adapter with value.mode=adapter), the
        tokenizer and manifest.json (base path and fingerprint, step, config).
merge   the policy adapter folded into the full-precision base weights (peft `merge_and_unload`),
        saved as sharded safetensors with config and tokenizer: a plain transformers model.
        Before anything is written, the merged model's logits on a few probe texts are compared
        with base + adapter (unmerged) in the same dtype; above the dtype's tolerance it fails.

Quantized training: the adapter of a 4-bit or 8-bit run is merged into the *original*
unquantized weights, never into quantized ones (rounding W + BA back to 4 bits would throw most
of the update away). The merged model therefore differs from the quantized model it was trained
with by the quantization error; merge reports that difference for information only.

Both write into a temporary directory beside --out and rename it at the end (lora_ppo.io.atomic).
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from lora_ppo.config.load import config_to_dict
from lora_ppo.errors import UserError
from lora_ppo.io.atomic import atomic_output_dir, check_output_dir
from lora_ppo.io.checkpoint import (
    POLICY_DIR,
    VALUE_DIR,
    Checkpoint,
    base_fingerprint,
    check_base,
    open_checkpoint,
)
from lora_ppo.modeling.loading import DTYPES, default_device, resolve_model_path

MANIFEST = "manifest.json"
# Largest |logit difference| between the merged model and base + adapter allowed, per unit of
# logit scale (max(1, largest |logit|) over the probes). Merging rounds W + BA once to the dtype
# where the unmerged path keeps BA apart (peft computes it in fp32), so the difference is the
# dtype's rounding of the weights: ~1e-7 relative in fp32, ~1e-3 (fp16, 11 bits) and ~1e-2 (bf16,
# 8 bits). A wrong merge (a lost alpha/r scaling, the wrong adapter) differs by the whole update.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
PROBE_TEXTS = ("The", "This movie was a", "I bought this blender last week and",
               "Overall, the service at the restaurant")


class MergeReport(NamedTuple):
    dtype: str
    max_logit_diff: float  # merged vs base + adapter, both in `dtype`
    tolerance: float  # TOLERANCE[dtype] * logit scale, or as given
    quantization: str  # the training-time base: none, 4bit or 8bit
    quantized_logit_diff: Optional[float]  # merged vs the quantized base + adapter (information)


def _prepare(checkpoint: str | Path, out: str | Path, force: bool) -> tuple[Checkpoint, str]:
    """Verify the checkpoint and its base before any slow work; refuse a non-empty --out."""
    check_output_dir(Path(out), force)
    ck = open_checkpoint(checkpoint)
    model_path = resolve_model_path(ck.cfg.model.path)
    check_base(ck, model_path)
    return ck, model_path


def _load_tokenizer(ck: Checkpoint, model_path: str):
    """The base's tokenizer as it ships (no pad token added: that was a training choice)."""
    from transformers import AutoTokenizer

    src = ck.cfg.model.tokenizer_path or model_path
    try:
        return AutoTokenizer.from_pretrained(src, trust_remote_code=ck.cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer from {src}: {str(e).splitlines()[0]}")


def _manifest(ck: Checkpoint, model_path: str, **extra) -> dict:
    return {"base_model": {**base_fingerprint(model_path), "config_path": ck.cfg.model.path},
            "trained_on": ck.state["base"], "step": ck.state["step"],
            "episode": ck.state["episode"], "checkpoint": str(ck.path.resolve()), **extra,
            "config": config_to_dict(ck.cfg)}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def export(checkpoint: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the checkpoint's adapters, tokenizer and manifest to `out`; returns `out`."""
    ck, model_path = _prepare(checkpoint, out, force)
    tokenizer = _load_tokenizer(ck, model_path)
    with atomic_output_dir(out, force) as tmp:
        for f in (ck.path / POLICY_DIR).iterdir():
            shutil.copy2(f, tmp / f.name)
        shutil.copytree(ck.path / VALUE_DIR, tmp / VALUE_DIR)
        tokenizer.save_pretrained(tmp)
        _write_json(tmp / MANIFEST, _manifest(ck, model_path, value_mode=ck.cfg.value.mode))
    print(f"exported step {ck.state['step']} of {ck.path} to {out}: PEFT adapter at the top, "
          f"value head in {VALUE_DIR}/, base {model_path}")
    return Path(out)


@torch.no_grad()
def probe_logits(model, tokenizer, device: torch.device) -> list[torch.Tensor]:
    """fp32 logits (1, L, V) of each probe text (one at a time: no padding to get wrong)."""
    model.eval()
    out = []
    for text in PROBE_TEXTS:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
        out.append(model(input_ids=ids).logits.float().cpu())
    return out


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _quantized_logits(ck: Checkpoint, model_path: str, tokenizer, device) -> list[torch.Tensor]:
    """Logits of the training-time model: quantized base + policy adapter."""
    from peft import PeftModel

    from lora_ppo.modeling.loading import load_base_model

    base = load_base_model(ck.cfg, model_path, device)
    model = PeftModel.from_pretrained(base, str(ck.path / POLICY_DIR))
    logits = probe_logits(model, tokenizer, device)
    del model, base
    gc.collect()
    return logits


def merge(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", force: bool = False,
          max_shard_size: str = "5GB", tolerance: Optional[float] = None) -> MergeReport:
    """Merge the policy adapter into the unquantized base in `dtype` and save it to `out`.

    Fails (UserError, `out` untouched) when the merged logits differ from base + adapter by more
    than `tolerance` (default: TOLERANCE[dtype] times the logit scale).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    ck, model_path = _prepare(checkpoint, out, force)
    tokenizer = _load_tokenizer(ck, model_path)
    device = default_device()
    quant = ck.cfg.quantization.mode
    q_logits = _quantized_logits(ck, model_path, tokenizer, device) if quant != "none" else None
    try:
        base = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=DTYPES[dtype], trust_remote_code=ck.cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the base {model_path}: {str(e).splitlines()[0]}")
    model = PeftModel.from_pretrained(base.to(device), str(ck.path / POLICY_DIR))
    want = probe_logits(model, tokenizer, device)
    merged = model.merge_and_unload()
    got = probe_logits(merged, tokenizer, device)
    if tolerance is None:
        scale = max(1.0, max(x.abs().max().item() for x in want))
        tolerance = TOLERANCE[dtype] * scale
    report = MergeReport(dtype, max_diff(got, want), tolerance, quant,
                         None if q_logits is None else max_diff(got, q_logits))
    if report.max_logit_diff > report.tolerance:
        raise UserError(f"merge check failed: merged and base+adapter logits differ by up to "
                        f"{report.max_logit_diff:.3g} > {report.tolerance:.3g} in {dtype}; nothing "
                        "was written; try --dtype fp32")
    with atomic_output_dir(out, force) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        _write_json(tmp / MANIFEST, _manifest(ck, model_path, merge=report._asdict()))
    print(f"merged step {ck.state['step']} of {ck.path} into {model_path} ({dtype}) -> {out}")
    print(f"  max |logit diff| vs base+adapter in {dtype}: {report.max_logit_diff:.3g} "
          f"(tolerance {report.tolerance:.3g}, {len(PROBE_TEXTS)} probe texts)")
    if q_logits is not None:
        print(f"  trained on a {quant} base: the adapter was merged into the full-precision "
              f"original weights; vs the {quant} base+adapter it was trained with: "
              f"{report.quantized_logit_diff:.3g} (quantization error, for information)")
    return report
