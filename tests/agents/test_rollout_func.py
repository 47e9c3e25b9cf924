"""The custom rollout's contract (TRL's rollout_func): what it returns is checked, one clause per
rule broken, in one line."""

from __future__ import annotations

import math

import pytest
import torch

from lora_ppo.agents import RolloutFuncError, check_rollout_output, load_rollout_func
from lora_ppo.agents.rollout_func import rollout_violations

VOCAB, BUDGET = 100, 8


def good() -> dict:
    """2 prompts x 2 samples: the second sample of each group called a tool (env tokens 0)."""
    return {"prompt_ids": [[1, 2], [1, 2], [3], [3]],
            "completion_ids": [[5, 6], [7, 8, 9, 10], [11], [12, 13, 14]],
            "logprobs": [[-0.1, -0.2], [-0.3, 0.0, 0.0, -0.4], [-1.0], [-0.5, 0.0, -0.6]],
            "env_mask": [[1, 1], [1, 0, 0, 1], [1], [1, 0, 1]],
            "answer": ["4", "4", "7", "7"]}


def test_a_good_return_passes_as_plain_lists():
    out = good()
    out["completion_ids"][0] = torch.tensor([5, 6])  # tensors are fine
    checked = check_rollout_output(out, 2, 2, VOCAB, BUDGET)
    assert checked.completion_ids[0] == [5, 6] and checked.env_mask[1] == [1, 0, 0, 1]
    assert checked.extra == {"answer": ["4", "4", "7", "7"]}
    del out["env_mask"]  # absent: every token is the model's
    assert check_rollout_output(out, 2, 2, VOCAB, BUDGET).env_mask[1] == [1, 1, 1, 1]


def broken(**changes) -> dict:
    out = good()
    for key, change in changes.items():
        change(out) if callable(change) else out.__setitem__(key, change)
    return out


CASES = [
    ([], "returned a list, not a dict with keys prompt_ids, completion_ids, logprobs"),
    (broken(logprobs=lambda o: o.pop("logprobs")), "has no 'logprobs'"),
    (broken(prompt_ids=[[1, 2]] * 2), "'prompt_ids' must be a list of 4 (2 prompts x 2 samples), "
                                      "got 2"),
    (broken(answer=["4"]), "'answer' must be a list of 4"),
    (broken(completion_ids=lambda o: o["completion_ids"].__setitem__(2, [])),
     "completion_ids[2] is not a non-empty list of token ids in [0, 100)"),
    (broken(completion_ids=lambda o: o["completion_ids"].__setitem__(0, [5, 100])),
     "completion_ids[0] is not a non-empty list of token ids in [0, 100)"),
    (broken(completion_ids=lambda o: o["completion_ids"].__setitem__(0, list(range(9))),
            logprobs=lambda o: o["logprobs"].__setitem__(0, [-0.1] * 9),
            env_mask=lambda o: o["env_mask"].__setitem__(0, [1] * 9)),
     "completion_ids[0] is longer than rollout.max_new_tokens=8"),
    (broken(prompt_ids=lambda o: o["prompt_ids"].__setitem__(1, [1, 9])),
     "prompt_ids[1] differs from the prompt ids of its group's first sample"),
    (broken(logprobs=lambda o: o["logprobs"].__setitem__(3, [-0.5, -0.6])),
     "logprobs[3] does not hold one value per completion token"),
    (broken(logprobs=lambda o: o["logprobs"].__setitem__(0, [math.nan, -0.2])),
     "logprobs[0] holds a value that is not a finite log-probability (<= 0) at a model token"),
    (broken(logprobs=lambda o: o["logprobs"].__setitem__(2, [0.5])), "logprobs[2] holds a value"),
    (broken(env_mask=lambda o: o["env_mask"].__setitem__(1, [1, 0, 2, 1])),
     "env_mask[1] is not a list of 0/1, one per completion token"),
    (broken(env_mask=lambda o: o["env_mask"].__setitem__(2, [0])),
     "env_mask[2] has no model token (1)"),
]


@pytest.mark.parametrize("out, message", CASES, ids=[m[:40] for _, m in CASES])
def test_each_violation_is_named(out, message):
    with pytest.raises(RolloutFuncError) as e:
        check_rollout_output(out, 2, 2, VOCAB, BUDGET, name="rollout.rollout_func=f.py:roll")
    text = str(e.value)
    assert "\n" not in text and text.startswith("rollout.rollout_func=f.py:roll broke its "
                                                "contract (docs/agents.md): ")
    assert message in text, text


def test_every_rule_broken_is_listed_once_with_the_count():
    out = good()
    out["completion_ids"] = [[], [], [5], [5]]
    out["env_mask"] = [[1]] * 4
    out["logprobs"][2] = [1.0]
    lines = rollout_violations(out, 2, 2, VOCAB, BUDGET)
    assert lines == ["completion_ids[0] is not a non-empty list of token ids in [0, 100) "
                     "(and 1 more)",
                     "logprobs[2] holds a value that is not a finite log-probability (<= 0) at "
                     "a model token",
                     "logprobs[3] does not hold one value per completion token"]


def test_the_function_loads_like_a_reward_function(tmp_path):
    (tmp_path / "roll.py").write_text("def roll(prompts, ctx):\n    return {}\nvalue = 3\n")
    assert load_rollout_func(f"{tmp_path}/roll.py:roll").__name__ == "roll"
    with pytest.raises(RolloutFuncError.__mro__[1], match="is a int; name a function"):
        load_rollout_func(f"{tmp_path}/roll.py:value")
