"""Peak memory and time of `lora-ppo merge` on a locally built model of several hundred MB.

    python benchmarks/bench_merge.py --out merge_bench.json                   # the documented run
    python benchmarks/bench_merge.py --hidden 64 --layers 2 --vocab 512 --base-shard-size 200KB

1. A random-init Llama (lora_ppo.builtin.tiny.build_tiny_model), re-saved in shards of
   --base-shard-size, fp32, with its tokenizer: the base.
2. One PPO update on it in 4-bit with `lora-ppo train` (LoRA r=16, alpha=32 on all linear layers,
   as scripts/recipes/llama70b_4bit_80gb.yaml): a real checkpoint to merge, whose LoRA B moved
   off 0 (its value loss trains the shared trunk).
3. For each --variant, `lora-ppo merge CHECKPOINT --out DIR --force VARIANT` in a child process
   (lora_ppo.cli.main, as `python -m lora_ppo` runs it), which writes its own peak RSS (VmHWM of
   /proc/self/status) when it ends. The baseline is the same figure for a child that only imports
   what merge imports (torch, transformers, peft, bitsandbytes, safetensors, lora_ppo's CLI,
   export and merge modules): the interpreter's own footprint. (Not os.wait4's ru_maxrss: Linux
   carries the parent's high-water mark over fork + exec, so every child would report at least
   the bench's own RSS.) glibc's malloc is left at its defaults, as a user runs it. Each merged
   model is then loaded, and generates 8 tokens, with plain transformers in a process where
   `import lora_ppo` and `import peft` fail.

Steps 1-2 are cached in --cache-dir ($LORA_PPO_CACHE/bench_merge, else
/tmp/lora_ppo_cache/bench_merge), keyed by the sizes. The JSON holds the commands, the machine,
the model (bytes, shards, largest shard and tensor) and per variant the peak RSS, the baseline,
their difference as a share of the model's size, the output's size and the wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = ("import torch, transformers, peft, bitsandbytes, safetensors; "
            "from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "import lora_ppo.cli, lora_ppo.io.export, lora_ppo.io.merge")
# Runs `lora-ppo ARGS` (or, with no ARGS, only BASELINE's imports) and writes its peak RSS in KiB
# to the file named first: VmHWM is the high-water mark of this process's own address space.
RUNNER = f"""
import sys
report, args = sys.argv[1], sys.argv[2:]
code = 0
try:
    if args:
        from lora_ppo.cli import main
        code = main(args)
    else:
        {BASELINE}
finally:
    hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
    open(report, "w").write(hwm[0])
sys.exit(code)
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--base-shard-size", default="100MB", help="shard size of the base checkpoint")
    p.add_argument("--variant", action="append", default=None,
                   help="extra `lora-ppo merge` arguments for one measured run, e.g. "
                        "--variant='--into dequantized' (repeatable; default: the plain command "
                        "and --into dequantized)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each variant this many times (peak RSS varies run to run with the "
                        "allocator's state); the JSON keeps every run")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the children")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the JSON here (also printed)")
    return p.parse_args(argv)


def child_env(threads: int) -> dict:
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Loads the merged model with lora_ppo and peft made unimportable and generates a few tokens.
PLAIN_LOAD = """
import sys
sys.modules["lora_ppo"] = sys.modules["peft"] = None  # `import lora_ppo` / `import peft` now fail
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok("This movie was a", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
print(model.dtype, "generated ids", out[0, ids.shape[1]:].tolist())
"""


def plain_load(out: Path, env: dict) -> dict:
    """The merged model in plain transformers, in a process that cannot import lora_ppo."""
    res = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out)], capture_output=True,
                         text=True, env=env, cwd="/")
    return {"returncode": res.returncode, "output": (res.stdout or res.stderr)[-1000:].strip()}


def measure(lora_ppo_args: list[str], env: dict, report: Path) -> dict:
    """`lora-ppo ARGS` in a child (no ARGS: the baseline imports); its exit code, wall time,
    peak RSS (MiB) and the tail of its output."""
    report.unlink(missing_ok=True)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", RUNNER, str(report), *lora_ppo_args],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env=env, cwd=REPO, text=True)
    peak = int(report.read_text()) / 1024 if report.is_file() else None
    return {"returncode": res.returncode, "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_mib": None if peak is None else round(peak, 1),
            "output_tail": res.stdout[-3000:]}


