"""Run by tests under the real `deepspeed` launcher: train, then dump this rank's trainable
weights so the test can compare ranks. Usage: ds_worker.py CONFIG OUT_DIR [overrides...]"""

import sys
from pathlib import Path

import torch

from lora_ppo.builtin.specs import resolve_builtins
from lora_ppo.cli import _quiet
from lora_ppo.config.load import load_config
from lora_ppo.ppo.loop import train
from lora_ppo.runtime.dist import shutdown_distributed

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    _quiet()
    run = train(resolve_builtins(load_config(args[0], args[2:])))
    weights = {n: p.detach().float().cpu() for n, p in run.ac.named_parameters() if p.requires_grad}
    torch.save({"weights": weights, "step": run.step, "world_size": run.dist.world_size},
               Path(args[1]) / f"rank{run.dist.rank}.pt")
    shutdown_distributed()
