"""The recipes in scripts/recipes/ load, fit the card they are written for by the estimator's
own account, and docs/recipes.md shows the estimator's figures for them as it prints them now."""

from __future__ import annotations

import re

import pytest
from helpers import REPO

from lora_ppo.cli import main

RECIPES = {"llama7b_4bit_24gb": 24576, "llama70b_4bit_80gb": 81920}


@pytest.mark.parametrize("name, gpu_mib", RECIPES.items())
def test_recipe_fits_its_card_and_the_docs_show_the_estimate(name, gpu_mib, capsys,
                                                              monkeypatch):
    monkeypatch.chdir(REPO)  # the recipes name their shape directory relative to the repo
    cfg = f"scripts/recipes/{name}.yaml"
    assert main(["estimate", "--config", cfg, "--gpu-mib", str(gpu_mib)]) == 0
    table = capsys.readouterr().out
    peak = float(re.search(r"^peak\s+([\d.]+)$", table, re.M).group(1))
    assert peak < 0.9 * gpu_mib, table

    docs = (REPO / "docs" / "recipes.md").read_text()
    command = f"estimate --config {cfg} --gpu-mib {gpu_mib}"
    assert command in docs
    block = docs[docs.index(command):].split("```")[2]  # the figures after the command's block
    shown = block.strip().splitlines()
    assert shown[0].startswith("component") and shown[-1].startswith("fits")
    lines = set(table.splitlines())
    stale = [ln for ln in shown if ln not in lines]
    assert not stale, f"docs/recipes.md is stale for {name}: {stale}"
