"""Helpers for tests that run the real CLI."""

from __future__ import annotations

import os
import re
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
                     dropout: float = 0.0, targets="all-linear", **lora) -> Path:
    """A real PEFT LoRA adapter (random B, so it changes the model) saved with save_pretrained,
    plus a score head when `head` (the layout of a reward adapter). `dropout` is the
    lora_dropout written into its adapter_config.json, as SFT recipes often leave it. `lora`:
    more LoraConfig fields (use_dora, lora_bias, use_rslora, modules_to_save, ...); every
    lora_B (a lora_bias's bias too) gets std 0.2, and a DoRA magnitude stays the norm of the
    base weight it was made from, so m / ||W + s B A|| differs from 1."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                 target_modules=targets, **lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
            elif "modules_to_save" in name:  # a trained copy: not the base's any more
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(out)
    if head:
        h = base.config.hidden_size
        save_file({"weight": torch.randn(1, h), "bias": torch.zeros(1)},
                  str(out / "score_head.safetensors"))
    return out


def tiny_config(model_dir: Path, out_dir: Path, *overrides: str):
    """A Config for tests: tiny sizes, fp32, no quantization unless overridden; the built-in
    prompts, SFT and preference data and the sentiment reward unless overridden, their
    `builtin:` names turned into files as the CLI does."""
    from lora_ppo.builtin.specs import resolve_builtins
    from lora_ppo.config.load import load_config

    base = [f"model.path={model_dir}", f"output_dir={out_dir}", "quantization.mode=none",
            "data.prompts=builtin:reviews", "sft.data=builtin:reviews",
            "reward_model.data=builtin:preferences",
            "reward.function=lora_ppo.builtin.rewards:positive_sentiment",
            "model.gradient_checkpointing=false", "model.max_prompt_length=16",
            "lora.r=4", "lora.alpha=8", "rollout.prompts_per_update=8", "rollout.generation_batch_size=8",
            "rollout.max_new_tokens=6", "ppo.minibatch_size=8", "ppo.micro_batch_size=4",
            "ppo.total_updates=2", "ppo.epochs=1", "deepspeed.config=zero0",
            "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0"]
    return resolve_builtins(load_config(None, base + list(overrides)))


def two_rank_yaml(path: Path, model_dir: Path, out: Path, reward: str, *,
                  checkpoint_every: int = 0, **ppo) -> Path:
    """A PPO config for the two-rank launcher tests: tiny sizes, ZeRO-2, fp32; `ppo` entries
    override the ppo section (total_updates, epochs, optim, ...)."""
    return write_yaml(path, {
        "output_dir": str(out),
        "model": {"path": str(model_dir), "gradient_checkpointing": False,
                  "max_prompt_length": 16},
        "quantization": {"mode": "none"}, "lora": {"r": 4, "alpha": 8},
        "reward": {"function": reward}, "data": {"prompts": "builtin:reviews"},
        "rollout": {"prompts_per_update": 8, "generation_batch_size": 8, "max_new_tokens": 6},
        "ppo": {"total_updates": 2, "epochs": 1, "minibatch_size": 4, "micro_batch_size": 2,
                **ppo},
        "deepspeed": {"config": "zero2"}, "logging": {"progress": False, "tensorboard": False},
        "checkpoint": {"every": checkpoint_every, "keep": 2}})


def run_two_ranks(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus 2 ARGS` on CPU ranks (gloo) on a free port; asserts success."""
    from lora_ppo.runtime.dist import shm_buffer

    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    port = str(free_port())
    res = subprocess.run([launcher, "--num_gpus", "2", "--master_port", port, *args],
                         capture_output=True, text=True, timeout=timeout, env=clean_env(),
                         cwd=REPO)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    # DeepSpeed's CPU all-reduce segments are gone with the run (runtime/dist.py)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    assert not [r for r in (0, 1) if os.path.exists(shm_buffer(r, env))]
    return res


def train_on_two_ranks(cfg: Path, dump: Path, timeout: int = 600) -> tuple[dict, dict]:
    """Train under the launcher with tests/ds_worker.py; each rank's trainable weights and step."""
    import torch

    dump.mkdir(exist_ok=True)
    run_two_ranks(str(REPO / "tests" / "ds_worker.py"), str(cfg), str(dump), timeout=timeout)
    r0, r1 = (torch.load(dump / f"rank{i}.pt") for i in (0, 1))
    return r0, r1


