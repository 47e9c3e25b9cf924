"""lora_ppo against TRL side by side, on the same model and settings: TRL 0.11.4's PPOTrainer + peft
for PPO, TRL 1.16's GRPOTrainer + peft for GRPO.

    python scripts/bench_vs_trl.py --workload fixed --repeats 3 --out fixed.json
    python scripts/bench_vs_trl.py --workload variable --repeats 3 --out variable.json
    python scripts/bench_vs_trl.py --workload memory --repeats 2 --out memory.json
    python scripts/bench_vs_trl.py --workload fixed --gen-len 16,32,64,128 --out sweep.json
    python scripts/bench_vs_trl.py --workload grpo-long --repeats 3 --out grpo-long.json
    python scripts/bench_vs_trl.py --workload grpo-variable --repeats 3 --out grpo-variable.json
    python scripts/bench_vs_trl.py --workload grpo-fixed --repeats 3 --out grpo-fixed.json
    python scripts/bench_vs_trl.py --workload grpo-memory --repeats 3 --out grpo-memory.json
    python scripts/bench_vs_trl.py --workload grpo-long --tiny --repeats 1 --steps 2 --out t.json

PPO. TRL runs in its own venv (transformers 4.46, peft 0.13; `../shared/peer/setup.sh` makes it)
with the peer's harness (`../shared/peer/trl_ppo.py`); lora_ppo runs in this checkout's venv, in
a fresh process per run (`--side lora_ppo`). Both load the same random-init Llama built by the
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

GRPO. TRL 1.16.0 runs in the venv of `../shared/peer/setup_trl_grpo.sh` (/tmp/peer-trl116-venv:
the project's transformers 5.25 / peft 0.21 on torch 2.13 CPU) with the peer's harness
(`../shared/peer/trl_grpo.py`); lora_ppo runs here, a fresh process per run (`--side
lora_ppo_grpo`). A `grpo-*` workload picks this peer by itself. Both sides take their prompts
from `grpo_common.make_prompts` (random words of the model's tokenizer that re-encode to exactly
prompt_len ids; the same seed, so the same texts: each run records their sha, checked equal),
score completions with `grpo_common.even_reward` on the completion ids (the stop token included
on both sides, and in the generated-token counts) and summarise with `grpo_common.summarize`
(tokens/s over the steps after the first; peak RSS above the RSS after the model load, weights
made resident first on both sides). Settings pinned alike (trl_grpo.py pins TRL's; here the
lora_ppo overrides in `grpo_overrides`): num_generations n = rollout.samples_per_prompt, beta
0.04 = ppo.kl_coef (fixed) with the KL in the loss, k3 (TRL's estimator), loss 'grpo' =
ppo.loss_aggregation seq_mean_token_mean, advantages (r - group mean) / (group std + 1e-4),
clip 0.2, one epoch (num_iterations 1) over one minibatch = the whole rollout (one optimizer
step per generation; micro-batch = per_device_train_batch_size), LoRA r 8 / alpha 16 / dropout 0
on all linear layers, reference = the base with the adapter off, AdamW lr 1e-5 constant, no
weight decay, grad-norm clip 1.0, temperature 1 on the full softmax, fp32, unquantized,
DeepSpeed zero0 on lora_ppo's side, one torch thread each, gradient checkpointing off except
grpo-memory (on on both sides: both tools' default).

    grpo-long      70M model, 4 prompts x 8 answers, 256-token prompts, answers end at one of
                   512 stop ids (mean ~15 tokens; cap 48); 4 steps
    grpo-variable  70M model, 8 prompts x 4, 16-token prompts, 400 stop ids (mean ~20; cap 64)
    grpo-fixed     70M model, 8 prompts x 4, 16-token prompts, 32 new tokens, no stop ids
    grpo-memory    20M model with 32k vocabulary, 2 prompts x 4, 64-token prompts + 256 new
                   tokens, no stop ids, micro-batch 4, gradient checkpointing on both sides
Every workload reports tokens/s and peak RSS above load for each side.

Fixed lengths under GRPO: trl_grpo.py has no min_new_tokens, and both tools always stop at the
tokenizer's EOS (TRL adds it to eos_token_ids, lora_ppo to its stop ids). With no extra stop ids
a random-init model samples EOS with probability ~1/vocab per token (logits of std ~0.5), the
same distribution on both sides: ~12% of grpo-fixed's steps (32 x 32 draws) and ~6% of
grpo-memory's (8 x 256 draws of 32000) see one early stop on either side. Each run records
`fixed_length_exact` (every answer at the cap); tokens/s counts the real tokens either way.

What lora_ppo does differently (its defaults; the work differs, the maths does not):
- a group's prompt is encoded once: prefilled once in generation, its KV copied to the n rows
  (generation/continuous.py), and one packed row holds the prompt + its n answers in the scoring
  (reference) forward and the update (model.shared_prompt; each answer attends to the prompt and
  itself);
- continuous batching in generation (a finished row's slot takes the next row), a static KV
  cache, the adapter merged into the fp32 base for generation, the sampler's own log-probs as
  the old log-probs, padding-free forwards, log-probs in chunks of rows;
- TRL 1.16 (trl/trainer/grpo_trainer.py; line numbers in /work/notes/bench_grpo.md) gets each
  prompt n times: RepeatSampler yields every prompt index n times in a row
  (utils.py RepeatSampler.__iter__), `_tokenize_prompts` tokenizes all P x n strings, and
  `generate()` runs on the left-padded (P x n, L) batch, so the prefill computes each prompt n
  times and the (dynamic) KV cache holds n copies; finished rows stay in the batch until all
  stop or hit the cap; the LoRA adapter stays unmerged. The reference forward (adapter disabled)
  and the training forward/backward run over the (P x n, L + longest completion) prompt +
  completion tensor in chunks of per_device_train_batch_size, each row with its own prompt copy,
  after `shuffle_sequence_dict` mixes the groups. Its fused LM head scores only completion
  positions, in tiles (no (B, T, V) logits). No old-log-prob forward with num_iterations 1 and
  steps_per_generation = gradient accumulation (both sides skip it).
- TRL's RepeatSampler shuffles the prompts (seeded); lora_ppo takes them in order: the same
  prompts over a run, in another order (each has exactly prompt_len tokens, so the cost is the
  same).

`--tiny` shrinks a workload for checking the harness only (2-layer hidden-64 models of the
same vocabularies, <= 2 prompts, prompts <= 32 and answers <= 24 tokens): its figures mean
nothing. `--malloc-mmap-threshold 65536` runs both sides with glibc's MALLOC_MMAP_THRESHOLD_
fixed, so that peak RSS counts live memory rather than freed blocks glibc kept (see
`_malloc_env`).
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
    # --tiny: the same vocabularies (the stop-id shares and prompts stay alike), a 2-layer trunk
    "tiny-v8k": ["--hidden", "64", "--layers", "2", "--heads", "4", "--vocab", "8192",
                 "--intermediate", "128"],
    "tiny-v32k": ["--hidden", "64", "--layers", "2", "--heads", "4", "--vocab", "32000",
                  "--intermediate", "128"],
}
TINY_MODELS = {"llama70m": "tiny-v8k", "llama20m-v32k": "tiny-v32k"}
WORKLOADS = {
    "fixed": {"model": "llama70m", "batch": 16, "mini": 4, "prompt_len": 16, "prompt_min": None,
              "gen_len": 32, "stop_ids": 0, "steps": 5},
    "variable": {"model": "llama70m", "batch": 16, "mini": 4, "prompt_len": 64, "prompt_min": 8,
                 "gen_len": 64, "stop_ids": 400, "steps": 5},
    "memory": {"model": "llama20m-v32k", "batch": 8, "mini": 4, "prompt_len": 64,
               "prompt_min": None, "gen_len": 512, "stop_ids": 0, "steps": 2},
}
# GRPO against TRL 1.16's GRPOTrainer: prompts x n answers per step, `micro` samples per
# forward/backward (TRL's per_device_train_batch_size), `stop_ids` K ordinary ids that also end
# an answer (0: every answer runs to gen_len but for a rare EOS, see the module doc).
GRPO_WORKLOADS = {
    "grpo-long": {"model": "llama70m", "prompts": 4, "n": 8, "micro": 8, "prompt_len": 256,
                  "gen_len": 48, "stop_ids": 512, "grad_ckpt": False, "steps": 4},
    "grpo-variable": {"model": "llama70m", "prompts": 8, "n": 4, "micro": 8, "prompt_len": 16,
                      "gen_len": 64, "stop_ids": 400, "grad_ckpt": False, "steps": 5},
    "grpo-fixed": {"model": "llama70m", "prompts": 8, "n": 4, "micro": 8, "prompt_len": 16,
                   "gen_len": 32, "stop_ids": 0, "grad_ckpt": False, "steps": 5},
    "grpo-memory": {"model": "llama20m-v32k", "prompts": 2, "n": 4, "micro": 4, "prompt_len": 64,
                    "gen_len": 256, "stop_ids": 0, "grad_ckpt": True, "steps": 2},
}
# What trl_grpo.py is told explicitly (its defaults too): LoRA rank (alpha = 2r), beta, loss, lr
GRPO_PEER_ARGS = {"lora_r": 8, "beta": 0.04, "loss_type": "grpo", "lr": 1e-5}
N_SPECIAL = 4  # make_tiny_model.py: <pad> <s> </s> <unk>


def tiny_workload(w: dict) -> dict:
    """`--tiny`: the workload's shape at a size that only checks the harness (2-layer model of the
    same vocabulary, <= 2 prompts or batch 4, prompts <= 32 tokens, answers <= 24)."""
    t = {**w, "model": TINY_MODELS[w["model"]], "prompt_len": min(w["prompt_len"], 32),
         "gen_len": min(w["gen_len"], 24)}
    if "prompts" in w:  # GRPO: micro-batch must still divide prompts x n
        t["prompts"] = min(w["prompts"], 2)
        t["micro"] = min(w["micro"], t["prompts"] * w["n"])
    else:
        t["batch"], t["mini"] = min(w["batch"], 4), min(w["mini"], 2)
        if w["prompt_min"]:
            t["prompt_min"] = min(w["prompt_min"], t["prompt_len"])
    return t


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
    from transformers import AutoConfig

    from lora_ppo.config.load import load_config
    from lora_ppo.io.data import Prompt
    from lora_ppo.ppo.loop import ppo_step, setup

    reward = Path(a.out).with_suffix(".reward.py")
    reward.write_text(REWARD)
    w = a.w
    stops = list(range(N_SPECIAL, N_SPECIAL + w["stop_ids"]))
    cfg = load_config(None, [
        f"model.path={a.model_dir}", f"output_dir={Path(a.out).with_suffix('.run')}",
        "quantization.mode=none", f"model.gradient_checkpointing={a.grad_ckpt}",
        f"model.max_prompt_length={w['prompt_len']}", "lora.r=8", "lora.alpha=16",
        f"rollout.prompts_per_update={w['batch']}", f"rollout.generation_batch_size={w['batch']}",
        f"rollout.max_new_tokens={w['gen_len']}", f"rollout.stop_token_ids={stops}",
        f"ppo.minibatch_size={w['mini']}", f"ppo.micro_batch_size={w['mini']}", "ppo.epochs=4",
        "ppo.optim.learning_rate=1.41e-5", "ppo.kl_coef=0.2", "ppo.adaptive_kl=true",
        f"ppo.total_updates={w['steps']}", "deepspeed.config=zero0", "deepspeed.precision=fp32",
        f"reward.function={reward}:even", "logging.progress=false", "logging.tensorboard=false",
        "checkpoint.every=0", *a.set])
    vocab = AutoConfig.from_pretrained(a.model_dir).vocab_size
    gen = torch.Generator().manual_seed(a.seed)
    n_prompts = w["batch"] * w["steps"]
    ids = torch.randint(N_SPECIAL + w["stop_ids"], vocab, (n_prompts, w["prompt_len"]),
                        generator=gen).tolist()
    if w["prompt_min"]:
        lens = torch.randint(w["prompt_min"], w["prompt_len"] + 1, (n_prompts,), generator=gen)
        ids = [p[:int(n)] for p, n in zip(ids, lens)]
    prompts = [Prompt("", tuple(p)) for p in ids]
    run = setup(cfg, prompts=prompts)
    with torch.no_grad():  # make every weight resident, as the peer's harness does
        for p in run.ac.parameters():
            p.sum()
    after_load = maxrss_mib()
    steps = []
    for step in range(w["steps"]):
        t0 = time.perf_counter()
        out = ppo_step(run)
        t3 = time.perf_counter()
        sec, ro = out.seconds, out.rollout
        gen_tokens = int(ro.response_mask.sum())
        steps.append({"step": step, "gen_s": sec["generation"], "score_s": sec["scoring"],
                      "update_s": sec["update"], "total_s": t3 - t0, "gen_tokens": gen_tokens,
                      "mean_resp_len": gen_tokens / w["batch"],
                      "mean_reward": float(ro.raw_scores.mean()), "ratio": out.stats.ratio,
                      "maxrss_mib": maxrss_mib()})
        print(f"[lora_ppo] step {step}: gen {sec['generation']:.2f}s score {sec['scoring']:.2f}s "
              f"update {sec['update']:.2f}s tokens {gen_tokens}", file=sys.stderr, flush=True)
    return {"side": "lora_ppo", "steps": steps, "after_model_load_mib": after_load,
            "peak_rss_mib": maxrss_mib()}


# --- the lora_ppo side of GRPO (this venv, one process per run) --------------------------------

GRPO_REWARD = """
import sys
sys.path.insert(0, {peer!r})
try:
    from grpo_common import even_reward
