"""Reward and KL of several runs against the response tokens each had generated so far.

    python benchmarks/curves.py ppo=outputs/demo-ppo/metrics.jsonl grpo=outputs/demo-grpo4/metrics.jsonl

Runs that sample different numbers of responses per update (GRPO's groups against PPO's one
response per prompt) are compared per generated token, not per update: each row of
`metrics.jsonl` has the mean response length and the running count of sampled responses
(`episode`), so tokens so far = sum over updates of length x responses in that update. With
dynamic sampling (rollout.dynamic_sampling) an update also generated responses it dropped; its
row's `sampling/response_tokens` counts them all and is used instead, and its score is
`sampling/raw_scores`, the mean over every response sampled (the rollout it kept leaves out the
groups whose scores tied, so its own mean overstates or understates the policy's). Prints a
Markdown table: for each run, the mean raw score and KL of the updates in each bin of generated
tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: str) -> list[dict]:
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "objective/raw_scores" in r]  # training rows, not eval
    seen, tokens = 0, 0.0
    for r in rows:
        generated = r.get("sampling/response_tokens")
        tokens += generated if generated is not None else r["response/length"] * (r["episode"] - seen)
        seen = r["episode"]
        r["tokens_so_far"] = tokens
        if r.get("sampling/raw_scores") is not None:
            r["objective/raw_scores"] = r["sampling/raw_scores"]
    return rows


def binned(rows: list[dict], edges: list[float], key: str) -> list[float | None]:
    out = []
    for lo, hi in zip(edges, edges[1:]):
        xs = [r[key] for r in rows if lo < r["tokens_so_far"] <= hi and r.get(key) is not None]
        out.append(sum(xs) / len(xs) if xs else None)
    return out


def fail(msg: str) -> None:
    """Bad input: one line on stderr, exit code 2."""
    print(f"curves.py: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="label=path/to/metrics.jsonl")
    p.add_argument("--bins", type=int, default=6)
    a = p.parse_args(argv)
    runs = {}
    for spec in a.runs:
        label, _, path = spec.partition("=")
        if not path:
            fail(f"{spec!r}: give label=path/to/metrics.jsonl")
        try:
            runs[label] = load(path)
        except (OSError, ValueError, KeyError) as e:  # missing file, bad JSON, not a metrics file
            fail(f"{path}: cannot read training rows ({type(e).__name__}: {e})")
        if not runs[label]:
            fail(f"{path}: no training rows (objective/raw_scores) in it")
    top = min(rows[-1]["tokens_so_far"] for rows in runs.values())  # the shortest run's total
    edges = [top * i / a.bins for i in range(a.bins + 1)]
    head = " | ".join(f"{lab} score | {lab} KL" for lab in runs)
    print(f"| generated tokens | {head} |")
    print("|---" * (1 + 2 * len(runs)) + "|")
    cols = {lab: (binned(rows, edges, "objective/raw_scores"), binned(rows, edges, "objective/kl"))
            for lab, rows in runs.items()}
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
        cells = " | ".join(f"{fmt(s[i])} | {fmt(k[i])}" for s, k in cols.values())
        print(f"| {lo:,.0f}-{hi:,.0f} | {cells} |")


if __name__ == "__main__":
    main()
