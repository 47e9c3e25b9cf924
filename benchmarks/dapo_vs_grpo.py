"""GRPO with DAPO's settings against plain GRPO on the built-in arithmetic task, at the same
generated-token budget.

    python benchmarks/dapo_vs_grpo.py --out outputs/dapo-vs-grpo                               # full size
    python benchmarks/dapo_vs_grpo.py --out /tmp/dvg --updates 20 rollout.prompts_per_update=8  # a look

1. plain GRPO: `lora-ppo train --config grpo` (the preset: the KL in the loss at 0.1, GRPO's
   per-sequence mean, a symmetric clip) for `--updates` updates. The response tokens it
   generated are the budget.
2. DAPO: the same preset with DAPO's fields (Yu et al. 2025; docs/ppo.md details 30-34): the
   token-level loss, no KL, clip-higher 0.28, dynamic sampling, truncated responses out of the
   loss; a checkpoint every update. Its result is the last update within the budget (or its last
   update, said so, if it never reached it). DAPO's soft overlong penalty stays off: the task
   caps answers at 3 tokens and a right two-digit answer with its EOS fills all 3, so the
   penalty would punish right answers; it is made for long reasoning (L_cache 4096 of 20480).
3. Both results merged into the unquantized base and asked 100 additions greedily with plain
   transformers (the demo's export check), and the base too.

Writes OUT/report.md: the reward and KL per generated token side by side (benchmarks/curves.py),
the share of groups whose scores tied (GRPO trains on them with advantage 0, DAPO drops them),
the greedy accuracies, and what each run cost. `section.key=value` overrides go to both runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import curves  # noqa: E402

DAPO = ["ppo.loss_aggregation=token_mean", "ppo.kl_coef=0", "ppo.cliprange_high=0.28",
        "rollout.dynamic_sampling=true", "rollout.max_extra_rounds=3",
        "ppo.mask_truncated_completions=true"]


def fail(msg: str) -> None:
    print(f"dapo_vs_grpo.py: {msg}", file=sys.stderr)
    sys.exit(2)


def train(out: Path, updates: int, extra: list[str], overwrite: bool) -> float:
    """`lora-ppo train --config grpo` into `out`; returns its wall-clock seconds."""
    cmd = [sys.executable, "-m", "lora_ppo", "train", "--config", "grpo", f"output_dir={out}",
           f"ppo.total_updates={updates}", "data.eval_every=0", "logging.progress=false",
           *extra] + (["--overwrite"] if overwrite else [])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        fail(f"{' '.join(cmd[2:])} failed (exit {res.returncode}): "
             f"{(res.stderr.strip().splitlines() or ['no output'])[-1]}")
    return time.perf_counter() - t0


def accuracy(checkpoint: Path, merged: Path) -> float:
    """Greedy accuracy on 100 additions of `checkpoint` merged into the base (fp32)."""
    from lora_ppo.builtin.demo import _arithmetic_check, check_export
    from lora_ppo.io.export import merge

    merge(checkpoint, merged, dtype="fp32", force=True)
    return check_export(str(merged), _arithmetic_check(), max_new_tokens=3, seed=1)


def mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def seconds(rows: list[dict]) -> float:
    return sum(r["time/rollout_s"] + r["time/update_s"] for r in rows)


def report(args, grpo: list[dict], dapo: list[dict], pick: dict, acc: dict, secs: dict) -> str:
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        curves.main([f"grpo={args.out / 'grpo' / 'metrics.jsonl'}",
                     f"dapo={args.out / 'dapo' / 'metrics.jsonl'}"])
    budget = grpo[-1]["tokens_so_far"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "# GRPO with DAPO's settings against plain GRPO (arithmetic, `--preset grpo`)", "",
        f"Command: `python benchmarks/dapo_vs_grpo.py --out {args.out} --updates {args.updates}"
        + "".join(f" {o}" for o in args.overrides) + "`", "",
        f"Budget: {budget:,.0f} generated response tokens (plain GRPO's {len(grpo)} updates). "
        f"DAPO had generated {pick['tokens_so_far']:,.0f} by update {pick['step']}, the last "
        + ("within the budget." if pick is not dapo[-1] or pick["tokens_so_far"] >= budget * 0.98
           else f"of its {len(dapo)}: short of the budget."), "",
        "Reward (share of right answers) and KL per generated token:", "", table.getvalue(),
        "| | plain GRPO | DAPO |", "|---|---|---|",
        f"| updates | {len(grpo)} | {pick['step']} |",
        f"| share of groups whose scores tied | {fmt(mean(grpo, 'objective/frac_zero_std_groups'))}"
        f" (trained on, advantage 0) | {fmt(mean(dapo[:pick['step']], 'sampling/frac_dropped_groups'))}"
        " of those sampled (dropped) |",
        f"| share of the rollout filled back at the cap | - | "
        f"{fmt(mean(dapo[:pick['step']], 'sampling/frac_filled_groups'))} |",
        f"| sampling rounds per update | 1 | {fmt(mean(dapo[:pick['step']], 'sampling/rounds'))} |",
        f"| reward, last 5 updates | {fmt(mean(grpo[-5:], 'objective/raw_scores'))} | "
        f"{fmt(mean(dapo[max(pick['step'] - 5, 0):pick['step']], 'objective/raw_scores'))} |",
        f"| greedy accuracy of the merged model on 100 additions (base {acc['base']:.2f}) | "
        f"{acc['grpo']:.2f} | {acc['dapo']:.2f} |",
        f"| rollout + update seconds (metrics time/*) | {seconds(grpo):.1f} | "
        f"{seconds(dapo[:pick['step']]):.1f} |",
        f"| wall clock of the whole `lora-ppo train` (s) | {secs['grpo']:.0f} | "
        f"{secs['dapo']:.0f} (all {len(dapo)} updates, a checkpoint each) |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for both runs and report.md")
    p.add_argument("--updates", type=int, default=300, help="plain GRPO's updates (the budget)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier runs in --out")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="for both runs")
    args = p.parse_args(argv)
    if args.updates < 1:
        fail(f"--updates {args.updates}: must be >= 1")
    secs = {"grpo": train(args.out / "grpo", args.updates,
                          ["checkpoint.every=0", *args.overrides], args.overwrite),
            "dapo": train(args.out / "dapo", args.updates,
                          [*DAPO, "checkpoint.every=1", f"checkpoint.keep={args.updates}",
                           *args.overrides], args.overwrite)}
    grpo, dapo = (curves.load(str(args.out / k / "metrics.jsonl")) for k in ("grpo", "dapo"))
    budget = grpo[-1]["tokens_so_far"]
    within = [r for r in dapo if r["tokens_so_far"] <= budget * 1.0001] or dapo[:1]
    pick = within[-1]
    from lora_ppo.builtin.demo import _arithmetic_check, check_export
    from lora_ppo.builtin.tiny import ensure_builtin_model

    acc = {"base": check_export(str(ensure_builtin_model(size="arith")), _arithmetic_check(), 3, 1),
           "grpo": accuracy(args.out / "grpo" / "checkpoints" / f"step-{len(grpo)}",
                            args.out / "grpo" / "merged"),
           "dapo": accuracy(args.out / "dapo" / "checkpoints" / f"step-{pick['step']}",
                            args.out / "dapo" / "merged")}
    text = report(args, grpo, dapo, pick, acc, secs)
    (args.out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
