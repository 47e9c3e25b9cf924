"""The sections of the SFT and reward-model stages (`lora-ppo sft`, `lora-ppo train-reward`).

They share model, quantization, lora, deepspeed, logging, checkpoint, seed and output_dir with
`train`, so one YAML and one output_dir can drive the whole pipeline: each command reads only its
own section here, `model.init_adapter` and `reward.*` are read by `train` only, and each stage
keeps its run files in <output_dir>/sft/ or <output_dir>/reward_model/.

Both compose the same three parts: `train` (epochs, batch sizes, sequence length), `optim`
(AdamW, as PPO's `ppo.optim`) and `eval` (the held-out rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Optional

from lora_ppo.config.checks import NONNEG, POSITIVE
from lora_ppo.config.sections import OptimConfig


@dataclass
class StageTrainConfig:
    """How a stage iterates over its rows (`sft.train`, `reward_model.train`)."""

    epochs: Annotated[int, POSITIVE] = 1
    """Passes over the training rows."""
    max_steps: Annotated[Optional[int], POSITIVE] = None
    """Stop after this many optimizer steps; none: run all epochs."""
    batch_size: Annotated[int, POSITIVE] = 16
    """Rows per optimizer step on each rank: examples (packed rows with sft.packing) or
    preference pairs."""
    micro_batch_size: Annotated[int, POSITIVE] = 4
    """Rows per forward/backward (both responses of a pair go in one forward); batch_size /
    micro_batch_size is the gradient accumulation."""
    max_length: Annotated[int, POSITIVE] = 512
    """Most tokens per sequence: the prompt is first cut from the left to
    model.max_prompt_length, then the response is cut at the end."""


@dataclass
class StageEvalConfig:
    """The held-out rows of a stage (`sft.eval`, `reward_model.eval`)."""

    data: Optional[str] = None
    """Held-out rows in the format of the stage's `data`; none: `size` rows of `data` are held
    out (a seeded random slice)."""
    size: Annotated[int, NONNEG] = 64
    """Held-out rows: SFT's eval loss, the reward model's accuracy and score statistics; 0 turns
    evaluation off."""
    every: Annotated[int, NONNEG] = 0
    """Evaluate every this many optimizer steps (and always at the end); 0: only at the end."""


@dataclass
class SFTConfig:
    data: Optional[str] = None
    """JSONL, JSON, Parquet or CSV file of prompt/response pairs, or of conversations."""
    prompt_column: str = "prompt"
    """Column with the prompt: a string or a conversation (a list of messages)."""
    response_column: str = "response"
    """Column with the response text; the loss covers its tokens only. Prompt and response may
    also be conversations (TRL's conversational format: lists of messages), rendered with the
    tokenizer's chat template; a response then lists the messages that follow the prompt (TRL's
    `completion`, one assistant message)."""
    messages_column: str = "messages"
    """Column of whole conversations (TRL's conversational language-modeling format), read when
    the data has no `prompt_column`: the last message, an assistant turn, is the response the
    loss covers, the messages before it the prompt. A conversation with tool calls or tool
    messages trains every assistant turn (its calls and its answer), the tools' schemas from a
    `tools` column or rollout.tools / rollout.environment (docs/agents.md)."""
    chat_template: bool = False
    """Render each pair of strings as a user turn and an assistant turn with the tokenizer's chat
    template (use with data.chat_template=true in `train`); conversations are always rendered
    with it."""
    append_eos: bool = True
    """End each response with EOS unless the chat template already put one in it, so the model
    learns to stop as PPO's responses stop."""
    packing: bool = False
    """Pack several whole examples into each row of train.max_length tokens. Each keeps its own
    positions and attends only to itself (block-diagonal mask), so the loss is the unpacked loss
    with fewer pad tokens."""
    train: StageTrainConfig = field(default_factory=StageTrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=2e-4,
                                                                   lr_schedule="cosine"))
    eval: StageEvalConfig = field(default_factory=StageEvalConfig)


@dataclass
class RewardModelConfig:
    data: Optional[str] = None
    """JSONL, JSON, Parquet or CSV file of preference pairs (TRL's formats: strings or
    conversations, with an explicit or an implicit prompt)."""
    prompt_column: str = "prompt"
    """Column with the prompt. Data without it: each pair's prompt is the beginning its chosen
    and rejected responses share (TRL's implicit prompt), said in one line."""
    chosen_column: str = "chosen"
    """Column with the preferred response (a conversation: the messages after the prompt)."""
    rejected_column: str = "rejected"
    """Column with the other response."""
    margin: Annotated[float, NONNEG] = 0.0
    """Margin m of the loss -log sigmoid(r_chosen - r_rejected - m) (Llama 2, Touvron et al. 2023,
    eq. 2): the chosen score must beat the rejected one by m."""
    margin_column: Optional[str] = None
    """Column with a per-pair margin instead of the constant `margin` (TRL's `margin` column)."""
    chat_template: bool = False
    """Render each pair of strings with the tokenizer's chat template (use with
    data.chat_template=true in `train`); conversations are always rendered with it."""
    append_eos: bool = True
    """End each response with EOS unless the chat template already did, so the score is read on
    the EOS token, where PPO reads it for a finished response."""
    init_adapter: Optional[str] = None
    """Start the reward LoRA from this PEFT adapter (e.g. the SFT output), as InstructGPT starts its
    reward model from the SFT model; none: fresh LoRA weights (lora.*)."""
    head_init_std: Annotated[float, NONNEG] = 0.02
    """Std of the score head's initial weights (transformers' initializer_range)."""
    train: StageTrainConfig = field(default_factory=StageTrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=1e-4,
                                                                   lr_schedule="cosine"))
    eval: StageEvalConfig = field(default_factory=StageEvalConfig)
