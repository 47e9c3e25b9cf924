"""lora_ppo against TRL side by side, on the same model, prompts, reward and settings: TRL 0.11.4's
PPOTrainer + peft for PPO, TRL 1.16's GRPOTrainer + peft for GRPO (with tools: its
environment_factory).

    bash benchmarks/peers/setup.sh                     # the two peer venvs (once; docs/benchmarks.md)
    python benchmarks/bench_vs_trl.py --workload variable --repeats 3 --out variable.json
    python benchmarks/bench_vs_trl.py --workload fixed --gen-len 16,32,64,128 --repeats 1 --out sweep.json
    python benchmarks/bench_vs_trl.py --workload grpo-long --repeats 3 --out grpo-long.json
    python benchmarks/bench_vs_trl.py --workload grpo-long --tiny --repeats 1 --steps 2 --out t.json
    python benchmarks/bench_vs_trl.py --workload grpo-tools --repeats 2 --out grpo-tools.json

The workloads (benchmarks/workload.py, WORKLOADS):
    fixed          PPO, 70M Llama (hidden 768, 8 layers, vocab 8192), batch 16, 16-token prompts,
                   exactly 32 new tokens
    variable       PPO, the same model, prompts of 8-64 tokens, responses ending at one of 400
                   stop ids (mean ~20 tokens, cap 64)
    memory         PPO, 20M Llama with a 32k vocabulary, batch 8, 64-token prompts + 512 new
    grpo-long      GRPO, 70M, 4 prompts x 8 answers, 256-token prompts, 512 stop ids (cap 48)
    grpo-variable  GRPO, 70M, 8 x 4, 16-token prompts, 400 stop ids (cap 64)
    grpo-fixed     GRPO, 70M, 8 x 4, 16-token prompts, 32 new tokens, no stop ids
    grpo-memory    GRPO, 20M with 32k vocabulary, 2 x 4, 64 + 256 tokens, checkpointing on both
    grpo-tools     GRPO with tools against TRL 1.16's environment_factory: a 4-layer Llama trained
                   to call a calculator (tools_model.py), 4 x 8, 2-3 calls per problem
                   (tools_task.py), 192 trajectory tokens, at most 4 tool rounds

How. For each point the driver builds the model once (lora_ppo.builtin.tiny, into --cache), then
runs TRL, lora_ppo, TRL, lora_ppo, ... (--repeats pairs), each in a fresh process with one torch
thread, so that a drift of the machine's speed hits both: TRL in its peer venv
(benchmarks/peers/trl_ppo.py, trl_grpo.py or trl_grpo_tools.py), lora_ppo in this venv
(benchmarks/lora_ppo_side.py).
Every side writes the same JSON (benchmarks/workload.py's summary, benchmarks/meters.py's
meters); the driver checks that both sides ran the same prompts and samples per step, and
reports per side and pair:
    tokens/s           generated tokens per second of whole steps, over the steps after the first
                       (the first pays one-time costs on both sides); with tools, the model's
                       own tokens (the tools' results are not counted)
    peak above load    peak RSS minus the RSS once the model is loaded with its weights resident
    speed ratio        lora_ppo / TRL tokens/s; memory ratio: lora_ppo / TRL peak above load

`--tiny` shrinks a workload for checking the harnesses only (2-layer models of the same
vocabularies, <= 2 prompts, prompts <= 32 and answers <= 24 tokens): its figures mean nothing.
`--malloc-mmap-threshold 65536` runs both sides with glibc's MALLOC_MMAP_THRESHOLD_ fixed, so
that peak RSS counts live memory rather than freed blocks glibc kept (see `_malloc_env`).
The settings each side pins, and why, are in the docstrings of the three side files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # lora_ppo from this checkout, without installing
sys.path.insert(0, str(HERE))
import workload as wl  # noqa: E402

SETUP = "bash benchmarks/peers/setup.sh"
PEERS = {"ppo": ("trl011", HERE / "peers" / "trl_ppo.py", "trl 0.11.4 PPOTrainer"),
         "grpo": ("trl116", HERE / "peers" / "trl_grpo.py", "trl 1.16.0 GRPOTrainer"),
         "grpo-tools": ("trl116", HERE / "peers" / "trl_grpo_tools.py",
                        "trl 1.16.0 GRPOTrainer with environment_factory")}


def peer_of(w: dict) -> str:
    """The PEERS key of a workload: its algorithm, or grpo-tools."""
    return "grpo-tools" if w.get("tools") else w["algo"]


class UsageError(Exception):
    """A bad argument or a missing peer venv: one line on stderr, exit code 2."""


def peer_python(peer: str, given: str | None) -> str:
    """The python of the workload's peer venv: --peer-python, else the one setup.sh made."""
    venv = PEERS[peer][0]
    if given:
        return given
    root = Path(os.environ.get("LORA_PPO_PEERS", "/tmp/lora_ppo_peers"))
    py = root / venv / "bin" / "python"
    if not os.access(py, os.X_OK):
        raise UsageError(f"no {venv} peer venv at {root / venv}: make it with `{SETUP} {venv}` "
                         "(or pass --peer-python)")
    return str(py)


