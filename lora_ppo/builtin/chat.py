"""The tokenizer and pre-training text of the built-in `tools` model: a Qwen 2.5-style chat model
that can call tools (builtin/calculator.py's task; the model itself: tiny.SIZES["tools"]).

The tokenizer is Qwen 2.5's kind, built locally: a byte-level BPE with digits split one per token
(Qwen's pre-tokenizer does so: a number is copied digit by digit, whatever surrounds it), trained
on the rendered pre-training conversations and calculator transcripts; `<|endoftext|>` (the pad),
`<|im_start|>` and `<|im_end|>` (the EOS, as in Qwen's instruct checkpoints) special;
`<tool_call>`, `</tool_call>`, `<tool_response>` and `</tool_response>` added as ordinary tokens,
as Qwen's tokenizer.json has them; no BOS. The chat template is Qwen 2.5's
(templates/qwen2_5.jinja; only the default system prompt shortened): the tools' JSON schemas in
the system message, calls as `<tool_call>` JSON, results as a user turn of `<tool_response>`
blocks.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.utils import get_json_schema
from transformers.utils.chat_template_utils import render_jinja_template

from lora_ppo.builtin import calculator
from lora_ppo.errors import UserError

TEMPLATE = (Path(__file__).parent / "templates" / "qwen2_5.jinja").read_text()
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
LOOKUP_SHARE = 0.5  # of the pre-training conversations: calls of `lookup`, the other tool
LOOKUPS = ("What is the code of item {i}?", "Find the code of item {i}.")


def render(conversations: list[list[dict]], tools: list[dict] | None = None) -> list[str]:
    """The template's rendering of whole conversations (no tokenizer needed)."""
    return [render_jinja_template(conversations=[c], tools=tools, chat_template=TEMPLATE)[0][0]
            for c in conversations]


def lookup(item: str) -> str:
    """Look up the code of an item.

    Args:
        item: The item's number, e.g. 4821.
    """
    return str(int(item) * 7919 % 1000003)  # any function of the item: only pre-training reads it


def lookup_transcripts(n: int, seed: int = 0) -> list[list[dict]]:
    """`n` conversations that call another tool, `lookup` (an item's code): what teaches the base
    model the tool-call format, putting digits into a call's JSON and reading a tool's result
    into the answer, without teaching it to call the calculator for arithmetic."""
    rng = random.Random(seed + 2)
    out = []
    for _ in range(n):
        item = str(rng.randint(10, 99999))
        code = str(rng.randint(10, 999999))
        call = {"type": "function", "function": {"name": "lookup", "arguments": {"item": item}}}
        out.append([{"role": "user", "content": rng.choice(LOOKUPS).format(i=item)},
                    {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "name": "lookup", "content": code},
                    {"role": "assistant", "content": calculator.ANSWER.format(c=code)}])
    return out


def lookup_schemas() -> list[dict]:
    return [get_json_schema(lookup)]


def pretraining_texts(n: int, seed: int) -> list[str]:
    """`n` rendered conversations: in LOOKUP_SHARE of them the `lookup` tool is called (its
    schema in the system prompt), the rest are `calculator.chat_corpus` (no tools)."""
    n_lookup = round(n * LOOKUP_SHARE)
    texts = (render(calculator.chat_corpus(n - n_lookup, seed=seed))
             + render(lookup_transcripts(n_lookup, seed=seed), lookup_schemas()))
    random.Random(seed).shuffle(texts)
    return texts


def tokenizer_texts(n: int = 2000, seed: int = 0) -> list[str]:
    """What the BPE is trained on: the pre-training conversations and calculator transcripts,
    rendered (so the tools' system prompt costs few tokens). Tokens made for the transcripts
    alone (`calculate`, `expression`) are never seen in pre-training: their logits start far
    down (~18 nats), and SFT has to raise them (3+ epochs at lr 3e-3 do)."""
    tools = [r["messages"] for r in calculator.transcripts(n // 4, seed=seed + 1)]
    return pretraining_texts(n, seed) + render(tools, calculator.tool_schemas())


def build_chat_tokenizer(texts: list[str], vocab_size: int = 768) -> PreTrainedTokenizerFast:
    """A Qwen 2.5-style tokenizer (module doc) trained on `texts`; decode(encode(x)) == x."""
    n_reserved = 256 + 3 + len(TOOL_TOKENS)
    if vocab_size <= n_reserved:
        raise UserError(f"vocab_size={vocab_size} is too small for a byte-level BPE with chat "
                        f"tokens; use more than {n_reserved}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TOOL_TOKENS), special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
                                  chat_template=TEMPLATE, model_max_length=4096)
    out.add_tokens(list(TOOL_TOKENS))
    return out


def chat_stream(tokenizer, n: int, seed: int) -> torch.Tensor:
    """The pre-training stream: `n` conversations of `pretraining_texts`, rendered and
    concatenated into one 1-D LongTensor (each ends with "<|im_end|>\\n"; the next starts with
    its system turn)."""
    ids = tokenizer(pretraining_texts(n, seed), add_special_tokens=False).input_ids
    return torch.tensor([t for row in ids for t in row], dtype=torch.long)
