"""TRL 1.16's GRPOTrainer with a peft LoRA policy: the peer of lora_ppo's GRPO in
benchmarks/bench_vs_trl.py. Runs in the trl116 venv of benchmarks/peers/setup.sh (torch 2.13.0
CPU, trl 1.16.0, and the project's transformers 5.25.0, peft 0.21.2, accelerate 1.16.0, datasets
5.2.0, tokenizers 0.23.3):

    PY=$(bash benchmarks/peers/setup.sh trl116 | awk '/^trl116 /{print $2}')
    $PY benchmarks/peers/trl_grpo.py --workload grpo-fixed --tiny --model-dir DIR --out trl.json

Every setting is set here explicitly, because several GRPOConfig defaults differ from the lora_ppo
run it is compared with (lora_ppo_side.py sets the same values on its side):
  - LoraConfig(r 8, alpha 16, dropout 0, all-linear, no bias) handed to the trainer as
    peft_config, so the reference is the base with the adapter disabled (beta > 0 builds no copy);
  - beta 0.04 (default 0: no KL), loss_type "grpo" (default "dapo": the token mean over the
    batch), scale_rewards "group" (std over the group + 1e-4), epsilon 0.2, num_iterations 1;
  - prompts x n samples per generation, per_device_train_batch_size = the micro-batch,
    gradient_accumulation_steps = samples / micro, so steps_per_generation = GA: one generation
    and one optimizer step per training step, and no old-log-prob forward (TRL runs it only when
    GA is not a multiple of steps_per_generation x num_iterations);
  - temperature 1, top_k 0, top_p 1, min_p None, repetition_penalty 1: no logits processor. The
    run checks that after training (one generate() of TRL's own config: the scores it samples
    from equal the raw logits);
  - lr 1e-5 constant (TrainingArguments decays linearly by default), AdamW, weight decay 0,
    grad-norm clip 1.0;
  - fp32 (GRPOConfig defaults bf16 on), gradient checkpointing only when the workload says so
    (GRPOConfig defaults it on), disable_dropout, no vLLM, no logging, saving or evaluation.

Stop ids: they go into model.generation_config.eos_token_id before the trainer is built; TRL
reads that list for generate() and for the completion mask, which keeps the stop token.

Timing (benchmarks/meters.py, as on lora_ppo's side): a TrainerCallback laps a StepClock at each
step's end, so a step's wall_s runs from the previous step's end (the first from its begin);
rollout_s is the trainer's _generate_and_score_completions (generation, reference forward,
reward), timed by a subclass; update_s is the rest of the step. Generated tokens are counted from
the completion ids the reward function receives (stop token included).
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
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.dont_write_bytecode = True  # this venv's python writes no __pycache__ into the checkout
import meters  # noqa: E402
import workload as wl  # noqa: E402

OFFLINE = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_DISABLED": "true", "ACCELERATE_USE_CPU": "true"}


def grpo_config(w: dict, seed: int, out_dir: str, **extra):
    """Every GRPOConfig field the comparison depends on, set to the lora_ppo run's value (and
    `extra` fields: trl_grpo_tools.py's)."""
    import torch
    from trl import GRPOConfig

    samples = wl.samples_per_step(w)
    return GRPOConfig(
        output_dir=out_dir, use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
        seed=seed, max_steps=w["steps"],
        learning_rate=wl.GRPO["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, optim="adamw_torch", max_grad_norm=1.0,
        per_device_train_batch_size=w["micro"], gradient_accumulation_steps=samples // w["micro"],
        num_generations=w["n"], max_completion_length=w["gen_len"],
        temperature=1.0, top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0,
        beta=wl.GRPO["beta"], loss_type=wl.GRPO["loss_type"], scale_rewards="group",
        epsilon=wl.GRPO["epsilon"], num_iterations=1, mask_truncated_completions=False,
        disable_dropout=True, gradient_checkpointing=w["grad_ckpt"],
        use_vllm=False, use_transformers_continuous_batching=False,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, log_completions=False, dataloader_num_workers=0, **extra)


def sampling_unwarped(trainer, tok, text: str) -> bool:
    """Whether TRL samples from the raw softmax: one generate() with the trainer's own generation
    config, as its rollout calls it; with no logits processor the scores it samples from equal
    the model's logits, bit for bit."""
    import torch
    from trl.models import unwrap_model_for_generation

    with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                     generation_kwargs=trainer.generation_kwargs) as m, \
            torch.no_grad():
        enc = tok([text], return_tensors="pt").to(m.device)
        g = m.generate(**enc, generation_config=trainer.generation_config, max_new_tokens=2,
                       output_scores=True, output_logits=True, return_dict_in_generate=True)
    return bool(g.scores) and all(torch.equal(s, lg) for s, lg in zip(g.scores, g.logits))


