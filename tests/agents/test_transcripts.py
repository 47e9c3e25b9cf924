"""SFT on tool-calling transcripts: the loss mask of a transcript, checked by hand, and equal to
the mask a rollout of the same conversation gives the model's tokens."""

from __future__ import annotations

import json

import pytest

from lora_ppo.agents import AgentError, Conversations, Toolbox
from lora_ppo.agents.transcripts import encode_transcript, is_tool_transcript, row_tools


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 3, "b": 4}}}
TRANSCRIPT = [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "name": "add", "content": "7"},
    {"role": "assistant", "content": "The answer is 7."},
    {"role": "user", "content": "Thanks."},
    {"role": "assistant", "content": "You are welcome.", "tool_calls": None},
]


def spans(tok, ids, mask) -> list[tuple[bool, str]]:
    """The decoded runs of equal mask values."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            out.append((bool(mask[start]), tok.decode(ids[start:i])))
            start = i
    return out


def test_the_loss_mask_of_a_transcript_by_hand(qwen_tokenizer):
    tok = qwen_tokenizer
    schemas = Toolbox([add]).schemas
    ids, mask = encode_transcript(tok, TRANSCRIPT, schemas, max_prompt_length=1000,
                                  max_length=1000)
    got = spans(tok, ids, mask)
    system = got[0][1]
    assert system.startswith("<|im_start|>system\nUse the tools.\n\n# Tools") and '"add"' in system
    assert got[0][0] is False and system.endswith(
        "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n")
    assert got[1:] == [
        (True, '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>'
               "<|im_end|>"),
        (False, "\n<|im_start|>user\n<tool_response>\n7\n</tool_response><|im_end|>\n"
                "<|im_start|>assistant\n"),
        (True, "The answer is 7.<|im_end|>"),
        (False, "\n<|im_start|>user\nThanks.<|im_end|>\n<|im_start|>assistant\n"),
        (True, "You are welcome.<|im_end|>")]
    # the ids are the template's rendering, token for token, to the last end of turn
    full = tok(tok.apply_chat_template(TRANSCRIPT[:-1] + [{"role": "assistant",
                                                           "content": "You are welcome."}],
                                       tools=schemas, tokenize=False),
               add_special_tokens=False)["input_ids"]
    assert full[:len(ids)] == ids and tok.decode(full[len(ids):]) == "\n"
    # cut: the context from the left, then the whole at the end
    cut_ids, cut_mask = encode_transcript(tok, TRANSCRIPT, schemas, max_prompt_length=5,
                                          max_length=20)
    first = mask.index(1)
    assert cut_ids[:5] == ids[first - 5:first] and cut_ids == (ids[first - 5:])[:20]
    assert cut_mask == (mask[first - 5:])[:20]


def test_sft_trains_on_the_tokens_a_rollout_marks_as_the_models(qwen_tokenizer):
    """The same conversation as a rollout (Conversations fed the assistant turns) and as an SFT
    transcript: the same ids, and the loss mask is the rollout's model mask."""
    tok = qwen_tokenizer
    toolbox = Toolbox([add])
    conv = Conversations([{"prompt": TRANSCRIPT[:2]}], tok, toolbox)
    for text in ('<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>',
                 "The answer is 7."):
        conv.end_turns([0], [tok(text, add_special_tokens=False)["input_ids"]
                             + [tok.eos_token_id]])
    messages = conv.prompts()[0] + conv.completions()[0]
    ids, mask = encode_transcript(tok, messages, toolbox.schemas, max_prompt_length=1000,
                                  max_length=1000)
    assert ids == conv.prompt_ids[0] + conv.completion_ids()[0]
    assert mask == [0] * len(conv.prompt_ids[0]) + conv.env_masks()[0]


