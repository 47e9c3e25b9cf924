"""Conversations as the turn hook of lora_ppo's own decode loop (lora_ppo/generation): the model's
turns forced to hand-written tool calls, the engine appends what end_turns returns on each row's
cache, and the trajectories it hands back are the conversations' token for token, environment
mask included; a result that does not fit the budget is left out by the engine and rolled back
from the messages."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config

from lora_ppo.agents import Conversations, Toolbox
from lora_ppo.generation.generate import sample

pytestmark = pytest.mark.integration


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


CALL = '<tool_call>\n{{"name": "add", "arguments": {{"a": {}, "b": {}}}}}\n</tool_call>'


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    from lora_ppo.ppo.loop import setup

    return setup(tiny_config(tiny_model_dir, tmp_path_factory.mktemp("run")))


def scripted(tok, n_rows: int) -> list[list[list[int]]]:
    """Row r's turns: r tool calls (one per turn), then an answer; each ends with <|im_end|>."""
    def turn(text):
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return [[turn(CALL.format(r, k)) for k in range(r)] + [turn(f"It is {r}.")]
            for r in range(n_rows)]


def dry_run(tok, toolbox, rows, turns) -> Conversations:
    """The conversations fed the scripted turns by hand: what the engine must reproduce."""
    conv = Conversations(rows, tok, toolbox, max_prompt_length=24)
    for k in range(max(len(t) for t in turns)):
        live = [r for r, t in enumerate(turns) if k < len(t)]
        conv.end_turns(live, [turns[r][k] for r in live])
    return conv


def forced(conv, width: int, pad: int) -> torch.Tensor:
    out = torch.full((len(conv.samples), width), pad, dtype=torch.long)
    for r, ids in enumerate(conv.completion_ids()):
        out[r, :len(ids)] = torch.tensor(ids)
    return out


@pytest.mark.parametrize("continuous", [True, False])
def test_the_engine_appends_the_conversations_answers(run, qwen_tokenizer, continuous):
    tok, toolbox = qwen_tokenizer, Toolbox([add])
    rows = [{"prompt": f"Add {r} numbers."} for r in range(4)]
    expected = dry_run(tok, toolbox, rows, scripted(tok, 4))
    budget = max(len(c) for c in expected.completion_ids()) + 1
    conv = Conversations(rows, tok, toolbox, max_prompt_length=24)
    run.ac.eval()
    drawn = sample(run.ac, conv.prompt_ids, max_new_tokens=budget, temperature=1.0, greedy=True,
                   stop_ids=[tok.eos_token_id], pad_id=0, generation_batch_size=2,
                   continuous=continuous, forced=forced(expected, budget, 0), turns=conv)
    got = [drawn.tokens[r, :int(drawn.length[r])].tolist() for r in range(4)]
    assert got == expected.completion_ids()
    assert [drawn.env_mask[r, :int(drawn.length[r])].logical_not().long().tolist()
            for r in range(4)] == expected.env_masks()
    assert drawn.finished.all()
    conv.finish(got)
    assert conv.completions() == expected.completions()
    assert [sum(m["role"] == "tool" for m in c) for c in conv.completions()] == [0, 1, 2, 3]
    assert conv.metric_sums()["calls"] == 6


def test_a_result_that_does_not_fit_is_rolled_back(run, qwen_tokenizer):
    """Row 1's second tool result would leave no room for a token of its own: the engine does
    not write it and ends the row truncated; finish() drops the tool message it never saw."""
    tok, toolbox = qwen_tokenizer, Toolbox([add])
    rows = [{"prompt": "Add."}] * 2
    turns = scripted(tok, 3)[1:]  # one call then the answer; two calls then the answer
    expected = dry_run(tok, toolbox, rows, turns)
    ids1, mask1 = expected.completion_ids()[1], expected.env_masks()[1]
    ends = [i for i in range(1, len(mask1)) if mask1[i - 1] == 1 and mask1[i] == 0]
    at = ends[1]  # the end of row 1's second turn (its second call)
    budget = at + 2  # the second result (many ids) does not fit with room for one more token
    conv = Conversations(rows, tok, toolbox, max_prompt_length=24)
    run.ac.eval()
    force = forced(expected, max(len(c) for c in expected.completion_ids()), 0)[:, :budget]
    drawn = sample(run.ac, conv.prompt_ids, max_new_tokens=budget, temperature=1.0, greedy=True,
                   stop_ids=[tok.eos_token_id], pad_id=0, generation_batch_size=2,
                   forced=force, turns=conv)
    got = [drawn.tokens[r, :int(drawn.length[r])].tolist() for r in range(2)]
    assert got[1] == ids1[:at] and not drawn.finished[1]
    conv.finish(got)
    assert [m["role"] for m in conv.completions()[1]] == ["assistant", "tool", "assistant"]
    assert conv.samples[1].truncated and conv.env_masks()[1] == mask1[:at]
