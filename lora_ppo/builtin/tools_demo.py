"""`lora-ppo demo --preset tools` (presets/tools.yaml): an agent that learns to use its tool.

The task (builtin/calculator.py) is two-digit arithmetic, which the built-in `tools` model
cannot do from its head; the `calculate` tool can. Every stage runs on one small local model:

    stage 0. base model   a Qwen 2.5-style chat model (builtin/chat.py) pre-trained on
                          arithmetic answered from its head and on calls of another tool
                          (`lookup`), built and cached once
    stage 1. SFT          a LoRA adapter on a few hundred calculator transcripts (the loss on
                          the assistant's turns only; LoRA on the LM head too), on the
                          unquantized base (at hidden size 128, 4 bits move the logits ~3 nats)
    stage 2. GRPO         from the SFT adapter: rollout.environment=Calculator, the reward
                          `calculator.correct` (no reward model, no critic)
    stage 3. PPO          the same from the SFT adapter with a critic (GAE, a value head on the
                          policy's adapter), one sample per prompt; skipped with run_tools_demo(critic=False)

After each stage the model is merged into the base and checked on the held-out
problems (never trained on) with plain transformers and a tool loop of its own
(builtin/tool_check.py): greedy accuracy and tool calls per problem, base -> SFT -> GRPO -> PPO.
At the preset's settings RL raises it (SFT 0.68 -> GRPO 0.95, PPO 0.995; docs/agents.md).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from lora_ppo.builtin import calculator
from lora_ppo.builtin.demo import claim_output_dir, say, summarize
from lora_ppo.builtin.specs import resolve_builtins
from lora_ppo.builtin.tool_check import ToolCheck, tool_accuracy
from lora_ppo.config import Config
from lora_ppo.io import checkpoint as ckpt
from lora_ppo.io.export import merge
from lora_ppo.ppo.loop import train
from lora_ppo.stages.sft import train_sft


def merge_adapter(base: str, adapter: Path, out: Path) -> Path:
    """The PEFT adapter `adapter` merged into the fp32 base `base` (peft's merge_and_unload),
    saved with the base's tokenizer to `out`: what `AutoModelForCausalLM` loads."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def _rl_stage(cfg: Config, out: Path, adapter: Path, critic: bool) -> tuple[Path, dict]:
    """GRPO (critic=False) or PPO with a critic from the SFT adapter; returns the merged export
    and the run's first/last scores (demo.summarize)."""
    if critic:  # GAE with a value head on the policy's trunk (value.mode auto), one sample
        # per prompt: as many samples per update as GRPO's groups hold
        n = cfg.rollout.samples_per_prompt
        cfg = dataclasses.replace(
            cfg, ppo=dataclasses.replace(cfg.ppo, advantage_estimator="gae"),
            rollout=dataclasses.replace(cfg.rollout, samples_per_prompt=1,
                                        prompts_per_update=cfg.rollout.prompts_per_update * n))
    cfg = dataclasses.replace(cfg, output_dir=str(out),
                              model=dataclasses.replace(cfg.model, init_adapter=str(adapter)))
    train(cfg, overwrite=True)
    merge(ckpt.find(out, "latest"), out / "merged", dtype="fp32", force=True)
    return out / "merged", summarize(out / "metrics.jsonl")


def run_tools_demo(cfg: Config, overwrite: bool = False, critic: bool = True,
                   n_heldout: int = calculator.HELDOUT_N) -> dict:
    """Run the pipeline (module doc); returns a summary, also written to
    <output_dir>/demo_summary.json."""
    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    claim_output_dir(out, overwrite)
    rows = calculator.heldout_prompts(n_heldout)
    checks: dict[str, ToolCheck] = {}
    seconds: dict[str, float] = {}

    def check(name: str, model_dir) -> None:
        checks[name] = tool_accuracy(str(model_dir), rows, max_calls=cfg.rollout.max_tool_calls)
        say(f"held-out, {name}: accuracy {checks[name].accuracy:.2f}, tool calls per problem "
             f"{checks[name].call_frequency:.2f}")

    n_stages = 3 if critic else 2
    say(f"stage 0/{n_stages}: base model (built and pre-trained once, then cached)")
    cfg = resolve_builtins(cfg)
    check("base", cfg.model.path)
    seconds["model"] = time.perf_counter() - t0

    say(f"stage 1/{n_stages}: SFT on {cfg.sft.data}: tool-calling transcripts")
    adapter = train_sft(dataclasses.replace(cfg, output_dir=str(out / "sft")), overwrite=True)
    check("SFT", merge_adapter(cfg.model.path, adapter, out / "sft" / "merged"))
    seconds["sft"] = time.perf_counter() - t0 - sum(seconds.values())

    runs = {}
    for stage, (name, with_critic) in enumerate([("GRPO", False), ("PPO", True)][:n_stages - 1]):
        say(f"stage {stage + 2}/{n_stages}: {name} from the SFT adapter, environment "
             f"{cfg.rollout.environment}, reward {cfg.reward.function}"
             + (", a critic (GAE), 1 sample per prompt" if with_critic else
                f", {cfg.rollout.samples_per_prompt} samples per prompt, no critic"))
        merged, runs[name] = _rl_stage(cfg, out / name.lower(), adapter, with_critic)
        check(name, merged)
        seconds[name.lower()] = time.perf_counter() - t0 - sum(seconds.values())
    seconds["total"] = time.perf_counter() - t0
    summary = {"preset": "tools", "heldout": {"problems": len(rows), "greedy": True,
                                              "max_tool_calls": cfg.rollout.max_tool_calls},
               "accuracy": {k: c.accuracy for k, c in checks.items()},
               "tool_calls_per_problem": {k: c.call_frequency for k, c in checks.items()},
               "runs": runs, "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    tmp = out / "demo_summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "demo_summary.json")
    say(f"held-out accuracy on {len(rows)} problems (greedy; merged models loaded with plain "
         "transformers, a tool loop of their own):")
    for name, c in checks.items():
        say(f"  {name:5s} accuracy {c.accuracy:.2f}   tool calls per problem "
             f"{c.call_frequency:.2f}")
    say(f"took {seconds['total']:.0f} s; outputs: {out}/sft, "
         + ", ".join(f"{out}/{n.lower()}" for n in runs) + " (each with merged/)")
    return summary
