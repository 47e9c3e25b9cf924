"""The checks `lora-ppo merge` runs before anything appears at --out (lora_ppo/io/export.py's
docstring says which run when).

tensors  bounded, one module at a time: for the first and last module of each kind the fp32
         streaming merge is compared with peft's own `merge_and_unload` of that module alone, and
         the written tensor must equal it cast to the output dtype.
probe    logits on PROBE_TEXTS of the merged model, of base + adapter unmerged (same base view)
         and of the quantized base + adapter as training loaded it. It loads whole models.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import re
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from lora_ppo.errors import UserError
from lora_ppo.io import merge as streaming
from lora_ppo.io.checkpoint import POLICY_DIR, Checkpoint, trained_quantization
from lora_ppo.io.lora_delta import PEFT_PREFIX, Adapter
from lora_ppo.io.shards import Shard, Structure, TensorIndex, open_safetensors
from lora_ppo.modeling.loading import DTYPES, load_base_model

# Tensor check: fp32 merge vs peft's, relative to the tensor's largest |value|. The same ops in
# the same order give 0; 1e-6 allows another matmul kernel's summation order.
TENSOR_RTOL = 1e-6
PROBE_TEXTS = ("The", "This movie was a", "I bought this blender last week and",
               "Overall, the service at the restaurant")


class MergeJob(NamedTuple):
    index: TensorIndex  # the base's shards and tensor headers
    structure: Structure
    adapter: Adapter
    view: streaming.View  # which base weights, untied tensors
    shards: list[Shard]  # the output's plan
    base_bytes: int  # the base's tensors in fp32


# -- verification: tensors --------------------------------------------------------------------------

def training_dtype(ck: Checkpoint) -> torch.dtype:
    """The dtype training loaded the base in (modeling/loading.resolve_compute_dtype). `auto`
    depends on the training device, which state.json does not record; the engine precision
    there follows the same rule (bf16 on a GPU that has it, fp32 on a CPU), so it stands in."""
    name = ck.cfg.quantization.compute_dtype
    if name == "auto":
        name = "bf16" if ck.state.get("precision") == "bf16" else "fp32"
    return DTYPES[name]


def sample_keys(job: MergeJob) -> list[str]:
    """The first and last tensor of each kind the merge changed (layer numbers wildcarded)."""
    a = job.adapter
    kinds: dict[str, list[str]] = {}
    for k in [*a.updates, *a.replace, *job.view.untied]:
        kinds.setdefault(re.sub(r"\.\d+\.", ".*.", k), []).append(k)
    return [k for ks in kinds.values() for k in dict.fromkeys((ks[0], ks[-1]))]


def _single_module_model(path: str, layer: torch.nn.Module) -> torch.nn.Module:
    """A module tree holding only `layer` at `path`, so peft's target matching and
    rank/alpha patterns see the same name as in the whole model."""
    root = cur = torch.nn.Module()
    *parents, last = path.split(".")
    for p in parents:
        cur.add_module(p, torch.nn.Module())
        cur = getattr(cur, p)
    cur.add_module(last, layer)
    return root


def peft_merged(adapter, module: str, weight: torch.Tensor, bias: Optional[torch.Tensor],
                kind: str) -> torch.Tensor:
    """peft's own merge_and_unload of one module (fp32 base `weight`) with the adapter's saved
    tensors for it, loaded by peft's set_peft_model_state_dict."""
    from peft import PeftModel, set_peft_model_state_dict
    from transformers.pytorch_utils import Conv1D

    layer = (torch.nn.Embedding(*weight.shape) if kind == "embedding" else
             Conv1D(weight.shape[1], weight.shape[0]) if kind == "conv1d" else
             torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None))
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None and getattr(layer, "bias", None) is not None:
            layer.bias.copy_(bias)
    cfg = copy.deepcopy(adapter.config)
    cfg.modules_to_save, cfg.inference_mode = None, True
    prefix = f"{PEFT_PREFIX}{module}."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's fan_in_fan_out notice for Conv1D
        model = PeftModel(_single_module_model(module, layer), cfg)
        res = set_peft_model_state_dict(model, {k: v for k, v in adapter.raw.items()
                                                if k.startswith(prefix)})
    if res.unexpected_keys:
        raise UserError(f"merge check failed: peft does not load {res.unexpected_keys[0]} into "
                        f"{module}; nothing was written")
    return model.merge_and_unload().get_submodule(module).weight.detach()


