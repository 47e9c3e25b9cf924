"""lora_ppo against TRL 0.11.4's PPOTrainer + peft, side by side, on the same model and settings.

    python scripts/bench_vs_trl.py --workload fixed --repeats 3 --out fixed.json
    python scripts/bench_vs_trl.py --workload variable --repeats 3 --out variable.json
    python scripts/bench_vs_trl.py --workload memory --repeats 2 --out memory.json
    python scripts/bench_vs_trl.py --workload fixed --gen-len 16,32,64,128 --out sweep.json

TRL runs in its own venv (transformers 4.46, peft 0.13; `../shared/peer/setup.sh` makes it) with
the peer's harness (`../shared/peer/trl_ppo.py`); lora_ppo runs in this checkout's venv, in a
fresh process per run (`--side lora_ppo`). Both load the same random-init Llama built by the
peer's `make_tiny_model.py`, get the same prompts (random token ids from the same seeded torch
generator), the same reward (2 x the share of even generated ids - 1) and the same PPO settings:
batch 16, minibatch 4, 4 epochs, LoRA r 8 / alpha 16 on every decoder linear, fp32, unquantized,
value head on the shared trunk, adaptive KL from 0.2, lr 1.41e-5, one generation batch. Runs
alternate (TRL, lora_ppo, TRL, ...) so that a drift of the machine's speed hits both; each side
runs with one intra-op thread.

Figures: generated tokens per second of whole PPO steps (generation + scoring + update), over
the steps after the first (the first of each side pays one-time costs), and peak RSS above the
RSS after the model was loaded. lora_ppo runs with its defaults (padding-free forwards, merged
policy for generation, entropy without grad) except gradient checkpointing, which is off for the
speed workloads (TRL's harness has none) and on (the default) for the memory workload.

Workloads (as in the issue that asked for them):
    fixed     70M params (hidden 768, 8 layers, vocab 8192), 16-token prompts, exactly 32 new
              tokens (TRL: min_new_tokens; lora_ppo: no stop token is sampled in practice)
    variable  the same model, prompts of 8-64 tokens, responses end at one of 400 stop ids
              (mean ~20 tokens, cap 64)
    memory    20M params (hidden 256, 4 layers, vocab 32000), 64-token prompts + 512 new tokens,
              batch 8

`--malloc-mmap-threshold 65536` runs both sides with glibc's MALLOC_MMAP_THRESHOLD_ fixed, so that
peak RSS counts live memory rather than freed blocks glibc kept (see `_malloc_env`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER = REPO.parent / "shared" / "peer"

MODELS = {  # make_tiny_model.py arguments
    "llama70m": ["--hidden", "768", "--layers", "8", "--heads", "12", "--vocab", "8192",
                 "--intermediate", "2048"],
    "llama20m-v32k": ["--hidden", "256", "--layers", "4", "--heads", "4", "--vocab", "32000",
                      "--intermediate", "688"],
}
WORKLOADS = {
    "fixed": {"model": "llama70m", "batch": 16, "mini": 4, "prompt_len": 16, "prompt_min": None,
              "gen_len": 32, "stop_ids": 0, "steps": 5},
    "variable": {"model": "llama70m", "batch": 16, "mini": 4, "prompt_len": 64, "prompt_min": 8,
                 "gen_len": 64, "stop_ids": 400, "steps": 5},
    "memory": {"model": "llama20m-v32k", "batch": 8, "mini": 4, "prompt_len": 64,
               "prompt_min": None, "gen_len": 512, "stop_ids": 0, "steps": 2},
}
N_SPECIAL = 4  # make_tiny_model.py: <pad> <s> </s> <unk>


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the lora_ppo side (run in this venv, one process per run) --------------------------------

REWARD = """
def even(prompts, completions, completion_ids, **kw):
    # the peer's reward: 2 * (share of even generated ids) - 1
    return [2.0 * sum(t % 2 == 0 for t in ids) / max(len(ids), 1) - 1.0 for ids in completion_ids]
