"""A PNG of reward and KL per update, read back from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_path: Path, out_png: Path, title: str = "PPO") -> Path:
    """Panels per update: the reward source's raw score (only when clipping, normalisation or
    the EOS penalty changed it), the score PPO trained on with and without the KL penalty, and
    the KL to the reference."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    steps = [r["step"] for r in rows]
    shaped = any(r["objective/raw_scores"] != r["objective/scores"] for r in rows)
    fig, axes = plt.subplots(1, 2 + shaped, figsize=(5 * (2 + shaped), 3.6))
    if shaped:
        axes[0].plot(steps, [r["objective/raw_scores"] for r in rows], color="tab:green")
        axes[0].set(xlabel="update", ylabel="mean per sample", title="raw score (reward source)")
    ax1, ax2 = axes[-2:]
    ax1.plot(steps, [r["objective/scores"] for r in rows], label="score")
    ax1.plot(steps, [r["objective/rlhf_reward"] for r in rows], label="score - KL penalty")
    ax1.set(xlabel="update", ylabel="mean per sample",
            title="reward (after clip/normalise/EOS penalty)" if shaped else "reward")
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
