"""What both sides of benchmarks/bench_vs_trl.py run and report: the workloads, the prompts, the
reward and the summary of a run. lora_ppo's side (benchmarks/lora_ppo_side.py) and the TRL
harnesses (benchmarks/peers/) import this one file, so the two sides cannot drift apart.

Standard library only: the peer venvs have no lora_ppo and import this file by path. Functions
that need a tokenizer take it as an argument (any transformers tokenizer, 4.46 or 5.x).

The reward (`even`, TRL's reward-function convention): 2 x the share of even ids in the
completion - 1, read off the completion's token ids (the stop token, when one ended it, included
on both sides), so no reward model runs and both tools score the same thing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics

# --- the workloads ---------------------------------------------------------------------------

# Random-init Llamas (lora_ppo.builtin.tiny.build_tiny_model arguments). Both sides load the same
# directory. The "tiny-*" ones serve --tiny: the same vocabularies (so stop-id shares and
# prompts stay alike) on a 2-layer trunk.
MODELS = {
    "llama70m": {"vocab_size": 8192, "hidden_size": 768, "intermediate_size": 2048,
                 "num_layers": 8, "num_heads": 12, "num_kv_heads": 12},
    "llama20m-v32k": {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 688,
                      "num_layers": 4, "num_heads": 4, "num_kv_heads": 4},
    "tiny-v8k": {"vocab_size": 8192, "hidden_size": 64, "intermediate_size": 128,
                 "num_layers": 2, "num_heads": 4, "num_kv_heads": 4},
    "tiny-v32k": {"vocab_size": 32000, "hidden_size": 64, "intermediate_size": 128,
                  "num_layers": 2, "num_heads": 4, "num_kv_heads": 4},
}
TINY_MODELS = {"llama70m": "tiny-v8k", "llama20m-v32k": "tiny-v32k", "tools-sft": "tiny-tools"}
# Models trained to call the calculator (benchmarks/tools_model.py.SIZES builds them)
TOOL_MODELS = ("tools-sft", "tiny-tools")

# PPO against TRL 0.11.4's PPOTrainer: `batch` prompts per step, minibatch = micro-batch `mini`,
# 4 epochs; `prompt_min` (when set) draws each prompt's length in [prompt_min, prompt_len];
# `stop_ids` K ordinary ids that also end a response (0: every response runs to gen_len).
# GRPO against TRL 1.16's GRPOTrainer: `prompts` x `n` answers per step, `micro` samples per
# forward/backward (TRL's per_device_train_batch_size). `grad_ckpt`: gradient checkpointing of
# lora_ppo's side, and of TRL's where its trainer has the switch (GRPO).
WORKLOADS = {
    "fixed": {"algo": "ppo", "model": "llama70m", "batch": 16, "mini": 4, "prompt_len": 16,
              "prompt_min": None, "gen_len": 32, "stop_ids": 0, "grad_ckpt": False, "steps": 5},
    "variable": {"algo": "ppo", "model": "llama70m", "batch": 16, "mini": 4, "prompt_len": 64,
                 "prompt_min": 8, "gen_len": 64, "stop_ids": 400, "grad_ckpt": False,
                 "steps": 5},
    "memory": {"algo": "ppo", "model": "llama20m-v32k", "batch": 8, "mini": 4, "prompt_len": 64,
               "prompt_min": None, "gen_len": 512, "stop_ids": 0, "grad_ckpt": True, "steps": 2},
    "grpo-long": {"algo": "grpo", "model": "llama70m", "prompts": 4, "n": 8, "micro": 8,
                  "prompt_len": 256, "gen_len": 48, "stop_ids": 512, "grad_ckpt": False,
                  "steps": 4},
    "grpo-variable": {"algo": "grpo", "model": "llama70m", "prompts": 8, "n": 4, "micro": 8,
                      "prompt_len": 16, "gen_len": 64, "stop_ids": 400, "grad_ckpt": False,
                      "steps": 5},
    "grpo-fixed": {"algo": "grpo", "model": "llama70m", "prompts": 8, "n": 4, "micro": 8,
                   "prompt_len": 16, "gen_len": 32, "stop_ids": 0, "grad_ckpt": False,
                   "steps": 5},
    "grpo-memory": {"algo": "grpo", "model": "llama20m-v32k", "prompts": 2, "n": 4, "micro": 4,
                    "prompt_len": 64, "gen_len": 256, "stop_ids": 0, "grad_ckpt": True,
                    "steps": 2},
    # GRPO with tools against TRL 1.16's environment_factory (benchmarks/tools_task.py):
    # conversational prompts rendered with the calculator's schema (~200 tokens), gen_len the
    # whole trajectory's budget (the model's tokens and the tools'), at most max_tool_calls
    # rounds; the model's own <|im_end|> ends each turn (no stop ids).
    "grpo-tools": {"algo": "grpo", "tools": True, "model": "tools-sft", "prompts": 4, "n": 8,
                   "micro": 8, "prompt_len": None, "gen_len": 192, "max_tool_calls": 4,
                   "stop_ids": 0, "grad_ckpt": False, "steps": 4},
}
# The settings both sides take from here rather than from either tool's defaults.
PPO = {"epochs": 4, "lora_r": 8, "lr": 1.41e-5, "init_kl_coef": 0.2}
GRPO = {"lora_r": 8, "beta": 0.04, "loss_type": "grpo", "lr": 1e-5, "epsilon": 0.2}


def tiny(w: dict) -> dict:
    """`--tiny`: the workload's shape at a size that only checks the harnesses (2-layer model of
    the same vocabulary, <= 2 prompts or a batch of 4, prompts <= 32 tokens, answers <= 24; a
    tool workload keeps its prompts and budget)."""
    t = {**w, "model": TINY_MODELS.get(w["model"], w["model"])}
    if not w.get("tools"):  # a tool workload's prompts are the task's, its budget the rounds'
        t.update(prompt_len=min(w["prompt_len"], 32), gen_len=min(w["gen_len"], 24))
    if w["algo"] == "grpo":  # the micro-batch must still divide prompts x n
        t["prompts"] = min(w["prompts"], 2)
        t["micro"] = min(w["micro"], t["prompts"] * w["n"])
    else:
        t["batch"], t["mini"] = min(w["batch"], 4), min(w["mini"], 2)
        if w["prompt_min"]:
            t["prompt_min"] = min(w["prompt_min"], t["prompt_len"])
    return t


def resolve(spec: str, steps: int | None = None, make_tiny: bool = False) -> dict:
    """A workload by name (WORKLOADS) or as a JSON object (what the driver hands each side)."""
    if spec.lstrip().startswith("{"):
        w = json.loads(spec)
    elif spec in WORKLOADS:
        w = dict(WORKLOADS[spec])
    else:
        raise SystemExit(f"unknown workload {spec!r}; one of {', '.join(WORKLOADS)} or a JSON object")
    w = tiny(w) if make_tiny else w
    return {**w, "steps": steps or w["steps"]}


def samples_per_step(w: dict) -> int:
    return w["batch"] if w["algo"] == "ppo" else w["prompts"] * w["n"]


def prompts_per_run(w: dict) -> int:
    return w["steps"] * (w["batch"] if w["algo"] == "ppo" else w["prompts"])


def side_parser(description: str, workload_help: str) -> argparse.ArgumentParser:
    """The arguments every side takes (bench_vs_trl.py passes the same ones to each); a side
    adds its own."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--workload", required=True, help=workload_help)
    ap.add_argument("--tiny", action="store_true", help="shrink it (checks the harness only)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--out", required=True)
    return ap


