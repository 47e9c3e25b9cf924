"""The built-in end-to-end run (`lora-ppo demo`): every stage on one small local model.

    stage 0. base model   a small Llama pre-trained on generated reviews, built and cached once
    stage 1. reward       a reward adapter + score head from synthetic preference pairs in which
                          the positive review is preferred (Bradley-Terry)
    stage 2. PPO          4-bit base, LoRA policy, the reward adapter on the same base, ZeRO-2
    stage 3. merge        the policy adapter merged into the unquantized base, saved as
                          safetensors that plain transformers loads

Nothing is downloaded: the model, tokenizer and data are generated locally.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from lora_ppo.config import Config


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / max(len(rows), 1)


def summarize(metrics_path: Path, k: int = 5) -> dict:
    """Mean reward-model score (before normalisation) and KL of the first and last `k` updates."""
    rows = [json.loads(x) for x in Path(metrics_path).read_text().splitlines() if x.strip()]
    first, last = rows[:k], rows[-k:]
    return {"updates": len(rows), "window": k,
            "score_first": _mean(first, "objective/raw_scores"),
            "score_last": _mean(last, "objective/raw_scores"),
            "kl_last": _mean(last, "objective/kl"),
            "kl_max": max(r["objective/kl"] for r in rows)}


def run_demo(cfg: Config) -> dict:
    """Run the pipeline; returns a summary (also written to <output_dir>/demo_summary.json)."""
    from lora_ppo import checkpoint as ckpt
    from lora_ppo.export import merge
    from lora_ppo.modeling.loading import resolve_model_path
    from lora_ppo.reward_model import train_reward
    from lora_ppo.train import train

    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    _say("stage 0/3: base model (built and pre-trained once, then cached)")
    resolve_model_path(cfg.model.path)
    t_model = time.perf_counter() - t0

    _say("stage 1/3: reward adapter from synthetic preference pairs (positive preferred)")
    reward_dir = train_reward(cfg)
    t_reward = time.perf_counter() - t0 - t_model

    _say(f"stage 2/3: PPO, {cfg.quantization.mode} base, LoRA policy, reward adapter on the "
         f"same base, DeepSpeed {cfg.deepspeed.config}")
    ppo_cfg = dataclasses.replace(
        cfg, reward=dataclasses.replace(cfg.reward, source="adapter", adapter=str(reward_dir)))
    run = train(ppo_cfg)
    t_ppo = time.perf_counter() - t0 - t_model - t_reward

    _say("stage 3/3: merge the policy into the unquantized base")
    last = ckpt.find(out, "latest")
    report = merge(last, out / "merged", dtype="fp32", force=True)
    summary = {**summarize(out / "metrics.jsonl"),
               "seconds": {"model": round(t_model, 1), "reward": round(t_reward, 1),
                           "ppo": round(t_ppo, 1), "total": round(time.perf_counter() - t0, 1)},
               "merge_max_logit_diff": report.max_logit_diff,
               "merged_model": str(out / "merged"), "plot": str(out / "metrics.png"),
               "reward_adapter": str(reward_dir)}
    if run.dist.rank == 0:
        tmp = out / "demo_summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(out / "demo_summary.json")
        _say(f"mean reward-model score {summary['score_first']:.3f} -> "
             f"{summary['score_last']:.3f} (first vs last {summary['window']} updates), KL to "
             f"the reference {summary['kl_last']:.2f} nats; took {summary['seconds']['total']:.0f} s")
        _say(f"outputs: {out}/metrics.jsonl, {out}/tensorboard, {out}/metrics.png, "
             f"{out}/merged (AutoModelForCausalLM.from_pretrained loads it)")
    return summary
