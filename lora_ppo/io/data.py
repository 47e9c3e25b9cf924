"""Prompts: read from a local file through `datasets`, cycled with a reshuffle on every pass."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

from lora_ppo.errors import UserError

BUILTIN_PROMPTS = "builtin:reviews"
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
            ".txt": "text"}


def load_prompts(spec: str, column: str) -> list[str]:
    """Prompt strings from a JSONL/JSON/Parquet/CSV file (column `column`) or a text file (one
    prompt per line); `builtin:reviews` generates openings of product and movie reviews."""
    if spec == BUILTIN_PROMPTS:
        from lora_ppo.builtin.corpus import review_prompts

        return review_prompts(512, seed=1234)
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"data.prompts={spec} does not exist; give a .jsonl/.parquet/.csv/.txt file")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"data.prompts={spec}: unknown extension {path.suffix!r}; "
                        f"use one of {', '.join(_FORMATS)}")
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:
        raise UserError(f"data.prompts={spec} could not be read as {fmt}: {str(e).splitlines()[0]}")
    if fmt == "text":
        column = "text"
    if column not in ds.column_names:
        raise UserError(f"data.prompt_column={column!r} is not a column of {spec}; "
                        f"columns: {', '.join(ds.column_names)}")
    prompts = [p for p in ds[column] if isinstance(p, str) and p.strip()]
    if not prompts:
        raise UserError(f"data.prompts={spec} holds no non-empty prompt in column {column!r}")
    return prompts


def apply_chat_template(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as a single user turn, ending where the assistant's reply begins."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("data.chat_template=true but the tokenizer has no chat template; "
                        "set data.chat_template=false")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


class PromptSampler:
    """Cycles the prompts, reshuffling at the start of every pass; its state is two integers.

    The order of pass k depends only on (seed, k), so a resumed run sees the same prompts.
    """

    def __init__(self, prompts: list[str], seed: int):
        self.prompts, self.seed = prompts, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[str]:
        out = []
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            out.append(self.prompts[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffled(self.epoch)


def split_eval(prompts: list[str], eval_spec: Optional[str], column: str, size: int,
               enabled: bool) -> tuple[list[str], list[str]]:
    """(train prompts, eval prompts): a separate file, or the last `size` prompts held out."""
    if not enabled:
        return prompts, []
    if eval_spec:
        return prompts, load_prompts(eval_spec, column)[:size]
    if len(prompts) <= size:
        raise UserError(f"data.eval_size={size} leaves no training prompts out of {len(prompts)}; "
                        "lower it or give data.eval_prompts")
    return prompts[:-size], prompts[-size:]
