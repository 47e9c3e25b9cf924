"""Agents on one base: tools, environments, and the chat rendering of multi-turn rollouts.

    tools.py          tools and environments with TRL 1.16's interfaces (Toolbox), checked at
                      setup; tool calls run sync in order, async concurrently
    parsing.py        tool calls parsed from a turn, in the model's own format
    render.py         prompts with the tools' schemas; tool results' token ids as the template's
                      suffix after the model's turn (TRL's _get_tool_suffix_ids)
    conversations.py  per-sample state of one rollout: the generation engine's turn hook
                      (end_turns), completions as messages, env rewards, tool metrics
    rollout_func.py   a custom rollout (TRL's rollout_func): its contract and the check
    transcripts.py    SFT on tool-calling transcripts: every assistant turn's tokens, the rest
                      context
    setup.py          setup_agents: what a run's setup checks before the model loads
    loading.py        `file.py:name` specs, AgentError

The generation engine knows nothing of this package: it calls `end_turns` on whatever hook it is
given. docs/agents.md is the user's guide.
"""

from lora_ppo.agents.conversations import (
    Conversations,
    format_conversation,
    rows_of,
    tool_metrics,
)
from lora_ppo.agents.loading import AgentError
from lora_ppo.agents.render import check_template
from lora_ppo.agents.rollout_func import (
    RolloutContext,
    RolloutFuncError,
    check_rollout_output,
    load_rollout_func,
)
from lora_ppo.agents.setup import Agents, setup_agents
from lora_ppo.agents.tools import Toolbox

__all__ = ["AgentError", "Agents", "Conversations", "RolloutContext", "RolloutFuncError",
           "Toolbox", "check_rollout_output", "check_template", "format_conversation",
           "load_rollout_func", "rows_of", "setup_agents", "tool_metrics"]
