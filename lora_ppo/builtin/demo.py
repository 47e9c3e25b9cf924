"""The built-in end-to-end run (`lora-ppo demo`): every stage on one small local model.

    stage 0. base model   a small Llama pre-trained on generated reviews, built and cached once
    stage 1. reward       a reward adapter + score head from synthetic preference pairs in which
                          the positive review is preferred (Bradley-Terry)
    stage 2. PPO          4-bit base, LoRA policy, the reward adapter on the same base, ZeRO-2
    stage 3. merge        the policy adapter merged into the unquantized base, saved as
                          safetensors that plain transformers loads; reviews sampled from it and
                          from the base are compared with a sentiment lexicon (not the reward
                          model), an independent check that the export carries what PPO learnt

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


def sentiment_of_samples(model_dir: str, prompts: list[str], max_new_tokens: int,
                         seed: int) -> float:
    """Mean `positive_sentiment` (a word lexicon, not the reward model) of reviews sampled from a
    model directory loaded with plain transformers: an independent check of the merged export."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_ppo.builtin.rewards import positive_sentiment

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    completions = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, do_sample=True, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id)
            completions.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    scores = positive_sentiment(prompts=prompts, completions=completions)
    return sum(scores) / len(scores)


MARKER = ".lora_ppo_demo"  # in a demo's output_dir: a later demo may replace what is there


def claim_output_dir(out: Path, overwrite: bool) -> None:
    """A demo replaces an earlier demo's outputs (the README runs it again to see the cached
    timings), but not a directory that holds anything else, unless `overwrite`."""
    from lora_ppo.errors import UserError
    from lora_ppo.io.run_dir import check_output_dir

    check_output_dir(out)
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists() and not overwrite:
        raise UserError(f"output_dir={out} holds files that no demo wrote; pass "
                        "output_dir=<another dir> or --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `lora-ppo demo`; a later demo replaces this directory\n")


def run_demo(cfg: Config, overwrite: bool = False) -> dict:
    """Run the pipeline; returns a summary (also written to <output_dir>/demo_summary.json)."""
    from lora_ppo.builtin.corpus import review_prompts
    from lora_ppo.io import checkpoint as ckpt
    from lora_ppo.io.export import merge
    from lora_ppo.modeling.loading import resolve_model_path
    from lora_ppo.ppo.loop import train
    from lora_ppo.stages.reward_model import train_reward

    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    claim_output_dir(out, overwrite)
    _say("stage 0/3: base model (built and pre-trained once, then cached)")
    resolve_model_path(cfg.model.path)
    t_model = time.perf_counter() - t0

    _say("stage 1/3: reward adapter from synthetic preference pairs (positive preferred)")
    reward_dir = train_reward(cfg, overwrite=True)
    t_reward = time.perf_counter() - t0 - t_model

    _say(f"stage 2/3: PPO, {cfg.quantization.mode} base, LoRA policy, reward adapter on the "
         f"same base, DeepSpeed {cfg.deepspeed.config}")
    ppo_cfg = dataclasses.replace(
        cfg, reward=dataclasses.replace(cfg.reward, source="adapter", adapter=str(reward_dir)))
    run = train(ppo_cfg, overwrite=True)
    t_ppo = time.perf_counter() - t0 - t_model - t_reward

    _say("stage 3/3: merge the policy into the unquantized base")
    last = ckpt.find(out, "latest")
    report = merge(last, out / "merged", dtype="fp32", force=True)
    prompts = review_prompts(48, seed=cfg.seed + 1)
    lexicon = {name: sentiment_of_samples(d, prompts, cfg.rollout.max_new_tokens, cfg.seed)
               for name, d in (("base", run.model_path), ("merged", str(out / "merged")))}
    summary = {**summarize(out / "metrics.jsonl"), "lexicon_sentiment": lexicon,
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
        _say(f"merged model, loaded with plain transformers: lexicon sentiment of 48 sampled "
             f"reviews {lexicon['base']:.2f} (base) -> {lexicon['merged']:.2f}")
        _say(f"outputs: {out}/metrics.jsonl, {out}/tensorboard, {out}/metrics.png, "
             f"{out}/merged (AutoModelForCausalLM.from_pretrained loads it)")
    return summary
