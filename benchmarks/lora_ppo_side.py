"""lora_ppo's side of one benchmarks/bench_vs_trl.py run, in the project's venv and a process of
its own (the driver starts it; benchmarks/gpu_check.py too):

    python benchmarks/lora_ppo_side.py --workload grpo-long --tiny --model-dir DIR --out side.json

It runs `lora_ppo.ppo.run.setup` and then `lora_ppo.ppo.loop.ppo_step` once per step, as `train`
does, with the settings below, each matching what the peer harness of the workload's algorithm
pins on TRL (benchmarks/peers/trl_ppo.py, trl_grpo.py). The prompts, the reward and the summary
come from benchmarks/workload.py and the meters from benchmarks/meters.py, which the peers import
too. The JSON has the same fields as the peers' (`steps`, `summary`, `rss`, `prompts`).

PPO (TRL 0.11.4's PPOTrainer recipe): batch, minibatch = micro-batch, 4 epochs, LoRA r 8 /
alpha 16 on every decoder linear, value head on the shared trunk, adaptive KL from 0.2 in the
reward, lr 1.41e-5, one generation batch; lora_ppo's own defaults for the rest.

GRPO (TRL 1.16's GRPOTrainer): n = rollout.samples_per_prompt, beta 0.04 = ppo.kl_coef (fixed),
the k3 KL in the loss, loss 'grpo' = per-sequence token mean, advantages (r - group mean) /
(group std + 1e-4), clip 0.2, one epoch over one minibatch = the whole rollout (one optimizer
step per generation), LoRA r 8 / alpha 16 / dropout 0 on all linear layers, reference = the base
with the adapter off, AdamW lr 1e-5 constant, no weight decay, grad-norm clip 1.0, temperature 1
on the full softmax.

Both: fp32, unquantized, DeepSpeed zero0, one torch thread (--threads), gradient checkpointing as
the workload says. Memory: RSS once the base model is loaded with every weight resident (the
`on_base_loaded` hook of setup; safetensors are mapped lazily), then the peak over the run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # lora_ppo from this checkout, without installing
sys.path.insert(0, str(HERE))
import meters  # noqa: E402
import tools_task  # noqa: E402
import workload as wl  # noqa: E402

REWARD = f"{HERE / 'workload.py'}:even"
TOOLS = HERE / "tools_task.py"


def common_overrides(w: dict, model_dir: str, out_dir: str, stops: list[int], grad_ckpt: bool,
                     precision: str) -> list[str]:
    return [
        f"model.path={model_dir}", f"output_dir={out_dir}", "quantization.mode=none",
        f"model.gradient_checkpointing={grad_ckpt}", f"model.max_prompt_length={w['prompt_len']}",
        f"rollout.max_new_tokens={w['gen_len']}", f"rollout.stop_token_ids={stops}",
        f"ppo.total_updates={w['steps']}", "deepspeed.config=zero0",
        f"deepspeed.precision={precision}",
        "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0"]


def ppo_overrides(w: dict) -> list[str]:
    r = wl.PPO["lora_r"]
    return [f"lora.r={r}", f"lora.alpha={2 * r}",
            f"rollout.prompts_per_update={w['batch']}", f"rollout.generation_batch_size={w['batch']}",
            f"ppo.minibatch_size={w['mini']}", f"ppo.micro_batch_size={w['mini']}",
            f"ppo.epochs={wl.PPO['epochs']}", f"ppo.optim.learning_rate={wl.PPO['lr']}",
            f"ppo.kl_coef={wl.PPO['init_kl_coef']}", "ppo.adaptive_kl=true"]


def grpo_overrides(w: dict) -> list[str]:
    r, samples = wl.GRPO["lora_r"], w["prompts"] * w["n"]
    return [
        # LoraConfig(r, alpha=2r, dropout 0, all-linear)
        f"lora.r={r}", f"lora.alpha={2 * r}", "lora.dropout=0.0",
        "lora.target_modules=[all-linear]",
        # generation batch = prompts x n, all decoded at once (TRL: one generate() call)
        f"rollout.prompts_per_update={w['prompts']}", f"rollout.samples_per_prompt={w['n']}",
        f"rollout.generation_batch_size={samples}", "rollout.temperature=1.0",
        # GRPO: group advantages (std + 1e-4), beta * k3 KL in the loss, loss_type 'grpo'
        "ppo.advantage_estimator=grpo", f"ppo.kl_coef={wl.GRPO['beta']}",
        "ppo.adaptive_kl=false", "ppo.kl_in=loss", "ppo.kl_estimator=k3",
        "ppo.loss_aggregation=seq_mean_token_mean", "ppo.scale_rewards=group",
        f"ppo.cliprange={wl.GRPO['epsilon']}", "ppo.importance_sampling_level=token",
        "ppo.ent_coef=0.0", "ppo.mask_truncated_completions=false",
        "rollout.dynamic_sampling=false",
        # num_iterations 1, steps_per_generation = GA: one optimizer step per generation
        "ppo.epochs=1", f"ppo.minibatch_size={samples}", f"ppo.micro_batch_size={w['micro']}",
        f"ppo.optim.learning_rate={wl.GRPO['lr']}", "ppo.optim.lr_schedule=constant",
        "ppo.optim.warmup_steps=0", "ppo.optim.weight_decay=0.0", "ppo.optim.max_grad_norm=1.0"]


def tools_overrides(w: dict) -> list[str]:
    """GRPO with tools (TRL's environment_factory, max_tool_calling_iterations): the task's
    environment class, its turn limit; the prompts are rendered with the tools' schemas, so
    model.max_prompt_length is only a bound (TRL 1.16 cuts no prompt)."""
    return [f"rollout.environment={TOOLS}:Calculator",
            f"rollout.max_tool_calls={w['max_tool_calls']}", "model.max_prompt_length=384"]


def prompts_of(w: dict, tok, vocab: int, seed: int):
    """(lora_ppo Prompts, their digest): PPO's random ids, or GRPO's texts as the tokenizer
    encodes them (the ids TRL 1.16 feeds its model)."""
    from lora_ppo.io.data import Prompt

    if w["algo"] == "ppo":
        ids = wl.random_prompt_ids(w, wl.min_prompt_id(tok, w), vocab, seed)
        return [Prompt("", tuple(p)) for p in ids], wl.digest(ids)
    texts = wl.make_prompts(tok, w, seed)
    return [Prompt(t, tuple(tok(t)["input_ids"])) for t in texts], wl.digest(texts)


def step_record(out, stop_ids: list[int]) -> dict:
    """The fields of workload.summarize from one ppo_step's output (lora_ppo.ppo.loop.StepOutput):
    its phases' seconds, the generated tokens (the model's own: the action mask, which leaves
    out the tools' tokens of a trajectory), the reward."""
    ro, sec = out.rollout, out.seconds
    lens = [int(x) for x in ro.response_mask.sum(1).tolist()]
    model_lens = [int(x) for x in ro.action_mask.sum(1).tolist()]
    ends = [int(r[n - 1]) for r, n, e in zip(ro.response_ids.tolist(), lens, ro.has_eos.tolist())
            if e and n]
    return {"gen_s": sec["generation"], "rollout_s": sec["generation"] + sec["scoring"],
            "score_s": sec["scoring"], "update_s": sec["update"], "samples": len(lens),
            "gen_tokens": sum(model_lens), "completion_tokens": sum(lens),
            "prompt_tokens": int(ro.query_mask.sum()),
            "resp_lens": model_lens, "mean_reward": float(ro.raw_scores.mean()),
            "maxrss_mib": meters.maxrss_mib(),
            # a response that stopped ends with its stop id, counted as TRL counts it
            "stop_token_counted": all(e in stop_ids for e in ends),
            "ratio": out.stats.ratio, "kl_coef": out.kl_coef}


def summarize(w: dict, records: list[dict], rss: dict) -> dict:
    """workload.summarize, plus whether every answer reached the cap, whether stop tokens were
    counted, and on a GPU the allocator's peak above the loaded model."""
    summary = wl.summarize(records, rss["after_model_load_mib"], rss["peak_mib"])
    summary["fixed_length_exact"] = all(n == w["gen_len"] for r in records for n in r["resp_lens"])
    summary["stop_token_counted"] = all(r["stop_token_counted"] for r in records)
    if "gpu_after_model_load_mib" in rss:
        summary["gpu_peak_mib"] = max(r["gpu_peak_mib"] for r in records)
        summary["gpu_peak_above_load_mib"] = (summary["gpu_peak_mib"]
                                              - rss["gpu_after_model_load_mib"])
    return summary


def run_side(w: dict, model_dir: str, out: Path, seed: int = 0, threads: int = 1,
             precision: str = "fp32", extra: tuple[str, ...] = ()) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import AutoConfig, AutoTokenizer

    from lora_ppo.config.load import load_config
    from lora_ppo.ppo.collect import sampler_scores
    from lora_ppo.ppo.loop import ppo_step
    from lora_ppo.ppo.run import setup

    rss = {"after_import_mib": meters.maxrss_mib()}
    tok = AutoTokenizer.from_pretrained(model_dir)
    stops = wl.stop_ids(tok, w["stop_ids"])
    tools = bool(w.get("tools"))
    overrides = (common_overrides(w, model_dir, str(out.with_suffix(".run")), stops,
                                  w["grad_ckpt"], precision)
                 + (ppo_overrides(w) if w["algo"] == "ppo" else grpo_overrides(w))
                 + (tools_overrides(w) if tools else [f"reward.function={REWARD}"])
                 + [f"seed={seed}", *extra])
    cfg = load_config(None, overrides)
    cuda = torch.cuda.is_available()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def resident(base):  # weights read once, so that "after load" is not a lazy mapping
        with torch.no_grad():
            for prm in base.parameters():
                prm.sum()
        rss["after_model_load_mib"] = meters.maxrss_mib()
        rss["after_model_load_current_mib"] = meters.rss_mib()
        if cuda:
            sync()
            rss["gpu_after_model_load_mib"] = torch.cuda.memory_allocated() / meters.MIB

    rounds = []  # per reward call: each sample's tool rounds and failed calls (tools_task)

    def correct(completions, answer, **kw):
        rounds.append(([tools_task.tool_rounds(c) for c in completions],
                       [tools_task.tool_failures(c) for c in completions]))
        return tools_task.correct(completions, answer)

    if tools:  # the task's rows, rendered by lora_ppo with the tools' schemas, as TRL does
        rows = wl.tool_prompt_rows(w, seed)
        prompts, sha = None, wl.digest(rows)
        run = setup(cfg, dataset=rows, reward_fn=correct, on_base_loaded=resident)
        if len(run.prompts.prompts) != len(rows):
            raise SystemExit("lora_ppo held some of the prompts out")
    else:
        prompts, sha = prompts_of(w, tok, AutoConfig.from_pretrained(model_dir).vocab_size, seed)
        run = setup(cfg, prompts=prompts, on_base_loaded=resident)
    rss["after_setup_mib"] = meters.maxrss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    records, clock = [], meters.StepClock()
    clock.start()
    for k in range(w["steps"]):
        out_k = ppo_step(run)
        sync()
        lap = clock.lap()
        rec = {"step": k, **lap, **step_record(out_k, run.stop_ids)}
        if tools:
            rec["tool_rounds"], rec["tool_failures"] = rounds[-1]
        sec = out_k.seconds
        if cuda:
            rec["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / meters.MIB
        records.append(rec)
        print(f"[lora_ppo] step {k}: {lap['wall_s']:.2f}s (gen {sec['generation']:.2f}s, score "
              f"{sec['scoring']:.2f}s, update {sec['update']:.2f}s) tokens {rec['gen_tokens']} "
              f"reward {rec['mean_reward']:+.4f} other-load {lap['other_cpu_load']:.2f}",
              file=sys.stderr, flush=True)
    rss["peak_mib"] = meters.maxrss_mib()
    summary = summarize(w, records, rss)
    if tools:
        summary.update(wl.tool_summary(records))
    import peft
    import transformers

    return {"side": "lora_ppo", "tool": f"lora_ppo {w['algo']}",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__},
            "device": str(run.dist.device), "torch_threads": torch.get_num_threads(),
            "workload": w, "overrides": overrides,
            "settings": {"seams": repr(run.seams), "sampler_logprobs": sampler_scores(run),
                         "stop_ids": run.stop_ids},
            "prompts": {"count": len(rows if tools else prompts), "sha": sha}, "rss": rss, "summary": summary,
            "steps": records, "wall_s": time.perf_counter() - T_START}


def main(argv: list[str] | None = None) -> int:
    p = wl.side_parser(__doc__.splitlines()[0], "a name of workload.WORKLOADS, or JSON")
    p.add_argument("--precision", default="fp32", help="deepspeed.precision (the GPU check: bf16)")
    p.add_argument("--set", action="append", default=[], help="another lora_ppo override")
    a = p.parse_args(argv)
    w = wl.resolve(a.workload, a.steps, a.tiny)
    out = Path(a.out)
    res = run_side(w, a.model_dir, out, a.seed, a.threads, a.precision, tuple(a.set))
    out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
