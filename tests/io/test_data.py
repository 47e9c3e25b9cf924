"""Prompt loading through `datasets` (JSONL, CSV, Parquet, text), chat template, cycling."""

from __future__ import annotations

import json

import pytest

from lora_ppo.errors import UserError
from lora_ppo.io.data import PromptCycle, hold_out, load_prompts, render_prompt

PROMPTS = ["review of the pizza :", "my review of the movie :", "the blender review :"]


@pytest.fixture
def files(tmp_path):
    import datasets

    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"q": p, "n": i}) + "\n"
                                              for i, p in enumerate(PROMPTS)))
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    datasets.Dataset.from_dict({"q": PROMPTS}).to_csv(str(tmp_path / "p.csv"))
    datasets.Dataset.from_dict({"q": PROMPTS}).to_parquet(str(tmp_path / "p.parquet"))
    return tmp_path


@pytest.mark.parametrize("name", ["p.jsonl", "p.csv", "p.parquet", "p.txt"])
def test_formats(files, name):
    assert load_prompts(str(files / name), "q") == PROMPTS


@pytest.mark.parametrize("spec, column, match", [
    ("p.jsonl", "prompt", "data.prompts=.*p.jsonl has no column 'prompt' \\(columns: q, n\\); "
                          "set data.prompt_column to one of them"),
    ("missing.jsonl", "q", "does not exist"),
    ("p.xml", "q", "unknown extension '.xml'"),
])
def test_bad_prompt_files(files, spec, column, match):
    (files / "p.xml").write_text("<x/>")
    with pytest.raises(UserError, match=match):
        load_prompts(str(files / spec), column)


def test_builtin_prompts(tmp_path, monkeypatch):
    """`builtin:reviews` becomes a cached JSONL at the edge (builtin/specs.py) that the core reads
    as any prompts file; the core itself takes no built-in name."""
    from lora_ppo.builtin.specs import data_file

    monkeypatch.setenv("LORA_PPO_CACHE", str(tmp_path))
    prompts = load_prompts(str(data_file("data.prompts", "reviews", ("prompt",))), "prompt")
    assert len(prompts) >= 100 and all(isinstance(p, str) and p for p in prompts)
    with pytest.raises(UserError, match="does not exist"):
        load_prompts("builtin:reviews", "prompt")


def test_sampler_cycles_reshuffles_and_resumes():
    s = PromptCycle(list("abcde"), seed=3)
    first_pass = s.take(5)
    second_pass = s.take(5)
    assert sorted(first_pass) == sorted(second_pass) == list("abcde")
    assert first_pass != second_pass  # reshuffled on the second pass (seed 3)
    state = s.state_dict()
    nxt = s.take(7)
    t = PromptCycle(list("abcde"), seed=3)
    t.load_state_dict(state)
    assert t.take(7) == nxt


def test_hold_out():
    train, held = hold_out(list("abcdef"), None, 2, 0, "data.eval_size")
    assert len(held) == 2 and sorted(train + held) == list("abcdef")
    assert hold_out(list("abcdef"), None, 2, 0, "x") == (train, held)  # seeded: the same slice
    assert hold_out(list("abc"), None, 0, 0, "x") == (list("abc"), [])
    assert hold_out(list("abc"), list("xyz"), 2, 0, "x") == (list("abc"), list("xy"))
    with pytest.raises(UserError, match="data.eval_size=2 leaves no training rows"):
        hold_out(list("ab"), None, 2, 0, "data.eval_size")


def test_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = render_prompt(tok, "hello there", chat_template=True)
    assert "hello there" in out and out != "hello there"
    assert render_prompt(tok, "hello there", chat_template=False) == "hello there"
