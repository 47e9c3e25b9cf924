"""TRL 0.11.4's PPOTrainer with a peft LoRA policy (its "gpt2-sentiment with peft" recipe): the
peer of lora_ppo's PPO in benchmarks/bench_vs_trl.py. TRL 0.11 is the last release with this
PPOTrainer; it needs transformers 4.46, so it runs in the trl011 venv of benchmarks/peers/setup.sh
(torch 2.13.0 CPU, trl 0.11.4, transformers 4.46.3, peft 0.13.2, accelerate 1.0.1, tokenizers
0.20.3):

    PY=$(bash benchmarks/peers/setup.sh trl011 | awk '/^trl011 /{print $2}')
    $PY benchmarks/peers/trl_ppo.py --workload variable --tiny --model-dir DIR --out trl.json

The recipe, as a TRL user runs it: AutoModelForCausalLMWithValueHead.from_pretrained(dir,
peft_config=LoraConfig(r 8, alpha 16, dropout 0.05, the seven decoder linears)), so the value
head sits on the shared LoRA trunk (its own dropout 0.1, TRL's default) and the reference is the
base with the adapter disabled (ref_model=None); PPOConfig(lr 1.41e-5, batch, mini_batch_size,
ppo_epochs 4, init_kl_coef 0.2, adap_kl_ctrl); the recipe's sampling (top_k 0, top_p 1.0,
do_sample); one generate() call per step (gen batch = batch; TRL's own default is 4). The pad
token is the EOS, as TRL's examples set it for a tokenizer without one. TRL has no gradient
checkpointing switch here, so the memory workload runs without it on this side (lora_ppo's has
it on: the documented asymmetry of that workload).

Fixed lengths (no stop ids): min_new_tokens = max_new_tokens, so every response has exactly
gen_len tokens. Stop ids: they join the EOS in eos_token_id, and each response is cut after its
first one (TRL itself cuts only at the tokenizer's EOS), the stop token kept.

Timing (benchmarks/meters.py, as on lora_ppo's side): a StepClock lap per step (wall_s from the
previous step's end), gen_s around generate(), rollout_s = gen_s + the reward + TRL's own
time/ppo/forward_pass, compute_rewards and compute_advantages; update_s the rest of the step.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

T_START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.dont_write_bytecode = True  # this venv's python writes no __pycache__ into the checkout
import meters  # noqa: E402
import workload as wl  # noqa: E402

OFFLINE = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_DISABLED": "true"}
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROLLOUT_TIMES = ("time/ppo/forward_pass", "time/ppo/compute_rewards", "time/ppo/compute_advantages")


def cut_at_stop(responses, stops):
    """Each response up to and with its first stop id."""
    import torch

    stop = torch.tensor(stops)
    out = []
    for r in responses:
        hit = torch.isin(r, stop).nonzero()
        out.append(r[: int(hit[0, 0]) + 1] if len(hit) else r)
    return out


def generation_kwargs(tok, w: dict, stops: list[int]) -> dict:
    """The recipe's sampling (top_k 0, top_p 1: the full softmax), one generate() per step."""
    kw = {"min_length": -1, "top_k": 0.0, "top_p": 1.0, "do_sample": True,
          "pad_token_id": tok.pad_token_id, "max_new_tokens": w["gen_len"]}
    if stops:
        kw["eos_token_id"] = [tok.eos_token_id, *stops]
    else:  # the EOS masked until gen_len: every response exactly gen_len tokens
        kw["eos_token_id"] = tok.eos_token_id
        kw["min_new_tokens"] = w["gen_len"]
    return kw


def ppo_step(trainer, queries: list, gen_kwargs: dict, cut: bool, clock) -> dict:
    """One PPO step as the recipe runs it: generate, score with workload.even_reward,
    trainer.step; its record in workload.summarize's fields."""
    import torch

    t0 = time.perf_counter()
    responses = trainer.generate(queries, batch_size=len(queries), return_prompt=False,
                                 **gen_kwargs)
    gen_s = time.perf_counter() - t0
    if cut:
        responses = cut_at_stop(responses, gen_kwargs["eos_token_id"])
    lens = [int(r.shape[0]) for r in responses]
    t1 = time.perf_counter()
    rewards = [torch.tensor(x) for x in wl.even_reward([r.tolist() for r in responses])]
    reward_s = time.perf_counter() - t1
    stats = trainer.step(queries, responses, rewards)
    lap = clock.lap()
    rollout_s = gen_s + reward_s + sum(float(stats[key]) for key in ROLLOUT_TIMES)
    return {**lap, "gen_s": gen_s, "rollout_s": rollout_s, "update_s": lap["wall_s"] - rollout_s,
            "samples": len(lens), "gen_tokens": sum(lens),
            "prompt_tokens": sum(len(q) for q in queries), "resp_lens": lens,
            "mean_reward": float(torch.stack(rewards).mean()), "maxrss_mib": meters.maxrss_mib(),
            "kl": float(stats["objective/kl"]), "kl_coef": float(stats["objective/kl_coef"])}


