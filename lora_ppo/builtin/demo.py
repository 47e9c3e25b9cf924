"""The built-in end-to-end runs (`lora-ppo demo [--preset NAME]`): every stage on one small
local model. Nothing is downloaded: the model, tokenizer and data are generated locally.

`demo` (presets/demo.yaml), RLHF with a learned reward:

    stage 0. base model   a small Llama pre-trained on generated reviews, built and cached once
    stage 1. reward       a reward adapter + score head from synthetic preference pairs in which
                          the positive review is preferred (Bradley-Terry)
    stage 2. PPO          4-bit base, LoRA policy, the reward adapter on the same base, ZeRO-2
    stage 3. merge        the policy adapter merged into the unquantized base, saved as
                          safetensors that plain transformers loads; reviews sampled from it and
                          from the base are compared with a sentiment lexicon (not the reward
                          model), an independent check that the export carries what PPO learnt

`grpo` (presets/grpo.yaml), critic-free RL with a verifiable reward: stage 0 builds the `arith`
model (additions "a + b = c"), stage 1 is not needed (the reward is a function that checks the
sum), stage 2 runs GRPO with 4 samples per prompt and no value function, stage 3 merges and
compares the greedy answers' accuracy of the base and the merged model.

`trl_grpo` (presets/trl_grpo.yaml): the `grpo` task with TRL 1.16 GRPOTrainer's defaults
(token-level loss, no KL, one optimizer step per rollout; docs/coming_from_trl.md).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Optional

from lora_ppo.builtin import arithmetic
from lora_ppo.builtin.corpus import review_prompts
from lora_ppo.builtin.rewards import arithmetic_correct, positive_sentiment
from lora_ppo.builtin.specs import resolve_builtins
from lora_ppo.config import Config
from lora_ppo.errors import UserError
from lora_ppo.io import checkpoint as ckpt
from lora_ppo.io.export import merge
from lora_ppo.io.run_dir import check_output_dir
from lora_ppo.modeling.loading import quantization_mode
from lora_ppo.ppo.loop import train
from lora_ppo.stages.reward_model import train_reward

MARKER = ".lora_ppo_demo"  # in a demo's output_dir: a later demo may replace what is there


class Check(NamedTuple):
    """An independent check of the merged export, run on it and on the base with plain
    transformers: the mean of `score(prompts, completions)` over `prompts(seed)`."""

    name: str
    prompts: Callable[[int], list[str]]
    score: Callable[..., list[float]]
    greedy: bool


def _review_check() -> Check:
    return Check("lexicon sentiment of 48 sampled reviews",
                 lambda seed: review_prompts(48, seed=seed), positive_sentiment, greedy=False)


def _arithmetic_check() -> Check:
    return Check("accuracy of 100 greedy answers", lambda seed: arithmetic.prompts(100, seed),
                 arithmetic_correct, greedy=True)


# preset -> (trains a reward adapter first, the export check)
PRESETS = {"demo": (True, _review_check), "grpo": (False, _arithmetic_check),
           "trl_grpo": (False, _arithmetic_check)}


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _mean(rows: list[dict], key: str) -> Optional[float]:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def summarize(metrics_path: Path, k: int = 5) -> dict:
    """Mean score of the reward source (before normalisation) and KL of the first and last `k`
    updates."""
    rows = [json.loads(x) for x in Path(metrics_path).read_text().splitlines() if x.strip()]
    first, last = rows[:k], rows[-k:]
    kls = [r["objective/kl"] for r in rows if r.get("objective/kl") is not None]
    return {"updates": len(rows), "window": k,
            "score_first": _mean(first, "objective/raw_scores"),
            "score_last": _mean(last, "objective/raw_scores"),
            "kl_last": _mean(last, "objective/kl"), "kl_max": max(kls) if kls else None}


def check_export(model_dir: str, check: Check, max_new_tokens: int, seed: int) -> float:
    """`check` on completions of a model directory loaded with plain transformers (sampled at
    temperature 1 with nothing truncated, or greedy)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = check.prompts(seed)
    sampling = {"do_sample": False} if check.greedy else {"do_sample": True, "top_k": 0,
                                                          "top_p": 1.0}
    torch.manual_seed(seed)
    completions = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id, **sampling)
            completions.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    scores = check.score(prompts=prompts, completions=completions)
    return sum(scores) / len(scores)