def update_with(run, ro, generator):
    """The loop's step 4 (ppo/loop.py::update) on `ro` with `generator` shuffling the minibatches
    and the run's KL coefficient."""
    from lora_ppo.ppo.update import ppo_update

    rollout = run.cfg.rollout
    return ppo_update(run.engine, run.ac, ro, ppo=run.cfg.ppo, algorithm=run.cfg.algorithm,
                      temperature=rollout.temperature, max_new_tokens=rollout.max_new_tokens,
                      chunk_rows=run.chunk_rows, generator=generator, kl_coef=run.kl_ctl.value)


# -- runs that are stopped and resumed ----------------------------------------------------------

VOLATILE = ("time/", "memory/", "tokens_per_s")  # wall-clock and RSS differ between runs


def resume_yaml(path: Path, model_dir: Path, reward: str) -> Path:
    """A tiny fp32 PPO run (ZeRO-2, adaptive KL and score normalisation, so that every piece of
    state matters) whose file asks for 8 prompts per update and 200 updates: the command
    line changes both."""
    return write_yaml(path, {
        "output_dir": str(path.parent / "unused"), "seed": 5,
        "model": {"path": str(model_dir), "gradient_checkpointing": False,
                  "max_prompt_length": 16},
        "quantization": {"mode": "none"}, "lora": {"r": 4, "alpha": 8},
        "reward": {"function": reward, "normalize": True},
        "data": {"prompts": "builtin:reviews"},
        "rollout": {"prompts_per_update": 8, "generation_batch_size": 8, "max_new_tokens": 6},
        "ppo": {"epochs": 1, "minibatch_size": 2, "micro_batch_size": 2, "adaptive_kl": True,
                "target_kl": 0.01, "optim": {"learning_rate": 0.01}},
        "deepspeed": {"config": "zero2"},
        "logging": {"progress": False, "tensorboard": False},
        "checkpoint": {"every": 0, "keep": 3}})


def metrics_of(out: Path) -> list[dict]:
    """metrics.jsonl's rows without what differs between identical runs (time, memory)."""
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def weights(out: Path, step: int) -> dict:
    """The policy adapter's and value head's tensors of a PPO run's checkpoint step-<step>."""
    from safetensors.torch import load_file

    ck = out / "checkpoints" / f"step-{step}"
    return {**load_file(ck / "policy/adapter_model.safetensors"),
            **load_file(ck / "value/value_head.safetensors")}


def assert_same_run(a: Path, b: Path, step: int) -> None:
    """Two PPO runs ended bit for bit alike: weights at `step` (torch.equal) and metrics."""
    import torch

    wa, wb = weights(a, step), weights(b, step)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert metrics_of(a) == metrics_of(b)




def documented_metrics() -> list[re.Pattern]:
    """Every name docs/metrics.md documents (a row may name several: `a`, `b`), `<name>` a
    placeholder for one path segment (a source's kind, a function's or environment's name)."""
    text = (REPO / "docs" / "metrics.md").read_text()
    names = [n for row in re.findall(r"^\| (`[^|]+)\|", text, flags=re.M)
             for n in re.findall(r"`([^`]+)`", row)]
    return [re.compile(re.sub(r"<[a-z_]+>", "[^/]+", re.escape(n).replace(r"\<", "<")
                              .replace(r"\>", ">")) + "$") for n in names]


def undocumented_metrics(row) -> list[str]:
    """The names of a metrics row that docs/metrics.md does not document."""
    documented = documented_metrics()
    return [k for k in row if not any(p.match(k) for p in documented)]


def scored_drawn(run, prompts, drawn, temperature: float):
    """One scoring forward over the trajectories a multi-turn `sample` drew (a Drawn): the
    log-probs it gives every response token, and the action mask (the model's own tokens)."""
    import torch

    from lora_ppo.generation.samples import left_pad

    query_ids, query_mask = left_pad(prompts, run.tokenizer.pad_token_id)
    response_mask = (torch.arange(drawn.tokens.shape[1])[None] < drawn.length[:, None]).float()
    with torch.no_grad():
        run.ac.eval()
        lp, _, _ = run.ac(query_ids, query_mask, drawn.tokens, response_mask,
                          temperature=temperature, chunk_size=64, with_values=False)
    return lp, response_mask * (1 - drawn.env_mask.float())
