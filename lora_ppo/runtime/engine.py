"""The DeepSpeed engine: built over the trainable parameters, with the LR schedule.

DeepSpeed owns ZeRO, mixed precision, gradient accumulation and clipping; lora_ppo translates
the training config into a DeepSpeed config (ds_config.py) and builds the engine here. The loops
then call `engine(...)` for every training forward, `engine.backward(loss)` once per micro-batch
and `engine.step()` after each; DeepSpeed applies the optimizer (and steps the LR scheduler) only
at accumulation boundaries. Launch and ranks: dist.py.

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
import logging
import math
import sys
from collections.abc import Iterator

import torch

from lora_ppo.errors import UserError

logger = logging.getLogger(__name__)


SCHEDULES = ("constant", "linear", "cosine")


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


def create_engine(model: torch.nn.Module, *, ds_config: dict, optim, total_steps: int):
    """deepspeed.initialize with a client AdamW over the trainable parameters only.

    A client torch.optim.AdamW (a ZeRO-supported optimizer, runtime/zero/utils.py) avoids
    compiling DeepSpeed's FusedAdam/CPUAdam C++ ops; with ZeRO-Offload DeepSpeed accepts it only
    when the config sets "zero_force_ds_cpu_optimizer": false (ds_configs/zero2_offload.json).
    `optim` is the section's OptimConfig (learning rate, weight decay, schedule, warmup) and
    `total_steps` the optimizer steps of the whole run. Returns the DeepSpeedEngine;
    `engine.module` is `model`.
    """
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters; check the LoRA target modules")
    optimizer = torch.optim.AdamW(params, lr=optim.learning_rate, weight_decay=optim.weight_decay)
    scheduler = make_lr_scheduler(optimizer, schedule=optim.lr_schedule,
                                  warmup_steps=optim.warmup_steps, total_steps=total_steps)
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
def gathered_trainable(engine_or_model) -> Iterator[None]:
    """The trainable weights (adapters, heads) whole inside the block under ZeRO-3, for what
    checkpoints and outputs write; a no-op otherwise. The frozen base stays partitioned: a
    gather of every parameter would bring the whole model onto each device, which is what
    ZeRO-3 is there to avoid (generation and scoring let ZeRO-3 fetch layer by layer).

    Read-only gather (modifier_rank=None): changes made inside are discarded on exit.
    ZeRO-3 marks the parameters it partitions with `ds_id`, the same test DeepSpeed uses.
    """
    deepspeed = sys.modules.get("deepspeed")  # no engine and no ZeRO-3 if it was never imported
    module = engine_or_model
    if deepspeed is not None and isinstance(module, deepspeed.DeepSpeedEngine):
        module = module.module
    params = [p for p in module.parameters() if p.requires_grad]
    if deepspeed is None or not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    with deepspeed.zero.GatheredParameters(params):
        yield