except ImportError:  # no ../shared/peer here (the GPU check): the same formula
    def even_reward(completion_ids):
        return [2.0 * sum(t % 2 == 0 for t in ids) / max(len(ids), 1) - 1.0
                for ids in completion_ids]


def even(prompts, completions, completion_ids, **kw):
    # the peer's reward (grpo_common.even_reward), on the completion ids, stop token included
    return even_reward(completion_ids)
"""


def _grpo_common():
    """The peer's grpo_common (standard library only), or a stand-in where ../shared/peer is
    absent (the GPU check's machine): then the prompts are random token ids, not the peer's
    texts, and the summary keeps grpo_common.summarize's main fields."""
    if (PEER / "grpo_common.py").is_file():
        sys.path.insert(0, str(PEER))
        sys.dont_write_bytecode = True  # no __pycache__ beside the shared files (as the peer)
        import grpo_common

        return grpo_common
    import types

    def n_special(tok):
        return max([i for i in tok.all_special_ids if i is not None] + [-1]) + 1

    def summarize(steps, rss_load, warmup=1):
        timed = steps[warmup:] if len(steps) > warmup else steps
        wall = sum(s["wall_s"] for s in timed)
        return {"warmup_steps": warmup if len(steps) > warmup else 0,
                "median_step_s": statistics.median(s["wall_s"] for s in timed),
                "median_rollout_s": statistics.median(s["rollout_s"] for s in timed),
                "median_update_s": statistics.median(s["update_s"] for s in timed),
                "gen_tokens_per_s": sum(s["gen_tokens"] for s in timed) / wall,
                "gen_tokens_per_step": [s["gen_tokens"] for s in steps],
                "mean_resp_len": statistics.mean(s["gen_tokens"] / s["samples"] for s in steps),
                "rewards": [s["mean_reward"] for s in steps], "peak_rss_mib": maxrss_mib(),
                "after_model_load_mib": rss_load, "rss_above_load_mib": maxrss_mib() - rss_load}

    return types.SimpleNamespace(
        make_prompts=None, prompts_digest=lambda texts: None, n_special=n_special,
        stop_ids=lambda tok, k: list(range(n_special(tok), n_special(tok) + k)),
        maxrss_mib=maxrss_mib, cur_rss_mib=lambda: float("nan"),
        cpu_sample=lambda: (0, 0, 0), proc_cpu_s=lambda c0, c1: float("nan"),
        other_load=lambda c0, c1: float("nan"), summarize=summarize)


def grpo_overrides(w: dict, model_dir: str, out_dir: str, reward: str, grad_ckpt: bool,
                   precision: str, stops: list[int]) -> list[str]:
    """lora_ppo's settings for a GRPO workload, each matching what trl_grpo.py pins on TRL."""
    samples = w["prompts"] * w["n"]
    return [
        f"model.path={model_dir}", f"output_dir={out_dir}", "quantization.mode=none",
        f"model.gradient_checkpointing={grad_ckpt}", f"model.max_prompt_length={w['prompt_len']}",
        # LoraConfig(r, alpha=2r, dropout 0, all-linear)
        f"lora.r={GRPO_PEER_ARGS['lora_r']}", f"lora.alpha={2 * GRPO_PEER_ARGS['lora_r']}",
        "lora.dropout=0.0", "lora.target_modules=[all-linear]",
        # generation batch = prompts x n, all decoded at once (TRL: one generate() call)
        f"rollout.prompts_per_update={w['prompts']}", f"rollout.samples_per_prompt={w['n']}",
        f"rollout.generation_batch_size={samples}", f"rollout.max_new_tokens={w['gen_len']}",
        f"rollout.stop_token_ids={stops}", "rollout.temperature=1.0",
        # GRPO: group advantages (std + 1e-4), beta * k3 KL in the loss, loss_type 'grpo'
        "ppo.advantage_estimator=grpo", f"ppo.kl_coef={GRPO_PEER_ARGS['beta']}",
        "ppo.adaptive_kl=false", "ppo.kl_in=loss", "ppo.kl_estimator=k3",
        "ppo.loss_aggregation=seq_mean_token_mean", "ppo.scale_rewards=group",
        "ppo.cliprange=0.2", "ppo.importance_sampling_level=token", "ppo.ent_coef=0.0",
        "ppo.mask_truncated_completions=false", "rollout.dynamic_sampling=false",
        # num_iterations 1, steps_per_generation = GA: one optimizer step per generation
        "ppo.epochs=1", f"ppo.minibatch_size={samples}", f"ppo.micro_batch_size={w['micro']}",
        f"ppo.optim.learning_rate={GRPO_PEER_ARGS['lr']}", "ppo.optim.lr_schedule=constant",
        "ppo.optim.warmup_steps=0", "ppo.optim.weight_decay=0.0", "ppo.optim.max_grad_norm=1.0",
        f"ppo.total_updates={w['steps']}", "deepspeed.config=zero0",
        f"deepspeed.precision={precision}", f"reward.function={reward}:even",
        "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0"]


def lora_ppo_grpo_side(a) -> dict:
    """One lora_ppo GRPO run of workload `a.w`, timed per step like trl_grpo.py: wall_s of step
    k from the end of step k-1 (step 0: its start), rollout_s = generation + reference forward +
    reward + advantages, update_s the optimizer step; the JSON has the peer's fields."""
    t_start = time.perf_counter()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    sys.path.insert(0, str(REPO))
    gc = _grpo_common()
    from transformers import AutoTokenizer

    from lora_ppo.config.load import load_config
    from lora_ppo.io.data import Prompt
    from lora_ppo.ppo.collect import sampler_scores
    from lora_ppo.ppo.loop import ppo_step, setup

    w = a.w
    P, steps_n = w["prompts"], w["steps"]
    rss = {"after_import_mib": gc.maxrss_mib()}
    # the peer's own tokenizer loading and prompts: the same texts, so the same token ids
    tok = AutoTokenizer.from_pretrained(a.model_dir, padding_side="left",
                                        truncation_side="left")
    stops = gc.stop_ids(tok, w["stop_ids"])
    lo = gc.n_special(tok) + w["stop_ids"]
    if gc.make_prompts is not None and not a.random_prompts:
        texts = gc.make_prompts(tok, P * steps_n, w["prompt_len"], a.seed, lo)
        prompt_ids = [tok(t)["input_ids"] for t in texts]
    else:  # random ids the tokenizer knows (the GPU check: no ../shared/peer there)
        g = torch.Generator().manual_seed(a.seed)
        prompt_ids = torch.randint(lo, len(tok), (P * steps_n, w["prompt_len"]),
                                   generator=g).tolist()
        texts = [tok.decode(p) for p in prompt_ids]
    bad = [len(p) for p in prompt_ids if len(p) != w["prompt_len"]]
    if bad:
        raise SystemExit(f"prompts of {bad} tokens, not {w['prompt_len']}")

    reward = Path(a.out).with_suffix(".reward.py")
    reward.write_text(GRPO_REWARD.format(peer=str(PEER)))
    cfg = load_config(None, grpo_overrides(
        w, a.model_dir, str(Path(a.out).with_suffix(".run")), str(reward), a.grad_ckpt,
        a.precision, stops) + [f"seed={a.seed}", *a.set])

    # RSS after the base model's load, its weights made resident (safetensors are mmap-backed),
    # as trl_grpo.py measures it: the adapters, engine and optimizer come after, on both sides
    cuda = torch.cuda.is_available()

    def load_resident(base):
        with torch.no_grad():
            for prm in base.parameters():
                prm.sum()
        rss["after_model_load_mib"] = gc.maxrss_mib()
        rss["after_model_load_current_mib"] = gc.cur_rss_mib()
        if cuda:
            torch.cuda.synchronize()
            rss["gpu_after_model_load_mib"] = torch.cuda.memory_allocated() / 2**20

    # Every step takes the next P of the run's prompt cycle: the same texts as the peer's, in
    # a seeded shuffle of the first pass (every step's prompts distinct; all of one length).
    prompts = [Prompt(t, tuple(p)) for t, p in zip(texts, prompt_ids)]
    run = setup(cfg, prompts=prompts, on_base_loaded=load_resident)
    rss["after_setup_mib"] = gc.maxrss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    records = []
    t_prev = c_prev = None
    for k in range(steps_n):
        sync()
        c0, t0 = gc.cpu_sample(), time.perf_counter()
        if t_prev is None:
            t_prev, c_prev = t0, c0
        out = ppo_step(run)
        sync()
        t3, c1 = time.perf_counter(), gc.cpu_sample()
        ro, stats, sec = out.rollout, out.stats, out.seconds
        raw = ro.raw_scores
        mask = ro.response_mask.cpu()
        lens = [int(x) for x in mask.sum(1).tolist()]
        ends = [int(r[int(m) - 1]) for r, m in zip(ro.response_ids.cpu(), lens) if m]
        ended = ro.has_eos.cpu().tolist()
        rec = {"step": k, "wall_s": t3 - t_prev, "cpu_s": gc.proc_cpu_s(c_prev, c1),
               "step_s": t3 - t0, "rollout_s": sec["generation"] + sec["scoring"],
               "update_s": sec["update"], "gen_s": sec["generation"],
               "score_s": sec["scoring"], "samples": len(lens), "gen_tokens": sum(lens),
               "prompt_tokens": len(lens) * w["prompt_len"], "resp_lens": lens,
               "mean_reward": float(raw.mean()), "maxrss_mib": gc.maxrss_mib(),
               "other_cpu_load": gc.other_load(c0, c1),
               # the stop token is counted: every answer that stopped ends with a stop id
               "stopped": sum(ended), "stop_token_counted": all(
                   e in run.stop_ids for e, s in zip(ends, ended) if s),
               "optimizer_steps": stats.optimizer_steps, "ratio": stats.ratio,
               "kl_loss": stats.kl_loss}
        if cuda:
            rec["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        records.append(rec)
        t_prev, c_prev = t3, c1
        print(f"[lora_ppo] step {k}: {rec['wall_s']:.2f}s (gen {sec['generation']:.2f}s, score "
              f"{sec['scoring']:.2f}s, update {sec['update']:.2f}s) tokens {rec['gen_tokens']} reward "
              f"{rec['mean_reward']:+.4f} other-load {rec['other_cpu_load']:.2f}",
              file=sys.stderr, flush=True)
    rss["peak_mib"] = gc.maxrss_mib()
    rss["current_mib"] = gc.cur_rss_mib()
    summary = gc.summarize(records, rss["after_model_load_mib"])
    summary["fixed_length_exact"] = all(ln == w["gen_len"] for r in records for ln in r["resp_lens"])
    summary["stop_token_counted"] = all(r["stop_token_counted"] for r in records)
    if cuda:
        summary["gpu_peak_mib"] = max(r["gpu_peak_mib"] for r in records)
        summary["gpu_peak_above_load_mib"] = (summary["gpu_peak_mib"]
                                              - rss["gpu_after_model_load_mib"])
    c, alg = run.cfg, run.cfg.algorithm
    import peft
    import transformers

    return {
        "tool": "lora_ppo-grpo", "side": "lora_ppo",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "device": str(run.dist.device), "torch_threads": torch.get_num_threads(),
        "workload": w,
        "settings": {"algorithm": alg._asdict(), "layout": repr(run.ac.layout),
                     "continuous_batching": run.seams.decode.continuous_batching,
                     "static_kv_cache": run.seams.decode.static_kv_cache,
                     "fold_for_generation": c.rollout.fold_for_generation,
                     "sampler_logprobs": sampler_scores(run),
                     "gradient_checkpointing": c.model.gradient_checkpointing,
                     "precision": c.deepspeed.precision, "kl_coef": run.kl_ctl.value,
                     "learning_rate": c.ppo.optim.learning_rate,
                     "lr_schedule": c.ppo.optim.lr_schedule, "epochs": c.ppo.epochs,
                     "minibatch_size": c.ppo.minibatch_size,
                     "micro_batch_size": c.ppo.micro_batch_size, "lora": [c.lora.r, c.lora.alpha],
                     "stop_ids": run.stop_ids},
        "prompts": {"count": len(texts), "sha": gc.prompts_digest(texts),
                    "token_len": w["prompt_len"],
                    "source": "random ids" if a.random_prompts or not gc.make_prompts
                    else "grpo_common"},
        "stop_ids": stops, "rss": rss, "summary": summary, "steps": records,
        "wall_s": time.perf_counter() - t_start,
    }


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
                 extra: list[str], malloc: dict | None = None, side: str = "lora_ppo") -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--model-dir", str(model),
           "--workload-json", json.dumps(w), "--seed", str(seed), "--grad-ckpt", str(grad_ckpt),
           "--out", str(out)] + [f"--set={s}" for s in extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    subprocess.run(cmd, check=True, env={**env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                                         **(malloc or {})})
    return json.loads(out.read_text())


def _stats(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


# --- GRPO: TRL 1.16's GRPOTrainer against lora_ppo -------------------------------------------

def grpo_peer_python() -> str:
    """The python of the TRL 1.16 venv, made (once) by ../shared/peer/setup_trl_grpo.sh."""
    out = subprocess.run(["bash", str(PEER / "setup_trl_grpo.sh")], check=True,
                         capture_output=True, text=True).stdout
    for line in reversed(out.splitlines()):
        if "ready at " in line:
            return line.split("ready at ", 1)[1].strip() + "/bin/python"
    raise SystemExit(f"setup_trl_grpo.sh did not say where its venv is:\n{out}")


def trl_grpo_cmd(peer_py: str, model: Path, w: dict, out: Path, seed: int) -> list[str]:
    cmd = [peer_py, str(PEER / "trl_grpo.py"), "--model-dir", str(model), "--prompts",
           str(w["prompts"]), "--num-generations", str(w["n"]), "--micro-batch-size",
           str(w["micro"]), "--prompt-len", str(w["prompt_len"]), "--gen-len", str(w["gen_len"]),
           "--stop-ids", str(w["stop_ids"]), "--steps", str(w["steps"]),
           "--lora-r", str(GRPO_PEER_ARGS["lora_r"]), "--beta", str(GRPO_PEER_ARGS["beta"]),
           "--loss-type", GRPO_PEER_ARGS["loss_type"], "--lr", str(GRPO_PEER_ARGS["lr"]),
           "--seed", str(seed), "--threads", "1", "--out", str(out)]
    return cmd + (["--grad-ckpt"] if w["grad_ckpt"] else [])


def run_trl_grpo(peer_py: str, model: Path, w: dict, out: Path, seed: int,
                 malloc: dict | None = None) -> dict:
    subprocess.run(trl_grpo_cmd(peer_py, model, w, out, seed), check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1", **(malloc or {})})
    return json.loads(out.read_text())


def summarize_grpo(res: dict, gen_len: int) -> dict:
    """One run of either side (both write grpo_common.summarize's fields)."""
    s, steps = res["summary"], res["steps"]
    lens = [n for st in steps for n in (st.get("resp_lens") or [])]
    return {"tokens_per_s": s["gen_tokens_per_s"],
            "tokens_per_cpu_s": s.get("gen_tokens_per_cpu_s"),
            "step_s": s["median_step_s"], "rollout_s": s["median_rollout_s"],
            "update_s": s["median_update_s"],
            "gen_s": (statistics.median(st["gen_s"] for st in steps[1:] or steps)
                      if "gen_s" in steps[0] else None),
            "peak_above_load_mib": s["rss_above_load_mib"],
            "after_model_load_mib": s["after_model_load_mib"], "peak_rss_mib": s["peak_rss_mib"],
            "mean_resp_len": s["mean_resp_len"], "gen_tokens_per_step": s["gen_tokens_per_step"],
            "samples_per_step": [st["samples"] for st in steps],
            "fixed_length_exact": bool(lens) and all(n == gen_len for n in lens),
            "rewards_finite": s.get("rewards_finite"),
            "max_other_cpu_load": s.get("max_other_cpu_load"),
            "prompts": {k: res["prompts"][k] for k in ("count", "sha", "token_len")}}


def grpo_point(name: str, w: dict, runs: dict) -> dict:
    """The per-workload result: each side's figures and the lora_ppo / TRL ratios per repeat
    (speed: tokens/s; memory: peak RSS above load), with the checks that both sides ran the
    same work."""
    trl, lp = runs["trl"], runs["lora_ppo"]
    pairs = [(t["tokens_per_s"], x["tokens_per_s"]) for t, x in zip(trl, lp)]
    mem = [(t["peak_above_load_mib"], x["peak_above_load_mib"]) for t, x in zip(trl, lp)]
    return {"workload": name, "gen_len": w["gen_len"], "settings": w, "runs": runs,
            "gradient_checkpointing": w["grad_ckpt"],
            "tokens_per_s": {k: _stats([x["tokens_per_s"] for x in v]) for k, v in runs.items()},
            "peak_above_load_mib": {k: _stats([x["peak_above_load_mib"] for x in v])
                                    for k, v in runs.items()},
            "mean_resp_len": {k: statistics.mean(x["mean_resp_len"] for x in v)
                              for k, v in runs.items()},
            "speed_ratio": _stats([b / a for a, b in pairs]),
            "memory_ratio": _stats([b / a if a > 0 else float("nan") for a, b in mem]),
            "same_prompts": all(t["prompts"] == x["prompts"] for t, x in zip(trl, lp)),
            "same_samples_per_step": all(t["samples_per_step"] == x["samples_per_step"]
                                         for t, x in zip(trl, lp))}


def grpo_line(p: dict) -> str:
    tps, mem, sr = p["tokens_per_s"], p["peak_above_load_mib"], p["speed_ratio"]
    line = (f"{p['workload']} gen_len {p['gen_len']}: tokens/s TRL {tps['trl']['median']:.1f} "
            f"lora_ppo {tps['lora_ppo']['median']:.1f} ratio {sr['min']:.2f}-{sr['max']:.2f} "
            f"(median {sr['median']:.2f}); peak above load TRL {mem['trl']['median']:.0f} MiB "
            f"lora_ppo {mem['lora_ppo']['median']:.0f} MiB ratio "
            f"{p['memory_ratio']['median']:.2f}; mean answer TRL "
            f"{p['mean_resp_len']['trl']:.1f} lora_ppo {p['mean_resp_len']['lora_ppo']:.1f}")
    if not p["settings"]["stop_ids"]:  # fixed lengths: did an EOS cut an answer short?
        exact = {k: all(x["fixed_length_exact"] for x in v) for k, v in p["runs"].items()}
        line += (f"; every answer at the cap: TRL {'yes' if exact['trl'] else 'no'} lora_ppo "
                 f"{'yes' if exact['lora_ppo'] else 'no'}")
    if not (p["same_prompts"] and p["same_samples_per_step"]):
        line += " [WARNING: the sides' prompts or samples per step differ]"
    return line


def compare_grpo(a) -> dict:
    peer_py = a.peer_python or grpo_peer_python()
    base = GRPO_WORKLOADS[a.workload]
    if a.tiny:
        base = tiny_workload(base)
    gen_lens = [int(x) for x in a.gen_len.split(",")] if a.gen_len else [base["gen_len"]]
    cache = Path(a.cache)
    points = []
    for gen_len in gen_lens:
        w = {**base, "gen_len": gen_len, "steps": a.steps or base["steps"]}
        model = build_model(w["model"], peer_py, cache / "models")
        runs = {"trl": [], "lora_ppo": []}
        for r in range(a.repeats):  # alternating: TRL, lora_ppo, TRL, ...
            work = cache / "runs" / f"{a.workload}{'-tiny' if a.tiny else ''}-{gen_len}-{r}"
            work.mkdir(parents=True, exist_ok=True)
            malloc = _malloc_env(a.malloc_mmap_threshold)
            runs["trl"].append(summarize_grpo(
                run_trl_grpo(peer_py, model, w, work / "trl.json", a.seed, malloc), gen_len))
            runs["lora_ppo"].append(summarize_grpo(run_lora_ppo(
                model, w, work / "lora_ppo.json", a.seed, w["grad_ckpt"], a.set, malloc,
                side="lora_ppo_grpo"), gen_len))
        point = grpo_point(a.workload, w, runs)
        point["malloc_mmap_threshold"] = a.malloc_mmap_threshold
        point["tiny"] = a.tiny
        points.append(point)
        print(grpo_line(point), flush=True)
    return {"command": " ".join(sys.argv), "peer": "trl 1.16 GRPOTrainer", "points": points}


def compare(a) -> dict:
    if a.workload in GRPO_WORKLOADS:
        return compare_grpo(a)
    peer_py = a.peer_python or subprocess.run(["bash", str(PEER / "setup.sh")], check=True,
                                              capture_output=True, text=True).stdout.strip()
    base = WORKLOADS[a.workload]
    if a.tiny:
        base = tiny_workload(base)
    gen_lens = [int(x) for x in a.gen_len.split(",")] if a.gen_len else [base["gen_len"]]
    cache = Path(a.cache)
    points = []
    for gen_len in gen_lens:
        w = {**base, "gen_len": gen_len, "steps": a.steps or base["steps"]}
        model = build_model(w["model"], peer_py, cache / "models")
        grad_ckpt = a.workload == "memory"
        runs = {"trl": [], "lora_ppo": []}
        for r in range(a.repeats):
            work = cache / "runs" / f"{a.workload}{'-tiny' if a.tiny else ''}-{gen_len}-{r}"
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=[*WORKLOADS, *GRPO_WORKLOADS], default="fixed",
                   help="PPO (TRL 0.11.4 peer) or grpo-* (TRL 1.16 GRPOTrainer peer)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    p.add_argument("--steps", type=int, default=None, help="PPO/GRPO steps per run (default: "
                   "the workload's)")
    p.add_argument("--gen-len", default=None, help="comma-separated new-token counts: a sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-python", default=None, help="the TRL venv's python (default: made "
                   "by ../shared/peer/setup.sh, or setup_trl_grpo.sh for grpo-*)")
    p.add_argument("--cache", default="/tmp/lora_ppo_vs_trl")
    p.add_argument("--set", action="append", default=[], help="extra lora_ppo override")
    p.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="MALLOC_MMAP_THRESHOLD_ for both sides (e.g. 65536: peak RSS follows "
                   "live tensors, not glibc's retained free blocks); default: glibc's own")
    p.add_argument("--tiny", action="store_true", help="shrink the workload to check the "
                   "harness only (2-layer model, few short prompts): the figures mean nothing")
    p.add_argument("--out", required=True)
    # the lora_ppo side, run by the driver in a fresh process (and by scripts/gpu_check.py)
    p.add_argument("--side", choices=["lora_ppo", "lora_ppo_grpo"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--workload-json", help=argparse.SUPPRESS)
    p.add_argument("--grad-ckpt", default="False", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)  # GRPO side
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)  # 0: torch's
    p.add_argument("--random-prompts", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    a = parse_args()
    if a.side:
        a.w = json.loads(a.workload_json)
        a.grad_ckpt = a.grad_ckpt == "True"
        res = lora_ppo_grpo_side(a) if a.side == "lora_ppo_grpo" else lora_ppo_side(a)
    else:
        res = compare(a)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
