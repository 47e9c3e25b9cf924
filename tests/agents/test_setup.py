"""Bad input about tools and environments, found at setup before any model loads: one line
(AgentError, a UserError: exit code 2) naming the thing and the fix."""

from __future__ import annotations

import textwrap
from types import SimpleNamespace

import pytest

from lora_ppo.agents import AgentError, Toolbox, setup_agents
from lora_ppo.errors import UserError

GOOD_TOOL = '''
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b
'''

FILES = {
    "no_reset.py": '''
class NoReset:
    def add(self, a: int, b: int) -> int:
        """Add.

        Args:
            a: The first.
            b: The second.
        """
        return a + b
''',
    "untyped.py": '''
def add(a, b):
    """Add.

    Args:
        a: The first.
        b: The second.
    """
    return a + b
''',
    "undocumented.py": "def add(a: int, b: int) -> int:\n    return a + b\n",
    "no_args_doc.py": 'def add(a: int, b: int) -> int:\n    """Add two integers."""\n    return a + b\n',
    "syntax.py": "def add(a: int\n",
    "env_untyped_tool.py": '''
class Env:
    def reset(self, **kwargs):
        return None

    def move(self, direction):
        """Move.

        Args:
            direction: Where.
        """
''',
    "reward_args.py": '''
class Env:
    def reset(self, **kwargs):
        return None

    def get_reward(self, completion) -> float:
        return 0.0
''',
    "strict_reset.py": '''
class Env:
    def reset(self, prompt):
        return None
''',
    "twice.py": GOOD_TOOL + '''
class Env:
    def reset(self, **kwargs):
        return None

    def add(self, a: int, b: int) -> int:
        """Add.

        Args:
            a: The first.
            b: The second.
        """
        return a + b
''',
    "raising_init.py": '''
class Env:
    def __init__(self):
        raise RuntimeError("no server")

    def reset(self, **kwargs):
        return None
''',
    "good.py": GOOD_TOOL,
}


@pytest.fixture
def ws(tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


def rollout(environment=None, tools=(), rollout_func=None):
    return SimpleNamespace(environment=environment, tools=list(tools), rollout_func=rollout_func)


CASES = [
    (rollout(environment="{ws}/no_reset.py:NoReset"), "NoReset has no reset method; define "
                                                      "reset(self, **kwargs)"),
    (rollout(tools=["{ws}/untyped.py:add"]), "rollout.tools[0]='{ws}/untyped.py:add' (add): "
                                             "Argument a is missing a type hint"),
    (rollout(tools=["{ws}/good.py:add", "{ws}/undocumented.py:add"]),
     "rollout.tools[1]='{ws}/undocumented.py:add' (add): Cannot generate JSON schema for add "
     "because it has no docstring!; write a Google-style docstring"),
    (rollout(tools=["{ws}/no_args_doc.py:add"]), "the docstring has no description for the "
                                                 "argument 'a'"),
    (rollout(environment="{ws}/env_untyped_tool.py:Env"), "tool method move: Argument direction "
                                                         "is missing a type hint"),
    (rollout(environment="{ws}/reward_args.py:Env"), "Env.get_reward takes 'completion'; it is "
                                                     "called with no arguments"),
    (rollout(environment="{ws}/twice.py:Env", tools=["{ws}/twice.py:add"]),
     "two tools are named 'add'"),
    (rollout(environment="{ws}/raising_init.py:Env"), "Env() raised RuntimeError: no server"),
    (rollout(tools=["{ws}/missing.py:add"]), "file {ws}/missing.py does not exist"),
    (rollout(tools=["{ws}/syntax.py:add"]), "importing {ws}/syntax.py failed: SyntaxError"),
    (rollout(tools=["{ws}/good.py:mul"]), "{ws}/good.py defines no 'mul'"),
    (rollout(environment="no_such_module_xyz:Env"), "importing no_such_module_xyz failed: "
                                                    "ModuleNotFoundError"),
    (rollout(tools=["good.py"]), "must be 'module:name' or 'file.py:name'"),
    (rollout(rollout_func="{ws}/good.py:nope"), "rollout.rollout_func='{ws}/good.py:nope'"),
]


@pytest.mark.parametrize("config, message", CASES, ids=[m[:40] for _, m in CASES])
def test_bad_input_is_one_line(ws, qwen_tokenizer, config, message):
    for key in ("environment", "rollout_func"):
        if getattr(config, key):
            setattr(config, key, getattr(config, key).format(ws=ws))
    config.tools = [t.format(ws=ws) for t in config.tools]
    with pytest.raises(AgentError) as e:
        setup_agents(config, qwen_tokenizer)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    assert message.format(ws=ws) in str(e.value), str(e.value)


def test_reset_must_take_the_datasets_columns(ws):
    toolbox = Toolbox.from_config(rollout(environment=f"{ws}/strict_reset.py:Env"))
    toolbox.check_columns(["prompt"])
    with pytest.raises(AgentError, match=r"Env.reset cannot take the dataset's columns \(prompt, "
                                         r"answer\) as keywords: .*; give it \*\*kwargs"):
        toolbox.check_columns(["prompt", "answer"])


def test_a_template_that_cannot_render_tools_is_refused(ws, tiny_model_dir, qwen_tokenizer):
    from transformers import AutoTokenizer

    tiny = AutoTokenizer.from_pretrained(tiny_model_dir)  # "role: content" lines, no tools
    with pytest.raises(AgentError, match="drops the tool call when it renders a tool exchange"):
        setup_agents(rollout(tools=[f"{ws}/good.py:add"]), tiny)
    tiny.chat_template = None
    with pytest.raises(AgentError, match="has no chat template"):
        setup_agents(rollout(tools=[f"{ws}/good.py:add"]), tiny)
    agents = setup_agents(rollout(tools=[f"{ws}/good.py:add"]), qwen_tokenizer)
    assert [s["function"]["name"] for s in agents.toolbox.schemas] == ["add"]
    assert setup_agents(rollout(), tiny) == (None, None)  # nothing asked, nothing checked


def test_config_fields_and_their_checks():
    from lora_ppo.config.load import load_config

    cfg = load_config(None, ["rollout.tools=[a.py:f, b.py:g]", "rollout.max_tool_calls=3"])
    assert cfg.rollout.tools == ["a.py:f", "b.py:g"] and cfg.rollout.max_tool_calls == 3
    with pytest.raises(UserError, match="rollout.max_tool_calls"):
        load_config(None, ["rollout.max_tool_calls=0"])
    with pytest.raises(UserError, match="rollout.rollout_func='f.py:g' and rollout.tools are both "
                                        "set; a rollout function runs its own tools: keep one"):
        load_config(None, ["rollout.tools=[a.py:f]", "rollout.rollout_func=f.py:g"])


def test_tools_with_zero3_over_ranks_are_refused():
    from lora_ppo.agents import Agents
    from lora_ppo.ppo.run import check_agents_fit

    tools = Agents(Toolbox([]), None)
    for world, stage in ((1, 3), (2, 2), (2, 0)):
        check_agents_fit(tools, world, stage)
    check_agents_fit(Agents(None, None), 2, 3)
    with pytest.raises(UserError, match="ZeRO-3 over 2 ranks.*ZeRO-2"):
        check_agents_fit(tools, 2, 3)