# transformers 5 saves the tokenizer's class as TokenizersBackend, which transformers 4.46 (TRL
# 0.11's) does not know; both load the same tokenizer.json as PreTrainedTokenizerFast.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def build_model(name: str, cache: Path) -> Path:
    """The workload's random-init Llama (once per cache): lora_ppo.builtin.tiny builds it, both
    venvs' transformers load it. Its tokenizer is trained on the review corpus and holds fewer
    ids than the model's vocabulary; PPO prompts with random ids, GRPO with the tokenizer's
    words, and both sides sample from every row of the head, so only the shapes matter."""
    out = cache / "models" / name
    if (out / "config.json").is_file():
        return out
    if name in wl.TOOL_MODELS:  # trained to call the calculator: minutes, once
        import tools_model

        print(f"building {name} into {out} (once; tools_model.py)", file=sys.stderr, flush=True)
        return tools_model.build(name, out)
    from lora_ppo.builtin.tiny import build_tiny_model

    print(f"building {name} into {out} (once)", file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out.parent))
    build_tiny_model(tmp, **wl.MODELS[name], max_position_embeddings=2048)
    tok_cfg = tmp / "tokenizer_config.json"
    tok_cfg.write_text(json.dumps({**json.loads(tok_cfg.read_text()),
                                   "tokenizer_class": TOKENIZER_CLASS}, indent=2))
    os.replace(tmp, out)  # atomic: a crash never leaves a half-built model
    return out


