"""`lora-ppo export` and `lora-ppo merge`: a checkpoint out of the toolkit's hands.

export  the policy adapter as a standard PEFT directory (`PeftModel.from_pretrained(base, out)`),
        `value/` beside it (value head, and the critic adapter with value.mode=adapter; none
        with value.mode=none), the
        tokenizer and manifest.json (base path and fingerprint, step, config).
merge   the policy adapter folded into the base weights shard by shard in bounded memory
        (lora_ppo/io/merge.py), saved as safetensors with config and tokenizer: a plain
        transformers model, in the base's own dtype by default (the merge itself is fp32 per
        tensor).

Into which weights (`into`):
  original     the checkpoint's own unquantized weights (the default). After 4-bit or 8-bit
               training the result differs from the model that was trained by the base's
               quantization error, which merge reports.
  dequantized  the 4-bit / 8-bit weights as the policy saw them in training, dequantized with
               bitsandbytes, plus the update: the merged model behaves like the trained one.

Verification, before anything appears at --out (lora_ppo/io/merge_check.py):
  tensors  always, bounded (one module at a time): for the first and last module of each kind
           the fp32 merge is compared with peft's own `merge_and_unload` of that module alone
           (relative 1e-6), and the written tensor must equal it cast to the output dtype.
  probe    logits on PROBE_TEXTS of the merged model vs base + adapter unmerged (same base view,
           checked against TOLERANCE[dtype]) and vs the quantized base + adapter training used
           (reported). It loads whole models, so by default it runs only for bases up to
           PROBE_MAX_BYTES (`verify="probe"` forces it, `"tensors"` skips it).

Both write into a temporary directory beside --out and rename it at the end (lora_ppo.io.atomic);
SIGTERM removes it on the way out and a SIGKILLed run's is removed by the next run.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from lora_ppo.config.load import config_to_dict
from lora_ppo.errors import UserError, first_line
from lora_ppo.io import lora_delta, shards
from lora_ppo.io import merge as streaming
from lora_ppo.io.atomic import atomic_output_dir, check_output_dir, sigterm_as_exit
from lora_ppo.io.checkpoint import (
    POLICY_DIR,
    VALUE_DIR,
    Checkpoint,
    base_fingerprint,
    check_base,
    open_checkpoint,
    trained_quantization,
)
from lora_ppo.io.merge_check import (
    PROBE_TEXTS,
    TENSOR_RTOL,
    MergeJob,
    check_tensors,
    max_diff,
    probe,
    training_dtype,
)
from lora_ppo.modeling.loading import DTYPES, quantization_config, resolve_model_path

MANIFEST = "manifest.json"
INTO = ("original", "dequantized")
VERIFY = ("auto", "probe", "tensors")
# Largest |logit difference| between the merged model and base + adapter allowed, per unit of
# logit scale (max(1, largest |logit|) over the probes). The merged weights are rounded once to
# the output dtype where the unmerged path keeps W and BA apart in fp32, so the difference is the
# dtype's rounding: ~1e-7 relative in fp32, ~1e-3 (fp16, 11 bits) and ~1e-2 (bf16, 8 bits). A
# wrong merge (a lost alpha/r scaling, the wrong adapter) differs by the whole update.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
PROBE_MAX_BYTES = 512 * 2**20  # the probe loads up to three whole models, one after another


class MergeReport(NamedTuple):
    dtype: str
    into: str  # original | dequantized
    quantization: str  # the training-time base: none, 4bit or 8bit
    max_logit_diff: Optional[float]  # probe: merged vs base (same view) + adapter; None: no probe
    tolerance: Optional[float]  # TOLERANCE[dtype] * logit scale, or as given
    quantized_logit_diff: Optional[float]  # probe: merged vs the quantized base + adapter
    max_tensor_diff: float  # tensor check: fp32 merge vs peft's merge, relative
    tensors_checked: int
    update_size: float  # largest |W' - W| / |W| over the checked tensors: 0 = a no-op adapter
    weight_gap_to_trained: float  # written vs the weights training used (+ update), relative
    shards: int
    seconds: float


def _prepare(checkpoint: str | Path, out: str | Path, force: bool) -> tuple[Checkpoint, str]:
    """Verify the checkpoint and its base before any slow work; refuse a bad --out."""
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
        raise UserError(f"cannot load the tokenizer from {src}: {first_line(e)}")


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
    with sigterm_as_exit(), atomic_output_dir(out, force) as tmp:
        for f in (ck.path / POLICY_DIR).iterdir():
            shutil.copy2(f, tmp / f.name)
        value_mode = ck.cfg.algorithm.value_mode
        if value_mode != "none":  # a critic-free run has no value function to export
            shutil.copytree(ck.path / VALUE_DIR, tmp / VALUE_DIR)
        tokenizer.save_pretrained(tmp)
        _write_json(tmp / MANIFEST, _manifest(ck, model_path, value_mode=value_mode))
    where = "no value function" if value_mode == "none" else f"value head in {VALUE_DIR}/"
    print(f"exported step {ck.state['step']} of {ck.path} to {out}: PEFT adapter at the top, "
          f"{where}, base {model_path}")
    return Path(out)


# -- merge ------------------------------------------------------------------------------------------

def base_dtype(model_path: str) -> str:
    """The dtype the base checkpoint is stored in (its config.json's `dtype`, `torch_dtype` in
    older files), as one of DTYPES' names; fp32 where it says nothing (transformers' default)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    stored = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "")
    names = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    return names.get(stored.removeprefix("torch."), "fp32")


