"""The tokenizer and pre-training text of the built-in `tools` model: a Qwen 2.5-style chat model
that can call tools (builtin/calculator.py's task; the model itself: tiny.SIZES["tools"]).

The tokenizer is Qwen 2.5's kind, built locally: a byte-level BPE with digits split one per token
(Qwen's pre-tokenizer does so: a number is copied digit by digit, whatever surrounds it), trained
on the task's rendered conversations; `<|endoftext|>` (the pad), `<|im_start|>` and `<|im_end|>`
(the EOS, as in Qwen's instruct checkpoints) special; `<tool_call>`, `</tool_call>`,
`<tool_response>` and `</tool_response>` added as ordinary tokens, as Qwen's tokenizer.json has
them; no BOS. The chat template is Qwen 2.5's (templates/qwen2_5.jinja; only the default system
prompt shortened): the tools' JSON schemas in the system message, calls as `<tool_call>` JSON,
results as a user turn of `<tool_response>` blocks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import render_jinja_template

from lora_ppo.builtin import calculator
from lora_ppo.errors import UserError

TEMPLATE = (Path(__file__).parent / "templates" / "qwen2_5.jinja").read_text()
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")


def render(conversations: list[list[dict]], tools: list[dict] | None = None) -> list[str]:
    """The template's rendering of whole conversations (no tokenizer needed)."""
    return [render_jinja_template(conversations=[c], tools=tools, chat_template=TEMPLATE)[0][0]
            for c in conversations]


def tokenizer_texts(n: int = 2000, seed: int = 0) -> list[str]:
    """What the BPE is trained on: the pre-training conversations and tool transcripts of the
    task, rendered (so the tools' system prompt costs few tokens)."""
    chats = calculator.chat_corpus(n, seed=seed)
    tools = [r["messages"] for r in calculator.transcripts(n // 4, seed=seed + 1)]
    return render(chats) + render(tools, calculator.tool_schemas())


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
    """The pre-training stream: `n` conversations of `calculator.chat_corpus`, rendered and
    concatenated into one 1-D LongTensor (each ends with "<|im_end|>\\n"; the next starts with
    its system turn)."""
    texts = render(calculator.chat_corpus(n, seed=seed))
    ids = tokenizer(texts, add_special_tokens=False).input_ids
    return torch.tensor([t for row in ids for t in row], dtype=torch.long)
