"""The prepared GPU check: one JSON with what only a GPU can show (run by benchmarks/gpu_check.sh).

    1. the demo pipeline (`lora-ppo demo`) with CUDA bitsandbytes 4-bit and bf16: its summary
       and wall time;
    2. benchmarks/bench.py at a ~1B-parameter Llama shape with a 32k vocabulary (hidden 2048, 16
       layers, 16 heads, 8 KV heads, intermediate 5632): generation and update tokens/s, the
       share of the matmul peak, and the allocator peak of each phase against the estimator's
       prediction (`lora-ppo estimate --device gpu`), unquantized and 4-bit;
    3. the critic-free demo (`lora-ppo demo --preset grpo`);
    4. the grouped long-prompt GRPO workload of benchmarks/bench_vs_trl.py (`grpo-long`: 4 prompts
       x 8 answers, 256-token prompts, answers ending at one of 512 stop ids, cap 48), lora_ppo's
       side only (benchmarks/lora_ppo_side.py), bf16 on the GPU, at the 70M shape (hidden 768,
       8 layers, vocab 8192) with the comparison's prompts: tokens/s, the step's phases, the
       allocator peak above the loaded model, and which paths it took.

Sized to finish in under 8 minutes on one H100 or H200 (step 4 is estimated at about a minute
more: a 70M model built and 4 GRPO steps). Without a GPU it refuses in one line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCH_1B = ["--vocab", "32000", "--hidden", "2048", "--intermediate", "5632", "--layers", "16",
            "--heads", "16", "--kv-heads", "8", "--batch", "16", "--micro-batch", "4",
            "--prompt-len", "128", "--new-tokens", "128", "--epochs", "1", "--updates", "2",
            "--warmup", "1", "--lora-r", "16", "--grad-ckpt"]


# benchmarks/bench_vs_trl.py's model of the workload, built as the comparison builds it
_BUILD = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import bench_vs_trl, workload
print(bench_vs_trl.build_model(workload.WORKLOADS[sys.argv[2]]["model"], Path(sys.argv[3])))
"""


def grpo_long(py: str, work: Path, precision: str = "bf16", steps: int = 4,
              timeout: int = 240) -> dict:
    """bench_vs_trl.py's grpo-long workload, lora_ppo's side alone (benchmarks/lora_ppo_side.py),
    in its own process, on every thread torch takes."""
    step = _run([py, "-c", _BUILD, str(HERE), "grpo-long", str(work)], 180)
    if step["exit"] != 0:
        return step
    model = work / "models" / "llama70m"
    out = work / "grpo_long.json"
    step = _run([py, str(HERE / "lora_ppo_side.py"), "--workload", "grpo-long", "--steps",
                 str(steps), "--model-dir", str(model), "--precision", precision,
                 "--threads", "0", "--out", str(out)], timeout)
    if out.is_file():
        res = json.loads(out.read_text())
        s = res["summary"]
        step["workload"] = res["workload"]
        step["device"] = res["device"]
        step["summary"] = {k: s.get(k) for k in (
            "gen_tokens_per_s", "median_step_s", "median_rollout_s", "median_update_s",
            "gen_tokens_per_step", "mean_resp_len", "gpu_peak_mib", "gpu_peak_above_load_mib",
            "rss_above_load_mib", "stop_token_counted")}
        step["gen_s"] = [r["gen_s"] for r in res["steps"]]
        step["settings"] = res["settings"]
    return step


def _run(cmd: list[str], timeout: int) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        code, tail = "timeout", str(e)[-3000:]
    return {"command": " ".join(cmd), "exit": code, "seconds": round(time.perf_counter() - t0, 1),
            "tail": tail if code != 0 else ""}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--skip-demo", action="store_true")
    a = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; run this on a machine with an NVIDIA GPU",
              file=sys.stderr)
        return 2
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="lora_ppo_gpu_check_"))
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                         time.gmtime())}
    if not a.skip_demo:
        demo = work / "demo"
        step = _run([py, "-m", "lora_ppo", "demo", f"output_dir={demo}",
                     "quantization.compute_dtype=bf16", "deepspeed.precision=bf16"], 240)
        summary = demo / "demo_summary.json"
        step["summary"] = json.loads(summary.read_text()) if summary.is_file() else None
        report["demo_4bit_bf16"] = step
    for name, quant in (("bench_1b_none", "none"), ("bench_1b_4bit", "4bit")):
        out = work / f"{name}.json"
        step = _run([py, "benchmarks/bench.py", *BENCH_1B, "--quant", quant, "--cache-dir",
                     str(work / "cache"), "--out", str(out)], 150)
        if out.is_file():
            run = json.loads(out.read_text())["runs"][0]
            step["phases"] = {k: {f: v[f] for f in ("seconds", "tokens_per_s", "flops_per_s",
                                                    "matmul_peak_share", "peak_mib",
                                                    "predicted_mib", "prediction_error")}
                              for k, v in run["phases"].items()}
            step["params"] = run["params"]
        report[name] = step
    grpo = work / "grpo"
    step = _run([py, "-m", "lora_ppo", "demo", "--preset", "grpo", f"output_dir={grpo}"], 120)
    summary = grpo / "demo_summary.json"
    step["summary"] = json.loads(summary.read_text()) if summary.is_file() else None
    report["demo_grpo"] = step
    report["grpo_long_bf16"] = grpo_long(py, work)
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: (v.get("exit"), v.get("seconds")) if isinstance(v, dict) else v
                      for k, v in report.items()}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
