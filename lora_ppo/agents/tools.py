"""Tools and environments with TRL 1.16's interfaces, checked at setup and run during rollouts.

    rollout.tools: [my_tools.py:add, ...]       plain functions, sync or async (TRL's `tools`)
    rollout.environment: my_env.py:Calculator   a class, one instance per sample (TRL's
                                                `environment_factory`)

An environment is TRL's (`trl/trainer/grpo_trainer.py`, GRPOTrainer.__init__ and
`_generate_and_score_completions`): the class is called with no arguments; `reset(**row)` gets the
dataset row's columns before each rollout and may return a string that is appended to the
prompt's last message; its public methods (not `reset`, `get_reward` or `_private`) are its
tools; an optional `get_reward()` (sync or async) scores the finished trajectory. Instances are
pooled as TRL pools them: constructed once, reset before each rollout, each serving one sample
at a time.

A tool's JSON schema, which the chat template shows the model, is transformers'
`get_json_schema` of the function: type hints on every argument and a Google-style docstring
with a line per argument are required, and their absence is refused at setup in one line.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Sequence
from typing import Any, Optional

from lora_ppo.agents.loading import AgentError, load_object
from lora_ppo.agents.parsing import ParsedCall
from lora_ppo.errors import first_line

RESERVED = ("reset", "get_reward")  # an environment's methods that are not tools (TRL)


def tool_schema(fn: Callable, where: str) -> dict:
    """The tool's JSON schema (transformers' `get_json_schema`); one line if it cannot be built."""
    from transformers.utils import get_json_schema
    from transformers.utils.chat_template_utils import (
        DocstringParsingException,
        TypeHintParsingException,
    )

    try:
        return get_json_schema(fn)
    except TypeHintParsingException as e:
        raise AgentError(f"{where}: {first_line(e)}; give every argument a type hint (the tool's "
                         "JSON schema is built from them by transformers' get_json_schema)")
    except DocstringParsingException as e:
        raise AgentError(f"{where}: {first_line(e)}; write a Google-style docstring: a "
                         "description, then 'Args:' with one 'name: meaning' line per argument")


def environment_tools(env: Any) -> list[Callable]:
    """The public methods of an environment instance, bound (TRL: the functions of its class,
    listed on the class so that properties are not evaluated, minus `reset`, `get_reward` and
    names starting with `_`)."""
    return [getattr(env, name) for name, _ in inspect.getmembers(type(env), inspect.isfunction)
            if name not in RESERVED and not name.startswith("_")]


class Toolbox:
    """The run's tools and environment, checked once before the model loads.

    `tools`: standalone functions; `factory`: the environment class (or any callable returning
    an instance), or None. `schemas` lists every tool's JSON schema, the standalone tools
    first (TRL's order). One instance of the environment is built here, as TRL probes one, to
    read its methods' schemas; it is the first of the pool."""

    def __init__(self, tools: Sequence[Callable] = (), factory: Optional[Callable] = None, *,
                 env_field: str = "rollout.environment", tool_fields: Sequence[str] = ()):
        self.factory, self.env_field = factory, env_field
        fields = list(tool_fields) or [f"rollout.tools[{i}]" for i in range(len(tools))]
        self.tools = list(tools)
        self.schemas = []
        for fn, where in zip(self.tools, fields):
            if not callable(fn):
                raise AgentError(f"{where} is a {type(fn).__name__}, not a function; name a "
                                 "function")
            self.schemas.append(tool_schema(fn, f"{where} ({getattr(fn, '__name__', fn)})"))
        self._pool: list = []
        self._leased: set[int] = set()
        self.has_reward = False
        if factory is not None:
            probe = self._construct()
            self._check_environment(probe)
            self._pool.append(probe)
        names = [s["function"]["name"] for s in self.schemas]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise AgentError(f"two tools are named {twice[0]!r} (rollout.tools and the methods of "
                             f"{env_field}); rename one: the model calls tools by name")
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    @classmethod
    def from_config(cls, rollout) -> Optional[Toolbox]:
        """The toolbox of `rollout.environment` and `rollout.tools`; None when neither is set."""
        if not rollout.environment and not rollout.tools:
            return None
        factory = (load_object(rollout.environment, "rollout.environment")
                   if rollout.environment else None)
        if factory is not None and not callable(factory):
            raise AgentError(f"rollout.environment={rollout.environment!r} is a "
                             f"{type(factory).__name__}; name a class")
        fields = [f"rollout.tools[{i}]={s!r}" for i, s in enumerate(rollout.tools)]
        tools = [load_object(s, f) for s, f in zip(rollout.tools, fields)]
        return cls(tools, factory, env_field=f"rollout.environment={rollout.environment!r}",
                   tool_fields=fields)

    # -- the environment ---------------------------------------------------------------------

    @property
    def env_name(self) -> str:
        """The environment's class name (TRL logs its reward under it)."""
        f = self.factory
        return getattr(f, "__name__", type(f).__name__) if f is not None else ""

    def _construct(self):
        try:
            return self.factory()
        except Exception as e:
            raise AgentError(f"{self.env_field}: {self.env_name}() raised {type(e).__name__}: "
                             f"{first_line(e)}; the environment is built with no arguments, as "
                             "TRL's environment_factory is")

    def _check_environment(self, env) -> None:
        where = self.env_field
        if not callable(getattr(env, "reset", None)):
            raise AgentError(f"{where}: {self.env_name} has no reset method; define "
                             "reset(self, **kwargs) -> str | None (it gets the dataset row's "
                             "columns before each rollout)")
        reward = getattr(env, "get_reward", None)
        if reward is not None:
            required = [p.name for p in inspect.signature(reward).parameters.values()
                        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL,
                                                                   p.VAR_KEYWORD)]
            if required:
                raise AgentError(f"{where}: {self.env_name}.get_reward takes {required[0]!r}; "
                                 "it is called with no arguments and returns a float")
            self.has_reward = True
        for fn in environment_tools(env):
            self.schemas.append(tool_schema(fn, f"{where}: tool method {fn.__name__}"))

    def check_columns(self, columns: Sequence[str]) -> None:
        """One line unless `reset` accepts the dataset's columns as keywords (call it once the
        data is read, before the model loads)."""
        if self.factory is None:
            return
        try:
            inspect.signature(self._pool[0].reset).bind(**{c: None for c in columns})
        except TypeError as e:
            raise AgentError(f"{self.env_field}: {self.env_name}.reset cannot take the dataset's "
                             f"columns ({', '.join(columns)}) as keywords: {e}; give it **kwargs")

    def lease(self, n: int) -> list:
        """n environment instances no one else holds, from the pool (built as needed)."""
        free = [i for i in range(len(self._pool)) if i not in self._leased]
        while len(free) < n:
            self._pool.append(self._construct())
            free.append(len(self._pool) - 1)
        self._leased.update(free[:n])
        return [self._pool[i] for i in free[:n]]

    def release(self, envs: Sequence) -> None:
        """Give leased instances back to the pool."""
        held = {id(e) for e in envs}
        self._leased -= {i for i in self._leased if id(self._pool[i]) in held}

    def tools_of(self, env) -> dict[str, Callable]:
        """name -> callable: the standalone tools and, with an environment, its bound methods."""
        fns = self.tools + (environment_tools(env) if env is not None else [])
        return {s["function"]["name"]: fn for s, fn in zip(self.schemas, fns)}

    # -- running tools -------------------------------------------------------------------------

    def run_calls(self, batches: Sequence[tuple[dict[str, Callable], list[ParsedCall]]]
                  ) -> list[list[tuple[str, str, bool]]]:
        """Run the calls of several samples: per sample, (name, result text, failed) in call
        order. Sync tools run one after another in that order; the coroutines of async tools,
        of every sample at once, are awaited together (asyncio.gather, TRL's
        `_run_async_tools`). Anything a tool raises becomes its result, TRL's
        `{'error': ...}`; a call that did not parse gets its parse error the same way."""
        out = [[None] * len(calls) for _, calls in batches]
        pending = []  # (sample, call index, name, coroutine)
        for s, (tools, calls) in enumerate(batches):
            for c, call in enumerate(calls):
                name = call.name or "unknown"
                if call.error is not None:
                    out[s][c] = (name, _error(call.error), True)
                    continue
                if call.name not in tools:
                    out[s][c] = (name, _error(f"Tool {call.name} not found."), True)
                    continue
                try:
                    result = tools[call.name](**call.arguments)
                except Exception as e:
                    out[s][c] = (name, _error(_raised(e)), True)
                    continue
                if inspect.isawaitable(result):
                    pending.append((s, c, name, result))
                else:
                    out[s][c] = (name, str(result), False)
        if pending:
            results = self.await_all([coro for *_, coro in pending])
            for (s, c, name, _), result in zip(pending, results):
                failed = isinstance(result, BaseException)
                out[s][c] = (name, _error(_raised(result)) if failed else str(result), failed)
        return out

    def await_all(self, coros: list) -> list:
        """Await coroutines together on the toolbox's event loop (a daemon thread, started on
        first use and kept, so that what a tool opens on it stays usable, as TRL keeps its
        loop); results in order, an exception in place of a result that raised."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, daemon=True,
                             name="lora-ppo-tools").start()

        async def gather():
            return await asyncio.gather(*coros, return_exceptions=True)

        return asyncio.run_coroutine_threadsafe(gather(), self._loop).result()

    def close(self) -> None:
        """Stop the event loop's thread (if one was started)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None


