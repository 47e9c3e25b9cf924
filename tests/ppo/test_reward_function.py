"""A reward function gets what TRL 1.16's GRPOTrainer passes one (`_calculate_rewards`): the
prompts (conversations as their messages), the completions (for conversations one assistant
message each), completion_ids, every other column of the dataset, trainer_state, log_extra and
log_metric; plus lora_ppo's prompt_ids. One whose signature cannot take that is refused at
setup, before the model loads."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli, tiny_config

from lora_ppo.errors import UserError
from lora_ppo.io.data import encode_rows, load_prompts
from lora_ppo.ppo.reward_functions import FunctionReward, RewardError, check_signature

CONVERSATIONS = [
    {"prompt": [{"role": "system", "content": "You add numbers."},
                {"role": "user", "content": "2 + 2 ="}], "answer": "4", "level": 1},
    {"prompt": [{"role": "user", "content": "1 + 1 ="}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "and 5 + 5 ="}], "answer": "10", "level": 2},
]
COMPLETIONS = [" 4", " 5", " 10", "10 and more"]


def correct(completions, answer, **kwargs):
    """The verifiable reward every TRL GRPO tutorial writes, conversational, unchanged."""
    return [float(c[0]["content"].strip().split()[0] == a) for c, a in zip(completions, answer)]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _batch(tok, rows, n=2):
    """Each prompt n times in a row, as ppo/collect.py::next_prompts makes a group, and the
    id lists the rollout passes."""
    prompts = [p for p in encode_rows(tok, load_prompts(rows, "prompt"), False, 64, "data.prompts")
               for _ in range(n)]
    ids = {"prompt_ids": [list(p.ids) for p in prompts],
           "completion_ids": [tok(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS]}
    return prompts, ids


def test_a_trl_conversational_reward_function_runs_unchanged(tok):
    from transformers import TrainerState

    prompts, ids = _batch(tok, CONVERSATIONS)
    seen = {}

    def probe(**kwargs):
        seen.update(kwargs)
        kwargs["prompts"][0][0]["content"] = "changed"  # a function's copies are its own
        kwargs["answer"][0] = "changed"
        return [0.0] * len(kwargs["prompts"])

    state = TrainerState(global_step=3, max_steps=10, epoch=0.5)
    fn = FunctionReward("probe", probe)
    fn(prompts, COMPLETIONS, ids, state)
    assert sorted(seen) == sorted(["prompts", "completions", "completion_ids", "answer", "level",
                                   "trainer_state", "log_extra", "log_metric", "prompt_ids"])
    assert seen["prompts"][1:] == [r["prompt"] for r in CONVERSATIONS for _ in range(2)][1:]
    assert seen["completions"] == [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    assert seen["answer"][1:] == ["4", "10", "10"] and seen["level"] == [1, 1, 2, 2]
    assert seen["completion_ids"] == ids["completion_ids"]
    assert seen["prompt_ids"] == ids["prompt_ids"]
    assert seen["trainer_state"] is state
    assert prompts[0].messages[0]["content"] == "You add numbers."
    assert prompts[0].columns["answer"] == "4"
    assert FunctionReward("correct", correct)(prompts, COMPLETIONS, ids, state).tolist() == \
        [1.0, 0.0, 1.0, 1.0]


def test_string_prompts_reach_it_as_the_text_the_policy_read(tok):
    rows = [{"prompt": r["prompt"][-1]["content"], "answer": r["answer"]} for r in CONVERSATIONS]
    prompts, ids = _batch(tok, rows)
    seen = {}
    FunctionReward("probe", lambda **kw: seen.update(kw) or [0.0] * 4)(prompts, COMPLETIONS, ids)
    assert seen["prompts"] == [p.text for p in prompts] == ["2 + 2 =", "2 + 2 =",
                                                            "and 5 + 5 =", "and 5 + 5 ="]
    assert seen["completions"] == COMPLETIONS and seen["answer"] == ["4", "4", "10", "10"]


def test_log_metric_and_log_extra_are_kept_for_the_loop(tok):
    prompts, ids = _batch(tok, CONVERSATIONS)

    def logs(completions, answer, log_metric, log_extra, **kwargs):
        log_metric("format/ok", 0.25)
        log_extra("parsed", [c[0]["content"].strip() for c in completions])
        return [0.0] * len(completions)

    fn = FunctionReward("logs", logs)
    fn(prompts, COMPLETIONS, ids)
    fn(prompts, COMPLETIONS, ids)
    assert fn.log.take_metrics() == {"format/ok": [0.25, 0.25]}
    assert fn.log.take_extra() == {"parsed": ["4", "5", "10", "10 and more"] * 2}
    assert fn.log.take_metrics() == {} and fn.log.take_extra() == {}


def test_a_failing_sample_is_named_and_its_probes_log_nothing(tok):
    prompts, ids = _batch(tok, CONVERSATIONS)

    def fails(completions, answer, log_metric, **kwargs):
        log_metric("calls", 1.0)
        return [float(int(a) == int(c[0]["content"])) for c, a in zip(completions, answer)]

    fn = FunctionReward("fails", fails)
    with pytest.raises(RewardError, match="reward function fails raised ValueError: .* on sample "
                                          "3 \\(completion '10 and more'\\)"):
        fn(prompts, COMPLETIONS, ids)
    assert fn.log.take_metrics() == {"calls": [1.0]}  # the batch's own call only


def exact(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, prompt_ids):
    return [0.0] * len(prompts)


class Scorer:
    def __call__(self, completions, **kwargs):
        return [0.0] * len(completions)


async def _async_reward(completions, **kwargs):
    return [0.0] * len(completions)


WHERE = "data.prompts=c.jsonl"
KEYWORDS = ("prompts, completions, completion_ids, trainer_state, log_extra, log_metric, "
            "prompt_ids")


@pytest.mark.parametrize("fn, columns", [
    (correct, ["answer"]),
    (lambda completions, solution=None, **kw: [], ["answer"]),
    (exact, []),
    (Scorer(), ["answer", "level"]),
    (max, ["answer"]),  # no signature to read (a builtin): called as is
])
def test_signatures_that_take_every_call(fn, columns):
    check_signature(fn, "f", {WHERE: columns})


@pytest.mark.parametrize("fn, columns, message", [
    (lambda completions, solution, **kw: [], ["answer"],
     f"reward function f needs argument 'solution', which is neither a column of {WHERE} "
     f"(columns: answer) nor a keyword every call gets ({KEYWORDS}); add the column or give "
     "'solution' a default"),
    (lambda prompts, completions: [], ["answer"],
     "reward function f has no argument 'completion_ids' (a keyword every call gets) and no "
     "**kwargs; add **kwargs to its signature, as a TRL reward function has"),
    (exact, ["answer"],
     f"reward function f has no argument 'answer' (a column of {WHERE} (columns: answer)) and "
     "no **kwargs; add **kwargs to its signature"),
    (lambda prompts, /, completions, **kw: [], [],
     "reward function f takes 'prompts' by position only, but every argument is passed by "
     "keyword"),
    (correct, ["answer", "prompt_ids"],
     f"{WHERE}: column 'prompt_ids' has the name of a keyword every reward function call gets "
     f"({KEYWORDS}); rename that column"),
    (_async_reward, [], "reward function f is async, and reward functions are called "
                        "synchronously here; call it in a plain function"),
])
def test_signatures_that_cannot_are_refused_in_one_line(fn, columns, message):
    with pytest.raises(UserError) as e:
        check_signature(fn, "f", {WHERE: columns})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.integration
def test_the_cli_refuses_it_before_the_model_loads(tiny_model_dir, tmp_path):
    """The model's weights are truncated: had the base been loaded first, its error would show."""
    import shutil

    model = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50_000])
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONS))
    (tmp_path / "rewards.py").write_text("def f(completions, solution, **kw):\n    return []\n")
    res = run_cli("train", f"model.path={model}", "quantization.mode=none",
                  f"data.prompts={data}", f"reward.function={tmp_path}/rewards.py:f",
                  f"output_dir={tmp_path}/run")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"lora-ppo: error: reward function {tmp_path}/rewards.py:f needs argument 'solution', "
        f"which is neither a column of data.prompts={data} (columns: answer, level) nor a keyword "
        f"every call gets ({KEYWORDS}); add the column or give 'solution' a default")
    assert not (tmp_path / "run").exists()