def test_transcripts_as_tables_give_them(qwen_tokenizer):
    tok = qwen_tokenizer
    as_string = [dict(m) for m in TRANSCRIPT[:5]]
    as_string[2] = {"role": "assistant", "content": None, "name": None, "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}]}
    schemas = Toolbox([add]).schemas
    assert (encode_transcript(tok, as_string, row_tools(json.dumps(schemas), None, "row 0"),
                              max_prompt_length=1000, max_length=1000)
            == encode_transcript(tok, TRANSCRIPT[:5], schemas, max_prompt_length=1000,
                                 max_length=1000))
    assert is_tool_transcript(TRANSCRIPT) and not is_tool_transcript(TRANSCRIPT[:2])
    assert row_tools(None, schemas, "row 0") is schemas
    with pytest.raises(AgentError, match="row 3: the tools column is not JSON"):
        row_tools("[{", None, "row 3")
    with pytest.raises(AgentError, match="no assistant message to train on"):
        encode_transcript(tok, TRANSCRIPT[:2], schemas, max_prompt_length=9, max_length=9)


def test_sft_reads_the_schemas_without_building_the_environment(tmp_path):
    from types import SimpleNamespace

    from lora_ppo.agents.tools import config_schemas

    (tmp_path / "env.py").write_text(
        "class Remote:\n"
        "    def __init__(self):\n"
        "        raise ConnectionError('no server in SFT')\n\n"
        "    def reset(self, **kwargs):\n"
        "        return None\n\n"
        "    def lookup(self, key: str) -> str:\n"
        '        """Look a key up.\n\n        Args:\n            key: The key.\n        """\n')
    (tmp_path / "tools.py").write_text(
        "def add(a: int, b: int) -> int:\n"
        '    """Add.\n\n    Args:\n        a: x.\n        b: y.\n    """\n')
    schemas = config_schemas(SimpleNamespace(environment=f"{tmp_path}/env.py:Remote",
                                             tools=[f"{tmp_path}/tools.py:add"]))
    assert [s["function"]["name"] for s in schemas] == ["add", "lookup"]
    assert config_schemas(SimpleNamespace(environment=None, tools=[])) is None


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_reads_tool_transcripts_in_trls_formats(qwen_tokenizer, tmp_path):
    """A messages column with tool calls trains every assistant turn (a plain conversation keeps
    training its last message only); a prompt/completion row trains the completion's assistant
    turns, not the prompt's."""
    from types import SimpleNamespace

    from lora_ppo.stages.sft import encode_examples, read_pairs

    tok = qwen_tokenizer
    schemas = Toolbox([add]).schemas
    sec = SimpleNamespace(prompt_column="prompt", response_column="completion",
                          messages_column="messages", chat_template=False, append_eos=True,
                          train=SimpleNamespace(max_length=1000))
    plain = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Bye."}, {"role": "assistant", "content": "Bye."}]
    data = _write_jsonl(tmp_path / "messages.jsonl", [
        {"messages": TRANSCRIPT, "tools": schemas}, {"messages": plain, "tools": None}])
    transcript, conversation = encode_examples(tok, read_pairs(str(data), sec, "sft.data"), sec,
                                               1000)
    assert [text for model, text in spans(tok, transcript.ids, transcript.loss_mask)
            if model] == ['<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n'
                          "</tool_call><|im_end|>", "The answer is 7.<|im_end|>",
                          "You are welcome.<|im_end|>"]
    assert [text for model, text in spans(tok, conversation.ids, conversation.loss_mask)
            if model] == ["Bye.<|im_end|>\n"]  # 28's rule for plain conversations, unchanged
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": TRANSCRIPT[:5] + TRANSCRIPT[5:6], "completion": TRANSCRIPT[6:7]},
        {"prompt": TRANSCRIPT[:2], "completion": TRANSCRIPT[2:5]}])
    rows = read_pairs(str(pairs), sec, "sft.data")
    assert [r["train_from"] for r in rows] == [6, 2]  # the prompt's tool calls need the schemas
    last, completion = encode_examples(tok, rows, sec, 1000, tools=schemas)  # rollout.tools'
    assert [text for model, text in spans(tok, last.ids, last.loss_mask) if model] == [
        "You are welcome.<|im_end|>"]
    assert [text for model, text in spans(tok, completion.ids, completion.loss_mask) if model] == [
        '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>',
        "The answer is 7.<|im_end|>"]


@pytest.mark.integration
def test_lora_ppo_sft_trains_on_the_assistant_turns_of_tool_transcripts(
        qwen_tokenizer_dir, tmp_path):
    """`train_sft` end to end on a tiny model with the Qwen-style tokenizer: the tokens the loss
    covers are the assistant turns' (summed over the data), and the adapter is written."""
    import shutil

    from helpers import tiny_config

    from lora_ppo.builtin.tiny import build_tiny_model
    from lora_ppo.stages.sft import train_sft

    model = build_tiny_model(tmp_path / "model", vocab_size=512, max_position_embeddings=1024)
    for f in qwen_tokenizer_dir.iterdir():
        shutil.copy(f, model / f.name)
    schemas = Toolbox([add]).schemas
    data = _write_jsonl(tmp_path / "tools.jsonl",
                        [{"messages": TRANSCRIPT, "tools": json.dumps(schemas)}] * 4)
    cfg = tiny_config(model, tmp_path / "out", f"sft.data={data}", "sft.eval.size=0",
                      "sft.train.batch_size=2", "sft.train.micro_batch_size=2",
                      "sft.train.max_steps=2", "sft.train.max_length=1000",
                      "model.max_prompt_length=900", "reward_model.train.max_length=1000")
    out = train_sft(cfg)
    assert (out / "adapter_model.safetensors").is_file()
    logged = [json.loads(line) for line in
              (tmp_path / "out" / "sft" / "metrics.jsonl").read_text().splitlines()]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    turns = ['<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>',
             "The answer is 7.", "You are welcome."]
    per_row = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in turns)
    assert [row["tokens/response"] for row in logged] == [2 * per_row, 2 * per_row]
