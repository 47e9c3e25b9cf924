"""Shared fixtures: a tiny Llama built locally (no hub), CPU DeepSpeed, quiet libraries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny models are dominated by per-op overhead: one thread is faster than two here, and leaves
# the other core to the CLI subprocesses that many tests start (they get OMP_NUM_THREADS=1 too).
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def restore_env():
    """A module whose tests train in this process (train -> setup_distributed() writes RANK,
    MASTER_PORT, ...) uses this, so later modules get a clean environment."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _unpatched_linear():
    """A ZeRO-3 engine replaces torch.nn.functional.linear for the rest of the process
    (DeepSpeed's memory-efficient linear, "persists unless manually reset"); put it back after
    each test, so a later test does not run DeepSpeed's linear (bf16 results then depended on
    whether a ZeRO-3 test ran earlier)."""
    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama (vocab 512, hidden 64) and its locally trained tokenizer."""
    from lora_ppo.builtin.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def wide_model_dir(tmp_path_factory) -> Path:
    """Linear layers dominate the size (hidden 256), so quantization shows in the footprint."""
    from lora_ppo.builtin.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("wide") / "model", hidden_size=256,
                            intermediate_size=512, num_heads=4, num_kv_heads=4)


@pytest.fixture(scope="session")
def peaked_model_dir(tmp_path_factory) -> Path:
    """The tiny model with its LM head scaled by 10. With transformers' 0.02-std init every logit
    of the tiny model is within ~0.2 of 0 (a near-uniform next-token distribution that LoRA on
    the trunk can barely move); scaled, the distribution is peaked and a reward on which tokens
    are sampled is learnable in a few updates."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_ppo.builtin.tiny import build_tiny_model

    out = build_tiny_model(tmp_path_factory.mktemp("peaked") / "model")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def low_ids_reward(tmp_path_factory) -> str:
    """`file.py:low_ids`, a reward function: the share of generated tokens from a fixed subset of
    the vocabulary (ids < 64), a signal any tiny model can learn from."""
    path = tmp_path_factory.mktemp("reward") / "reward.py"
    path.write_text(
        "def low_ids(prompts, completions, completion_ids, **kw):\n"
        "    return [sum(t < 64 for t in ids) / max(len(ids), 1) for ids in completion_ids]\n")
    return f"{path}:low_ids"
