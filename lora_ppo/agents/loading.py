"""Loading what a config names by `file.py:name` or `module:name`, and the errors of the agents
package.

The same spec form as `reward.function` (ppo/reward_functions.py): a path to a Python file, or an
importable module, then a colon and a name in it. Every failure is one line naming the config
field, the spec and the fix, raised before the base model loads.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from lora_ppo.errors import UserError, first_line


class AgentError(UserError):
    """Bad input about tools, environments or a rollout function: one line, exit code 2.

    Raised at setup for what can be checked there (an environment without `reset`, a tool
    without type hints), and during a rollout for what only a rollout shows (a `reset` that
    does not take the dataset's columns, a `get_reward` that returns no number)."""


def load_object(spec: str, field: str):
    """`package.module:name` or `path/to/file.py:name` -> the object; `field` names the config
    field in the message (e.g. "rollout.tools[1]")."""
    if not isinstance(spec, str) or not spec:
        raise AgentError(f"{field} is empty; give 'module:name' or 'file.py:name'")
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise AgentError(f"{field}={spec!r} must be 'module:name' or 'file.py:name'")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise AgentError(f"{field}={spec!r}: file {target} does not exist; give the path of "
                             "a Python file (relative to where you run) or an importable module")
        module_name = f"lora_ppo_user_{path.stem}_{abs(hash(str(path.resolve()))):x}"
        mod_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(mod_spec)
        load = lambda: mod_spec.loader.exec_module(module)  # noqa: E731
    else:
        module = None
        load = lambda: importlib.import_module(target)  # noqa: E731
    try:
        loaded = load()
    except Exception as e:
        raise AgentError(f"{field}={spec!r}: importing {target} failed: {type(e).__name__}: "
                         f"{first_line(e)}; fix the module or the path")
    module = module if module is not None else loaded
    if not hasattr(module, name):
        raise AgentError(f"{field}={spec!r}: {target} defines no {name!r}; check the name after "
                         "the colon")
    return getattr(module, name)
