"""What a run's setup calls for agents, before the base model loads: import and check
rollout.environment, rollout.tools and rollout.rollout_func, and the chat template the tools
need. Bad input stops there with one line (AgentError, exit code 2), before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Optional

from lora_ppo.agents.render import check_template
from lora_ppo.agents.rollout_func import load_rollout_func
from lora_ppo.agents.tools import Toolbox


class Agents(NamedTuple):
    """The run's toolbox (None without tools or environment) and rollout function (None)."""

    toolbox: Optional[Toolbox]
    rollout_func: Optional[Callable]


def setup_agents(rollout, tokenizer, where: str = "the tokenizer") -> Agents:
    """`rollout`: the config's rollout section; `tokenizer`: the policy's (its chat template
    must render tool calls and tool messages, and prefix-preservingly)."""
    toolbox = Toolbox.from_config(rollout)
    if toolbox is not None:
        check_template(tokenizer, where)
    fn = load_rollout_func(rollout.rollout_func) if rollout.rollout_func else None
    return Agents(toolbox, fn)