GRPO = ("ppo.advantage_estimator=grpo", "rollout.prompts_per_update=2",
        "rollout.samples_per_prompt=2", "ppo.minibatch_size=4", "ppo.micro_batch_size=4",
        "model.max_prompt_length=64", "logging.num_samples=2")


def _check_calls(calls: list[dict], total_updates: int) -> None:
    """Every call got whole groups of conversations with their own row's answer, and the
    trainer state of its update."""
    answer_of = {json.dumps(r["prompt"]): r["answer"] for r in CONVERSATIONS}
    assert [c["step"] for c in calls] == list(range(total_updates))
    for c in calls:
        assert c["max_steps"] == total_updates and len(c["prompts"]) == 4
        assert c["prompts"][0::2] == c["prompts"][1::2]  # groups of 2, never split
        assert c["answer"] == [answer_of[json.dumps(p)] for p in c["prompts"]]
        assert all(len(x) == 1 and x[0]["role"] == "assistant" for x in c["completions"])


@pytest.mark.integration
def test_conversational_grpo_from_python_with_a_dataset_and_a_callable(tiny_model_dir, tmp_path,
                                                                       capsys):
    import datasets

    from lora_ppo.ppo.loop import train

    calls = []

    def reward(prompts, completions, answer, trainer_state, log_metric, log_extra, **kwargs):
        calls.append({"prompts": prompts, "completions": completions, "answer": answer,
                      "step": trainer_state.global_step, "max_steps": trainer_state.max_steps})
        log_metric("answers/mean_length", sum(map(len, answer)) / len(answer))
        log_extra("answer", answer)
        return correct(completions, answer)

    cfg = tiny_config(tiny_model_dir, tmp_path / "run", *GRPO)
    train(cfg, dataset=datasets.Dataset.from_list(CONVERSATIONS * 2), reward_fn=reward)
    _check_calls(calls, 2)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in metrics]
    assert [r["answers/mean_length"] for r in rows] == [
        sum(map(len, c["answer"])) / 4 for c in calls]
    assert "[reward/log_extra] answer: " in capsys.readouterr().out


