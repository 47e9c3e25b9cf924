"""The thin DeepSpeed layer: launch, config filling, the engine, and the LR schedule.

DeepSpeed owns ZeRO, mixed precision, gradient accumulation and clipping; this module only
translates the training config into a DeepSpeed config and builds the engine. The training loop
then calls `engine.backward(loss)` once per micro-batch and `engine.step()` after each; DeepSpeed
applies the optimizer (and steps the LR scheduler) only at accumulation boundaries.

One switch, not a second code path (cf. nanoGPT's `ddp = int(os.environ.get('RANK', -1)) != -1`):
a plain `python -m lora_ppo ...` is a world of size 1 that goes through exactly the same
`deepspeed.initialize` as a multi-rank `deepspeed`/`torchrun` launch.

What DeepSpeed 0.19 does to the module in `deepspeed.initialize` (runtime/engine.py,
`_configure_distributed_model`), which matters for a frozen (maybe bitsandbytes) base + LoRA:

* fp16/bf16 enabled: every parameter whose dtype is fp16/bf16/fp32/fp64 is cast to the training
  dtype (`_cast_module_mixed_precision`; no longer a blanket `module.bfloat16()`). Integer
  parameters - bitsandbytes' packed uint8 4-bit and int8 8-bit weights - are skipped, so a
  quantized base survives. Trainable fp32 LoRA weights *are* cast to bf16 in the module; the fp32
  master copy lives in DeepSpeed's bf16/ZeRO optimizer, which updates it and copies it back.
  Buffers keep their dtype (rotary `inv_freq` stays fp32).
* fp32: nothing is cast.
* Then `module.to(device)` and `_broadcast_model()`: every parameter, frozen ones included, is
  broadcast from rank 0 as raw bytes (`p.data.view(torch.uint8)`), so any dtype survives; all
  ranks load the same checkpoint anyway, so this only costs one copy of the base at start-up.
* Only parameters in the optimizer (here: `requires_grad=True`) get gradients reduced, ZeRO
  partitions of optimizer state, and clipping; frozen ones are never touched by the optimizer.
  ZeRO-3 is the exception: it partitions *every* module parameter (see `refuse_unsupported`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lora_ppo.errors import UserError

logger = logging.getLogger(__name__)

# The repo's ds_configs/ (a checkout or an editable install); a wheel installs the same files
# under <prefix>/share/lora_ppo/ds_configs (pyproject's data-files).
DS_CONFIG_DIR = next((d for d in (Path(__file__).resolve().parents[1] / "ds_configs",
                                  Path(sys.prefix) / "share" / "lora_ppo" / "ds_configs")
                      if d.is_dir()), Path(__file__).resolve().parents[1] / "ds_configs")



def training_source(section: str = "ppo", batch_key: str = "minibatch_size") -> dict[str, str]:
    """The training-config field each DeepSpeed key comes from, named in contradiction errors."""
    micro, batch = f"{section}.micro_batch_size", f"{section}.{batch_key}"
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": f"{batch}/{micro}",
        "train_batch_size": f"{batch} * world_size",
        "gradient_clipping": f"{section}.max_grad_norm",
        "bf16.enabled": "deepspeed.precision",
        "fp16.enabled": "deepspeed.precision",
    }


# Keys where DeepSpeed itself understands "auto"; any other "auto" left after filling is an error.
_DS_OWN_AUTO = {"data_types.keep_in_fp32_modules"}
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("constant", "linear", "cosine")


class DistInfo(NamedTuple):
    """Where this process sits in the (possibly size-1) world."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _use_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


def shutdown_distributed(code: int = 0) -> int:
    """End this process's part in a multi-rank run; returns `code` when there is no such run.

    Under a launcher with several ranks, a CPU rank that had finished its work (outputs written
    and closed) sometimes aborted at interpreter exit ("terminate called without an active
    exception", exit -6: a C++ thread of torch's distributed runtime destroyed while joinable),
    and the launcher then reported the whole run as failed. Destroying the process group first
    was not enough (1 failure in ~15 runs of tests/test_engine.py's launcher test), so a rank of
    a multi-rank run leaves with os._exit after flushing its streams, skipping the static
    destructors. A single process is left alone, its group too: in-process callers (tests, a
    notebook) go on using it, and DeepSpeed keeps a reference to it.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return code
    if torch.distributed.get_world_size() == 1:
        return code
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def setup_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed; idempotent; call before importing deepspeed.

    Under the `deepspeed` launcher or `torchrun`, RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* come from
    the environment (the `--local_rank=N` argument the deepspeed launcher also passes is ignored
    by the CLI; LOCAL_RANK carries the same number). A plain process gets a world of size 1.
    """
    if not torch.cuda.is_available() and "DS_ACCELERATOR" not in os.environ:
        # DeepSpeed picks its accelerator once, at import; without this it probes for CUDA/XPU/...
        # and warns. Set only when unset, so a user's choice wins.
        os.environ["DS_ACCELERATOR"] = "cpu"
        logger.info("no CUDA device: running DeepSpeed on CPU (DS_ACCELERATOR=cpu), backend gloo")
    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                          RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    missing = [k for k in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if k not in os.environ]
    if missing:
        raise UserError(f"RANK is set but {', '.join(missing)} is not; launch with `deepspeed` "
                        "or `torchrun`, or unset RANK for a single process")

    import deepspeed

    use_cuda = _use_cuda()
    local_rank = int(os.environ["LOCAL_RANK"])
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(torch.distributed.get_rank(), local_rank, torch.distributed.get_world_size(),
                    device)