"""


def lora_ppo_side(a) -> dict:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    from lora_ppo.config.load import load_config
    from lora_ppo.ppo import loop
    from lora_ppo.ppo.update import ppo_update

    reward = Path(a.out).with_suffix(".reward.py")
    reward.write_text(REWARD)
    w = a.w
    stops = list(range(N_SPECIAL, N_SPECIAL + w["stop_ids"]))
    cfg = load_config(None, [
        f"model.path={a.model_dir}", f"output_dir={Path(a.out).with_suffix('.run')}",
        "quantization.mode=none", f"model.gradient_checkpointing={a.grad_ckpt}",
        f"model.max_prompt_length={w['prompt_len']}", "lora.r=8", "lora.alpha=16",
        f"rollout.batch_size={w['batch']}", f"rollout.generation_batch_size={w['batch']}",
        f"rollout.max_new_tokens={w['gen_len']}", f"rollout.stop_token_ids={stops}",
        f"ppo.minibatch_size={w['mini']}", f"ppo.micro_batch_size={w['mini']}", "ppo.epochs=4",
        "ppo.optim.learning_rate=1.41e-5", "ppo.kl_coef=0.2", "ppo.adaptive_kl=true",
        f"ppo.total_updates={w['steps']}", "deepspeed.config=zero0", "deepspeed.precision=fp32",
        f"reward.function={reward}:even", "logging.progress=false", "logging.tensorboard=false",
        "checkpoint.every=0", *a.set])
    run = loop.setup(cfg)
    with torch.no_grad():  # make every weight resident, as the peer's harness does
        for p in run.ac.parameters():
            p.sum()
    after_load = maxrss_mib()
    vocab = run.ac.vocab
    gen = torch.Generator().manual_seed(a.seed)
    steps = []
    for step in range(w["steps"]):
        prompts = torch.randint(N_SPECIAL + w["stop_ids"], vocab, (w["batch"], w["prompt_len"]),
                                generator=gen)
        ids = [p.tolist() for p in prompts]
        if w["prompt_min"]:
            lens = torch.randint(w["prompt_min"], w["prompt_len"] + 1, (w["batch"],),
                                 generator=gen)
            ids = [p[:int(n)] for p, n in zip(ids, lens)]
        t0 = time.perf_counter()
        samples = loop.sample_ids(run, ids)
        t1 = time.perf_counter()
        texts = [""] * len(ids)
        ro = loop.rollout_of(run, samples)
        raw, _ = loop.compute_scores(run, texts, ro)
        ro = loop.add_advantages(run, loop.add_rewards(run, ro, raw))
        t2 = time.perf_counter()
        stats = ppo_update(run.engine, run.ac, ro, cfg, run.generator, run.kl_ctl.value)
        t3 = time.perf_counter()
        run.kl_ctl.update(float((ro.kl * ro.response_mask).sum(1).mean()), w["batch"])
        gen_tokens = int(samples.response_mask.sum())
        steps.append({"step": step, "gen_s": t1 - t0, "score_s": t2 - t1, "update_s": t3 - t2,
                      "total_s": t3 - t0, "gen_tokens": gen_tokens,
                      "mean_resp_len": gen_tokens / w["batch"],
                      "mean_reward": float(raw.mean()), "ratio": stats.ratio,
                      "maxrss_mib": maxrss_mib()})
        print(f"[lora_ppo] step {step}: gen {t1 - t0:.2f}s score {t2 - t1:.2f}s update "
              f"{t3 - t2:.2f}s tokens {gen_tokens}", file=sys.stderr, flush=True)
    return {"side": "lora_ppo", "steps": steps, "after_model_load_mib": after_load,
            "peak_rss_mib": maxrss_mib()}


# --- the driver ---------------------------------------------------------------------------------

def _throughput(steps: list[dict], tokens_key: str, time_key: str) -> float:
    rest = steps[1:] or steps
    return sum(s[tokens_key] for s in rest) / sum(s[time_key] for s in rest)


def summarize(side: str, res: dict) -> dict:
    if side == "trl":
        steps, load = res["steps"], res["rss"]["after_model_load_mib"]
        out = {"tokens_per_s": _throughput(steps, "gen_tokens", "total_s"),
               "gen_s": statistics.median(s["gen_s"] for s in steps[1:] or steps),
               "rest_s": statistics.median(s["step_s"] for s in steps[1:] or steps),
               "peak_above_load_mib": res["rss"]["peak_mib"] - load,
               "mean_resp_len": statistics.mean(s["mean_resp_len"] for s in steps)}
    else:
        steps, load = res["steps"], res["after_model_load_mib"]
        out = {"tokens_per_s": _throughput(steps, "gen_tokens", "total_s"),
               "gen_s": statistics.median(s["gen_s"] for s in steps[1:] or steps),
               "rest_s": statistics.median(s["score_s"] + s["update_s"]
                                           for s in steps[1:] or steps),
               "peak_above_load_mib": res["peak_rss_mib"] - load,
               "mean_resp_len": statistics.mean(s["mean_resp_len"] for s in steps)}
    return out


# The peer's make_tiny_model.py trains its BPE tokenizer up to the full vocabulary; at 32 000 ids
# that took over 15 minutes on one core here. Both sides prompt with random token ids, so the
# tokenizer's merges never matter: train at most TOKENIZER_MERGES_CAP ids and add the rest as
# plain tokens (the script's own padding path). The model and its shapes are unchanged.
TOKENIZER_MERGES_CAP = 8192
_BUILD = """
import sys
sys.path.insert(0, sys.argv[1])
import make_tiny_model as m
cap, full = int(sys.argv[2]), m.build_tokenizer
def capped(vocab, seed):
    tok = full(min(vocab, cap), seed)
    tok.add_tokens([f"<extra_{i}>" for i in range(vocab - len(tok))])
    assert len(tok) == vocab, (len(tok), vocab)
    return tok
