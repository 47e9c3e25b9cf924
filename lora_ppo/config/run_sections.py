"""The sections of the config tree that say what a run reads and writes and how it is launched:
data, DeepSpeed, logging and checkpoints (sections.py: the model, the reward, the rollout, PPO).

The string under each field is its documentation (read by `config.reference.field_docs`, so
docs/config.md is generated from these files and cannot drift).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Optional

from lora_ppo.config.checks import NONNEG, POSITIVE


@dataclass
class DataConfig:
    prompts: Optional[str] = None
    """JSONL, JSON, Parquet, CSV or text file of prompts."""
    prompt_column: str = "prompt"
    """Column that holds the prompts (text files: one prompt per line): strings, or
    conversations (TRL's conversational format: lists of messages), rendered with the
    tokenizer's chat template. Every other column of a row reaches the reward function by name."""
    chat_template: bool = False
    """Wrap each string prompt as a user turn with the tokenizer's chat template (conversations
    are always rendered with it)."""
    eval_prompts: Optional[str] = None
    """Held-out prompts for periodic evaluation; none: a slice of `prompts` is held out."""
    eval_every: Annotated[int, NONNEG] = 0
    """Evaluate every this many updates; 0 turns evaluation off."""
    eval_size: Annotated[int, NONNEG] = 16
    """Number of held-out prompts per evaluation."""


@dataclass
class DeepSpeedConfig:
    config: str = "zero2"
    """A file in ds_configs/ by name (`zero0` .. `zero3`, `zero2_offload`) or a path to a JSON file."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Training precision; `auto` is bf16 on a GPU that has it, fp32 on a CPU."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Also write metrics to TensorBoard under output_dir/tensorboard."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `wandb` installed)."""
    wandb_project: str = "lora-ppo"
    """W&B project name."""
    progress: bool = True
    """Show a progress bar with ETA and key metrics (rank 0)."""
    num_samples: int = 2
    """Samples printed as text at each evaluation and every `completions_every` updates."""
    completions_every: Annotated[int, NONNEG] = 10
    """Every this many updates, print `num_samples` of the rollout's completions (prompt ->
    completion, score) above the progress bar and log them to TensorBoard as text (TRL's
    log_completions); 0 turns it off."""


@dataclass
class CheckpointConfig:
    every: Annotated[int, NONNEG] = 50
    """Save a checkpoint every this many updates (and at the end); 0 saves only at the end."""
    keep: Annotated[int, POSITIVE] = 2
    """Keep the newest this many checkpoints."""