def claim_output_dir(out: Path, overwrite: bool) -> None:
    """A demo replaces an earlier demo's outputs (the README runs it again to see the cached
    timings), but not a directory that holds anything else, unless `overwrite`."""

    check_output_dir(out)
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists() and not overwrite:
        raise UserError(f"output_dir={out} holds files that no demo wrote; pass "
                        "output_dir=<another dir> or --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `lora-ppo demo`; a later demo replaces this directory\n")


def run_demo(cfg: Config, preset: str = "demo", overwrite: bool = False) -> dict:
    """Run the pipeline; returns a summary (also written to <output_dir>/demo_summary.json)."""
    trains_reward, check = PRESETS[preset][0], PRESETS[preset][1]()
    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    claim_output_dir(out, overwrite)
    say("stage 0/3: base model (built and pre-trained once, then cached)")
    cfg = resolve_builtins(cfg)
    t_model = time.perf_counter() - t0

    reward_dir = None
    if trains_reward:
        say("stage 1/3: reward adapter from synthetic preference pairs (positive preferred)")
        reward_dir = train_reward(cfg, overwrite=True)
        cfg = dataclasses.replace(cfg, reward=dataclasses.replace(
            cfg.reward, source="adapter", adapter=str(reward_dir)))
    else:
        say(f"stage 1/3: no reward model: the reward is the function {cfg.reward.function}")
    t_reward = time.perf_counter() - t0 - t_model

    alg = cfg.algorithm
    say(f"stage 2/3: {alg.estimator.upper()}, {quantization_mode(cfg.quantization)} base, LoRA policy, "
         f"reward {cfg.reward.source}, value function {alg.value_mode}, "
         f"{alg.group_size} sample(s) per prompt, DeepSpeed {cfg.deepspeed.config}")
    run = train(cfg, overwrite=True)
    t_ppo = time.perf_counter() - t0 - t_model - t_reward

    say("stage 3/3: merge the policy into the unquantized base")
    report = merge(ckpt.find(out, "latest"), out / "merged", dtype="fp32", force=True)
    after = {name: check_export(d, check, cfg.rollout.max_new_tokens, cfg.seed + 1)
             for name, d in (("base", run.model_path), ("merged", str(out / "merged")))}
    summary = {"preset": preset, **summarize(out / "metrics.jsonl"),
               "export_check": {"what": check.name, **after},
               "seconds": {"model": round(t_model, 1), "reward": round(t_reward, 1),
                           "ppo": round(t_ppo, 1), "total": round(time.perf_counter() - t0, 1)},
               "merge_max_logit_diff": report.max_logit_diff,
               "merged_model": str(out / "merged"), "plot": str(out / "metrics.png"),
               "reward_adapter": None if reward_dir is None else str(reward_dir)}
    if run.dist.rank == 0:
        tmp = out / "demo_summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(out / "demo_summary.json")
        kl = summary["kl_last"]
        say(f"mean score {summary['score_first']:.3f} -> {summary['score_last']:.3f} (first vs "
             f"last {summary['window']} updates)"
             + (f", KL to the reference {kl:.2f} nats" if kl is not None else "")
             + f"; took {summary['seconds']['total']:.0f} s")
        say(f"merged model, loaded with plain transformers: {check.name} "
             f"{after['base']:.2f} (base) -> {after['merged']:.2f}")
        say(f"outputs: {out}/metrics.jsonl, {out}/tensorboard, {out}/metrics.png, "
             f"{out}/merged (AutoModelForCausalLM.from_pretrained loads it)")
    return summary
