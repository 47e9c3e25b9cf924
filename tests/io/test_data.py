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
    rows = load_prompts(str(files / name), "q")
    assert [r.prompt for r in rows] == PROMPTS
    assert [r.columns for r in rows] == ([{"n": i} for i in range(3)] if name == "p.jsonl" else
                                         [{}] * 3)


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
    assert len(prompts) >= 100 and all(isinstance(p.prompt, str) and p.prompt for p in prompts)
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


# TRL's conversational format: a system message and earlier turns, kept by the chat template.
CONVERSATIONS = [
    {"prompt": [{"role": "system", "content": "You add numbers."},
                {"role": "user", "content": "2 + 2 ="}], "answer": "4"},
    {"prompt": [{"role": "user", "content": "1 + 1 ="}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "and 5 + 5 ="}], "answer": "10"},
]


@pytest.fixture
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _conversations(kind: str, tmp_path):
    import datasets

    if kind == "jsonl":
        path = tmp_path / "c.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONS))
    elif kind == "json":
        path = tmp_path / "c.json"
        path.write_text(json.dumps(CONVERSATIONS))
    elif kind == "parquet":
        path = tmp_path / "c.parquet"
        datasets.Dataset.from_list(CONVERSATIONS).to_parquet(str(path))
    else:
        return datasets.Dataset.from_list(CONVERSATIONS) if kind == "Dataset" else CONVERSATIONS
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "Dataset", "list"])
def test_conversations_are_rendered_with_the_chat_template(tok, tmp_path, kind):
    """A prompt column of message lists, from a file or from memory, is rendered as TRL renders
    it (apply_chat_template with the generation prompt), the system message and earlier turns
    kept; the row's other columns ride along with each prompt."""
    from lora_ppo.io.data import encode_rows

    rows = load_prompts(_conversations(kind, tmp_path), "prompt")
    prompts = encode_rows(tok, rows, chat_template=False, max_length=64, field="data.prompts")
    bos = tok.bos_token
    # the tiny template (lora_ppo/builtin/tiny.py): "role: content" lines, "assistant:" opened
    assert [p.text for p in prompts] == [
        f"{bos}system: You add numbers.\nuser: 2 + 2 =\nassistant:",
        f"{bos}user: 1 + 1 =\nassistant: 2{tok.eos_token}\nuser: and 5 + 5 =\nassistant:"]
    for p, row in zip(prompts, CONVERSATIONS):
        assert p.text == tok.apply_chat_template(row["prompt"], tokenize=False,
                                                 add_generation_prompt=True)
        assert list(p.ids) == tok(p.text, add_special_tokens=False)["input_ids"]
        assert p.messages == row["prompt"] and dict(p.columns) == {"answer": row["answer"]}


def test_string_prompts_are_read_as_before(tok):
    """Plain strings: as is, or one user turn with data.chat_template; no conversation kept."""
    from lora_ppo.io.data import encode, encode_rows

    rows = load_prompts([{"prompt": p} for p in PROMPTS], "prompt")
    for chat_template in (False, True):
        prompts = encode_rows(tok, rows, chat_template, 16, "data.prompts")
        texts = [render_prompt(tok, p, chat_template) for p in PROMPTS]
        assert [(p.text, p.ids) for p in prompts] == \
            [(p.text, p.ids) for p in encode(tok, texts, chat_template, 16)]
        assert all(p.messages is None and not p.columns for p in prompts)


def test_conversations_need_a_chat_template(tok):
    from lora_ppo.io.data import encode_rows

    tok.chat_template = None
    rows = load_prompts(CONVERSATIONS, "prompt")
    with pytest.raises(UserError, match=r"^data.prompts holds conversations \(lists of messages\) "
                                        "but the tokenizer has no chat template to render them"):
        encode_rows(tok, rows, False, 64, "data.prompts")
    with pytest.raises(UserError, match="^data.chat_template=true but the tokenizer has no chat "
                                        "template; set it false$"):
        encode_rows(tok, load_prompts([{"prompt": "hi"}], "prompt"), True, 64, "data.prompts")


@pytest.mark.parametrize("rows, match", [
    ([{"prompt": 5}], r"row 0's prompt in column 'prompt' is 5, neither a string nor a list of "
                      "messages"),
    ([{"prompt": ["a", "b"]}], "row 0's prompt in column 'prompt' is \\['a', 'b'\\], neither"),
    ([{"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}]}],
     "row 0's prompt is a string and row 1's a list of messages; give one kind of prompt"),
    ([{"prompt": "a", "answer": 1}, {"prompt": "b"}],
     "row 1 has the columns prompt but row 0 has prompt, answer; give every row the same columns"),
])
def test_prompts_that_are_neither_strings_nor_conversations(rows, match):
    with pytest.raises(UserError, match=match):
        load_prompts(rows, "prompt")


def test_what_the_run_does_with_the_data_is_said():
    """Rows held out of the training data and prompts cycled within an update are said in one
    line each (issue 28: both were silent)."""
    from lora_ppo.config.load import load_config
    from lora_ppo.io.data import Prompt, held_out_note
    from lora_ppo.ppo.run import data_notes

    assert held_out_note(136, 64, False, "reward_model.data", "reward_model.eval.size",
                         "reward_model.eval.data") == (
        "64 of 200 rows of reward_model.data are held out for evaluation "
        "(reward_model.eval.size=64; reward_model.eval.size=0 trains on all of them, "
        "reward_model.eval.data gives a separate set)")
    assert held_out_note(200, 64, True, "d", "s", "e") is None  # a separate evaluation set
    assert held_out_note(200, 0, False, "d", "s", "e") is None  # no evaluation
    prompts = [Prompt(str(i), (i,)) for i in range(6)]
    cfg = load_config(None, ["rollout.prompts_per_update=4", "ppo.minibatch_size=4",
                             "ppo.micro_batch_size=4", "data.eval_every=1"])
    assert data_notes(cfg, prompts, prompts[:2], None, 1) == [
        "2 of 8 rows of data.prompts are held out for evaluation (data.eval_size=2; "
        "data.eval_size=0 trains on all of them, data.eval_prompts gives a separate set)"]
    notes = data_notes(cfg, prompts, [], None, 2)
    assert notes == ["data.prompts has 6 training prompts, fewer than the 8 an update takes "
                     "(rollout.prompts_per_update x 2 rank(s)): every update goes through them "
                     "more than once"]