# --- token ids and prompts -------------------------------------------------------------------

def n_special(tok) -> int:
    """Ids below this are the tokenizer's special tokens (both builders put them first)."""
    return max([i for i in tok.all_special_ids if i is not None] + [-1]) + 1


def stop_ids(tok, k: int) -> list[int]:
    """The K ordinary ids right after the specials (byte tokens of the BPE alphabet): a random
    model samples one with probability about K / vocab per token, so answers end at random
    lengths on both sides alike."""
    s = n_special(tok)
    return list(range(s, s + k))


def min_prompt_id(tok, w: dict) -> int:
    """Prompts never hold a special id or a stop id."""
    return n_special(tok) + w["stop_ids"]


def random_prompt_ids(w: dict, lo: int, vocab: int, seed: int) -> list[list[int]]:
    """PPO's prompts: `prompts_per_run(w)` rows of random ids in [lo, vocab), each prompt_len
    long, or of a length drawn in [prompt_min, prompt_len]. Ids past the tokenizer's own
    vocabulary are fine: both tools take token ids and the model has `vocab` rows."""
    rng = random.Random(seed)
    out = []
    for _ in range(prompts_per_run(w)):
        n = rng.randint(w["prompt_min"], w["prompt_len"]) if w.get("prompt_min") else w["prompt_len"]
        out.append([rng.randrange(lo, vocab) for _ in range(n)])
    return out


def _word_ids(tok, lo: int) -> tuple[list[int], list[int]]:
    """(ids of letters-only tokens, ids of ' '+letters tokens), each encoding back to itself."""
    first, rest = [], []
    for i in range(lo, len(tok)):
        s = tok.decode([i])
        body = s[1:] if s.startswith(" ") else s
        if not (body.isascii() and body.isalpha()):
            continue
        if tok(s, add_special_tokens=False)["input_ids"] != [i]:
            continue
        (rest if s.startswith(" ") else first).append(i)
    return first, rest


