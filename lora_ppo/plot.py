"""A PNG of reward and KL per update, read back from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_path: Path, out_png: Path, title: str = "PPO") -> Path:
    """Two panels: objective/scores (and rlhf_reward) and objective/kl per update."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(steps, [r["objective/scores"] for r in rows], label="score")
    ax1.plot(steps, [r["objective/rlhf_reward"] for r in rows], label="score - KL penalty")
    ax1.set(xlabel="update", ylabel="mean per sample", title="reward")
    ax1.legend()
    ax2.plot(steps, [r["objective/kl"] for r in rows], color="tab:red")
    ax2.set(xlabel="update", ylabel="nats per sample", title="KL to the reference")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(out_png).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)
    return Path(out_png)
