"""Docs that must match the code: the config reference, the metric names, the README commands."""

from __future__ import annotations

import re

from helpers import REPO

from lora_ppo.config.reference import config_reference
from lora_ppo.io.metrics import REQUIRED


def test_config_reference_is_generated_from_the_code():
    on_disk = (REPO / "docs" / "config.md").read_text()
    assert on_disk == config_reference(), (
        "docs/config.md is stale: run `lora-ppo config-docs --out docs/config.md`")


def test_every_logged_metric_is_documented():
    text = (REPO / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)`", text, flags=re.M))
    missing = [k for k in REQUIRED if k not in documented]
    assert not missing, missing


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
