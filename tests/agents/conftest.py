"""A real tokenizer with a Qwen 2.5-style chat template that renders tools, built locally.

The byte-level BPE of `lora_ppo.builtin.tiny.build_tokenizer`, trained on a few reviews and tool
calls, plus Qwen 2.5's tokens: `<|im_start|>` and `<|im_end|>` special (the EOS is `<|im_end|>`,
as in Qwen's instruct checkpoints), `<tool_call>`, `</tool_call>`, `<tool_response>` and
`</tool_response>` added as ordinary tokens, as Qwen's tokenizer.json has them. The template is
Qwen 2.5's (the tools' schemas in the system message, calls as <tool_call> JSON, tool results as
a user turn of <tool_response> blocks). Saved and loaded back with AutoTokenizer, as a hub
checkpoint would be.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Qwen 2.5's chat template (the system prompt shortened), as its tokenizer_config.json has it.
QWEN25_TEMPLATE = (Path(__file__).parent / "qwen2_5.jinja").read_text()

# transformers' response template for Qwen-style output (the one TRL 1.16 sets for Qwen 2.5/3,
# `trl/chat_template_utils.py::qwen3_template`): what `tokenizer.parse_response` reads.
QWEN_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "reasoning_content": {"open": "<think>", "close_pattern": r"</think>\s*",
                              "content": "text"},
        "tool_calls": {"open": "<tool_call>", "close_pattern": r"</tool_call>\s*",
                       "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    from lora_ppo.builtin.corpus import review_corpus
    from lora_ppo.builtin.tiny import build_tokenizer

    texts = [t for t, _ in review_corpus(300, seed=0)]
    texts += ['{"name": "add", "arguments": {"a": 3, "b": 4}}', "The answer is 7."] * 20
    tok = build_tokenizer(texts, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])
    tok.eos_token = "<|im_end|>"
    tok.chat_template = QWEN25_TEMPLATE
    out = tmp_path_factory.mktemp("qwen_tok")
    tok.save_pretrained(out)
    return out


@pytest.fixture
def qwen_tokenizer(qwen_tokenizer_dir):
    """A fresh copy per test (tests set attributes such as response_template on it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture
def qwen_response_template():
    return QWEN_RESPONSE_TEMPLATE


@pytest.fixture(scope="session")
def tool_model_dir(qwen_tokenizer_dir, tmp_path_factory):
    """A tiny random Llama (vocab 512, 1024 positions: the tools' schemas make long prompts)
    with the Qwen-style tokenizer (~406 ids), a model directory whose chat template renders
    tools. The LM head's rows of `<tool_call>` and `<|im_end|>` point along the mean final
    hidden state, so each is drawn ~10% of the time: a random model that calls tools and ends
    turns, for runs through the whole loop."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_ppo.builtin.tiny import build_tiny_model

    out = build_tiny_model(tmp_path_factory.mktemp("tool_model") / "model",
                           max_position_embeddings=1024)
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        h = model.model(torch.randint(0, len(tok), (8, 64), generator=torch.Generator()
                                      .manual_seed(0))).last_hidden_state.flatten(0, 1).mean(0)
        for token in ("<tool_call>", "<|im_end|>"):
            model.lm_head.weight[tok.convert_tokens_to_ids(token)] = 3.0 * h / h.norm() ** 2
    model.save_pretrained(out)
    for f in out.glob("*token*"):
        f.unlink()
    tok.save_pretrained(out)
    return out
