"""Docs that must match the code: the config reference, the metric names, the README commands."""

from __future__ import annotations

import json
import re

import pytest
from helpers import REPO, documented_metrics, undocumented_metrics

from lora_ppo.config.reference import config_reference
from lora_ppo.io.metrics import REQUIRED


def test_config_reference_is_generated_from_the_code():
    on_disk = (REPO / "docs" / "config.md").read_text()
    assert on_disk == config_reference(), (
        "docs/config.md is stale: run `lora-ppo config-docs --out docs/config.md`")


def test_every_required_metric_is_documented():
    documented = documented_metrics()
    missing = [k for k in REQUIRED if not any(p.match(k) for p in documented)]
    assert not missing, missing


@pytest.mark.integration
def test_every_metric_the_loop_logs_is_documented(tiny_model_dir, tmp_path):
    """One update of `train`, with an evaluation and a weighted reward source so that every
    kind of metric appears: each name in metrics.jsonl is a row of docs/metrics.md."""
    from helpers import tiny_config

    from lora_ppo.ppo.loop import train

    cfg = tiny_config(tiny_model_dir, tmp_path / "run", "ppo.total_updates=1",
                      "data.eval_every=1", "data.eval_size=2", "reward.sources=[function]",
                      "reward.weights=[2.0]")
    train(cfg)
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "objective/score_function" in logged and "eval/score_greedy" in logged
    missing = undocumented_metrics(logged)
    assert not missing, f"docs/metrics.md lacks {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    test_cmd = "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    assert test_cmd in readme and test_cmd in ci


def test_readme_names_the_tested_versions_of_constraints_txt():
    """The README's "Tested versions" line says what scripts/setup.sh installs."""
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("**Tested versions.**"):]
    block = " ".join(block[:block.index("\n\n")].split())
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    named = re.findall(r"([a-z_]+) (\d+\.\d+\.\d+)", block)
    assert len(named) >= 10, named
    for name, version in named:
        assert pins.get(name) == version, (name, version, pins.get(name))


def _sections(text: str) -> dict[str, list[list[str]]]:
    """Table rows (cells, stripped) under each `## ` heading of a Markdown page."""
    out, heading = {}, ""
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:]
        elif line.startswith("| `"):
            out.setdefault(heading, []).append([c.strip() for c in line.strip().strip("|").split("|")])
    return out


def _same_default(written: str, value) -> bool:
    import yaml

    if value is None:
        return written == "null"
    if isinstance(value, bool):
        return written == str(value).lower()
    if isinstance(value, (int, float)):
        return float(written) == float(value)
    if isinstance(value, list):
        return yaml.safe_load(written) == value
    return written == value


def test_coming_from_trl_maps_to_fields_that_exist_with_their_defaults():
    """Every lora_ppo field named in docs/coming_from_trl.md's three mapping tables exists in the
    config tree, and where a row names one field and its default, the default is the code's.
    Every lora_ppo metric in its metrics table is one docs/metrics.md documents."""
    from lora_ppo.config import Config

    sections = _sections((REPO / "docs" / "coming_from_trl.md").read_text())
    tables = [rows for heading, rows in sections.items() if "Config" in heading]
    assert len(tables) == 3 and all(len(rows) > 20 for rows in tables)
    checked = 0
    for rows in tables:
        for cells in rows:
            paths = re.findall(r"`([a-z_][a-z_.]*)`", cells[2])
            for path in paths:
                obj = Config()
                for part in path.split("."):
                    assert hasattr(obj, part), f"{cells[0]} maps to {path}, not in the config"
                    obj = getattr(obj, part)
            default = re.fullmatch(r"`([^`]*)`", cells[3])
            if len(paths) == 1 and default:
                assert _same_default(default.group(1), obj), (cells[0], path, obj)
                checked += 1
    assert checked > 50
    metrics = [m for cells in sections["Metrics side by side"]
               for m in re.findall(r"`([^`]+)`", cells[0])]
    assert metrics and not undocumented_metrics(metrics)


def _trls_reward_call(columns: dict) -> set[str]:
    """The keywords TRL's own GRPOTrainer._calculate_rewards passes a reward function, on a
    stand-in trainer holding only what that method reads (its profiling wrapper unwrapped)."""
    import types

    import torch
    from transformers import TrainerState
    from trl import GRPOTrainer

    seen = {}

    def probe(**kwargs):
        seen.update(kwargs)
        return [0.0] * len(kwargs["prompts"])

    trainer = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), is_main_process=True),
        args=types.SimpleNamespace(report_to=[]), state=TrainerState(), environments=None,
        reward_funcs=[probe], reward_processing_classes=[None], reward_func_names=["probe"],
        _log_completion_extra=lambda column, values: None, _log_metric=lambda name, value: None)
    prompt = [{"role": "user", "content": "2 + 2 ="}]
    GRPOTrainer._calculate_rewards.__wrapped__(
        trainer, [{"prompt": prompt, **columns}], [prompt],
        [[{"role": "assistant", "content": "4"}]], [[1]])
    return set(seen)


def test_the_reward_function_gets_the_keywords_the_docs_list_and_trl_passes():
    """docs/coming_from_trl.md's table of reward-function keywords is what lora_ppo passes (a
    call through FunctionReward), and, where TRL is installed, what TRL's own call passes; else
    the table's TRL column stands as written (read from TRL 1.16's grpo_trainer.py)."""
    from lora_ppo.io.data import Prompt
    from lora_ppo.ppo.reward_sources import KEYWORDS, FunctionReward

    rows = _sections((REPO / "docs" / "coming_from_trl.md").read_text())["The reward function"]
    keyword = {cells[0].strip("`"): cells for cells in rows}
    assert "<column>" in keyword
    ours = {k for k, cells in keyword.items() if not cells[1].startswith("—")} - {"<column>"}
    trls = {k for k, cells in keyword.items() if not cells[2].startswith("—")} - {"<column>"}
    assert ours == set(KEYWORDS)
    seen = {}
    FunctionReward("probe", lambda **kw: seen.update(kw) or [0.0])(
        [Prompt("2 + 2 =", (1,), None, {"answer": "4"})], [" 4"],
        {"prompt_ids": [[1]], "completion_ids": [[2]]})
    assert set(seen) == ours | {"answer"}
    try:
        import trl
    except ImportError:
        return
    assert _trls_reward_call({"answer": "4"}) == trls | {"answer"}, trl.__version__
