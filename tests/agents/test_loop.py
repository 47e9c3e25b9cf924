"""Agents through the whole loop: `lora_ppo.ppo.loop.train` with rollout.environment on the tiny
model under a chat template that renders tools. The reward function gets the trajectories as TRL
passes them (prompts and completions as messages, the environments), the environment's
get_reward is one more term with weight 1, the environment's tokens are context in the rollout,
and tools/* are logged."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from helpers import tiny_config, undocumented_metrics

pytestmark = pytest.mark.integration

ENV = '''
class Adder:
    """Answers `add` calls; its reward is 2 for every trajectory."""

    def reset(self, **kwargs):
        self.calls = 0
        return "Use the tools."

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        self.calls += 1
        return a + b

    def get_reward(self) -> float:
        return 2.0
'''

REWARD = '''
import json

LOG = {log!r}


def seen(prompts, completions, environments, completion_ids, **kwargs):
    with open(LOG, "a") as f:
        f.write(json.dumps({{"prompts": prompts, "completions": completions,
                             "environments": [type(e).__name__ for e in environments],
                             "lengths": [len(c) for c in completion_ids]}}) + "\\n")
    return [1.0] * len(prompts)
'''


def agent_config(model_dir, tmp_path, *overrides):
    (tmp_path / "env.py").write_text(textwrap.dedent(ENV))
    (tmp_path / "reward.py").write_text(REWARD.format(log=str(tmp_path / "seen.jsonl")))
    return tiny_config(model_dir, tmp_path / "out", f"rollout.environment={tmp_path}/env.py:Adder",
                       f"reward.function={tmp_path}/reward.py:seen",
                       "ppo.advantage_estimator=grpo", "rollout.samples_per_prompt=2",
                       "rollout.prompts_per_update=4", "rollout.max_new_tokens=160",
                       # the tools' schemas in Qwen's system prompt: ~525 ids of this tokenizer
                       "model.max_prompt_length=640", "sft.train.max_length=1024",
                       "reward_model.train.max_length=1024", "rollout.max_tool_calls=2",
                       "ppo.total_updates=3", *overrides)


def test_a_run_with_an_environment(tool_model_dir, tmp_path):
    from lora_ppo.ppo.loop import train

    run = train(agent_config(tool_model_dir, tmp_path, "data.eval_every=3", "data.eval_size=4"))
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:  # the function's 1 plus the environment's 2, each logged on its own
        assert row["objective/raw_scores"] == pytest.approx(3.0)
        assert row["objective/score_function"] == pytest.approx(1.0)
        assert row["objective/score_environment"] == pytest.approx(2.0)
        assert row["rewards/Adder/mean"] == pytest.approx(2.0)
        assert {"tools/call_frequency", "tools/failure_frequency", "tools/turns",
                "tools/env_token_frac", "tools/call_limit_frac"} <= set(row)
        assert row["tools/turns"] >= 1.0
    # The random model calls a tool now and then (<tool_call> is one of ~400 ids): the seeded
    # run does, so the environment's answers were in some trajectories.
    assert sum(r["tools/call_frequency"] for r in rows) > 0
    assert sum(r["tools/env_token_frac"] for r in rows) > 0
    assert not undocumented_metrics({k for r in rows for k in r})
    for mode in ("greedy", "sampled"):  # the held-out prompts' conversations, evaluated
        assert rows[-1][f"eval/score_{mode}"] == pytest.approx(3.0)
        assert f"eval/{mode}/tools/call_frequency" in rows[-1]
    calls = [json.loads(x) for x in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert len(calls) == 3 + 2 * 2  # the updates', and greedy and sampled before and at the end
    for call in calls:
        assert call["environments"] == ["Adder"] * len(call["prompts"])
        for prompt in call["prompts"]:  # the observation appended to the prompt's user turn
            assert prompt[-1]["role"] == "user" and prompt[-1]["content"].endswith("Use the tools.")
        for completion, n in zip(call["completions"], call["lengths"]):
            assert completion[0]["role"] == "assistant" and n <= 160
            assert {m["role"] for m in completion} <= {"assistant", "tool"}
    assert run.step == 3


def test_the_rollout_marks_the_environments_tokens(tool_model_dir, tmp_path):
    """collect's trajectories are the conversations': ids and environment mask, token for token,
    and the scoring's action mask leaves the environment's tokens out."""
    from lora_ppo.ppo.collect import next_prompts, sample_episodes, score_samples
    from lora_ppo.ppo.run import setup

    torch.manual_seed(0)
    run = setup(agent_config(tool_model_dir, tmp_path))
    found = False
    for _ in range(4):
        episodes = sample_episodes(run, next_prompts(run))
        conv, s = episodes.conversations, episodes.samples
        for i, (ids, env) in enumerate(zip(conv.completion_ids(), conv.env_masks())):
            n = int(s.response_mask[i].sum())
            assert s.response_ids[i, :n].tolist() == ids
            assert (1 - s.env_mask[i, :n]).long().tolist() == env
            found |= 0 in env
        ro = score_samples(run, s)
        assert torch.equal(ro.action_mask, s.response_mask * (1 - s.env_mask))
        if found:
            break
    assert found, "no trajectory with a tool result in 4 rounds"


ROLLOUT = '''
def roll(prompts, ctx):
    """Each prompt's text encoded, one response from lora_ppo's engine (its first four ids),
    then three environment ids and one more response to the whole of it (cut to the budget)."""
    n, budget = ctx.samples_per_prompt, ctx.max_new_tokens
    ids = [ctx.tokenizer(p, add_special_tokens=False)["input_ids"][-32:] for p in prompts]
    ids = [i for i in ids for _ in range(n)]
    first = ctx.generate(ids)
    first = {k: [v[:4] for v in vs] for k, vs in first.items()}
    env = [7, 8, 9]
    second = ctx.generate([p + c + env for p, c in zip(ids, first["completion_ids"])])
    out = {"prompt_ids": ids, "completion_ids": [], "logprobs": [], "env_mask": [],
           "hint": []}
    for c1, l1, c2, l2 in zip(first["completion_ids"], first["logprobs"],
                              second["completion_ids"], second["logprobs"]):
        c = (c1 + env + c2)[:budget]
        out["completion_ids"].append(c)
        out["logprobs"].append((l1 + [0.0] * 3 + l2)[:budget])
        out["env_mask"].append(([1] * len(c1) + [0] * 3 + [1] * len(c2))[:budget])
        out["hint"].append(len(c1))
    return out
'''

HINTED = '''
import json

LOG = {log!r}


def hinted(prompts, completions, hint, **kwargs):
    with open(LOG, "a") as f:
        f.write(json.dumps(hint) + "\\n")
    return [float(h) for h in hint]
'''


def test_a_run_with_a_rollout_function(tiny_model_dir, tmp_path):
    """rollout.rollout_func's samples train (the environment's ids masked), its extra fields
    reach the reward function by name, and the evaluation runs it too."""
    from lora_ppo.ppo.collect import next_prompts, sample_episodes
    from lora_ppo.ppo.loop import train
    from lora_ppo.ppo.run import setup

    (tmp_path / "roll.py").write_text(ROLLOUT)
    (tmp_path / "reward.py").write_text(HINTED.format(log=str(tmp_path / "hints.jsonl")))
    cfg = tiny_config(tiny_model_dir, tmp_path / "out", f"rollout.rollout_func={tmp_path}/roll.py:roll",
                      f"reward.function={tmp_path}/reward.py:hinted",
                      "ppo.advantage_estimator=grpo", "rollout.samples_per_prompt=2",
                      "rollout.prompts_per_update=4", "rollout.max_new_tokens=12",
                      "data.eval_every=2", "data.eval_size=4")
    run = setup(cfg)
    s = sample_episodes(run, next_prompts(run)).samples
    assert s.env_mask is not None and s.query_ids.shape[0] == 8
    for i in range(8):  # three environment ids after the first response
        env = s.env_mask[i].nonzero().flatten().tolist()
        assert s.response_ids[i, env].tolist() == [7, 8, 9] and env == [4, 5, 6]
        assert s.logprobs[i, env].eq(0).all() and s.logprobs[i, :4].lt(0).all()
    out = train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    hints = [json.loads(x) for x in (tmp_path / "hints.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and out.step == 2
    assert len(hints) == 2 + 2  # the updates', and the sampled evaluation before and at the end
    for row, hint in zip(rows, hints[1:]):
        assert row["objective/raw_scores"] == pytest.approx(sum(hint) / len(hint))
    assert "eval/score_sampled" in rows[-1] and "eval/score_greedy" not in rows[-1]


def test_the_environments_reward_alone(tool_model_dir, tmp_path):
    """With an environment that has get_reward, reward.function may be left out (TRL: no
    reward_funcs then); without get_reward it may not."""
    from lora_ppo.errors import UserError
    from lora_ppo.ppo.collect import collect, next_prompts
    from lora_ppo.ppo.reward_sources import EnvironmentReward
    from lora_ppo.ppo.run import setup

    run = setup(agent_config(tool_model_dir, tmp_path, "reward.function=null"))
    assert isinstance(run.reward, EnvironmentReward)
    _, raw = collect(run, next_prompts(run))
    assert raw.tolist() == [2.0] * 8
    (tmp_path / "plain.py").write_text(textwrap.dedent(ENV).replace("def get_reward", "def _r"))
    with pytest.raises(UserError, match="reward.function is not set"):
        setup(agent_config(tool_model_dir, tmp_path, "reward.function=null",
                           f"rollout.environment={tmp_path}/plain.py:Adder"))