m.build_tokenizer = capped
sys.argv = ["make_tiny_model.py", *sys.argv[3:]]
m.main()
"""


def build_model(name: str, peer_py: str, cache: Path) -> Path:
    out = cache / name
    if not (out / "config.json").is_file():
        print(f"building {name} into {out} (once)", file=sys.stderr, flush=True)
        subprocess.run([peer_py, "-c", _BUILD, str(PEER), str(TOKENIZER_MERGES_CAP),
                        *MODELS[name], "--out", str(out)], check=True)
    return out


def _malloc_env(mmap_threshold: int | None) -> dict:
    """glibc settings for both sides' processes. By default glibc keeps freed blocks below its
    dynamic mmap threshold (up to 32 MiB) in the heap, so peak RSS also counts memory that was
    already freed, in amounts that depend on the order of allocations. MALLOC_MMAP_THRESHOLD_
    fixes the threshold: every larger block gets its own mapping, unmapped on free, so RSS
    follows the live tensors (what a GPU's caching allocator can reuse)."""
    return {} if mmap_threshold is None else {"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)}


def run_trl(peer_py: str, model: Path, w: dict, out: Path, seed: int,
            malloc: dict | None = None) -> dict:
    cmd = [peer_py, str(PEER / "trl_ppo.py"), "--model-dir", str(model), "--steps",
           str(w["steps"]), "--batch-size", str(w["batch"]), "--mini-batch-size", str(w["mini"]),
           "--ppo-epochs", "4", "--prompt-len", str(w["prompt_len"]), "--gen-len",
           str(w["gen_len"]), "--seed", str(seed), "--threads", "1", "--out", str(out)]
    if w["prompt_min"]:
        cmd += ["--prompt-len-min", str(w["prompt_min"])]
    if w["stop_ids"]:
        cmd += ["--stop-ids", str(w["stop_ids"])]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(malloc or {})})
    return json.loads(out.read_text())