def _check_args(dtype: str, into: str, verify: str, quant: str, device: str) -> torch.device:
    for flag, value, allowed in (("--dtype", dtype, DTYPES), ("--into", into, INTO),
                                 ("--verify", verify, VERIFY)):
        if value not in allowed:
            raise UserError(f"{flag} {value} is not one of {', '.join(allowed)}")
    if into == "dequantized" and quant == "none":
        raise UserError("--into dequantized: the checkpoint was trained on an unquantized base "
                        "(quantization.mode=none), so there is nothing to dequantize; use --into "
                        "original")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device} is not a torch device (cpu, cuda, cuda:1)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU here; use --device cpu")
    return dev


def _job(ck: Checkpoint, model_path: str, into: str, dtype: torch.dtype,
         max_shard_size) -> MergeJob:
    """Everything the merge needs, read and checked before anything is written."""
    from transformers.utils.hub import convert_file_size_to_int

    load_dtype = training_dtype(ck)
    qcfg = quantization_config(ck.cfg.quantization, load_dtype, trained_quantization(ck))
    index = shards.read_index(model_path)
    structure = shards.model_structure(model_path, ck.cfg.model.trust_remote_code, qcfg)
    adapter = lora_delta.read_adapter(ck.path / POLICY_DIR, index, structure)
    untied = lora_delta.untied_keys(adapter, structure)
    view = streaming.View(into, load_dtype, structure, untied)
    try:
        max_bytes = None if max_shard_size is None else convert_file_size_to_int(max_shard_size)
    except ValueError:
        raise UserError(f"--max-shard-size {max_shard_size}: give a size such as 2GB or 500MB")
    plan = shards.plan_shards(index, untied, dtype, max_bytes)
    base_bytes = sum(shards.out_bytes(i, DTYPES["fp32"]) for i in index.tensors.values())
    return MergeJob(index, structure, adapter, view, plan, base_bytes)


