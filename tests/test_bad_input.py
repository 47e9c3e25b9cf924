"""Bad input through the real CLI: one line on stderr that names the problem and the fix, exit
code 2, and no file of an earlier run changed (nor a new one written).

CASES is the table "Bad input" of docs/troubleshooting.md; `test_the_docs_table_lists_every_case`
keeps the two the same.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers import REPO, make_adapter_dir, run_cli

pytestmark = pytest.mark.slow


class Case(NamedTuple):
    input: str         # what the user did (the docs table's first column)
    args: list[str]    # the command line; "{ws}" is the workspace, "{base}" the tiny run's fields
    message: str       # the part of our one line that names the problem (the table's second)


BASE = "{base}"  # expands to the tiny run's model, sizes and reward function

CASES = [
    # -- an earlier run is never clobbered ------------------------------------------------
    Case("`train` into the output_dir of a finished run, without --resume",
         ["train", BASE, "output_dir={ws}/run"], "holds an earlier train run"),
    Case("`train` into a finished run, with a reward function that then fails to import",
         ["train", BASE, "output_dir={ws}/run", "reward.function={ws}/nope.py:f"],
         "holds an earlier train run"),
    Case("`sft` into a directory that holds an SFT adapter",
         ["sft", BASE, "output_dir={ws}/stages", "sft.train.max_steps=1"],
         "holds an earlier sft run"),
    Case("`train-reward` into a directory that holds a reward adapter",
         ["train-reward", BASE, "output_dir={ws}/stages", "reward_model.train.max_steps=1"],
         "holds an earlier train-reward run"),
    Case("`--resume latest` with another lora.r",
         ["train", BASE, "output_dir={ws}/run", "--resume", "latest", "lora.r=8"],
         "lora.r=8 (the run's: 4) would change the run"),
    Case("`--resume latest` with another rollout.prompts_per_update",
         ["train", BASE, "output_dir={ws}/run", "--resume", "latest",
          "rollout.prompts_per_update=8"],
         "rollout.prompts_per_update=8 (the run's: 4) would change the run"),
    Case("`--resume latest` with fewer ppo.total_updates than the run has done",
         ["train", BASE, "output_dir={ws}/run", "--resume", "latest", "ppo.total_updates=1"],
         "ppo.total_updates=1 is below update 2"),
    Case("`sft --resume latest` with another sft.optim.learning_rate",
         ["sft", BASE, "output_dir={ws}/stages", "--resume", "latest",
          "sft.optim.learning_rate=0.5"],
         "sft.optim.learning_rate=0.5 (the run's: 0.0002) would change the run"),
    Case("`--resume` and `--overwrite` together",
         ["train", BASE, "output_dir={ws}/run", "--resume", "latest", "--overwrite"],
         "--resume continues the run in output_dir and --overwrite replaces it"),
    # -- what used to print a traceback -------------------------------------------------------------
    Case("an option the command does not have", ["train", "--bogus"],
         "unrecognized arguments: --bogus"),
    Case("a config file whose top level is a list",
         ["train", "--config", "{ws}/list.yaml"], "the top level must be a mapping of sections"),
    Case("`--config` pointing at a directory", ["train", "--config", "{ws}"], "is a directory"),
    Case("a truncated model.safetensors",
         ["train", BASE, "model.path={ws}/truncated", "output_dir={ws}/new"],
         "check that its weight files are complete"),
    Case("an init_adapter trained on another base",
         ["train", BASE, "model.init_adapter={ws}/other_adapter", "output_dir={ws}/new"],
         "model.init_adapter={ws}/other_adapter was trained on another base"),
    Case("a reward adapter trained on another base (4-bit base)",
         ["train", BASE, "quantization.mode=4bit", "reward.source=adapter",
          "reward.adapter={ws}/other_reward", "output_dir={ws}/new"],
         "reward.adapter={ws}/other_reward was trained on another base"),
    Case("an empty prompts file",
         ["train", BASE, "data.prompts={ws}/empty.jsonl", "output_dir={ws}/new"],
         "data.prompts={ws}/empty.jsonl is empty"),
    Case("a DeepSpeed config with an invalid value",
         ["train", BASE, "deepspeed.config={ws}/stage5.json", "output_dir={ws}/new"],
         "zero_optimization.stage=5 is invalid"),
    Case("output_dir equal to a regular file", ["train", BASE, "output_dir={ws}/a_file"],
         "is a file, not a directory"),
    Case("output_dir under a regular file", ["train", BASE, "output_dir={ws}/a_file/run"],
         "lies under {ws}/a_file, which is a file"),
    # -- found before anything is loaded, said in one line ------------------------------------------
    Case("reward.function in a file that does not exist",
         ["train", BASE, "reward.function={ws}/nope.py:f", "output_dir={ws}/new"],
         "file {ws}/nope.py does not exist"),
    Case("reward.function naming a function the file lacks",
         ["train", BASE, "reward.function={ws}/rewards.py:nope", "output_dir={ws}/new"],
         "has no function 'nope'"),
    Case("reward.function in a file with a syntax error",
         ["train", BASE, "reward.function={ws}/broken.py:f", "output_dir={ws}/new"],
         "failed: SyntaxError"),
    Case("rollout.environment naming a class without reset",
         ["train", BASE, "rollout.environment={ws}/envs.py:NoReset", "output_dir={ws}/new"],
         "NoReset has no reset method"),
    Case("rollout.tools naming a function without type hints",
         ["train", BASE, "rollout.tools=[{ws}/envs.py:untyped]", "output_dir={ws}/new"],
         "Argument a is missing a type hint"),
    Case("rollout.tools with a model whose chat template cannot render tool calls",
         ["train", BASE, "rollout.tools=[{ws}/envs.py:add]", "output_dir={ws}/new"],
         "drops the tool call when it renders a tool exchange"),
    Case("an environment with a reward function that takes neither `environments` nor **kwargs",
         ["train", BASE, "model.path={ws}/tool_model", "rollout.environment={ws}/envs.py:Env",
          "reward.function={ws}/rewards.py:no_trajectory", "output_dir={ws}/new"],
         "has no argument 'environments'"),
    Case("a reward function needing a column the prompts lack (the model's weights truncated)",
         ["train", BASE, "model.path={ws}/truncated", "reward.function={ws}/rewards.py:needs_answer",
          "output_dir={ws}/new"],
         "reward function {ws}/rewards.py:needs_answer needs argument 'answer'"),
    Case("a prompts file with a malformed JSONL line",
         ["train", BASE, "data.prompts={ws}/bad.jsonl", "output_dir={ws}/new"],
         "line 2 is not valid JSON"),
    Case("`--resume` from a checkpoint whose file grew after it was written",
         ["train", BASE, "output_dir={ws}/grown", "--resume"], "has changed since it was written"),
]


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root (directories by their files)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ws(tiny_model_dir, low_ids_reward, tmp_path_factory):
    """A workspace holding a finished PPO run, an output_dir with both stage adapters, and the
    bad inputs of CASES."""
    ws = tmp_path_factory.mktemp("ws")
    base = _base(tiny_model_dir, low_ids_reward)
    res = run_cli("train", *base, f"output_dir={ws / 'run'}", "checkpoint.every=1")
    assert res.returncode == 0, res.stderr[-2000:]
    for command, limit in (("sft", "sft.train.max_steps=2"),
                           ("train-reward", "reward_model.train.max_steps=2")):
        res = run_cli(command, *base, f"output_dir={ws / 'stages'}", limit,
                      "logging.progress=true", "sft.train.batch_size=4",
                      "sft.train.micro_batch_size=4", "reward_model.train.batch_size=4",
                      "reward_model.train.micro_batch_size=4", "sft.eval.size=4",
                      "reward_model.eval.size=4", "sft.train.max_length=48",
                      "reward_model.train.max_length=48")
        assert res.returncode == 0, res.stderr[-2000:]
        (ws.parent / f"{command}.stderr").write_text(res.stderr)
    shutil.copytree(ws / "run", ws / "grown")
    with open(ws / "grown" / "checkpoints" / "step-2" / "state.json", "a") as f:
        f.write(" ")
    (ws / "list.yaml").write_text("- model\n- ppo\n")
    shutil.copytree(tiny_model_dir, ws / "truncated")
    weights = ws / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50_000])
    from lora_ppo.builtin.tiny import build_tiny_model

    other = build_tiny_model(ws / "other_base", hidden_size=128, intermediate_size=256)
    make_adapter_dir(other, ws / "other_adapter", seed=1)
    make_adapter_dir(other, ws / "other_reward", seed=2, head=True)
    shutil.rmtree(other)
    (ws / "empty.jsonl").write_text("")
    (ws / "bad.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "broken"\n')
    raw = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    raw["zero_optimization"]["stage"] = 5
    (ws / "stage5.json").write_text(json.dumps(raw))
    (ws / "a_file").write_text("not a directory\n")
    (ws / "rewards.py").write_text("def f(prompts, completions, **kw):\n    return [0.0]\n"
                                   "def needs_answer(completions, answer, **kw):\n    return []\n"
                                   "def no_trajectory(prompts, completions, completion_ids,\n"
                                   "                  trainer_state, log_extra, log_metric,\n"
                                   "                  prompt_ids):\n    return []\n")
    shutil.copytree(tiny_model_dir, ws / "tool_model")  # its chat template renders tools
    shutil.copy(REPO / "tests" / "agents" / "qwen2_5.jinja", ws / "tool_model" / "chat_template.jinja")
    (ws / "broken.py").write_text("def f(prompts, completions, **kw)\n    return []\n")
    doc = '    """Add.\n\n    Args:\n        a: x.\n        b: y.\n    """\n'
    (ws / "envs.py").write_text(
        "class NoReset:\n    pass\n\n\ndef untyped(a, b):\n" + doc + "    return a + b\n\n\n"
        "def add(a: int, b: int) -> int:\n" + doc + "    return a + b\n\n\n"
        "class Env:\n    def reset(self, **kwargs):\n        return None\n\n"
        "    def add(self, a: int, b: int) -> int:\n    " + doc.replace("\n    ", "\n        ")
        + "        return a + b\n")
    return ws


def _base(model_dir, reward) -> list[str]:
    return [f"model.path={model_dir}", "quantization.mode=none", "model.max_prompt_length=16",
            "lora.r=4", "lora.alpha=8", "rollout.prompts_per_update=4", "rollout.generation_batch_size=4",
            "rollout.max_new_tokens=4", "ppo.minibatch_size=4", "ppo.micro_batch_size=4",
            "ppo.total_updates=2", "deepspeed.config=zero0", "logging.progress=false",
            "logging.tensorboard=false", f"reward.function={reward}", "data.prompts=builtin:reviews",
            "sft.data=builtin:reviews", "reward_model.data=builtin:preferences"]


@pytest.mark.parametrize("case", CASES, ids=[c.input for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, ws, tiny_model_dir,
                                                          low_ids_reward):
    args = []
    for a in case.args:
        args += _base(tiny_model_dir, low_ids_reward) if a == BASE else [a.format(ws=ws)]
    before = _tree(ws)
    res = run_cli(*args)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("lora-ppo: error: "), res.stderr[-3000:]
    assert case.message.format(ws=ws) in lines[0], lines[0]
    assert _tree(ws) == before, "a refused command changed or wrote files"


@pytest.mark.parametrize("command, label", [("sft", "sft"), ("train-reward", "reward_model")])
def test_each_stage_progress_bar_carries_its_name(ws, command, label):
    """The reward-model stage's bar said `ppo`."""
    stderr = (ws.parent / f"{command}.stderr").read_text()
    assert f"{label}:" in stderr and "ppo:" not in stderr, stderr[-1000:]


def test_the_docs_table_lists_every_case():
    text = (REPO / "docs" / "troubleshooting.md").read_text()
    table = {m.group(1): m.group(2) for m in
             re.finditer(r"^\| (.+?) \| `(.+?)` \| 2 \|$", text, flags=re.M)}
    for case in CASES:
        assert case.input in table, f"docs/troubleshooting.md lacks the row for: {case.input}"
        assert table[case.input] == case.message.replace("{ws}", "<dir>"), case.input
