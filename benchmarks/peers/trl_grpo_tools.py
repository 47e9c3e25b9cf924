"""TRL 1.16's GRPOTrainer with tools (`environment_factory`) and a peft LoRA policy: the peer of
lora_ppo's multi-turn GRPO in benchmarks/bench_vs_trl.py (`--workload grpo-tools`). Runs in the
trl116 venv of benchmarks/peers/setup.sh:

    PY=$(bash benchmarks/peers/setup.sh trl116 | awk '/^trl116 /{print $2}')
    $PY benchmarks/peers/trl_grpo_tools.py --workload grpo-tools --tiny --model-dir DIR --out t.json

Every GRPO setting is trl_grpo.py's (`grpo_config`: LoRA r 8 / alpha 16 / dropout 0 on all linear
layers, beta 0.04, loss "grpo", scale_rewards "group", lr 1e-5 constant, fp32, one optimizer step
per generation, temperature 1 with no logits processor, no vLLM), plus the tools':
  - environment_factory = benchmarks/tools_task.py's Calculator (one instance per sample,
    `reset(**row)` with the row's `answer`), its `calculate` method the one tool;
  - max_tool_calling_iterations = the workload's max_tool_calls (lora_ppo: rollout.max_tool_calls);
  - max_completion_length = gen_len, the whole trajectory's tokens, the model's and the tools'
    (lora_ppo: rollout.max_new_tokens counts the same);
  - reward_funcs = tools_task.correct (the final answer's last number against the row's answer);
  - the prompts: tools_task.prompt_rows (conversational, with `answer`), rendered by TRL with the
    tools' schemas. The model directory's tokenizer carries TRL's own Qwen response template
    (benchmarks/tools_model.py), so TRL parses calls with `parse_response` as it would for Qwen.

Counted per step (what workload.summarize reads): `gen_tokens` are the tokens the model generated
(tool_mask 1, what TRL logs as completions/mean_length), `completion_tokens` those plus the tools'
(tool_mask 0), `prompt_tokens` the rendered prompts', and `tool_rounds` per sample
(tools_task.tool_rounds over the completion messages the reward function receives).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import warnings

T_START = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # this venv's python writes no __pycache__ into the checkout
import meters  # noqa: E402
import tools_task  # noqa: E402
import trl_grpo  # noqa: E402
import workload as wl  # noqa: E402


def step_records(laps: list, gens: list, calls: list, rollout_s: list, begins: list,
                 ends: list) -> list[dict]:
    """One record per step: the clock's lap, the rollout's time, what `_generate` returned and
    what the reward function saw."""
    steps = []
    for k, (lap, gen, call) in enumerate(zip(laps, gens, calls)):
        step_s = ends[k] - begins[k]
        steps.append({"step": k, **lap, "step_s": step_s, "gen_s": None,
                      "rollout_s": rollout_s[k], "update_s": step_s - rollout_s[k], **gen,
                      "samples": len(gen["resp_lens"]), "tool_rounds": call["tool_rounds"],
                      "tool_failures": call["tool_failures"],
                      "mean_reward": call["mean_reward"]})
        print(f"[trl] step {k}: {lap['wall_s']:.2f}s (rollout {rollout_s[k]:.2f}s, update "
              f"{step_s - rollout_s[k]:.2f}s) model tokens {gen['gen_tokens']} all "
              f"{gen['completion_tokens']} rounds/sample "
              f"{sum(call['tool_rounds']) / len(call['tool_rounds']):.2f} reward "
              f"{call['mean_reward']:+.3f} other-load {lap['other_cpu_load']:.2f}",
              file=sys.stderr, flush=True)
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = wl.side_parser(__doc__.splitlines()[0], "grpo-tools, or its JSON")
    a = ap.parse_args(argv)
    w = wl.resolve(a.workload, a.steps, a.tiny)
    if not w.get("tools") or wl.samples_per_step(w) % w["micro"]:
        raise SystemExit(f"trl_grpo_tools.py runs tool workloads whose micro-batch divides "
                         f"prompts x n: {w}")
    warnings.filterwarnings("ignore")
    for k, v in trl_grpo.OFFLINE.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

    import datasets
    import peft
    import torch
    import transformers
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if a.threads:
        torch.set_num_threads(a.threads)
    rss = {"after_import_mib": meters.maxrss_mib()}

    tok = AutoTokenizer.from_pretrained(a.model_dir, truncation_side="left")
    rows = wl.tool_prompt_rows(w, a.seed)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    with torch.no_grad():  # safetensors are mapped lazily: make the weights resident first
        for prm in model.parameters():
            prm.sum()
    rss["after_model_load_mib"] = meters.maxrss_mib()

    calls, gens = [], []  # per generation: what the reward function saw, what _generate made

    def correct(prompts, completions, answer, **kw):
        r = tools_task.correct(completions, answer)
        calls.append({"tool_rounds": [tools_task.tool_rounds(c) for c in completions],
                      "tool_failures": [tools_task.tool_failures(c) for c in completions],
                      "mean_reward": sum(r) / len(r)})
        return r

    clock, laps, begins, ends, rollout_s = meters.StepClock(), [], [], [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            begins.append(time.perf_counter())
            if not laps and len(begins) == 1:
                clock.start()

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            laps.append({**clock.lap(), "maxrss_mib": meters.maxrss_mib()})

    class TimedGRPOTrainer(GRPOTrainer):
        """Times the rollout and counts the tokens of each generation."""

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            rollout_s.append(time.perf_counter() - t0)
            return out

        def _generate(self, prompts):
            out = super()._generate(prompts)
            prompt_ids, completion_ids, tool_mask = out[0], out[1], out[2]
            model_lens = [sum(m) for m in tool_mask] if tool_mask else [len(c) for c in completion_ids]
            gens.append({"gen_tokens": sum(model_lens), "resp_lens": model_lens,
                         "completion_tokens": sum(len(c) for c in completion_ids),
                         "prompt_tokens": sum(len(p) for p in prompt_ids)})
            return out

    out_dir = tempfile.mkdtemp(prefix="trl-grpo-tools-")
    cfg = trl_grpo.grpo_config(w, a.seed, out_dir, max_tool_calling_iterations=w["max_tool_calls"])
    lora = LoraConfig(r=wl.GRPO["lora_r"], lora_alpha=2 * wl.GRPO["lora_r"], lora_dropout=0.0,
                      bias="none", target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = TimedGRPOTrainer(model=model, reward_funcs=correct, args=cfg,
                               train_dataset=datasets.Dataset.from_list(rows),
                               processing_class=tok, peft_config=lora, callbacks=[Clock()],
                               environment_factory=tools_task.Calculator)
    # what the comparison relies on, checked rather than assumed
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config
    assert cfg.steps_per_generation == cfg.gradient_accumulation_steps
    assert [t.__name__ for t in trainer.tools] == ["calculate"]
    assert trainer.chat_template is None  # the template is prefix-preserving: used as it is
    trainer.train()
    if not len(calls) == len(gens) == len(rollout_s) == len(laps) == w["steps"]:
        raise SystemExit(f"expected {w['steps']} generations and steps, got reward calls "
                         f"{len(calls)}, generations {len(gens)}, steps {len(laps)}")
    text = tok.apply_chat_template(rows[0]["prompt"], tools=trainer.tools,
                                   add_generation_prompt=True, tokenize=False)
    unwarped = trl_grpo.sampling_unwarped(trainer, tok, text)

    steps = step_records(laps, gens, calls, rollout_s, begins, ends)
    shutil.rmtree(out_dir, ignore_errors=True)
    rss["peak_mib"] = meters.maxrss_mib()
    summary = wl.summarize(steps, rss["after_model_load_mib"], rss["peak_mib"])
    summary.update(wl.tool_summary(steps), sampling_unwarped=unwarped)
    res = {
        "side": "trl", "tool": "trl GRPOTrainer + environment_factory + peft",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__, "peft": peft.__version__,
                     "datasets": datasets.__version__},
        "torch_threads": torch.get_num_threads(), "workload": w,
        "settings": {"loss_type": cfg.loss_type, "beta": cfg.beta,
                     "max_completion_length": cfg.max_completion_length,
                     "max_tool_calling_iterations": cfg.max_tool_calling_iterations,
                     "generation_batch_size": cfg.generation_batch_size,
                     "per_device_train_batch_size": cfg.per_device_train_batch_size,
                     "gradient_checkpointing": cfg.gradient_checkpointing,
                     "eos_token_ids": trainer.eos_token_ids, "reference": "adapter disabled"},
        "prompts": {"count": len(rows), "sha": wl.digest(rows)},
        "rss": rss, "summary": summary, "steps": steps,
        "wall_s": time.perf_counter() - T_START}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"[trl {trl.__version__}] {summary['gen_tokens_per_s']:.1f} model tokens/s, "
          f"{summary['mean_tool_rounds']:.2f} tool rounds/sample, peak RSS "
          f"{summary['rss_above_load_mib']:.0f} MiB above load", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
