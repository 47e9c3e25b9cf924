"""Metrics: one JSON object per update in metrics.jsonl, TensorBoard, optional W&B, a progress bar.

Every name and formula is documented in docs/metrics.md. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import torch

from lora_ppo.config import Config
from lora_ppo.config.load import config_to_dict
from lora_ppo.errors import UserError

# The names every line of metrics.jsonl carries (TRL's names, so dashboards carry over).
REQUIRED = (
    "step", "episode", "objective/kl", "objective/kl_coef", "objective/entropy",
    "objective/scores", "objective/rlhf_reward", "policy/approx_kl", "policy/clipfrac",
    "policy/entropy", "loss/policy", "loss/value", "val/clipfrac", "val/explained_variance",
    "val/mean", "lr", "time/rollout_s", "time/update_s", "tokens_per_s", "memory/peak_mib",
)


class PhaseClock:
    """Seconds spent in each phase of one step (generation, scoring, update), summed over the
    times a phase is entered (dynamic sampling enters generation and scoring once per round).
    `on_phase(name)` is called as each phase starts: the progress bar shows it, a benchmark
    reads its memory meters there."""

    def __init__(self, on_phase: Optional[Callable[[str], None]] = None):
        self.on_phase, self.seconds = on_phase, {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.on_phase is not None:
            self.on_phase(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def peak_memory_mib(device: torch.device) -> float:
    """GPU allocator peak on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def check_logging(logging) -> None:
    """Refuse, before anything loads, a logging backend that is asked for but not installed."""
    if logging.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("logging.wandb=true but wandb is not installed; pip install wandb "
                            "(or lora-ppo[wandb]), or set logging.wandb=false") from None


class MetricsLogger:
    def __init__(self, output_dir: Path, cfg: Config, total: int, start: int = 0, enabled: bool = True,
                 desc: str = "ppo", unit: str = "update",
                 bar_keys: tuple[tuple[str, str], ...] = ()):
        """`bar_keys`: (metric, short name) pairs shown on the progress bar after each row."""
        self.enabled, self.bar_keys, self.desc = enabled, bar_keys, desc
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = self.wandb = self.bar = None
        if not enabled:
            return
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if cfg.logging.wandb:  # installed: check_logging refused it at setup otherwise
            import wandb

            self.wandb = wandb.init(project=cfg.logging.wandb_project,
                                    config=config_to_dict(cfg), dir=str(output_dir))
        if cfg.logging.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit=unit,
                            dynamic_ncols=True, file=sys.stderr)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: (float(v) if isinstance(v, (float, torch.Tensor)) else v) for k, v in row.items()}
        # JSON has no NaN/inf: a metric that is undefined this update (explained variance of
        # constant returns) is written as null.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        step = row["step"]
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(row, step=step)
        if self.bar is not None:
            self.bar.set_postfix({short: f"{row[k]:.3g}" for k, short in self.bar_keys
                                  if isinstance(row.get(k), (int, float)) and math.isfinite(row[k])},
                                 refresh=False)
            self.bar.update(1)

    def phase(self, name: str) -> None:
        """Show the phase an update is in on the bar (`ppo [generation]`): a long update no
        longer sits silent at its count (PhaseClock calls it as each phase starts)."""
        if self.bar is not None:
            self.bar.set_description_str(f"{self.desc} [{name}]", refresh=True)

    def text(self, tag: str, lines: list[str], step: int) -> None:
        """Samples as text: on the console (above the bar) and in TensorBoard."""
        if not self.enabled:
            return
        out = self.bar.write if self.bar is not None else print
        for line in lines:
            out(f"[{tag}] {line}")
        if self.tb is not None:
            self.tb.add_text(tag, "\n\n".join(lines), step)

    def close(self) -> None:
        if self.bar is not None:  # the last line shows the run, not its last update's phase
            self.bar.set_description_str(self.desc, refresh=False)
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint's step (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))


def check_finite(row: dict) -> Optional[str]:
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    return ", ".join(bad) if bad else None