def merge(checkpoint: str | Path, out: str | Path, dtype: str = "auto", force: bool = False,
          max_shard_size: Optional[str | int] = None, tolerance: Optional[float] = None,
          into: str = "original", device: str = "cpu", verify: str = "auto") -> MergeReport:
    """Merge the policy adapter into the base (`into`: original or dequantized weights), shard
    by shard, and save it in `dtype` to `out` (`auto`: the dtype the base is stored in, so an
    fp32 base is not rounded to bf16 unasked). Fails (UserError, `out` untouched) when a check
    fails: the tensor check always, the probe's logits against `tolerance` (default:
    TOLERANCE[dtype] times the logit scale) when it runs."""
    ck, model_path = _prepare(checkpoint, out, force)
    quant = trained_quantization(ck)
    if dtype == "auto":
        dtype = base_dtype(model_path)
    dev = _check_args(dtype, into, verify, quant, device)
    tokenizer = _load_tokenizer(ck, model_path)
    t0 = time.perf_counter()
    job = _job(ck, model_path, into, DTYPES[dtype], max_shard_size)
    run_probe = verify == "probe" or (verify == "auto" and job.base_bytes <= PROBE_MAX_BYTES)
    print(f"merging step {ck.state['step']} of {ck.path} into the {into} weights of {model_path} "
          f"({len(job.adapter.updates)} LoRA tensors, {len(job.adapter.replace)} replaced) "
          f"-> {out} in {dtype}, {len(job.shards)} shards on {dev}", flush=True)
    with sigterm_as_exit(), atomic_output_dir(out, force) as tmp:
        streaming.write_merged(job.index, job.adapter, job.view, job.shards, tmp,
                               DTYPES[dtype], dev, log=lambda s: print(s, flush=True))
        shards.write_model_files(job.index, job.structure, tmp, DTYPES[dtype],
                                    job.view.untied)
        trained_view = job.view._replace(into="dequantized" if quant != "none" else "original")
        checks = check_tensors(job, tmp, DTYPES[dtype], trained_view, dev)
        logit = {"max_logit_diff": None, "tolerance": None, "quantized_logit_diff": None}
        if run_probe:
            got, want, trained = probe(ck, model_path, job, tmp, tokenizer, dev)
            if tolerance is None:
                tolerance = TOLERANCE[dtype] * max(1.0, max(x.abs().max().item() for x in want))
            logit = {"max_logit_diff": max_diff(got, want), "tolerance": tolerance,
                     "quantized_logit_diff": None if trained is None else max_diff(got, trained)}
            if logit["max_logit_diff"] > tolerance:
                raise UserError(f"merge check failed: merged and base+adapter logits differ by up "
                                f"to {logit['max_logit_diff']:.3g} > {tolerance:.3g} in {dtype}; "
                                "nothing was written; try --dtype fp32")
        report = MergeReport(dtype, into, quant, **logit, **checks, shards=len(job.shards),
                             seconds=round(time.perf_counter() - t0, 1))
        tokenizer.save_pretrained(tmp)
        _write_json(tmp / MANIFEST, _manifest(ck, model_path, merge=report._asdict()))
    _print_report(report, job, verify)
    return report


def _print_report(r: MergeReport, job: MergeJob, verify: str) -> None:
    print(f"merged in {r.seconds:.0f} s; tensor check: {r.tensors_checked} tensors equal peft's "
          f"merge_and_unload to {r.max_tensor_diff:.2g} (relative, limit {TENSOR_RTOL:g}); "
          f"largest relative update {r.update_size:.3g}")
    if r.tensors_checked and r.update_size == 0.0 and job.adapter.updates:
        print("  warning: the adapter changes nothing (LoRA B is 0: an untrained adapter?)")
    if job.view.untied:
        print(f"  untied {', '.join(job.view.untied)} from the tensor it shared: the adapter "
              "changes one side only (config.json: tie_word_embeddings false)")
    if r.max_logit_diff is None:
        why = ("--verify tensors" if verify == "tensors" else
               f"the base is {job.base_bytes / 2**20:.0f} MiB in fp32, over "
               f"{PROBE_MAX_BYTES / 2**20:.0f} MiB; --verify probe loads whole models to run them")
        print(f"  probe texts skipped ({why})")
    else:
        print(f"  max |logit diff| vs base+adapter ({r.into} weights): {r.max_logit_diff:.3g} "
              f"(tolerance {r.tolerance:.3g}, {len(PROBE_TEXTS)} probe texts)")
    if r.quantization != "none":
        where = ("the full-precision original weights" if r.into == "original" else
                 f"the dequantized {r.quantization} weights")
        q = "" if r.quantized_logit_diff is None else (
            f"logits vs the {r.quantization} base+adapter it was trained with differ by "
            f"{r.quantized_logit_diff:.3g}; ")
        print(f"  trained on a {r.quantization} base: the adapter was merged into {where}; {q}"
              f"written weights vs the trained ones: {r.weight_gap_to_trained:.3g} relative"
              + (" (quantization error, for information)" if r.into == "original" else ""))