def world_size() -> int:
    """Ranks in the process group (1 without one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: list[float]) -> list[float]:
    """Sum of each value over ranks, in float64 (the values themselves with one rank)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def all_mean(values: list[float]) -> list[float]:
    """Mean of each value over ranks (the values themselves with one rank)."""
    return [v / world_size() for v in all_sum(values)]


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks of a (B, ...) tensor of the same shape on every rank."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


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
                   max_grad_norm: float, precision: str, source: str, section: str = "ppo",
                   batch_key: str = "minibatch_size") -> dict:
    """A copy of `raw` with the keys the training config decides set from it.

    Each key is set whether it is "auto" or missing (a missing gradient_accumulation_steps would
    silently default to 1 in DeepSpeed); an explicit value must agree or we raise UserError.
    train_batch_size = micro_batch_size * grad_accum_steps * world_size (DeepSpeed checks this
    identity itself). max_grad_norm <= 0 means no clipping, which DeepSpeed writes as 0.
    The optimizer and scheduler come from the training config (`create_engine`), so a DeepSpeed
    "optimizer"/"scheduler" block, which DeepSpeed would silently ignore, is refused.
    `section`/`batch_key` only name the training-config fields in errors (e.g. "sft",
    "batch_size" for the supervised stages).
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
                            f"{training_source(section, batch_key)[key]} = {shown}; "
                            "write \"auto\" or change one of them")
        node[leaf] = expected
    left = [p for p in _auto_paths(out) if p not in _DS_OWN_AUTO]
    if left:
        raise UserError(f"{source}: {', '.join(left)} is \"auto\" but lora_ppo only fills "
                        f"{', '.join(wanted)}; write a value")
    return out


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


def make_lr_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, warmup_steps: int,
                      total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LR multiplier per optimizer step s: linear warmup s/warmup_steps, then the schedule.

    Same formulas as transformers' get_{constant,linear,cosine}_schedule_with_warmup
    (transformers/optimization.py): the multiplier is 0 at s=0 when warmup_steps > 0,
    "linear" reaches 0 at s=total_steps, "cosine" is 0.5*(1+cos(pi*progress)) with
    progress = (s - warmup_steps)/(total_steps - warmup_steps), also 0 at total_steps.
    DeepSpeed calls scheduler.step() once per optimizer step (engine._take_model_step), i.e. at
    accumulation boundaries, so s counts optimizer steps, not micro-batches.
    """
    if schedule not in SCHEDULES:
        raise UserError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}; pick one")
    if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
        raise UserError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got "
                        f"warmup_steps={warmup_steps}, total_steps={total_steps}; fix them")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


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


def create_engine(model: torch.nn.Module, *, ds_config: dict, lr: float, weight_decay: float,
                  schedule: str, warmup_steps: int, total_steps: int):
    """deepspeed.initialize with a client AdamW over the trainable parameters only.

    A client torch.optim.AdamW (a ZeRO-supported optimizer, runtime/zero/utils.py) avoids
    compiling DeepSpeed's FusedAdam/CPUAdam C++ ops; with ZeRO-Offload DeepSpeed accepts it only
    when the config sets "zero_force_ds_cpu_optimizer": false (ds_configs/zero2_offload.json).
    Returns the DeepSpeedEngine; `engine.module` is `model`.
    """
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters; check the LoRA target modules")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = make_lr_scheduler(optimizer, schedule=schedule, warmup_steps=warmup_steps,
                                  total_steps=total_steps)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                      lr_scheduler=scheduler, config=ds_config)
    if optimizer.state:
        # bf16/fp16 at ZeRO stage 0 wraps a client optimizer in FP16_UnfusedOptimizer, whose
        # initialize_optimizer_states() runs one optimizer.step() on zero gradients
        # (deepspeed/runtime/fp16/unfused_optimizer.py). That leaves AdamW at step 1, so the first
        # real update would use step-2 bias correction (~0.74 * lr). A fresh AdamW has no state,
        # and torch re-creates it on the first real step. (Its one decoupled weight decay,
        # w *= 1 - lr * mult(0) * weight_decay, is ~1e-7 and 0 with warmup.) Same bug class:
        # NVIDIA/Megatron-LM#5976, pytorch/torchtitan#4382.
        optimizer.state.clear()
    return engine


@contextlib.contextmanager
def gathered_params(engine_or_model) -> Iterator[None]:
    """Full weights inside the block under ZeRO-3 (for generation); a no-op otherwise.

    Read-only gather (modifier_rank=None): changes made inside are discarded on exit.
    ZeRO-3 marks the parameters it partitions with `ds_id`, the same test DeepSpeed uses.
    """
    deepspeed = sys.modules.get("deepspeed")  # no engine and no ZeRO-3 if it was never imported
    module = engine_or_model
    if deepspeed is not None and isinstance(module, deepspeed.DeepSpeedEngine):
        module = module.module
    params = list(module.parameters())
    if deepspeed is None or not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    with deepspeed.zero.GatheredParameters(params):
        yield