def step_records(w: dict, laps: list, calls: list, rollout_s: list, begins: list,
                 ends: list) -> list[dict]:
    """One record per step, in workload.summarize's fields: the clock's lap, the rollout's time,
    and what the reward function saw of that step's generation."""
    steps = []
    for k, (lap, call) in enumerate(zip(laps, calls)):
        step_s = ends[k] - begins[k]
        steps.append({"step": k, **lap, "step_s": step_s, "gen_s": None,
                      "rollout_s": rollout_s[k], "update_s": step_s - rollout_s[k],
                      "samples": call["samples"], "gen_tokens": sum(call["resp_lens"]),
                      "prompt_tokens": call["samples"] * w["prompt_len"],
                      "resp_lens": call["resp_lens"], "mean_reward": call["mean_reward"]})
        print(f"[trl] step {k}: {lap['wall_s']:.2f}s (rollout {rollout_s[k]:.2f}s, update "
              f"{step_s - rollout_s[k]:.2f}s) tokens {steps[-1]['gen_tokens']} reward "
              f"{call['mean_reward']:+.4f} other-load {lap['other_cpu_load']:.2f}",
              file=sys.stderr, flush=True)
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = wl.side_parser(__doc__.splitlines()[0], "a grpo-* name of workload.WORKLOADS, or JSON")
    a = ap.parse_args(argv)
    w = wl.resolve(a.workload, a.steps, a.tiny)
    samples = wl.samples_per_step(w)
    if w["algo"] != "grpo" or samples % w["micro"]:
        raise SystemExit(f"trl_grpo.py runs GRPO workloads whose micro-batch divides prompts x n: {w}")
    warnings.filterwarnings("ignore")
    for k, v in OFFLINE.items():
        os.environ.setdefault(k, v)

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

    # TRL's own default processing class truncates from the left
    tok = AutoTokenizer.from_pretrained(a.model_dir, truncation_side="left")
    stops = wl.stop_ids(tok, w["stop_ids"])
    texts = wl.make_prompts(tok, w, a.seed)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    with torch.no_grad():  # safetensors are mapped lazily: make the weights resident first
        for prm in model.parameters():
            prm.sum()
    rss["after_model_load_mib"] = meters.maxrss_mib()
    if stops:
        model.generation_config.eos_token_id = [tok.eos_token_id, *stops]

    calls = []  # one per generation: what the reward function saw

    def even(prompts, completions, completion_ids, **kw):
        calls.append({"samples": len(completion_ids),
                      "resp_lens": [len(c) for c in completion_ids]})
        r = wl.even(prompts, completions, completion_ids)
        calls[-1]["mean_reward"] = sum(r) / len(r)
        return r

    clock, laps, begins, ends = meters.StepClock(), [], [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            begins.append(time.perf_counter())
            if not laps and len(begins) == 1:
                clock.start()

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            laps.append({**clock.lap(), "maxrss_mib": meters.maxrss_mib()})

    rollout_s = []

    class TimedGRPOTrainer(GRPOTrainer):
        """Times the rollout (generation, reference forward, reward) of each step."""

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            rollout_s.append(time.perf_counter() - t0)
            return out

    out_dir = tempfile.mkdtemp(prefix="trl-grpo-")  # nothing is written there (save_strategy no)
    cfg = grpo_config(w, a.seed, out_dir)
    lora = LoraConfig(r=wl.GRPO["lora_r"], lora_alpha=2 * wl.GRPO["lora_r"], lora_dropout=0.0,
                      bias="none", target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = TimedGRPOTrainer(model=model, reward_funcs=even, args=cfg,
                               train_dataset=datasets.Dataset.from_dict({"prompt": texts}),
                               processing_class=tok, peft_config=lora, callbacks=[Clock()])
    # what the comparison relies on, checked rather than assumed
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config
    assert cfg.steps_per_generation == cfg.gradient_accumulation_steps
    assert cfg.generation_batch_size == samples
    assert sorted(trainer.eos_token_ids) == sorted([tok.eos_token_id, *stops])
    n_total = sum(p.numel() for p in trainer.model.parameters())
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    trainer.train()
    if not len(calls) == len(rollout_s) == len(laps) == w["steps"]:
        raise SystemExit(f"expected {w['steps']} generations and steps, got reward calls "
                         f"{len(calls)}, rollouts {len(rollout_s)}, steps {len(laps)}")

    unwarped = sampling_unwarped(trainer, tok, texts[0])

    steps = step_records(w, laps, calls, rollout_s, begins, ends)
    shutil.rmtree(out_dir, ignore_errors=True)
    rss["peak_mib"] = meters.maxrss_mib()
    summary = wl.summarize(steps, rss["after_model_load_mib"], rss["peak_mib"])
    summary["fixed_length_exact"] = all(n == w["gen_len"] for s in steps for n in s["resp_lens"])
    summary["sampling_unwarped"] = unwarped
    res = {
        "side": "trl", "tool": "trl GRPOTrainer + peft",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__, "peft": peft.__version__,
                     "datasets": datasets.__version__},
        "torch_threads": torch.get_num_threads(), "workload": w,
        "settings": {"loss_type": cfg.loss_type, "scale_rewards": cfg.scale_rewards,
                     "beta": cfg.beta, "num_iterations": cfg.num_iterations,
                     "steps_per_generation": cfg.steps_per_generation,
                     "generation_batch_size": cfg.generation_batch_size,
                     "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                     "per_device_train_batch_size": cfg.per_device_train_batch_size,
                     "gradient_checkpointing": cfg.gradient_checkpointing, "bf16": cfg.bf16,
                     "lr_scheduler_type": str(cfg.lr_scheduler_type),
                     "eos_token_ids": trainer.eos_token_ids, "reference": "adapter disabled"},
        "model": {"params_total": n_total, "params_trainable": n_train},
        "prompts": {"count": len(texts), "sha": wl.digest(texts)},
        "rss": rss, "summary": summary, "steps": steps,
        "wall_s": time.perf_counter() - T_START}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"[trl {trl.__version__}] {summary['gen_tokens_per_s']:.1f} generated tokens/s, peak RSS "
          f"{summary['rss_above_load_mib']:.0f} MiB above load, unwarped sampling {unwarped}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