def _malloc_env(mmap_threshold: int | None) -> dict:
    """glibc settings for both sides' processes. By default glibc keeps freed blocks below its
    dynamic mmap threshold (up to 32 MiB) in the heap, so peak RSS also counts memory that was
    already freed, in amounts that depend on the order of allocations. MALLOC_MMAP_THRESHOLD_
    fixes the threshold: every larger block gets its own mapping, unmapped on free, so RSS
    follows the live tensors (what a GPU's caching allocator can reuse)."""
    return {} if mmap_threshold is None else {"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)}


def run_side(side: str, w: dict, model: Path, out: Path, a, peer_py: str) -> dict:
    """One run of one side in a fresh process; its JSON."""
    args = ["--workload", json.dumps(w), "--model-dir", str(model), "--seed", str(a.seed),
            "--threads", "1", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", **_malloc_env(a.malloc_mmap_threshold))
    if side == "trl":
        cmd = [peer_py, str(PEERS[peer_of(w)][1]), *args]
    else:
        cmd = [sys.executable, str(HERE / "lora_ppo_side.py"), *args,
               *(f"--set={s}" for s in a.set)]
        env.setdefault("DS_ACCELERATOR", "cpu")
    # the sides' own output (TRL prints its training metrics) goes to stderr: stdout carries the
    # driver's result lines only
    subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)
    return json.loads(out.read_text())


# a tool workload's figures (workload.tool_summary), per run
TOOL_FIGURES = ("mean_tool_rounds", "frac_2_to_3_rounds", "tool_rounds_hist", "env_token_frac",
                "tool_failures")


def figures(res: dict, gen_len: int) -> dict:
    """What the comparison reads from one run of either side."""
    s = res["summary"]
    lens = [n for st in res["steps"] for n in st["resp_lens"]]
    return {"tokens_per_s": s["gen_tokens_per_s"], "tokens_per_cpu_s": s["gen_tokens_per_cpu_s"],
            "step_s": s["median_step_s"], "gen_s": s["median_gen_s"], "rest_s": s["median_rest_s"],
            "rollout_s": s["median_rollout_s"], "update_s": s["median_update_s"],
            "peak_above_load_mib": s["rss_above_load_mib"],
            "after_model_load_mib": s["after_model_load_mib"], "peak_rss_mib": s["peak_rss_mib"],
            "mean_resp_len": s["mean_resp_len"], "gen_tokens_per_step": s["gen_tokens_per_step"],
            "samples_per_step": s["samples_per_step"],
            "fixed_length_exact": bool(lens) and all(n == gen_len for n in lens),
            "rewards_finite": s["rewards_finite"], "max_other_cpu_load": s["max_other_cpu_load"],
            "sampling_unwarped": s.get("sampling_unwarped"), "prompts_sha": res["prompts"]["sha"],
            "versions": res["versions"],
            **{k: s[k] for k in TOOL_FIGURES if k in s}}


def _stats(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def point(name: str, w: dict, runs: dict) -> dict:
    """One workload at one response length: each side's figures and the lora_ppo / TRL ratios
    per alternating pair, with the checks that both sides ran the same work."""
    trl, lp = runs["trl"], runs["lora_ppo"]
    speed = [x["tokens_per_s"] / t["tokens_per_s"] for t, x in zip(trl, lp)]
    memory = [x["peak_above_load_mib"] / t["peak_above_load_mib"]
              if t["peak_above_load_mib"] > 0 else float("nan") for t, x in zip(trl, lp)]
    return {"workload": name, "gen_len": w["gen_len"], "settings": w, "runs": runs,
            "gradient_checkpointing": w["grad_ckpt"],
            "tokens_per_s": {k: _stats([x["tokens_per_s"] for x in v]) for k, v in runs.items()},
            "peak_above_load_mib": {k: _stats([x["peak_above_load_mib"] for x in v])
                                    for k, v in runs.items()},
            "mean_resp_len": {k: statistics.mean(x["mean_resp_len"] for x in v)
                              for k, v in runs.items()},
            "speed_ratio": _stats(speed), "memory_ratio": _stats(memory),
            **({"mean_tool_rounds": {k: statistics.mean(x["mean_tool_rounds"] for x in v)
                                     for k, v in runs.items()}} if w.get("tools") else {}),
            "same_prompts": all(t["prompts_sha"] == x["prompts_sha"] for t, x in zip(trl, lp)),
            "same_samples_per_step": all(t["samples_per_step"] == x["samples_per_step"]
                                         for t, x in zip(trl, lp))}


def line(p: dict) -> str:
    """The point in one line (stdout)."""
    tps, mem, sr = p["tokens_per_s"], p["peak_above_load_mib"], p["speed_ratio"]
    out = (f"{p['workload']} gen_len {p['gen_len']}: tokens/s TRL {tps['trl']['median']:.1f} "
           f"lora_ppo {tps['lora_ppo']['median']:.1f} ratio {sr['min']:.2f}-{sr['max']:.2f} "
           f"(median {sr['median']:.2f}); peak above load TRL {mem['trl']['median']:.0f} MiB "
           f"lora_ppo {mem['lora_ppo']['median']:.0f} MiB ratio "
           f"{p['memory_ratio']['median']:.2f}; mean answer TRL "
           f"{p['mean_resp_len']['trl']:.1f} lora_ppo {p['mean_resp_len']['lora_ppo']:.1f}")
    if p["settings"].get("tools"):
        r = p["mean_tool_rounds"]
        out += f"; tool rounds/sample TRL {r['trl']:.2f} lora_ppo {r['lora_ppo']:.2f}"
    elif not p["settings"]["stop_ids"]:  # fixed lengths: did an EOS cut an answer short?
        exact = {k: all(x["fixed_length_exact"] for x in v) for k, v in p["runs"].items()}
        out += (f"; every answer at the cap: TRL {'yes' if exact['trl'] else 'no'} lora_ppo "
                f"{'yes' if exact['lora_ppo'] else 'no'}")
    if not (p["same_prompts"] and p["same_samples_per_step"]):
        out += " [WARNING: the sides' prompts or samples per step differ]"
    if any(x["sampling_unwarped"] is False for x in p["runs"]["trl"]):
        out += " [WARNING: a logits processor changed TRL's sampling]"
    return out


def compare(a) -> dict:
    base = wl.WORKLOADS[a.workload]
    peer_py = peer_python(peer_of(base), a.peer_python)
    base = wl.tiny(base) if a.tiny else base
    gen_lens = [int(x) for x in a.gen_len.split(",")] if a.gen_len else [base["gen_len"]]
    cache = Path(a.cache)
    points = []
    for gen_len in gen_lens:
        w = {**base, "gen_len": gen_len, "steps": a.steps or base["steps"]}
        model = build_model(w["model"], cache)
        runs = {"trl": [], "lora_ppo": []}
        for r in range(a.repeats):  # alternating: TRL, lora_ppo, TRL, ...
            work = cache / "runs" / f"{a.workload}{'-tiny' if a.tiny else ''}-{gen_len}-{r}"
            work.mkdir(parents=True, exist_ok=True)
            for side in ("trl", "lora_ppo"):
                res = run_side(side, w, model, work / f"{side}.json", a, peer_py)
                runs[side].append(figures(res, gen_len))
        p = point(a.workload, w, runs)
        p.update(malloc_mmap_threshold=a.malloc_mmap_threshold, tiny=a.tiny)
        points.append(p)
        print(line(p), flush=True)
    return {"command": " ".join(sys.argv), "peer": PEERS[peer_of(base)][2], "points": points}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=list(wl.WORKLOADS), default="fixed",
                   help="PPO against TRL 0.11.4, or grpo-* against TRL 1.16's GRPOTrainer")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per run (default: the workload's)")
    p.add_argument("--gen-len", default=None, help="comma-separated new-token counts: a sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-python", default=None,
                   help=f"the peer venv's python (default: the one `{SETUP}` made)")
    p.add_argument("--cache", default="/tmp/lora_ppo_vs_trl",
                   help="where the models and each run's JSON are kept")
    p.add_argument("--set", action="append", default=[], help="another lora_ppo override")
    p.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="MALLOC_MMAP_THRESHOLD_ for both sides (e.g. 65536: peak RSS follows "
                   "live tensors, not glibc's retained free blocks); default: glibc's own")
    p.add_argument("--tiny", action="store_true", help="shrink the workload to check the "
                   "harnesses only (2-layer model, few short prompts): the figures mean nothing")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.repeats < 1 or (a.steps is not None and a.steps < 1):
        p.error("--repeats and --steps must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        res = compare(a)
    except UsageError as e:
        print(f"bench_vs_trl: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"bench_vs_trl: a side failed (exit {e.returncode}): {' '.join(e.cmd[:2])}",
              file=sys.stderr)
        return 1
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