def make_prompts(tok, w: dict, seed: int) -> list[str]:
    """GRPO's prompts: texts of random words of the model's tokenizer (both tools take text),
    each encoding to exactly prompt_len ids with the tokenizer's own special tokens (TRL 1.16
    tokenizes a plain-text prompt with them, as lora_ppo's side does), never an id below
    `min_prompt_id`. Deterministic in (tokenizer, workload, seed)."""
    first, rest = _word_ids(tok, min_prompt_id(tok, w))
    if not first or not rest:
        raise SystemExit(f"the tokenizer has no word tokens above id {min_prompt_id(tok, w)}")
    words = w["prompt_len"] - len(tok("")["input_ids"])  # e.g. a BOS the tokenizer adds
    rng = random.Random(seed)
    texts = []
    for _ in range(prompts_per_run(w)):
        for _try in range(100):
            ids = [rng.choice(first)] + [rng.choice(rest) for _ in range(words - 1)]
            text = tok.decode(ids)
            if (tok(text, add_special_tokens=False)["input_ids"] == ids
                    and len(tok(text)["input_ids"]) == w["prompt_len"]):
                break
        else:
            raise SystemExit("could not build a prompt that encodes back to its own ids")
        texts.append(text)
    return texts


def tool_prompt_rows(w: dict, seed: int) -> list[dict]:
    """A tool workload's prompts: `prompts_per_run(w)` rows of benchmarks/tools_task.py (a user
    message and the `answer` column), the same on both sides."""
    import tools_task

    return tools_task.prompt_rows(prompts_per_run(w), seed=seed)


def digest(prompts) -> str:
    """A short hash of the prompts (texts or id lists): both sides record it, the driver checks
    that they match."""
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


# --- the reward ------------------------------------------------------------------------------

def even_reward(completion_ids) -> list[float]:
    """2 x the share of even ids in each completion - 1."""
    return [2.0 * sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) - 1.0
            for ids in completion_ids]


def even(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """`even_reward` as a reward function of TRL's convention (lora_ppo's reward.function and
    TRL 1.16's reward_funcs take it as it is)."""
    return even_reward(completion_ids)


# --- the summary of one run -----------------------------------------------------------------

def tool_summary(steps: list[dict]) -> dict:
    """A tool workload's extra figures from its step records (`tool_rounds` per sample,
    `completion_tokens`: the model's and the tools' tokens): rounds per sample (mean, and the
    share of samples with 2-3 rounds), the share of completion tokens the tools wrote, and the
    calls that went wrong (`tool_failures` per sample, summed)."""
    rounds = [r for s in steps for r in s["tool_rounds"]]
    failures = [f for s in steps for f in s.get("tool_failures", [])]
    model = sum(s["gen_tokens"] for s in steps)
    total = sum(s["completion_tokens"] for s in steps)
    return {"mean_tool_rounds": statistics.mean(rounds),
            "frac_2_to_3_rounds": sum(1 for r in rounds if 2 <= r <= 3) / len(rounds),
            "tool_rounds_hist": {str(k): rounds.count(k) for k in sorted(set(rounds))},
            "env_token_frac": (total - model) / total if total else 0.0,
            "tool_failures": sum(failures)}


def summarize(steps: list[dict], after_load_mib: float, peak_mib: float, warmup: int = 1) -> dict:
    """One run's figures from its step records (benchmarks/meters.StepClock's wall_s, cpu_s,
    other_cpu_load, plus gen_tokens, prompt_tokens, samples, mean_reward, rollout_s, update_s
    and gen_s where the side can time generation alone). Throughput counts generated tokens over
    the wall time of the steps after the first `warmup` (which pay one-time costs; all steps
    when there are no more). Memory: the peak RSS above the RSS once the model was loaded with
    its weights resident."""
    timed = steps[warmup:] if len(steps) > warmup else steps
    wall = sum(s["wall_s"] for s in timed)
    gen = [s["gen_s"] for s in timed if s.get("gen_s") is not None]
    rewards = [s["mean_reward"] for s in steps]
    return {
        "warmup_steps": warmup if len(steps) > warmup else 0,
        "median_step_s": statistics.median(s["wall_s"] for s in timed),
        "median_gen_s": statistics.median(gen) if len(gen) == len(timed) else None,
        "median_rest_s": (statistics.median(s["wall_s"] - s["gen_s"] for s in timed)
                          if len(gen) == len(timed) else None),
        "median_rollout_s": statistics.median(s["rollout_s"] for s in timed),
        "median_update_s": statistics.median(s["update_s"] for s in timed),
        "gen_tokens_per_s": sum(s["gen_tokens"] for s in timed) / wall,
        # less sensitive to other processes than wall time (not immune: idle OpenMP threads spin)
        "gen_tokens_per_cpu_s": (sum(s["gen_tokens"] for s in timed)
                                 / max(sum(s["cpu_s"] for s in timed), 1e-9)),
        "cpu_utilisation": sum(s["cpu_s"] for s in timed) / wall,
        "all_tokens_per_s": sum(s["gen_tokens"] + s["prompt_tokens"] for s in timed) / wall,
        "gen_tokens_per_step": [s["gen_tokens"] for s in steps],
        "samples_per_step": [s["samples"] for s in steps],
        "mean_resp_len": statistics.mean(s["gen_tokens"] / s["samples"] for s in steps),
        "rewards": rewards,
        "rewards_finite": all(math.isfinite(r) for r in rewards),
        "peak_rss_mib": peak_mib,
        "after_model_load_mib": after_load_mib,
        "rss_above_load_mib": peak_mib - after_load_mib,
        "max_other_cpu_load": max(s["other_cpu_load"] for s in steps),
    }
