"""`builtin:NAME` in a config: the demo world's models and data, turned into files before the core
sees the config. Everything below the CLI takes paths and callables only; the CLI, `lora-ppo demo`
and the Python entry points (lora_ppo.api) pass a config through `resolve_builtins` first.

    field                                      names                      becomes
    model.path                                 demo, arith, tools, test   a model directory,
                                                                          built once and cached
    data.prompts, data.eval_prompts            reviews, arithmetic        a JSONL of prompts
                                               calculator                 ... with an `answer`
                                               calculator_heldout         the held-out problems
    sft.data, sft.eval.data                    reviews                    prompt/response pairs
                                               tool_transcripts           tool-calling transcripts
    reward_model.data, reward_model.eval.data  preferences                preference pairs

Data files are written once per recipe and column names under $LORA_PPO_CACHE/data (default
~/.cache/lora_ppo/data), atomically, and read back through the same code as a user's files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from lora_ppo.builtin import arithmetic, calculator
from lora_ppo.builtin.corpus import preference_pairs, review_prompts, sft_pairs
from lora_ppo.builtin.tiny import SIZES, ensure_builtin_model
from lora_ppo.config import Config
from lora_ppo.errors import UserError
from lora_ppo.sizing.arch import Arch

PREFIX = "builtin:"


N_TRANSCRIPTS = 300  # tool transcripts for SFT: "a few hundred"


def _prompts(name: str, column: str) -> list[dict]:
    if name.startswith("calculator"):  # conversational prompts, and their `answer` column
        rows = (calculator.prompts(2048, seed=1234) if name == "calculator"
                else calculator.heldout_prompts())
        return [{column: r["prompt"], "answer": r["answer"]} for r in rows]
    texts = {"reviews": lambda: review_prompts(512, seed=1234),
             "arithmetic": lambda: arithmetic.prompts(512, seed=1234)}[name]()
    return [{column: t} for t in texts]


def _sft(name: str, prompt: str, response: str, messages: str) -> list[dict]:
    if name == "tool_transcripts":
        return [{messages: r["messages"]} for r in calculator.transcripts(N_TRANSCRIPTS, seed=7)]
    return [{prompt: r["prompt"], response: r["response"]} for r in sft_pairs(2000, seed=7)]


def _preferences(name: str, prompt: str, chosen: str, rejected: str) -> list[dict]:
    return [{prompt: r["prompt"], chosen: r["chosen"], rejected: r["rejected"]}
            for r in preference_pairs(2000, seed=7, broken=0.25)]


_PROMPTS = ("reviews", "arithmetic", "calculator", "calculator_heldout")
_SFT = ("reviews", "tool_transcripts")

# field -> (names it takes, the rows of a name given the field's column names, those columns)
_DATA: dict[str, tuple[tuple[str, ...], Callable[..., list[dict]], Callable[[Config], tuple]]] = {
    "data.prompts": (_PROMPTS, _prompts, lambda c: (c.data.prompt_column,)),
    "data.eval_prompts": (_PROMPTS, _prompts, lambda c: (c.data.prompt_column,)),
    "sft.data": (_SFT, _sft, lambda c: (c.sft.prompt_column, c.sft.response_column,
                                        c.sft.messages_column)),
    "sft.eval.data": (_SFT, _sft, lambda c: (c.sft.prompt_column, c.sft.response_column,
                                             c.sft.messages_column)),
    "reward_model.data": (("preferences",), _preferences, lambda c: (
        c.reward_model.prompt_column, c.reward_model.chosen_column,
        c.reward_model.rejected_column)),
    "reward_model.eval.data": (("preferences",), _preferences, lambda c: (
        c.reward_model.prompt_column, c.reward_model.chosen_column,
        c.reward_model.rejected_column)),
}


def cache_root() -> Path:
    return Path(os.environ.get("LORA_PPO_CACHE") or Path.home() / ".cache" / "lora_ppo")


def data_file(field: str, name: str, columns: tuple[str, ...]) -> Path:
    """The JSONL of built-in data `name` for `field`, with the field's column names, written
    once (atomically: a temp file renamed into place). Its name is a hash of its rows, made
    each time (milliseconds): a change to the code that makes them can never read a stale file."""
    _, rows_of, _ = _DATA[field]
    kind = field.split(".")[0]
    text = "".join(json.dumps(row) + "\n" for row in rows_of(name, *columns))
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    path = cache_root() / "data" / f"{kind}-{name}-{digest}.jsonl"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _get(cfg: Config, path: str):
    obj = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj, path: str, value):
    """A copy of the config tree `obj` with the field at `path` set to `value`."""
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(obj, **{head: value})
    return dataclasses.replace(obj, **{head: _set(getattr(obj, head), rest, value)})


def _name(field: str, value, allowed) -> str | None:
    """The name of a `builtin:` spec in `field`, checked against `allowed`; None otherwise."""
    if not (isinstance(value, str) and value.startswith(PREFIX)):
        return None
    name = value[len(PREFIX):]
    if name not in allowed:
        raise UserError(f"{field}={value} is no built-in; use a path, or one of "
                        f"{', '.join(PREFIX + n for n in allowed)}")
    return name


def resolve_builtins(cfg: Config) -> Config:
    """`cfg` with every `builtin:` spec replaced by the file or directory it names (module
    doc); a built-in model is built the first time."""
    size = _name("model.path", cfg.model.path, SIZES)
    if size is not None:
        cfg = _set(cfg, "model.path", str(ensure_builtin_model(size=size)))
    for field, (names, _, columns) in _DATA.items():
        name = _name(field, _get(cfg, field), names)
        if name is not None:
            cfg = _set(cfg, field, str(data_file(field, name, columns(cfg))))
    return cfg


def builtin_arch(model_path: str | None) -> Arch | None:
    """The architecture of a built-in model spec, from its recipe alone (nothing is built or
    written: `lora-ppo estimate`); None for any other model.path."""
    size = _name("model.path", model_path, SIZES)
    if size is None:
        return None
    m = SIZES[size]["model"]
    return Arch(vocab=m["vocab_size"], hidden=m["hidden_size"], layers=m["num_layers"],
                heads=m["num_heads"], kv_heads=m["num_kv_heads"],
                head_dim=m["hidden_size"] // m["num_heads"],
                intermediate=m["intermediate_size"], tied=False)
