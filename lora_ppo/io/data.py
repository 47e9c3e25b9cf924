"""What goes into a run: tables of rows, prompts, a held-out slice, and the text the model reads.

Files are read through `datasets` (JSONL, JSON, Parquet, CSV; prompts also from a text file, one
per line). The same functions serve PPO's prompts and the SFT / reward-model stages' rows, so a
file is read, split and rendered with a chat template the same way by every command.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import NamedTuple, Optional

from lora_ppo.errors import UserError, first_line

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
            ".txt": "text"}


def read_rows(spec: str, columns: dict[str, str], field: str, text: bool = False) -> list[dict]:
    """Rows {column: value} of a JSONL/JSON/Parquet/CSV file (with `text`, also a .txt file:
    one row per line, its column named "text"). `columns` maps each column to the config field
    that names it (a missing column's message names that field). Every column must exist and
    hold a value."""
    kinds = ".jsonl, .json, .parquet, .csv" + (" or .txt" if text else "")
    if not spec:
        raise UserError(f"{field} is not set; give a {kinds} file")
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"{field}={spec} does not exist; give a {kinds} file")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None or (fmt == "text" and not text):
        raise UserError(f"{field}={spec}: unknown extension {path.suffix!r}; use {kinds}")
    if fmt in ("json", "csv", "text") and _blank(path):
        raise UserError(f"{field}={spec} is empty; give a file with at least one row")
    if fmt == "json" and path.suffix.lower() == ".jsonl":
        _check_jsonl(path, field)
    import datasets

    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:
        raise UserError(f"{field}={spec} could not be read as {fmt}: {first_line(e)}")
    if fmt == "text":
        columns = {"text": ""}
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise UserError(f"{field}={spec} has no column {missing[0]!r} (columns: "
                        f"{', '.join(table.column_names)}); set {columns[missing[0]]} to one of "
                        "them")
    rows = [dict(zip(columns, values)) for values in zip(*(table[c] for c in columns))]
    if not rows:
        raise UserError(f"{field}={spec} holds no rows")
    for i, row in enumerate(rows):
        empty = [c for c, v in row.items() if v is None]
        if empty:
            raise UserError(f"{field}={spec}: row {i} has no value in column {empty[0]!r}; fill "
                            "it in or drop the row")
    return rows


def _blank(path: Path) -> bool:
    """True if the file holds nothing but whitespace (read in blocks, stopping at the first
    other byte, so a large file costs one block)."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            if block.strip():
                return False
    return True


def _check_jsonl(path: Path, field: str) -> None:
    """Name the first line that is not a JSON object (`datasets` reports neither the line nor
    the file, after two log lines of its own)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{field}={path}: line {n} is not valid JSON ({e.msg}, column "
                                f"{e.colno}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise UserError(f"{field}={path}: line {n} is a JSON {type(row).__name__}, not an "
                                "object with named columns; write one object per line")


def load_prompts(spec, column: str, field: str = "data.prompts",
                 column_field: str = "data.prompt_column") -> list[str]:
    """Prompt strings from a table file (column `column`), a text file (one per line), or rows
    in memory (`in_memory_rows`: a `datasets.Dataset` or a list of dicts). Blank prompts are
    dropped."""
    if isinstance(spec, (str, Path)) or spec is None:
        rows = read_rows(spec, {column: column_field}, field, text=True)
    else:
        rows = [{column: r[column]} for r in in_memory_rows(spec, {column: column_field}, field)]
    prompts = [p for row in rows for p in row.values() if isinstance(p, str) and p.strip()]
    if not prompts:
        raise UserError(f"{field}={_shown(spec)} holds no non-empty prompt in column {column!r}")
    return prompts


def _shown(spec) -> str:
    return spec if isinstance(spec, (str, Path)) else f"<{type(spec).__name__} in memory>"


def in_memory_rows(data, columns: dict[str, str], field: str) -> list[dict]:
    """Rows of a `datasets.Dataset` (or anything with `to_list()`) or a list of dicts, each
    holding `columns` (column -> the config field naming it, for the message)."""
    rows = data.to_list() if hasattr(data, "to_list") else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{field}: give a file path, a datasets.Dataset or a list of dicts, not "
                        f"{type(data).__name__}")
    if not rows:
        raise UserError(f"{field}: the {type(data).__name__} holds no rows")
    for c, name in columns.items():
        if c not in rows[0]:
            raise UserError(f"{field}: the rows have no column {c!r} (columns: "
                            f"{', '.join(rows[0])}); set {name} to one of them")
    return rows


def hold_out(rows: list, eval_rows: Optional[list], size: int, seed: int,
             field: str) -> tuple[list, list]:
    """(train, eval): all rows and the first `size` of a separate eval set, or `size` rows of a
    seeded shuffle held out (files are often sorted; a random slice is representative).
    size 0: no evaluation. `field` names the size field in the error."""
    if size == 0:
        return rows, []
    if eval_rows is not None:
        return rows, eval_rows[:size]
    if len(rows) <= size:
        raise UserError(f"{field}={size} leaves no training rows out of {len(rows)}; lower it or "
                        "give a separate evaluation file")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[size:]], [rows[i] for i in order[:size]]


def render_prompt(tokenizer, prompt: str, chat_template: bool) -> str:
    """The prompt as the model reads it: as is, or one user turn of the tokenizer's chat
    template, ending where the assistant's reply begins."""
    if not chat_template:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("chat_template=true but the tokenizer has no chat template; set it false")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def encode_prompts(tokenizer, texts: list[str], chat_template: bool,
                   max_length: int) -> list[list[int]]:
    """Token ids of rendered prompts, each cut from the left to `max_length` (the end of a
    prompt matters most). Text rendered by a chat template already holds its BOS, so no special
    tokens are added to it again (transformers' chat-template docs)."""
    ids = tokenizer(list(texts), add_special_tokens=not chat_template)["input_ids"]
    return [x[-max_length:] for x in ids]


class Prompt(NamedTuple):
    """A prompt as the policy reads it: its text (the chat template applied) and its token ids
    (cut from the left to model.max_prompt_length)."""

    text: str
    ids: tuple[int, ...]


def encode(tokenizer, texts: list[str], chat_template: bool, max_length: int) -> list[Prompt]:
    """Rendered prompt texts -> Prompts (encode_prompts' ids)."""
    ids = encode_prompts(tokenizer, texts, chat_template, max_length)
    return [Prompt(t, tuple(i)) for t, i in zip(texts, ids)]


class PromptCycle:
    """Cycles the prompts, reshuffling at the start of every pass; its state is two integers.

    The order of pass k depends only on (seed, k), so a resumed run sees the same prompts.
    """

    def __init__(self, prompts: list, seed: int):
        self.prompts, self.seed = prompts, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, n: int) -> list:
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