def build_base(args, root: Path) -> Path:
    """The random Llama in shards of --base-shard-size, built once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_ppo.builtin.tiny import build_tiny_model

    base = root / "base"
    if (base / "built.json").is_file():
        return base
    torch.set_num_threads(args.threads)
    shutil.rmtree(base, ignore_errors=True)
    single = build_tiny_model(root / "single", vocab_size=args.vocab, hidden_size=args.hidden,
                              intermediate_size=args.intermediate, num_layers=args.layers,
                              num_heads=args.heads, num_kv_heads=args.kv_heads)
    model = AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    model.save_pretrained(base, max_shard_size=args.base_shard_size)
    AutoTokenizer.from_pretrained(single).save_pretrained(base)
    del model
    shutil.rmtree(single)
    (base / "built.json").write_text(json.dumps(vars(args), default=str))
    return base


def train_checkpoint(base: Path, root: Path, env: dict) -> tuple[Path, list[str]]:
    """One 4-bit PPO update with the 70B recipe's LoRA settings; its checkpoint."""
    from lora_ppo.io.checkpoint import complete_checkpoints

    run = root / "run"
    cmd = ["train", f"model.path={base}", f"output_dir={run}",
           "quantization.mode=4bit", "lora.r=16", "lora.alpha=32", "model.max_prompt_length=16",
           "model.gradient_checkpointing=false", "rollout.prompts_per_update=2",
           "rollout.generation_batch_size=2", "rollout.max_new_tokens=4", "ppo.minibatch_size=2",
           "ppo.micro_batch_size=2", "ppo.total_updates=1", "ppo.epochs=1",
           "deepspeed.config=zero0", "logging.progress=false", "logging.tensorboard=false",
           "data.prompts=builtin:reviews",
           "reward.function=lora_ppo.builtin.rewards:positive_sentiment",
           # Random text earns the same reward everywhere, so the policy loss has no gradient;
           # a value head that starts off 0 gives the shared trunk's LoRA B one, and B leaves 0.
           "value.head_init_std=0.1", "ppo.optim.learning_rate=1e-3"]
    if not complete_checkpoints(run / "checkpoints"):
        shutil.rmtree(run, ignore_errors=True)
        res = measure(cmd, env, root / "train.rss")
        if res["returncode"] != 0:
            sys.exit(f"training the checkpoint failed:\n{res['output_tail']}")
    return complete_checkpoints(run / "checkpoints")[-1][1], ["lora-ppo", *cmd]


def model_facts(base: Path) -> dict:
    from lora_ppo.io.shards import read_index

    index = read_index(str(base))
    files = [base / f for f in index.files]
    sizes = {k: math.prod(s) * 4 for k, (_, s, _) in index.tensors.items()}
    return {"bytes": sum(f.stat().st_size for f in files), "shards": len(files),
            "largest_shard_bytes": max(f.stat().st_size for f in files),
            "largest_tensor_bytes": max(sizes.values()),
            "params": sum(sizes.values()) // 4}


def main(argv=None) -> dict:
    args = parse_args(argv)
    cache = args.cache_dir or Path(os.environ.get("LORA_PPO_CACHE", "/tmp/lora_ppo_cache")) / "bench_merge"
    key = f"v{args.vocab}-h{args.hidden}-i{args.intermediate}-l{args.layers}-s{args.base_shard_size}"
    root = cache / key
    root.mkdir(parents=True, exist_ok=True)
    env = child_env(args.threads)
    base = build_base(args, root)
    checkpoint, train_cmd = train_checkpoint(base, root, env)
    model = model_facts(base)
    baseline = measure([], env, root / "baseline.rss")
    runs = []
    for variant in [v for v in args.variant or ["", "--into dequantized"]
                    for _ in range(args.repeat)]:
        out = root / "merged"
        cmd = ["merge", str(checkpoint), "--out", str(out), "--force", *shlex.split(variant)]
        res = measure(cmd, env, root / "merge.rss")
        if res["returncode"] != 0:
            sys.exit(f"lora-ppo {shlex.join(cmd)} failed:\n{res['output_tail']}")
        above = res["peak_rss_mib"] - baseline["peak_rss_mib"]
        out_files = list(out.glob("*.safetensors"))
        runs.append({"command": shlex.join(["lora-ppo", *cmd]), **res,
                     "baseline_rss_mib": baseline["peak_rss_mib"],
                     "peak_rss_above_baseline_mib": round(above, 1),
                     "ratio_to_model_size": round(above * 2**20 / model["bytes"], 3),
                     "base_shards": model["shards"], "output_shards": len(out_files),
                     "output_bytes": sum(f.stat().st_size for f in out_files),
                     "plain_transformers": plain_load(out, env)})
        if runs[-1]["plain_transformers"]["returncode"] != 0:
            sys.exit(f"plain transformers cannot load {out}: {runs[-1]['plain_transformers']}")
        print(f"{variant or '(defaults)'}: rc {res['returncode']}, {res['wall_s']} s, peak RSS "
              f"{res['peak_rss_mib']} MiB = baseline {baseline['peak_rss_mib']} + {above:.0f} MiB "
              f"({runs[-1]['ratio_to_model_size']:.2f} x the {model['bytes'] / 2**20:.0f} MiB model "
              f"in {model['shards']} shards)", flush=True)
    import torch

    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                           / 2**30, 1), "cuda": torch.cuda.is_available()},
              "versions": _versions(), "args": {k: str(v) for k, v in vars(args).items()},
              "model": model, "train_command": shlex.join(train_cmd),
              "baseline_command": BASELINE,
              "baseline_rss_mib": baseline["peak_rss_mib"], "runs": runs}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return result


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "peft", "bitsandbytes", "safetensors")}


if __name__ == "__main__":
    main()