def config_schemas(rollout) -> Optional[list[dict]]:
    """The JSON schemas of rollout.tools and rollout.environment's tool methods, without building
    the environment (SFT needs the schemas, not a live environment: its methods are read off an
    instance made without __init__); None when neither field is set."""
    if not rollout.environment and not rollout.tools:
        return None
    fields = [f"rollout.tools[{i}]={s!r}" for i, s in enumerate(rollout.tools)]
    schemas = [tool_schema(load_object(s, f), f) for s, f in zip(rollout.tools, fields)]
    if rollout.environment:
        where = f"rollout.environment={rollout.environment!r}"
        cls = load_object(rollout.environment, "rollout.environment")
        if not inspect.isclass(cls):
            return Toolbox.from_config(rollout).schemas  # a factory: only calling it tells
        unbuilt = object.__new__(cls)
        schemas += [tool_schema(fn, f"{where}: tool method {fn.__name__}")
                    for fn in environment_tools(unbuilt)]
    return schemas


def _error(message: str) -> str:
    """A failed call's result as TRL 1.16 writes it (`str({"error": str(e)})`), so a model
    trained with TRL reads the same."""
    return str({"error": message})


def _raised(e: BaseException) -> str:
    """What a tool raised, for the model: TypeError's text names the bad argument."""
    return str(e) or type(e).__name__
