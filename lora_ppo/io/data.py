"""What goes into a run: tables of rows, prompts, a held-out slice, and the text the model reads.

Files are read through `datasets` (JSONL, JSON, Parquet, CSV; prompts also from a text file, one
per line). The same functions serve PPO's prompts and the SFT / reward-model stages' rows, so a
file is read, split and rendered with a chat template the same way by every command. A prompt
is a string or a conversation (TRL's conversational format, a list of messages), which the chat
template renders; a PPO prompt keeps its row's other columns for the reward function.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple, Optional, Union

from lora_ppo.errors import UserError, first_line

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
            ".txt": "text"}


def read_rows(spec: str, columns: dict[str, str], field: str, text: bool = False) -> list[dict]:
    """Rows {column: value}, every column of the file, of a JSONL/JSON/Parquet/CSV file (with
    `text`, also a .txt file: one row per line, its column named as the first of `columns`).
    `columns` maps each column the caller needs to the config field that names it (a missing
    column's message names that field); those must exist and hold a value in every row."""
    rows = read_table(spec, field, text)
    if isinstance(spec, (str, Path)) and Path(spec).suffix.lower() == ".txt":
        rows = [{next(iter(columns)): r["text"]} for r in rows]
    require_columns(rows, columns, f"{field}={shown(spec)}")
    require_values(rows, columns, f"{field}={shown(spec)}")
    return rows


def read_table(spec: str, field: str, text: bool = False) -> list[dict]:
    """Every row, with every column, of a JSONL/JSON/Parquet/CSV file (with `text`, also a .txt
    file: one row {"text": line} per line); at least one row. `spec` may also be rows in memory
    (in_memory_rows: a stage's train_dataset from lora_ppo.api)."""
    if spec is not None and not isinstance(spec, (str, Path)):
        return in_memory_rows(spec, {}, field)
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
    if not len(table):
        raise UserError(f"{field}={spec} holds no rows")
    return table.to_list()


def require_values(rows: list[dict], columns, where: str) -> None:
    """Every row holds a value (not None) in each of `columns`; else one line naming the row."""
    for i, row in enumerate(rows):
        empty = [c for c in columns if row[c] is None]
        if empty:
            raise UserError(f"{where}: row {i} has no value in column {empty[0]!r}; fill it in or "
                            "drop the row")


def require_text(value, where: str, what: str) -> None:
    """One line unless `value` is a string or a conversation (`is_conversation`); `what` says
    which value of which row, e.g. "row 3's prompt in column 'prompt'"."""
    if not isinstance(value, str) and not is_conversation(value):
        raise UserError(f"{where}: {what} is {value!r:.60}, neither a string nor a list of "
                        "messages {'role': ..., 'content': ...}; fix that row")


def require_columns(rows: list[dict], columns: dict[str, str], where: str) -> None:
    """Every column of `columns` (column -> the config field naming it) is in the rows; else one
    line naming the first missing column, the columns there are and the field to set."""
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise UserError(f"{where} has no column {missing[0]!r} (columns: {', '.join(rows[0])}); "
                        f"set {columns[missing[0]]} to one of them")


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


class PromptRow(NamedTuple):
    """A prompt as the data gives it, before any rendering: a string, or a conversation (TRL's
    conversational format: a list of messages {"role": ..., "content": ...}); and the row's
    other columns, which reach a reward function by name."""

    prompt: Union[str, list]
    columns: dict


def is_conversation(value) -> bool:
    """A non-empty list of messages, dicts with a "role" (TRL's `is_conversational`, which looks
    at the first message only; here every message is checked)."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m for m in value))


def load_prompts(spec, column: str, field: str = "data.prompts",
                 column_field: str = "data.prompt_column") -> list[PromptRow]:
    """The prompts of a table file (column `column`), a text file (one per line), or rows in
    memory (`in_memory_rows`: a `datasets.Dataset` or a list of dicts): strings or
    conversations, one kind per dataset, each with its row's other columns. Blank prompts (and
    empty conversations) are dropped."""
    if isinstance(spec, (str, Path)) or spec is None:
        rows = read_rows(spec, {column: column_field}, field, text=True)
    else:
        rows = in_memory_rows(spec, {column: column_field}, field)
    out, first = [], {}  # first: the row of the first prompt of each kind, for the message
    for i, row in enumerate(rows):
        prompt = row[column]
        if isinstance(prompt, str) and not prompt.strip() or prompt == []:
            continue
        require_text(prompt, f"{field}={shown(spec)}", f"row {i}'s prompt in column {column!r}")
        first.setdefault(isinstance(prompt, str), i)
        out.append(PromptRow(prompt, {k: v for k, v in row.items() if k != column}))
    if len(first) == 2:
        raise UserError(f"{field}={shown(spec)}: row {first[True]}'s prompt is a string and row "
                        f"{first[False]}'s a list of messages; give one kind of prompt")
    if not out:
        raise UserError(f"{field}={shown(spec)} holds no non-empty prompt in column {column!r}")
    return out


def shown(spec) -> str:
    """A data spec as a message names it: the path, or what kind of rows in memory."""
    return spec if isinstance(spec, (str, Path)) else f"<{type(spec).__name__} in memory>"


def in_memory_rows(data, columns: dict[str, str], field: str) -> list[dict]:
    """Rows of a `datasets.Dataset` (or anything with `to_list()`) or a list of dicts, each
    holding `columns` (column -> the config field naming it, for the message) and all the same
    columns (as a table's rows do: they reach a reward function by name)."""
    rows = data.to_list() if hasattr(data, "to_list") else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{field}: give a file path, a datasets.Dataset or a list of dicts, not "
                        f"{type(data).__name__}")
    if not rows:
        raise UserError(f"{field}: the {type(data).__name__} holds no rows")
    require_columns(rows, columns, f"{field}: the {type(data).__name__} in memory")
    for i, row in enumerate(rows):
        if row.keys() != rows[0].keys():
            raise UserError(f"{field}: row {i} has the columns {', '.join(row)} but row 0 has "
                            f"{', '.join(rows[0])}; give every row the same columns")
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