def main(argv: list[str] | None = None) -> int:
    ap = wl.side_parser(__doc__.splitlines()[0], "a PPO name of workload.WORKLOADS, or JSON")
    a = ap.parse_args(argv)
    w = wl.resolve(a.workload, a.steps, a.tiny)
    if w["algo"] != "ppo":
        raise SystemExit(f"trl_ppo.py runs PPO workloads: {w}")
    warnings.filterwarnings("ignore")
    for k, v in OFFLINE.items():
        os.environ.setdefault(k, v)

    import peft
    import torch
    import transformers
    import trl
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    transformers.logging.set_verbosity_error()
    if a.threads:
        torch.set_num_threads(a.threads)
    rss = {"after_import_mib": meters.maxrss_mib()}

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    stops = wl.stop_ids(tok, w["stop_ids"])
    lo = wl.min_prompt_id(tok, w)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lora = LoraConfig(r=wl.PPO["lora_r"], lora_alpha=2 * wl.PPO["lora_r"], lora_dropout=0.05,
                      bias="none", target_modules=LINEARS, task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(a.model_dir, peft_config=lora)
    with torch.no_grad():  # safetensors are mapped lazily: make the weights resident first
        for prm in model.parameters():
            prm.sum()
    rss["after_model_load_mib"] = meters.maxrss_mib()
    vocab = model.pretrained_model.config.vocab_size
    prompts = wl.random_prompt_ids(w, lo, vocab, a.seed)

    config = PPOConfig(learning_rate=wl.PPO["lr"], batch_size=w["batch"],
                       mini_batch_size=w["mini"], ppo_epochs=wl.PPO["epochs"],
                       init_kl_coef=wl.PPO["init_kl_coef"], adap_kl_ctrl=True, seed=a.seed,
                       log_with=None)
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tok)
    assert trainer.is_peft_model and trainer.ref_model is None  # reference = adapter disabled
    gen_kwargs = generation_kwargs(tok, w, stops)
    steps, clock = [], meters.StepClock()
    clock.start()
    for k in range(w["steps"]):
        queries = [torch.tensor(p) for p in prompts[k * w["batch"]:(k + 1) * w["batch"]]]
        steps.append({"step": k, **ppo_step(trainer, queries, gen_kwargs, bool(stops), clock)})
        print(f"[trl] step {k}: {steps[-1]['wall_s']:.2f}s (gen {steps[-1]['gen_s']:.2f}s) "
              f"tokens {steps[-1]['gen_tokens']} reward {steps[-1]['mean_reward']:+.4f} "
              f"other-load {steps[-1]['other_cpu_load']:.2f}", file=sys.stderr, flush=True)
    if not stops:
        assert all(n == w["gen_len"] for s in steps for n in s["resp_lens"])
    rss["peak_mib"] = meters.maxrss_mib()
    summary = wl.summarize(steps, rss["after_model_load_mib"], rss["peak_mib"])
    res = {
        "side": "trl", "tool": "trl PPOTrainer + peft",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__, "peft": peft.__version__},
        "torch_threads": torch.get_num_threads(), "workload": w,
        "settings": {"lora": lora.to_dict() if hasattr(lora, "to_dict") else repr(lora),
                     "ppo_config": {k: getattr(config, k) for k in (
                         "learning_rate", "batch_size", "mini_batch_size", "ppo_epochs",
                         "init_kl_coef", "adap_kl_ctrl", "gradient_accumulation_steps")},
                     "generation": {k: v for k, v in gen_kwargs.items() if k != "eos_token_id"},
                     "eos_token_ids": gen_kwargs["eos_token_id"]},
        "prompts": {"count": len(prompts), "sha": wl.digest(prompts)},
        "rss": rss, "summary": summary, "steps": steps,
        "wall_s": time.perf_counter() - T_START}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(f"[trl {trl.__version__}] {summary['gen_tokens_per_s']:.1f} generated tokens/s, peak "
          f"RSS {summary['rss_above_load_mib']:.0f} MiB above load", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
