"""The prepared GPU check: one JSON with what only a GPU can show (run by scripts/gpu_check.sh).

    1. the demo pipeline (`lora-ppo demo`) with CUDA bitsandbytes 4-bit and bf16: its summary
       and wall time;
    2. scripts/bench.py at a ~1B-parameter Llama shape with a 32k vocabulary (hidden 2048, 16
       layers, 16 heads, 8 KV heads, intermediate 5632): generation and update tokens/s, the
       share of the matmul peak, and the allocator peak of each phase against the estimator's
       prediction (`lora-ppo estimate --device gpu`), unquantized and 4-bit;
    3. the critic-free demo (`lora-ppo demo --preset grpo`).

Sized to finish in under 8 minutes on one H100 or H200. Without a GPU it refuses in one line.
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

REPO = Path(__file__).resolve().parents[1]
BENCH_1B = ["--vocab", "32000", "--hidden", "2048", "--intermediate", "5632", "--layers", "16",
            "--heads", "16", "--kv-heads", "8", "--batch", "16", "--micro-batch", "4",
            "--prompt-len", "128", "--new-tokens", "128", "--epochs", "1", "--updates", "2",
            "--warmup", "1", "--lora-r", "16", "--grad-ckpt"]


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
        step = _run([py, "scripts/bench.py", *BENCH_1B, "--quant", quant, "--cache-dir",
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
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: (v.get("exit"), v.get("seconds")) if isinstance(v, dict) else v
                      for k, v in report.items()}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
