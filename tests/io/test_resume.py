"""`--resume` keeps the run's config (io/resume.py): what may change, what is refused, what a
--config file given with it does; and runs through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_same_run, resume_yaml, run_cli

from lora_ppo.config.load import load_config, override_tree, save_config
from lora_ppo.errors import UserError
from lora_ppo.io.atomic import seal
from lora_ppo.io.config_changes import check_changes, ignored_line
from lora_ppo.io.resume import saved_run


def test_override_tree_takes_strings_and_dicts_alike():
    want = {"ppo": {"epochs": 2, "optim": {"learning_rate": 0.5}}, "seed": 3}
    assert override_tree(["ppo.epochs=2", "ppo.optim.learning_rate=0.5", "seed=3"]) == want
    assert override_tree({"ppo.epochs": 2, "ppo": {"optim": {"learning_rate": 0.5}},
                          "seed": 3}) == want
    with pytest.raises(UserError, match="list of 'section.key=value' strings or a dict"):
        override_tree("ppo.epochs=2")


def test_safe_changes_are_accepted_in_one_line():
    saved = load_config(None, ["ppo.total_updates=42", "checkpoint.every=50"])
    now = load_config(None, ["ppo.total_updates=100", "checkpoint.every=10",
                             "output_dir=elsewhere", "sft.train.epochs=9"])
    line = check_changes(saved, now, "train", 42, "run/checkpoints/step-42/config.yaml")
    assert line.startswith("--resume: continuing with ppo.total_updates=100 (was 42: ")
    assert "checkpoint.every=10 (was 50: " in line and "\n" not in line
    assert "output_dir" not in line and "sft" not in line  # a location; a section train skips
    assert check_changes(saved, saved, "train", 42, "x") is None
    cosine = load_config(None, ["ppo.total_updates=100", "ppo.optim.lr_schedule=cosine"])
    line = check_changes(load_config(None, ["ppo.optim.lr_schedule=cosine"]), cosine, "train",
                         5, "x")
    assert "cosine learning-rate schedule of the steps to come follows the new length" in line


def test_a_change_of_the_run_is_refused_naming_field_values_and_fix():
    saved = load_config(None, ["rollout.prompts_per_update=4", "ppo.minibatch_size=4"])
    now = load_config(None, ["rollout.prompts_per_update=32", "ppo.minibatch_size=4",
                             "data.eval_every=5", "logging.progress=false"])
    with pytest.raises(UserError) as e:
        check_changes(saved, now, "train", 3, "run/checkpoints/step-3/config.yaml")
    msg = str(e.value)
    assert msg.startswith("--resume: rollout.prompts_per_update=32 (the run's: 4), "
                          "data.eval_every=5 (the run's: 0) would change the run saved in "
                          "run/checkpoints/step-3/config.yaml")
    assert "drop the change, or start a new run with --overwrite" in msg
    assert "logging" not in msg and "\n" not in msg
    with pytest.raises(UserError, match="ppo.total_updates=2 is below update 3"):
        check_changes(saved, load_config(None, ["rollout.prompts_per_update=4",
                                                "ppo.minibatch_size=4", "ppo.total_updates=2"]),
                      "train", 3, "x")


def test_each_command_is_checked_on_the_sections_it_reads():
    saved = load_config(None, [])
    ppo_change = load_config(None, ["ppo.epochs=1", "sft.train.epochs=5"])
    assert "sft.train.epochs=5" in check_changes(saved, ppo_change, "sft", 2, "x")  # ppo: not sft's
    with pytest.raises(UserError, match=r"^--resume: ppo.epochs=1 \(the run's: 4\)"):
        check_changes(saved, ppo_change, "train", 2, "x")
    with pytest.raises(UserError, match=r"sft.optim.learning_rate=0.1 \(the run's: 0.0002\)"):
        check_changes(saved, load_config(None, ["sft.optim.learning_rate=0.1"]), "sft", 2, "x")


def test_a_config_file_given_with_resume_is_named_as_ignored():
    saved = load_config(None, ["rollout.prompts_per_update=4", "ppo.minibatch_size=4",
                               "ppo.total_updates=42"])
    given = load_config(None, ["output_dir=x"])
    line = ignored_line(given, saved, "train", "--config my.yaml", Path("r/config.yaml"))
    assert line == ("--resume: the run's saved config (r/config.yaml) is its config; where "
                    "--config my.yaml differs it is ignored: rollout.prompts_per_update (64; "
                    "the run's: 4), ppo.total_updates (200; the run's: 42), ppo.minibatch_size "
                    "(16; the run's: 4) (change a field with section.key=value)")
    assert ignored_line(saved, saved, "train", "--config my.yaml", Path("r")) is None


def _checkpoint(root: Path, step: int, cfg) -> Path:
    ck = root / "checkpoints" / f"step-{step}"
    ck.mkdir(parents=True)
    save_config(cfg, ck / "config.yaml")
    (ck / "state.json").write_text(json.dumps({"step": step}))
    seal(ck, "COMPLETE")
    return ck


def test_saved_run_reads_the_checkpoint_then_the_run_dir(tmp_path):
    cfg = load_config(None, ["ppo.total_updates=7"])
    assert saved_run(tmp_path, "train", "latest") is None  # nothing saved: a fresh start
    save_config(load_config(None, ["ppo.total_updates=5"]), tmp_path / "config.yaml")
    at0 = saved_run(tmp_path, "train", "latest")  # killed before its first checkpoint
    assert (at0.step, at0.path, at0.cfg.ppo.total_updates) == (0, tmp_path / "config.yaml", 5)
    ck = _checkpoint(tmp_path, 3, cfg)
    saved = saved_run(tmp_path, "train", "latest")
    assert (saved.step, saved.path, saved.cfg.ppo.total_updates) == (3, ck / "config.yaml", 7)
    assert saved_run(tmp_path, "train", str(ck)).step == 3
    assert saved_run(tmp_path, "sft", "latest") is None  # the stage keeps its own under sft/
    with open(ck / "config.yaml", "a") as f:
        f.write("# edited\n")
    with pytest.raises(UserError, match="config.yaml has changed since it was written"):
        saved_run(tmp_path, "train", "latest")


# -- through the CLI ------------------------------------------------------------------------------

RUN = ("rollout.prompts_per_update=4", "ppo.total_updates=3")  # the overrides of the run


@pytest.fixture(scope="module")
def full(tiny_model_dir, low_ids_reward, tmp_path_factory):
    """The uninterrupted run: 3 updates at 4 prompts, as the command line asked."""
    ws = tmp_path_factory.mktemp("resume")
    cfg = resume_yaml(ws / "cfg.yaml", tiny_model_dir, low_ids_reward)
    res = run_cli("train", "--config", str(cfg), *RUN, f"output_dir={ws / 'full'}")
    assert res.returncode == 0, res.stderr[-3000:]
    return ws, cfg


@pytest.mark.integration
def test_resume_without_the_overrides_continues_the_saved_run(full):
    """A run started with overrides (4 prompts per update) and stopped after update 1 resumes
    with `--config` alone: the saved config is the run's, so it ends bit for bit where the
    uninterrupted run ends; a changed `rollout.prompts_per_update` is refused, exit 2, with
    nothing written. (Before, the resume went on at the file's 8 prompts per update.)"""
    ws, cfg = full
    out = ws / "part"
    res = run_cli("train", "--config", str(cfg), "rollout.prompts_per_update=4",
                  "ppo.total_updates=1", f"output_dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    refused = run_cli("train", "--config", str(cfg), f"output_dir={out}", "--resume", "latest",
                      "rollout.prompts_per_update=8", "ppo.total_updates=3")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines() == [
        f"lora-ppo: error: --resume: rollout.prompts_per_update=8 (the run's: 4) would change "
        f"the run saved in {out}/checkpoints/step-1/config.yaml; a resumed run keeps its "
        "config: drop the change, or start a new run with --overwrite or another output_dir"]
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before

    res = run_cli("train", "--config", str(cfg), f"output_dir={out}", "--resume", "latest",
                  "ppo.total_updates=3")
    assert res.returncode == 0, res.stderr[-3000:]
    said = res.stdout.splitlines()
    assert said[0].startswith("--resume: continuing with ppo.total_updates=3 (was 1: ")
    assert said[1].startswith(f"--resume: the run's saved config ({out}/checkpoints/step-1/"
                              f"config.yaml) is its config; where --config {cfg} differs it is "
                              "ignored: rollout.prompts_per_update (8; the run's: 4)")
    assert_same_run(ws / "full", out, 3)
    saved = load_config(out / "config.yaml")  # the run's config, with the accepted change
    assert (saved.rollout.prompts_per_update, saved.ppo.total_updates) == (4, 3)


@pytest.mark.integration
def test_a_resume_from_the_run_dir_keeps_its_config_too(full):
    """A run killed before its first checkpoint has only output_dir/config.yaml: `--resume
    latest` starts it again from step 0 with that config, not the file's."""
    ws, cfg = full
    out = ws / "early"
    out.mkdir()
    data = load_config(cfg, [*RUN, f"output_dir={out}"])
    from lora_ppo.builtin.specs import resolve_builtins

    save_config(resolve_builtins(data), out / "config.yaml")
    res = run_cli("train", "--config", str(cfg), f"output_dir={out}", "--resume", "latest")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "no complete checkpoint" in res.stdout and "from step 0" in res.stdout
    assert_same_run(ws / "full", out, 3)

