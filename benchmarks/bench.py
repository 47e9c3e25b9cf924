"""Benchmark the three phases of a PPO update on a locally built Llama of any size.

    python benchmarks/bench.py --hidden 512 --layers 4 --updates 2 --out bench.json
    python benchmarks/bench.py --sweep seq=64,128,256 --sweep quant=none,4bit --out sweep.json
    deepspeed --num_gpus 1 benchmarks/bench.py --hidden 2048 --layers 16 --out gpu.json

Each update runs the real pieces of lora_ppo.ppo.loop: `loop.setup` builds the run, then
    generation  the sampler (lora_ppo/generation)
    scoring     old/ref log-probs and values, the reward, rewards and advantages
    update      the PPO epochs on the DeepSpeed engine
as `ppo_step` runs them and calls back at the start of each phase
and for each phase the JSON holds its time, tokens/s, FLOPs (lora_ppo.sizing.flops), FLOP/s as a
share of a matmul peak measured in the same process, peak memory, the estimator's prediction for
that peak, and the share of the machine other processes used meanwhile.

Peak memory per phase. GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats.
CPU: the kernel's peak resident set size (VmHWM) is monotone, so before each phase the bench
writes 5 to /proc/self/clear_refs, which resets VmHWM to the current RSS, and reads VmHWM after
it; the figure is that peak minus the RSS before the model was loaded (libraries imported,
process group up). For RSS to fall when tensors are freed, glibc must return large blocks to the
kernel: the bench re-executes itself with MALLOC_MMAP_THRESHOLD_=65536 (every allocation of
64 KiB or more gets its own mmap, unmapped on free), as tests/rl/test_logprobs.py does. That
costs time (fresh pages fault in at every allocation: scoring ran 1.4x slower in
docs/benchmarks.md), so `--malloc-default` keeps glibc's thresholds for timing runs, whose CPU
peaks are then only upper bounds.

Each point of a sweep runs in a fresh process, so each has its own baseline. Sweeps are refused
under a multi-process launch; launch one point per `deepspeed` command instead.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

import meters  # noqa: E402
from meters import other_cpu_share  # noqa: E402

from lora_ppo.errors import UserError  # noqa: E402

MIB = 2**20
SWEEP_KEYS = {"seq": int, "prompt_len": int, "new_tokens": int, "batch": int, "micro_batch": int,
              "quant": str, "value_mode": str, "grad_ckpt": lambda v: v.lower() in ("1", "true"),
              "hidden": int, "layers": int, "vocab": int, "ds_config": str}


# --- measurement (the meters: benchmarks/meters.py) -------------------------------------------

def matmul_peak_flops(device, dtype, n: int = 1024, reps: int = 5) -> float:
    """Best FLOP/s of an n x n matmul over `reps` timed tries (after one warm-up)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, (time.perf_counter() - t0) / 4)
    return 2.0 * n**3 / best


# --- the model, prompts and config of one point ----------------------------------------------

