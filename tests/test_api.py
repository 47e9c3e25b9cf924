"""The Python entry points (lora_ppo/api.py): a GRPO run from Python with callables and a
datasets.Dataset, what config.yaml records of them, resuming with the same objects, and bad
input as one-line UserErrors."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli, tiny_config

import lora_ppo
from lora_ppo.config.load import load_config
from lora_ppo.errors import UserError

pytestmark = pytest.mark.usefixtures("restore_env")  # it trains in this process


def short(completions, **kwargs):
    """A TRL-style reward function: shorter completions score higher."""
    return [-len(c) / 10 for c in completions]


def _prompts(n: int = 16) -> list[dict]:
    return [{"prompt": f"review {i} :", "answer": str(i)} for i in range(n)]


GRPO = {"ppo.advantage_estimator": "grpo", "rollout.samples_per_prompt": 2,
        "rollout.prompts_per_update": 4, "ppo.minibatch_size": 4, "ppo.micro_batch_size": 4}


@pytest.fixture(scope="module")
def grpo(tiny_model_dir, tmp_path_factory):
    """Two GRPO updates from Python: a config object, two reward functions with weights (one
    importable, one a lambda) and a datasets.Dataset."""
    from datasets import Dataset

    out = tmp_path_factory.mktemp("api") / "grpo"
    base = tiny_config(tiny_model_dir, out)
    has_e = lambda completions, **kwargs: [float("e" in c) for c in completions]  # noqa: E731
    ds = Dataset.from_list(_prompts())
    run = lora_ppo.train(base, reward_funcs=[short, has_e], reward_weights=[1.0, 0.5],
                         train_dataset=ds, overrides={**GRPO, "ppo.total_updates": 2})
    return out, base, ds, has_e, run


@pytest.mark.integration
def test_grpo_from_python_with_callables_and_a_dataset(grpo):
    out, _, ds, _, run = grpo
    assert run.step == 2 and run.cfg.algorithm.estimator == "grpo"
    saved = load_config(out / "config.yaml")
    # what was used, truthfully: an importable function by its spec (the CLI loads it too), a
    # lambda and the rows by a description
    mod = short.__module__  # tests.test_api under pytest
    assert saved.reward.function == [f"{mod}:short", f"<in memory: {mod}.grpo.<locals>.<lambda>>"]
    assert saved.reward.function_weights == [1.0, 0.5]
    assert saved.data.prompts.startswith("<in memory: Dataset of 16 rows, sha256 ")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # TRL's sum of weighted functions, each logged under TRL's name
        assert row["objective/raw_scores"] == pytest.approx(
            row["rewards/short/mean"] + 0.5 * row["rewards/<lambda>/mean"], abs=1e-6)


@pytest.mark.integration
def test_resume_from_python_needs_the_same_objects(grpo):
    from datasets import Dataset

    out, base, ds, has_e, _ = grpo
    other = Dataset.from_list(_prompts(12))
    with pytest.raises(UserError, match=r"^--resume: data\.prompts=<in memory: Dataset of 12 "
                                        r"rows, .* would change the run"):
        lora_ppo.train(base, reward_funcs=[short, has_e], reward_weights=[1.0, 0.5],
                       train_dataset=other, overrides=GRPO, resume="latest")
    # the CLI has no lambda to call: refused in one line that says how to resume
    res = run_cli("train", f"output_dir={out}", "--resume", "latest")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"lora-ppo: error: the run in {out} was started from Python with reward.function and "
        "data.prompts in memory (its config.yaml describes them); resume it from Python with the "
        "same objects: lora_ppo.train(..., resume=\"latest\")"]
    run = lora_ppo.train(base, reward_funcs=[short, has_e], reward_weights=[1.0, 0.5],
                         train_dataset=ds, resume="latest", overrides={"ppo.total_updates": 3})
    assert run.step == 3
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.integration
def test_sft_from_python_with_a_list_of_dicts(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"review {i} :", "response": " the food was great ."} for i in range(8)]
    out = lora_ppo.train_sft(tiny_config(tiny_model_dir, tmp_path / "sft"), train_dataset=rows,
                             overrides={"sft.train.max_steps": 2, "sft.train.batch_size": 4,
                                        "sft.train.micro_batch_size": 4, "sft.eval.size": 0})
    assert (out / "adapter_model.safetensors").is_file()
    saved = load_config(tmp_path / "sft" / "sft" / "config.yaml")
    assert saved.sft.data.startswith("<in memory: list of 8 rows, sha256 ")


@pytest.mark.parametrize("kwargs, message", [
    ({"reward_funcs": "my_rewards.py:score"}, "reward_funcs: 'my_rewards.py:score' is a string; "
                                              "give functions"),
    ({"reward_funcs": [short, 3]}, "reward_funcs: 3 is not callable"),
    ({"reward_funcs": short, "reward_weights": [1.0, 2.0]},
     "reward_weights has 2 entries for 1 reward_funcs"),
    ({"reward_weights": [1.0]}, "reward_weights without reward_funcs"),
    ({"train_dataset": 42}, "train_dataset: give a file path, a datasets.Dataset or a list of "
                            "dicts, not int"),
    ({"train_dataset": []}, "train_dataset: the list holds no rows"),
    ({"eval_dataset": [{"prompt": "x"}]}, "eval_dataset given, but data.eval_every=0"),
    ({"overrides": ["ppo.epochs"]}, "override 'ppo.epochs' is not of the form section.key=value"),
    ({"overrides": {"ppo.epoch": 2}}, "unknown config key 'ppo.epoch'"),
    ({"config": "no_such_preset"}, "no such file and no such preset"),
])
def test_bad_input_from_python_is_a_one_line_user_error(kwargs, message, tmp_path):
    """Raised before anything loads or is written (no model path is even needed)."""
    kwargs = {"overrides": {"output_dir": str(tmp_path / "out")}, **kwargs}
    with pytest.raises(UserError) as e:
        lora_ppo.train(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