@pytest.mark.integration
def test_conversational_grpo_from_the_cli(tiny_model_dir, tmp_path):
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONS * 2))
    seen = tmp_path / "seen.jsonl"
    (tmp_path / "rewards.py").write_text(
        "import json\n"
        "def correct(completions, answer, trainer_state, **kwargs):\n"
        f"    with open({str(seen)!r}, 'a') as f:\n"
        "        f.write(json.dumps({'prompts': kwargs['prompts'], 'completions': completions,\n"
        "                            'answer': answer, 'step': trainer_state.global_step,\n"
        "                            'max_steps': trainer_state.max_steps}) + '\\n')\n"
        "    return [float(c[0]['content'].strip() == a) for c, a in zip(completions, answer)]\n")
    res = run_cli("train", f"model.path={tiny_model_dir}", "quantization.mode=none",
                  f"data.prompts={data}", f"reward.function={tmp_path}/rewards.py:correct",
                  f"output_dir={tmp_path}/run", "ppo.total_updates=2", "ppo.epochs=1",
                  "rollout.max_new_tokens=6", "lora.r=4",
                  "deepspeed.config=zero0", "logging.progress=false", "logging.tensorboard=false",
                  "checkpoint.every=0", "model.gradient_checkpointing=false", *GRPO)
    assert res.returncode == 0, res.stderr[-2000:]
    _check_calls([json.loads(line) for line in seen.read_text().splitlines()], 2)