def model_dir(p: dict) -> Path:
    """Build (once, into the cache) a random-init Llama of the point's size."""
    from filelock import FileLock  # a transformers dependency

    from lora_ppo.builtin.tiny import build_tiny_model

    arch = {k: p[k] for k in ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads")}
    max_pos = max(2048, p["prompt_len"] + p["new_tokens"])
    name = "-".join(f"{k}{v}" for k, v in arch.items()) + f"-pos{max_pos}"
    root = Path(p["cache_dir"] or os.environ.get("LORA_PPO_CACHE") or "~/.cache/lora_ppo")
    target = root.expanduser() / "bench" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):  # ranks of one launch share the build
        if not (target / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
            build_tiny_model(tmp, vocab_size=p["vocab"], hidden_size=p["hidden"],
                             intermediate_size=p["intermediate"], num_layers=p["layers"],
                             num_heads=p["heads"], num_kv_heads=p["kv_heads"],
                             max_position_embeddings=max_pos)
            os.replace(tmp, target)  # atomic: a crash never leaves a half-built model
    return target


def prompts_file(path: Path, prompt_len: int, n: int = 64) -> Path:
    """Prompts of at least `prompt_len` tokens (model.max_prompt_length cuts them to exactly
    that): each line joins enough corpus reviews (about 20 tokens each)."""
    from lora_ppo.builtin.corpus import review_corpus

    texts = [t.replace("\n", " ") for t, _ in review_corpus(n * (2 + prompt_len // 8), seed=7)]
    per = len(texts) // n
    path.write_text("\n".join(" ".join(texts[i * per:(i + 1) * per]) for i in range(n)) + "\n")
    return path


def make_config(p: dict, model: Path, out_dir: Path):
    from lora_ppo.builtin.specs import resolve_builtins
    from lora_ppo.config.load import load_config

    o = [f"model.path={model}", f"output_dir={out_dir}", f"quantization.mode={p['quant']}",
         f"value.mode={p['value_mode']}", f"model.gradient_checkpointing={p['grad_ckpt']}",
         f"model.max_prompt_length={p['prompt_len']}", f"lora.r={p['lora_r']}",
         f"lora.alpha={2 * p['lora_r']}", f"rollout.prompts_per_update={p['batch']}",
         f"rollout.generation_batch_size={p['gen_batch'] or p['batch']}",
         f"rollout.max_new_tokens={p['new_tokens']}", f"ppo.minibatch_size={p['batch']}",
         f"ppo.micro_batch_size={min(p['micro_batch'], p['batch'])}", f"ppo.epochs={p['epochs']}",
         f"ppo.total_updates={p['warmup'] + p['updates']}", f"deepspeed.config={p['ds_config']}",
         f"data.prompts={prompts_file(out_dir / 'prompts.txt', p['prompt_len'])}",
         "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0"]
    cfg = load_config(p["config"], o + p["set"])
    if "function" in cfg.reward.kinds and not cfg.reward.function:  # the built-in reward
        cfg = load_config(p["config"], o + ["reward.function=lora_ppo.builtin.rewards:"
                                            "positive_sentiment"] + p["set"])
    return resolve_builtins(cfg)


# --- one point -------------------------------------------------------------------------------

def _preload() -> None:
    """Import what the phases import lazily, so the baseline RSS already holds the libraries."""
    import datasets  # noqa: F401  (data.load_prompts reads files through it: ~85 MB)
    import deepspeed.runtime.engine  # noqa: F401
    import peft  # noqa: F401
    import transformers.generation.utils  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    with contextlib.suppress(ImportError):
        import bitsandbytes  # noqa: F401

    import lora_ppo.ppo.loop  # noqa: F401


def one_update(run, phase: dict) -> dict:
    """One update of the loop (lora_ppo.ppo.loop.ppo_step, as `train` runs it), each of its
    phases (generation, scoring, update) under its meters.PhaseMeter; returns shapes and token
    counts."""
    from lora_ppo.ppo.loop import ppo_step

    active = []  # the meter of the phase now running

    def on_phase(name: str) -> None:
        if active and active[-1] is phase[name]:
            return  # scoring is entered twice in a row: the forwards, then rewards/advantages
        if active:
            active.pop().__exit__(None, None, None)
        active.append(phase[name].__enter__())

    out = ppo_step(run, on_phase)
    active.pop().__exit__(None, None, None)
    ro = out.rollout
    q, qm, r, rm = ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask
    real = int(qm.sum() + rm.sum())
    return {"prompt_len": q.shape[1], "resp_len": r.shape[1], "generated": int(rm.sum()),
            "real_tokens": real, "lengths": list(zip(qm.sum(1).tolist(),
                                                     rm.sum(1).long().tolist()))}


def _forwards(run) -> tuple[bool, bool]:
    """(policy, reference): which scoring forwards the rollout runs."""
    from lora_ppo.ppo.collect import sampler_scores

    return not sampler_scores(run), run.cfg.algorithm.uses_reference


def phase_flops(run, arch, shapes: dict) -> dict:
    """Model FLOPs per phase (generation per chunk of generation_batch_size, summed)."""
    from lora_ppo.sizing import flops
    from lora_ppo.sizing.arch import lora_param_count

    cfg = run.cfg
    lora = lora_param_count(arch, cfg.lora.r, cfg.lora.target_modules)
    b, gb, q, r = cfg.rollout.prompts_per_update * cfg.rollout.samples_per_prompt, \
        cfg.rollout.generation_batch_size, shapes["prompt_len"], shapes["resp_len"]
    chunks = [min(gb, b - s) for s in range(0, b, gb)]
    adapter = cfg.algorithm.value_mode == "adapter"
    model, executed = flops.update_flops(arch, b, q, r, lora, adapter, cfg.ppo.epochs,
                                         cfg.model.gradient_checkpointing)
    return {"generation": sum(flops.generation_flops(arch, c, q, r, lora) for c in chunks),
            "scoring": sum(flops.scoring_flops(arch, c, q, r, lora, adapter,
                                               bool(cfg.model.init_adapter), *_forwards(run))
                           for c in chunks),
            "update": model, "update_executed": executed}


def useful_flops(run, arch, shapes: dict) -> dict:
    """Model FLOPs of the real tokens only: each sequence at its own prompt and response
    length, as if no padding were computed (the same formulas as phase_flops, batch 1)."""
    from lora_ppo.sizing import flops
    from lora_ppo.sizing.arch import lora_param_count

    cfg = run.cfg
    lora = lora_param_count(arch, cfg.lora.r, cfg.lora.target_modules)
    adapter = cfg.algorithm.value_mode == "adapter"
    out = {"generation": 0.0, "scoring": 0.0, "update": 0.0}
    for q, r in shapes["lengths"]:
        out["generation"] += flops.generation_flops(arch, 1, q, r, lora)
        out["scoring"] += flops.scoring_flops(arch, 1, q, r, lora, adapter,
                                              bool(cfg.model.init_adapter), *_forwards(run))
        out["update"] += flops.update_flops(arch, 1, q, r, lora, adapter, cfg.ppo.epochs,
                                            cfg.model.gradient_checkpointing)[0]
    return out


def _reduce(values: list[float], op: str) -> list[float]:
    import torch

    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op))
    return t.tolist()


def run_point(p: dict) -> dict:
    """Set up one configuration, run warm-up and measured updates, and summarise them."""
    import torch

    from lora_ppo.ppo import loop
    from lora_ppo.runtime.dist import setup_distributed
    from lora_ppo.sizing import memory as est
    from lora_ppo.sizing.arch import read_arch

    # Build before the process group exists: once it does, transformers' save_pretrained writes
    # nothing on ranks other than 0 (distributed/mixin.py, should_save_on_this_rank), so a
    # build that rank 1 won the lock for would lack config.json.
    model = model_dir(p)
    dist = setup_distributed()
    if p["threads"]:
        torch.set_num_threads(p["threads"])
    _preload()
    dtype = torch.float32 if dist.device.type == "cpu" else torch.bfloat16
    peak_flops = matmul_peak_flops(dist.device, dtype)
    out_dir = Path(tempfile.mkdtemp(prefix="lora_ppo_bench_"))
    cfg = make_config(p, model, out_dir)
    baseline = (torch.cuda.memory_allocated(dist.device) if dist.device.type == "cuda"
                else meters.status_bytes("VmRSS"))
    t0 = time.perf_counter()
    run = loop.setup(cfg)
    setup_s = time.perf_counter() - t0
    arch = read_arch(str(model))
    records = []
    for i in range(p["warmup"] + p["updates"]):
        cuda = dist.device if dist.device.type == "cuda" else None
        phase = {k: meters.PhaseMeter(baseline, cuda) for k in ("generation", "scoring", "update")}
        shapes = one_update(run, phase)
        if i >= p["warmup"]:
            records.append((shapes, phase))
    shutil.rmtree(out_dir, ignore_errors=True)  # config.yaml and prompts.txt of this point
    device = "gpu" if dist.device.type == "cuda" else "cpu"
    pred = est.estimate_memory(cfg, arch, device)
    result = summarise(p, run, arch, records, peak_flops, pred)
    result.update(setup_s=setup_s, baseline_mib=baseline / MIB, device=str(dist.device),
                  world_size=dist.world_size, model_dir=str(model),
                  torch_threads=torch.get_num_threads(),
                  malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"))
    return result


def summarise(p: dict, run, arch, records, peak_flops: float, pred) -> dict:
    """Per phase: mean time over the measured updates, max peak memory, FLOPs, contention."""
    from lora_ppo.sizing.arch import lora_param_count, param_counts

    cfg, world = run.cfg, run.dist.world_size
    phases = {}
    for name in ("generation", "scoring", "update"):
        secs = [m[name].seconds for _, m in records]
        peak = max(m[name].peak_bytes for _, m in records)
        own = sum(m[name].own_cpu_s for _, m in records)
        busy = sum(m[name].busy_s for _, m in records)
        ncpu = records[0][1][name].ncpu
        secs_max, peak = _reduce([sum(secs), peak], "MAX")  # the slowest rank sets the pace
        (own_all,) = _reduce([own], "SUM")  # ranks on one machine are not "other" processes
        flops = [phase_flops(run, arch, s)[name] for s, _ in records]
        useful = [useful_flops(run, arch, s)[name] for s, _ in records]
        tokens = [s["generated"] if name == "generation" else
                  s["real_tokens"] * (cfg.ppo.epochs if name == "update" else 1)
                  for s, _ in records]
        mean_s = secs_max / len(records)
        fps = sum(flops) * world / secs_max
        other = other_cpu_share(busy, own_all, secs_max, ncpu)
        phases[name] = {
            "seconds": mean_s, "tokens": sum(tokens) / len(records) * world,
            "tokens_per_s": sum(tokens) * world / secs_max,
            "flops": sum(flops) / len(records) * world, "flops_per_s": fps,
            "matmul_peak_share": fps / (peak_flops * world),
            # FLOP/s of the real tokens: what padding-free work would have cost
            "useful_flops_per_s": sum(useful) * world / secs_max,
            "useful_peak_share": sum(useful) / secs_max / peak_flops,
            "peak_mib": peak / MIB, "predicted_mib": pred.phases[name] / MIB,
            "prediction_error": (pred.phases[name] - peak) / peak,
            "other_cpu_share": other, "contention": other > p["contention_threshold"],
        }
    s0 = records[0][0]
    phases["update"]["executed_flops"] = sum(phase_flops(run, arch, s)["update_executed"]
                                             for s, _ in records) / len(records) * world
    lora = lora_param_count(arch, cfg.lora.r, cfg.lora.target_modules)
    return {"settings": {k: v for k, v in p.items() if k not in ("cache_dir",)},
            "shapes": {"prompt_len": s0["prompt_len"], "resp_len": s0["resp_len"]},
            "params": param_counts(arch).total, "lora_params_per_adapter": lora,
            "matmul_peak_flops": peak_flops, "phases": phases,
            "predicted": {k: v / MIB for k, v in pred.components.items()},
            "contention": any(ph["contention"] for ph in phases.values())}


# --- command line ----------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    m = a.add_argument_group("model size (a random-init Llama built with lora_ppo.builtin.tiny)")
    for flag, default in (("vocab", 8192), ("hidden", 512), ("intermediate", 1408),
                          ("layers", 4), ("heads", 8), ("kv-heads", 4)):
        m.add_argument(f"--{flag}", type=int, default=default)
    w = a.add_argument_group("work per update")
    for flag, default in (("batch", 8), ("micro-batch", 4), ("prompt-len", 64),
                          ("new-tokens", 64), ("epochs", 1), ("lora-r", 16), ("updates", 2),
                          ("warmup", 1)):
        w.add_argument(f"--{flag}", type=int, default=default)
    w.add_argument("--gen-batch", type=int, default=0, help="generation batch (0: --batch)")
    w.add_argument("--quant", choices=["none", "8bit", "4bit"], default="none")
    w.add_argument("--value-mode", choices=["shared", "adapter", "none"], default="shared")
    w.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on")
    w.add_argument("--ds-config", default="zero2")
    w.add_argument("--config", help="a training YAML to start from (bench flags override it)")
    w.add_argument("--set", action="append", default=[], metavar="section.key=value")
    a.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help=f"repeatable; the cartesian product is run; keys: {', '.join(SWEEP_KEYS)}"
                        " (seq sets prompt_len = new_tokens = seq/2)")
    a.add_argument("--out", default="bench.json")
    a.add_argument("--cache-dir", help="where built models are kept (default ~/.cache/lora_ppo)")
    a.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default, one per core)")
    a.add_argument("--contention-threshold", type=float, default=0.10,
                   help="flag a phase when other processes used more than this share of the CPUs")
    a.add_argument("--malloc-default", action="store_true",
                   help="keep glibc's malloc thresholds (CPU per-phase peaks become upper bounds)")
    a.add_argument("--point", help=argparse.SUPPRESS)  # one sweep point, run by the parent
    a.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return a.parse_args(argv)


def points(args) -> list[dict]:
    base = {"vocab": args.vocab, "hidden": args.hidden, "intermediate": args.intermediate,
            "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
            "batch": args.batch, "micro_batch": args.micro_batch, "gen_batch": args.gen_batch,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "epochs": args.epochs,
            "lora_r": args.lora_r, "updates": args.updates, "warmup": args.warmup,
            "quant": args.quant, "value_mode": args.value_mode, "grad_ckpt": args.grad_ckpt,
            "ds_config": args.ds_config, "config": args.config, "set": args.set,
            "cache_dir": args.cache_dir, "contention_threshold": args.contention_threshold,
            "threads": args.threads}
    axes = []
    for item in args.sweep:
        key, sep, values = item.partition("=")
        if not sep or key not in SWEEP_KEYS or not values:
            raise UserError(f"--sweep {item!r}: use KEY=V1,V2 with KEY one of "
                            f"{', '.join(SWEEP_KEYS)}")
        axes.append([(key, SWEEP_KEYS[key](v)) for v in values.split(",")])
    out = []
    for combo in itertools.product(*axes):
        p = dict(base)
        for key, value in combo:
            if key == "seq":
                p["prompt_len"] = p["new_tokens"] = value // 2
            else:
                p[key] = value
        out.append(p)
    return out


def run_child(p: dict, args) -> dict:
    """One sweep point in a fresh process (own baseline, own process group)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "point.json"
        cmd = [sys.executable, __file__, "--point", json.dumps(p), "--out", str(out),
               *(["--malloc-default"] if args.malloc_default else [])]
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench point {p} failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())["runs"][0]


def machine_info() -> dict:
    import platform

    import deepspeed
    import torch
    import transformers

    info = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    with contextlib.suppress(ImportError):
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    return info


def markdown_table(runs: list[dict], swept: list[str]) -> str:
    """One row per point and phase: the numbers docs/benchmarks.md shows."""
    head = [*swept, "phase", "s", "tokens/s", "GFLOP/s", "% matmul peak",
            "useful GFLOP/s", "peak MiB", "predicted MiB", "error", "other CPU"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        for name, ph in r["phases"].items():
            cells = [str(r["settings"].get("prompt_len", "") * 2 if k == "seq"
                         else r["settings"].get(k, "")) for k in swept]
            cells += [name, f"{ph['seconds']:.2f}", f"{ph['tokens_per_s']:.0f}",
                      f"{ph['flops_per_s'] / 1e9:.1f}", f"{100 * ph['matmul_peak_share']:.0f}",
                      f"{ph['useful_flops_per_s'] / 1e9:.1f}",
                      f"{ph['peak_mib']:.0f}", f"{ph['predicted_mib']:.0f}",
                      f"{100 * ph['prediction_error']:+.0f}%",
                      f"{100 * ph['other_cpu_share']:.0f}%" + (" !" if ph["contention"] else "")]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def warn_contention(runs: list[dict]) -> None:
    for r in runs:
        for name, ph in r["phases"].items():
            if ph["contention"]:
                print(f"bench: warning: other processes used {100 * ph['other_cpu_share']:.0f}% "
                      f"of the CPUs during {name} ({r['settings']}); its timings are not "
                      "reliable, rerun on a quiet machine", file=sys.stderr)


def _reexec_with_malloc_threshold(args) -> None:
    """glibc keeps freed blocks below its (self-raising) mmap threshold, so RSS would not fall
    after a phase; a fixed threshold must be set before the process starts, hence exec."""
    if (sys.platform.startswith("linux") and not args.malloc_default
            and "MALLOC_MMAP_THRESHOLD_" not in os.environ):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(argv=None) -> int:
    args = parse_args(argv)
    _reexec_with_malloc_threshold(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.point:
        result = run_point(json.loads(args.point))
        Path(args.out).write_text(json.dumps({"runs": [result]}, indent=1))
        return 0
    pts = points(args)
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if len(pts) > 1 and multi:
        raise UserError("--sweep runs each point in a fresh process and cannot run under a "
                        "multi-process launch; launch one point per deepspeed command")
    runs = [run_child(p, args) for p in pts] if len(pts) > 1 else [run_point(pts[0])]
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        swept = [item.partition("=")[0] for item in args.sweep]
        report = {"command": shlex.join(["python", *sys.argv]), "machine": machine_info(),
                  "memory_measure": ("cuda max_memory_allocated" if torch.cuda.is_available()
                                     else "VmHWM after clear_refs minus RSS before model load"),
                  "runs": runs}
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(markdown_table(runs, swept))
        warn_contention(runs)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except UserError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        code = 2
    from lora_ppo.runtime.dist import shutdown_distributed

    sys.exit(shutdown_distributed(code))