def _oracle(job: MergeJob, key: str, read) -> torch.Tensor:
    """What peft makes of tensor `key`: its merge for a LoRA module, the saved copy for
    modules_to_save, the base for an untied copy nothing changed."""
    a, view = job.adapter, job.view
    if key in a.replace:
        return a.replace[key].float()
    src = view.untied.get(key, key)
    stored = a.base_override.get(key)
    base = streaming.base_view(read(src) if stored is None else stored, src, view)
    if key not in a.updates:
        return base
    module = key.removesuffix(".weight")
    kind = ("embedding" if f"{PEFT_PREFIX}{module}.lora_embedding_A" in a.raw else
            "conv1d" if module in view.structure.conv1d else "linear")
    bias = f"{module}.bias"
    b = streaming.base_view(read(bias), bias, view) if bias in a.bias_updates else None
    return peft_merged(a, module, base, b, kind)


def check_tensors(job: MergeJob, out: Path, dtype: torch.dtype, trained_view,
                  device: torch.device) -> dict:
    """The tensor check on `sample_keys` (see the module docstring); raises UserError if the
    fp32 merge and peft's differ or a written tensor is not the merge cast to `dtype`."""
    written = {k: s.name for s in job.shards for k in s.keys}
    rel = lambda x, y: ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
    worst = size = gap = 0.0
    keys = sample_keys(job)
    with contextlib.ExitStack() as stack:
        opened = {}

        def read_from(root: Path, name: str, key: str) -> torch.Tensor:
            if (root, name) not in opened:
                opened[root, name] = stack.enter_context(open_safetensors(root / name))
            return opened[root, name].get_tensor(key)

        read = lambda k: read_from(job.index.root, job.index.tensors[k][0], k)
        for key in keys:
            ours = streaming.merged_tensor(key, read, job.adapter, job.view, device).cpu().float()
            oracle = _oracle(job, key, read)
            worst = max(worst, rel(ours, oracle))
            disk = read_from(out, written[key], key)
            if not torch.equal(disk, ours.to(dtype)):
                raise UserError(f"merge check failed: {written[key]} does not hold the merged "
                                f"{key}; nothing was written")
            src = job.view.untied.get(key, key)
            if key in job.adapter.updates:
                size = max(size, rel(ours, streaming.base_view(read(src), src, job.view)))
            trained = streaming.merged_tensor(key, read, job.adapter, trained_view,
                                              torch.device("cpu")).float()
            gap = max(gap, rel(disk.float(), trained))
    if worst > TENSOR_RTOL:
        raise UserError(f"merge check failed: the streaming merge and peft's merge_and_unload "
                        f"differ by {worst:.3g} (relative) > {TENSOR_RTOL:g}; nothing was written")
    return {"max_tensor_diff": worst, "tensors_checked": len(keys), "update_size": size,
            "weight_gap_to_trained": gap}


# -- verification: probe texts ----------------------------------------------------------------------

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


def _logits_and_free(model, tokenizer, device) -> list[torch.Tensor]:
    logits = probe_logits(model, tokenizer, device)
    del model
    gc.collect()
    return logits


def probe(ck: Checkpoint, model_path: str, job: MergeJob, out: Path, tokenizer,
          device: torch.device) -> tuple[list, list, Optional[list]]:
    """Probe logits of: the merged model (from `out`, computed in fp32); base + adapter unmerged
    with the base in the merge's view; the quantized base + adapter as training loaded it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    policy = str(ck.path / POLICY_DIR)
    trained = None
    quant = trained_quantization(ck)
    if quant != "none":  # the base as training loaded it, in the mode it was trained in
        cfg = dataclasses.replace(ck.cfg, quantization=dataclasses.replace(
            ck.cfg.quantization, mode=quant))
        trained = _logits_and_free(PeftModel.from_pretrained(
            load_base_model(cfg, model_path, device), policy), tokenizer, device)
    base = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, trust_remote_code=ck.cfg.model.trust_remote_code)
    with torch.no_grad():
        for name, p in base.named_parameters():  # deduplicated: a tied tensor once
            p.data = streaming.base_view(p.data, name, job.view)
    want = _logits_and_free(PeftModel.from_pretrained(base.to(device), policy), tokenizer, device)
    merged = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, trust_remote_code=ck.cfg.model.trust_remote_code)
    return _logits_and_free(merged.to(device), tokenizer, device), want, trained
