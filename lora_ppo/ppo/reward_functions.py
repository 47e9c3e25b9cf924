"""Reward functions as TRL 1.16 writes them (GRPOTrainer._calculate_rewards), so existing ones
work unchanged:

    def my_reward(prompts, completions, **kwargs) -> list[float]

called with keywords only, one list entry per sample (a group's prompt and columns repeated for
each of its n samples): `prompts` (strings, or the conversations as the data gave them),
`completions` (strings, or for conversations [{"role": "assistant", "content": text}]),
`completion_ids`, every other column of the dataset's rows by its name, `trainer_state`,
`log_extra` and `log_metric`; and lora_ppo's own `prompt_ids` (KEYWORDS). A function whose
signature cannot take that is refused at setup (`check_signature`), before the model loads.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lora_ppo.config import Config
from lora_ppo.errors import UserError
from lora_ppo.io.data import Prompt


class RewardError(UserError):
    """A reward function raised, returned the wrong length, or gave NaN/inf."""


def load_function(spec: str) -> Callable:
    """`package.module:function` or `path/to/file.py:function` -> the function."""
    if not spec:
        raise UserError("reward.function is not set; give 'module:function' or "
                        "'file.py:function' (or another reward.source)")
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise UserError(f"reward.function={spec!r} must be 'module:function' or 'file.py:function'")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise UserError(f"reward.function={spec!r}: file {target} does not exist")
            mod_spec = importlib.util.spec_from_file_location(f"lora_ppo_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(target)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"reward.function={spec!r}: importing {target} failed: "
                        f"{type(e).__name__}: {e}")
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"reward.function={spec!r}: {target} has no function {name!r}")
    return fn


def check_scores(scores: Sequence, n: int, name: str) -> torch.Tensor:
    """A list of n finite floats -> tensor; otherwise a RewardError naming the sample."""
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward {name} must return a list of floats: {e}")
    if len(values) != n:
        raise RewardError(f"reward {name} returned {len(values)} scores for {n} samples")
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise RewardError(f"reward {name} returned {v} for sample {i}; rewards must be finite")
    return torch.tensor(values, dtype=torch.float32)


# The keywords of every call besides the dataset's columns: TRL 1.16's (prompts, completions,
# completion_ids, trainer_state, log_extra, log_metric) and lora_ppo's prompt_ids.
# docs/coming_from_trl.md's table lists them; tests/test_docs.py checks it against this and, where
# TRL is installed, against TRL's own call.
KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
            "prompt_ids")
_PER_SAMPLE_EXCEPT = ("trainer_state", "log_extra", "log_metric")
# ... and with rollout.environment, TRL's `environments` (the samples' instances).
ENVIRONMENT_KEYWORDS = ("environments",)


class RewardLog:
    """What a reward function hands to `log_metric(name, value)` and `log_extra(column, values)`
    (TRL 1.16's callables), kept until the loop takes it: the metrics go to metrics.jsonl as the
    mean of their values over an update, the extra columns to the console (ppo/metrics.py)."""

    def __init__(self):
        self.metrics: dict[str, list[float]] = {}
        self.extra: dict[str, list] = {}

    def log_metric(self, name: str, value: float) -> None:
        self.metrics.setdefault(str(name), []).append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        self.extra.setdefault(str(column), []).extend(values)

    def take_metrics(self) -> dict[str, list[float]]:
        """The metrics logged since the last take; none are kept."""
        out, self.metrics = self.metrics, {}
        return out

    def take_extra(self) -> dict[str, list]:
        """The extra columns logged since the last take; none are kept."""
        out, self.extra = self.extra, {}
        return out


def reward_kwargs(prompts: Sequence[Prompt], completions: list[str], rollout_tensors: dict,
                  state, log: RewardLog) -> dict:
    """The keywords of one call, as TRL 1.16 builds them (`_generate_and_score_completions`,
    `_calculate_rewards`): a conversation's prompt as its messages and its completion as one
    assistant message, a string prompt as the text the policy read; the row's columns, one value
    per sample. Each call gets its own copies, so a function that changes them changes nothing
    of the run's."""
    conv = [p.messages is not None for p in prompts]
    columns = list(prompts[0].columns) if prompts else []
    kwargs = {
        "prompts": [copy.deepcopy(p.messages) if c else p.text for p, c in zip(prompts, conv)],
        "completions": [[{"role": "assistant", "content": t}] if c else t
                        for t, c in zip(completions, conv)],
        "completion_ids": rollout_tensors["completion_ids"],
        **{k: [copy.deepcopy(p.columns[k]) for p in prompts] for k in columns},
        "trainer_state": state, "log_extra": log.log_extra, "log_metric": log.log_metric,
        "prompt_ids": rollout_tensors["prompt_ids"],
    }
    turns = rollout_tensors.get("conversations")
    if turns is not None:  # a multi-turn rollout: the trajectories as messages (TRL's, agents)
        kwargs["prompts"] = copy.deepcopy(turns.prompts())
        kwargs["completions"] = copy.deepcopy(turns.completions())
        if turns.environments is not None:
            kwargs["environments"] = turns.environments
    for k, v in rollout_tensors.get("columns", {}).items():  # a rollout function's extra fields
        kwargs[k] = copy.deepcopy(v)
    return kwargs


class FunctionReward:
    def __init__(self, spec: str, fn: Callable | None = None):
        self.name = spec
        self.fn = fn if fn is not None else load_function(spec)
        self.log = RewardLog()

    def __call__(self, prompts, completions, rollout_tensors, state=None) -> torch.Tensor:
        kwargs = reward_kwargs(prompts, completions, rollout_tensors, state, self.log)
        try:
            out = self.fn(**kwargs)
        except Exception as e:
            # Find the failing sample so the message points at it, not at the whole batch.
            idx = _first_failing_sample(self.fn, kwargs)
            where = f" on sample {idx} (completion {completions[idx]!r:.80})" if idx is not None else ""
            raise RewardError(f"reward function {self.name} raised {type(e).__name__}: {e}{where}")
        return check_scores(out, len(prompts), f"function {self.name}")


def _first_failing_sample(fn, kwargs):
    quiet = RewardLog()  # the probes log nothing of their own
    for i in range(len(kwargs["prompts"])):
        one = {k: v if k in _PER_SAMPLE_EXCEPT else v[i:i + 1] for k, v in kwargs.items()}
        try:
            fn(**{**one, "log_extra": quiet.log_extra, "log_metric": quiet.log_metric})
        except Exception:
            return i
    return None


def check_signature(fn: Callable, name: str, columns: dict[str, list[str]],
                    keywords: Sequence[str] = KEYWORDS, extra_fields: bool = False) -> None:
    """Refuse, at setup, a reward function that cannot take what every call passes (`keywords`,
    KEYWORDS and with an environment ENVIRONMENT_KEYWORDS, and the columns of each dataset it is
    called on: `columns`, where -> its columns): a required argument that is neither, or,
    without **kwargs, a keyword it has no argument for. Also a column named as one of the
    keywords, and an async function (TRL awaits those on an event loop of its own). A callable
    without a signature (a builtin) is not checked. `extra_fields`: a rollout function's fields
    come too, known only once it returns, so a required argument may be one of them."""
    if inspect.iscoroutinefunction(fn):
        raise UserError(f"reward function {name} is async, and reward functions are called "
                        "synchronously here; call it in a plain function, e.g. "
                        "`def f(**kw): return asyncio.run(g(**kw))`")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    shown_keywords = ", ".join(keywords)
    for where, cols in columns.items():
        clash = [c for c in cols if c in keywords]
        if clash:
            raise UserError(f"{where}: column {clash[0]!r} has the name of a keyword every reward "
                            f"function call gets ({shown_keywords}); rename that column")
        shown = f"{where} (columns: {', '.join(cols) or 'none but the prompt'})"
        for p in params:
            if p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.kind is p.POSITIONAL_ONLY:
                raise UserError(f"reward function {name} takes {p.name!r} by position only, but "
                                "every argument is passed by keyword (as TRL passes them); make "
                                "it a keyword argument")
            if p.name not in keywords and p.name not in cols and not extra_fields:
                raise UserError(f"reward function {name} needs argument {p.name!r}, which is "
                                f"neither a column of {shown} nor a keyword every call gets "
                                f"({shown_keywords}); add the column or give {p.name!r} a default")
        if not takes_any:
            extra = [k for k in (*keywords, *cols) if k not in named]
            if extra:
                what = ("a keyword every call gets" if extra[0] in keywords
                        else f"a column of {shown}")
                raise UserError(f"reward function {name} has no argument {extra[0]!r} ({what}) "
                                "and no **kwargs; add **kwargs to its signature, as a TRL reward "
                                "function has")



def function_name(cfg: Config, function: Callable | None) -> str:
    """How messages name the reward function: reward.function, or a callable's own name."""
    spec = cfg.reward.function
    if isinstance(spec, str) and spec:
        return spec
    return getattr(function, "__qualname__", None) or repr(function)


def named_functions(cfg: Config, function: Callable | list[Callable] | None
                    ) -> list[tuple[str, Callable]]:
    """(how messages name it, the function) for each reward function: the callables given (a
    list: several) or, with none, reward.function's specs imported; named by their spec in
    reward.function (lora_ppo.api writes one per callable) or their own name."""
    specs = cfg.reward.function if isinstance(cfg.reward.function, list) else [cfg.reward.function]
    if function is None:
        function = [load_function(s) for s in specs]
    functions = function if isinstance(function, list) else [function]
    if len(specs) == len(functions) and all(specs):
        return list(zip(specs, functions))
    return [(getattr(f, "__qualname__", None) or repr(f), f) for f in functions]




class FunctionSum:
    """Several reward functions (reward.function a list; TRL's `reward_funcs` with
    `reward_weights`): score = sum_i weight_i * f_i, as TRL sums them; `by_function` keeps each
    function's last raw scores by its name (logged as TRL's rewards/<name>/mean). The functions
    share one RewardLog, so what any of them logs is logged as one function's would be."""

    def __init__(self, parts: list[tuple[FunctionReward, float]]):
        self.parts, self.by_function = parts, {}
        self.log = RewardLog()
        self.names: list[str] = []
        for fr, _ in parts:  # the function's __name__, as TRL names it; a repeat gets _2, _3, ...
            fr.log = self.log
            base = getattr(fr.fn, "__name__", type(fr.fn).__name__)
            name, k = base, 1
            while name in self.names:
                k += 1
                name = f"{base}_{k}"
            self.names.append(name)
        self.name = " + ".join(fr.name for fr, _ in parts)

    def __call__(self, prompts, completions, rollout_tensors, state=None) -> torch.Tensor:
        total = torch.zeros(len(prompts))
        for name, (fr, weight) in zip(self.names, self.parts):
            scores = fr(prompts, completions, rollout_tensors, state)
            self.by_function[name] = scores
            total += weight * scores
        return total