def held_out_note(n_train: int, n_held: int, separate: bool, data_field: str,
                  size_field: str, eval_field: str) -> Optional[str]:
    """The line that says rows of the training data were held out for evaluation (None when
    none were: no evaluation, or a separate evaluation set)."""
    if separate or not n_held:
        return None
    return (f"{n_held} of {n_train + n_held} rows of {data_field} are held out for evaluation "
            f"({size_field}={n_held}; {size_field}=0 trains on all of them, {eval_field} gives "
            "a separate set)")


def render_prompt(tokenizer, prompt: Union[str, list], chat_template: bool) -> str:
    """The prompt as the model reads it: a string as is, or (`chat_template`) as one user turn
    of the tokenizer's chat template; a conversation always through the chat template, its
    system message and earlier turns kept. Both end where the assistant's reply begins
    (`add_generation_prompt`, as TRL renders a conversational prompt)."""
    if isinstance(prompt, str) and not chat_template:
        return prompt
    check_chat_template(tokenizer, not isinstance(prompt, str))
    messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                else template_messages(prompt))
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def check_chat_template(tokenizer, conversations: bool, field: str = "") -> None:
    """One line if the tokenizer has no chat template to render with."""
    if getattr(tokenizer, "chat_template", None):
        return
    if conversations:
        where = f"{field} holds" if field else "the data holds"
        raise UserError(f"{where} conversations (lists of messages) but the tokenizer has no "
                        "chat template to render them; use a model whose tokenizer has one, or "
                        "plain-string prompts")
    raise UserError(f"{field or 'chat_template'}=true but the tokenizer has no chat template; "
                    "set it false")


def template_messages(messages: list) -> list:
    """The messages without keys whose value is None: a table (Arrow, Parquet) gives every
    message the keys of all (`"name": None`), and a template that tests `is defined` would
    render them. Only for rendering; a reward function sees the messages as given."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def encode_prompts(tokenizer, texts: list[str], chat_template: bool,
                   max_length: int) -> list[list[int]]:
    """Token ids of rendered prompts, each cut from the left to `max_length` (the end of a
    prompt matters most). Text rendered by a chat template already holds its BOS, so no special
    tokens are added to it again (transformers' chat-template docs)."""
    ids = tokenizer(list(texts), add_special_tokens=not chat_template)["input_ids"]
    return [x[-max_length:] for x in ids]


class Prompt(NamedTuple):
    """A prompt as the policy reads it: its text (the chat template applied) and its token ids
    (cut from the left to model.max_prompt_length); for a reward function, the conversation it
    was rendered from (None for a string prompt) and the other columns of its row; `raw`, the
    prompt as the data gave it (a multi-turn rollout renders it again, with the tools' schemas:
    lora_ppo/agents)."""

    text: str
    ids: tuple[int, ...]
    messages: Optional[list] = None
    columns: Mapping[str, Any] = MappingProxyType({})
    raw: Union[str, list, None] = None


def encode(tokenizer, texts: list[str], chat_template: bool, max_length: int) -> list[Prompt]:
    """Rendered prompt texts -> Prompts (encode_prompts' ids)."""
    ids = encode_prompts(tokenizer, texts, chat_template, max_length)
    return [Prompt(t, tuple(i)) for t, i in zip(texts, ids)]


def encode_rows(tokenizer, rows: list[PromptRow], chat_template: bool, max_length: int,
                field: str) -> list[Prompt]:
    """Prompts of rows as `load_prompts` gives them: rendered (`render_prompt`), encoded
    (`encode_prompts`), each with its conversation and columns. `field` names the data in the
    message when a conversation meets a tokenizer without a chat template."""
    if not rows:
        return []
    conversations = not isinstance(rows[0].prompt, str)
    templated = chat_template or conversations
    if templated:
        check_chat_template(tokenizer, conversations, field if conversations else
                            field.rpartition(".")[0] + ".chat_template")
    texts = [render_prompt(tokenizer, r.prompt, chat_template) for r in rows]
    ids = encode_prompts(tokenizer, texts, templated, max_length)
    return [Prompt(t, tuple(i), r.prompt if conversations else None, MappingProxyType(r.columns),
                   r.prompt) for t, i, r in zip(texts, ids, rows)]


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
