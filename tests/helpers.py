"""Helpers for tests that run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port nothing listens on now, for a launcher's --master_port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    """This environment without the rendezvous variables that an in-process test run of
    setup_distributed() left behind (a child would try to join this process's group)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m lora_ppo ARGS` in a fresh process, as a user would run it."""
    full_env = {**clean_env(), **(env or {})}
    return subprocess.run([sys.executable, "-m", "lora_ppo", *args], capture_output=True,
                          text=True, cwd=cwd or REPO, timeout=timeout, env=full_env)


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_adapter_dir(model_dir: Path, out: Path, seed: int, head: bool = False,
                     dropout: float = 0.0) -> Path:
    """A real PEFT LoRA adapter (random B, so it changes the model) saved with save_pretrained,
    plus a score head when `head` (the layout of a reward adapter). `dropout` is the
    lora_dropout written into its adapter_config.json, as SFT recipes often leave it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                 target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    peft_model.save_pretrained(out)
    if head:
        h = base.config.hidden_size
        save_file({"weight": torch.randn(1, h), "bias": torch.zeros(1)},
                  str(out / "score_head.safetensors"))
    return out


def tiny_config(model_dir: Path, out_dir: Path, *overrides: str):
    """A Config for tests: tiny sizes, fp32, no quantization unless overridden."""
    from lora_ppo.config.load import load_config

    base = [f"model.path={model_dir}", f"output_dir={out_dir}", "quantization.mode=none",
            "model.gradient_checkpointing=false", "model.max_prompt_length=16",
            "lora.r=4", "lora.alpha=8", "rollout.batch_size=8", "rollout.generation_batch_size=8",
            "rollout.max_new_tokens=6", "ppo.minibatch_size=8", "ppo.micro_batch_size=4",
            "ppo.total_updates=2", "ppo.epochs=1", "deepspeed.config=zero0",
            "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0"]
    return load_config(None, base + list(overrides))
