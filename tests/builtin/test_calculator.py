"""The tools demo's task (builtin/calculator.py), its chat tokenizer (builtin/chat.py) and the
held-out check through plain transformers (builtin/tool_check.py)."""

import random

import pytest

from lora_ppo.agents.parsing import parse_tool_call_blocks
from lora_ppo.agents.transcripts import encode_transcript
from lora_ppo.builtin import calculator, chat, tool_check
from lora_ppo.builtin.calculator import Problem


@pytest.fixture(scope="module")
def chat_tokenizer():
    return chat.build_chat_tokenizer(chat.tokenizer_texts(200), vocab_size=400)


def test_heldout_problems_are_never_trained_on():
    held = set(calculator.heldout())
    assert len(held) == calculator.HELDOUT_N  # no duplicates: 200 distinct problems
    assert calculator.heldout(5) == calculator.heldout()[:5]
    assert not held & set(calculator.problems(3000, seed=1234))
    rows = calculator.transcripts(300)
    trained = {m["tool_calls"][0]["function"]["arguments"]["expression"]
               for r in rows for m in r["messages"] if m.get("tool_calls")}
    assert not trained & {p.expression for p in held}
    with pytest.raises(ValueError, match="at most 200"):
        calculator.heldout(201)


def test_prompt_rows_carry_the_answer():
    (row,) = calculator.prompt_rows([Problem(347, "*", 29)])
    assert row["answer"] == 10063
    assert row["prompt"][0]["role"] == "user" and "347 * 29" in row["prompt"][0]["content"]


def test_the_tool_computes_and_refuses():
    env = calculator.Calculator()
    env.reset(answer=10063, prompt=[])
    assert env.calculate("347 * 29") == "10063" and env.calls == 1
    assert calculator.evaluate("(2 + 3) * -4 - 1") == -21
    for bad in ("2 ** 10", "__import__('os')", "1.5 * 2", "9" * 70, "2 +"):
        with pytest.raises(ValueError):
            calculator.evaluate(bad)


def test_correct_reads_the_last_number_of_the_final_answer():
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "calculate", "arguments": {"expression": "2 + 3"}}}]}
    convs = [[call, {"role": "tool", "content": "5"},
              {"role": "assistant", "content": "The answer is 5."}],
             [call, {"role": "tool", "content": "5"}],  # no final answer after the result
             "2 + 3 = 6."]
    assert calculator.correct(convs, answer=[5, 5, 6]) == [1.0, 0.0, 1.0]
    assert calculator.correct(["no number"], answer=[1]) == [0.0]


def test_a_transcript_renders_and_its_call_parses(chat_tokenizer):
    messages = calculator.transcript(Problem(347, "*", 29), random.Random(0))
    schemas = calculator.tool_schemas()
    assert schemas[0]["function"]["name"] == "calculate"
    text = chat_tokenizer.apply_chat_template(messages, tools=schemas, tokenize=False)
    assert text == chat.render([messages], schemas)[0]
    assert chat_tokenizer.decode(chat_tokenizer(text).input_ids) == text
    assert "<tool_response>\n10063\n</tool_response>" in text
    turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    parsed = parse_tool_call_blocks(turn)  # lora_ppo's parser, as a rollout reads the turn
    assert [(c.name, c.arguments, c.error) for c in parsed.calls] == [
        ("calculate", {"expression": "347 * 29"}, None)]
    assert tool_check.parse_calls(turn) == ("", [{"name": "calculate",
                                                  "arguments": {"expression": "347 * 29"}}])
    # SFT trains both assistant turns (the call and the answer), nothing else
    ids, mask = encode_transcript(chat_tokenizer, messages, schemas, max_prompt_length=512,
                                  max_length=1024)
    trained = chat_tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert "347 * 29" in trained and trained.endswith("The answer is 10063.<|im_end|>")
    assert "<tool_response>" not in trained and "helpful" not in trained


def test_a_failed_call_is_answered_with_an_error():
    env = calculator.Calculator()
    assert tool_check.parse_calls("<tool_call>{oops</tool_call>")[1] == [
        {"name": None, "arguments": {}}]
    assert "could not be parsed" in tool_check.run_call(env, {"name": None, "arguments": {}})
    assert "not found" in tool_check.run_call(env, {"name": "lookup", "arguments": {}})
    assert "error" in tool_check.run_call(env, {"name": "calculate",
                                                "arguments": {"expression": "2 ** 3"}})
    assert "error" in tool_check.run_call(env, {"name": "calculate", "arguments": {"x": "1"}})


def test_tool_check_on_a_tiny_model(tmp_path, chat_tokenizer):
    from lora_ppo.builtin.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "m", vocab_size=len(chat_tokenizer), hidden_size=32,
                                 intermediate_size=64, num_layers=1, max_position_embeddings=512,
                                 tokenizer=chat_tokenizer)
    rows = calculator.heldout_prompts(3)
    result = tool_check.tool_accuracy(str(model_dir), rows, max_new_tokens=6)
    assert len(result.conversations) == 3 and result.accuracy == 0.0  # a random model
    assert all(c[-1]["role"] == "assistant" for c in result.conversations)


def test_a_builtin_data_file_is_named_by_its_rows(tmp_path, monkeypatch):
    """A cached built-in data file is named by a hash of its rows, so a change to the code that
    makes them (the task's operand range, say) writes a new file instead of reading a stale one:
    a stale file under the old name is never read."""
    import hashlib

    from lora_ppo.builtin.specs import data_file

    monkeypatch.setenv("LORA_PPO_CACHE", str(tmp_path))
    path = data_file("data.prompts", "calculator", ("prompt",))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert path.name == f"data-calculator-{digest}.jsonl"
    assert data_file("data.prompts", "calculator", ("prompt",)) == path  # cached: same file
    assert data_file("data.prompts", "calculator", ("question",)) != path  # other rows, other file