def run_lora_ppo(model: Path, w: dict, out: Path, seed: int, grad_ckpt: bool,
                 extra: list[str], malloc: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--side", "lora_ppo", "--model-dir", str(model),
           "--workload-json", json.dumps(w), "--seed", str(seed), "--grad-ckpt", str(grad_ckpt),
           "--out", str(out)] + [f"--set={s}" for s in extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    subprocess.run(cmd, check=True, env={**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                                         **(malloc or {})})
    return json.loads(out.read_text())


def _stats(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def compare(a) -> dict:
    peer_py = a.peer_python or subprocess.run(["bash", str(PEER / "setup.sh")], check=True,
                                              capture_output=True, text=True).stdout.strip()
    base = WORKLOADS[a.workload]
    gen_lens = [int(x) for x in a.gen_len.split(",")] if a.gen_len else [base["gen_len"]]
    cache = Path(a.cache)
    points = []
    for gen_len in gen_lens:
        w = {**base, "gen_len": gen_len, "steps": a.steps or base["steps"]}
        model = build_model(w["model"], peer_py, cache / "models")
        grad_ckpt = a.workload == "memory"
        runs = {"trl": [], "lora_ppo": []}
        for r in range(a.repeats):
            work = cache / "runs" / f"{a.workload}-{gen_len}-{r}"
            work.mkdir(parents=True, exist_ok=True)
            malloc = _malloc_env(a.malloc_mmap_threshold)
            runs["trl"].append(summarize("trl", run_trl(peer_py, model, w, work / "trl.json",
                                                        a.seed, malloc)))
            runs["lora_ppo"].append(summarize("lora_ppo", run_lora_ppo(
                model, w, work / "lora_ppo.json", a.seed, grad_ckpt, a.set, malloc)))
        pairs = [(t["tokens_per_s"], lp["tokens_per_s"])
                 for t, lp in zip(runs["trl"], runs["lora_ppo"])]
        mem = [(t["peak_above_load_mib"], lp["peak_above_load_mib"])
               for t, lp in zip(runs["trl"], runs["lora_ppo"])]
        point = {"workload": a.workload, "gen_len": gen_len, "settings": w,
                 "malloc_mmap_threshold": a.malloc_mmap_threshold,
                 "gradient_checkpointing": grad_ckpt, "runs": runs,
                 "tokens_per_s": {s: _stats([x["tokens_per_s"] for x in runs[s]]) for s in runs},
                 "peak_above_load_mib": {s: _stats([x["peak_above_load_mib"] for x in runs[s]])
                                         for s in runs},
                 "speed_ratio": _stats([lp / t for t, lp in pairs]),
                 "memory_ratio": _stats([lp / t for t, lp in mem])}
        points.append(point)
        print(f"{a.workload} gen_len {gen_len}: tokens/s TRL "
              f"{point['tokens_per_s']['trl']['median']:.1f} lora_ppo "
              f"{point['tokens_per_s']['lora_ppo']['median']:.1f} ratio "
              f"{point['speed_ratio']['min']:.2f}-{point['speed_ratio']['max']:.2f} (median "
              f"{point['speed_ratio']['median']:.2f}); peak above load TRL "
              f"{point['peak_above_load_mib']['trl']['median']:.0f} MiB lora_ppo "
              f"{point['peak_above_load_mib']['lora_ppo']['median']:.0f} MiB ratio "
              f"{point['memory_ratio']['median']:.2f}", flush=True)
    return {"command": " ".join(sys.argv), "points": points}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=list(WORKLOADS), default="fixed")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    p.add_argument("--steps", type=int, default=None, help="PPO steps per run (default: the "
                   "workload's)")
    p.add_argument("--gen-len", default=None, help="comma-separated new-token counts: a sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-python", default=None, help="the TRL venv's python (default: made "
                   "by ../shared/peer/setup.sh)")
    p.add_argument("--cache", default="/tmp/lora_ppo_vs_trl")
    p.add_argument("--set", action="append", default=[], help="extra lora_ppo override")
    p.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="MALLOC_MMAP_THRESHOLD_ for both sides (e.g. 65536: peak RSS follows "
                   "live tensors, not glibc's retained free blocks); default: glibc's own")
    p.add_argument("--out", required=True)
    # the lora_ppo side, run by the driver in a fresh process
    p.add_argument("--side", choices=["lora_ppo"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--workload-json", help=argparse.SUPPRESS)
    p.add_argument("--grad-ckpt", default="False", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        a.w = json.loads(a.workload_json)
        a.grad_ckpt = a.grad_ckpt == "True"
        res = lora_ppo_side(a)
    else:
        res = compare(a)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
