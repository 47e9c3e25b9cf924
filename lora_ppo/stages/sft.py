"""Supervised fine-tuning, RLHF stage 1: a LoRA adapter on prompt/response pairs.

    loss = - sum_{t in response} log p(x_t | x_<t)  /  (response tokens in the batch)

The loss covers response tokens only (InstructGPT, Ouyang et al. 2022, sec. 3.5; TRL's SFTTrainer
`completion_only_loss`): the prompt is context, not something the model should learn to write.
A tool-calling transcript (a conversation with tool calls and tool messages) trains every
assistant turn, its calls and its answer, and nothing else (lora_ppo/agents/transcripts.py).
Its output, `<output_dir>/adapter/`, is a plain PEFT adapter dir; PPO starts from it with
`model.init_adapter`, and it then also is PPO's frozen reference (actor_critic.py).

Packing (`sft.packing`) puts several whole examples into one row (first-fit decreasing, the
packer of modeling/packing.py). Each keeps its own positions (0, 1, ...) and the explicit mask PPO's
packed rows use stops it attending to its neighbours (a sliding window and masks by layer type
included: Mistral, Gemma 2/3), so the packed
loss equals the unpacked one (tests/stages/test_sft.py checks it) while fewer tokens are padding.

Logged per optimizer step (<output_dir>/sft/metrics.jsonl): `loss` (the formula above over the
batches of all ranks), `tokens/response` (its denominator), `tokens_per_s` (all tokens, prompts
included, over the step's time), `lr`, `epoch`, `time/step_s`, `memory/peak_mib`; at eval steps
`eval/loss`, the same mean over the held-out examples.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from lora_ppo.agents.render import check_template
from lora_ppo.agents.tools import config_schemas
from lora_ppo.agents.transcripts import encode_transcript, row_tools, transcript_row
from lora_ppo.config import Config
from lora_ppo.errors import UserError
from lora_ppo.io.data import read_table, require_columns, require_text, require_values, shown
from lora_ppo.modeling.heads import frozen_weight, logits_transform
from lora_ppo.modeling.packing import (
    Attention,
    explicit_attentions,
    first_fit,
    mask_for,
    mask_to,
    position_ids_from_mask,
)
from lora_ppo.rl.logprobs import chunk_rows, logprobs_and_entropy_from_hidden
from lora_ppo.runtime.dist import all_sum
from lora_ppo.stages.common import (
    check_conversations,
    encode_pair,
    fit,
    load_stage_model,
    setup_stage,
    start_training,
    write_peft_adapter,
)

log = logging.getLogger(__name__)


class Example(NamedTuple):
    ids: list[int]        # prompt + response token ids
    loss_mask: list[int]  # 1 where the token is a response token the loss covers


class Batch(NamedTuple):
    input_ids: torch.Tensor       # (B, L) long, right-padded
    attention_mask: torch.Tensor | dict  # (B, L) long; packed: (B, 1, L, L) or {layer type: ...}
    position_ids: torch.Tensor    # (B, L) long, restarting at 0 for every packed example
    loss_mask: torch.Tensor       # (B, L) float, 1 on response tokens


def read_pairs(spec: str, sec, field: str) -> list[dict]:
    """Rows {"prompt", "response"}: the prompt and response columns (strings or conversations),
    or, in data without the prompt column, the conversations of the messages column, each split
    before its last message (`split_conversation`)."""
    rows = read_table(spec, field)
    where = f"{field}={shown(spec)}"
    if sec.prompt_column not in rows[0] and sec.messages_column in rows[0]:
        require_values(rows, [sec.messages_column], where)
        # a conversation with tool calls trains every assistant turn (agents/transcripts.py)
        return [transcript_row(None, r[sec.messages_column], r, f"{where}: row {i}")
                or split_conversation(r[sec.messages_column], where,
                                      f"row {i}'s conversation in column {sec.messages_column!r}")
                for i, r in enumerate(rows)]
    if sec.prompt_column not in rows[0]:
        raise UserError(f"{where} has no column {sec.prompt_column!r} (columns: "
                        f"{', '.join(rows[0])}); set sft.prompt_column to one of them, or "
                        "sft.messages_column to a column of whole conversations")
    columns = {sec.prompt_column: "sft.prompt_column", sec.response_column: "sft.response_column"}
    require_columns(rows, columns, where)
    require_values(rows, columns, where)
    for i, r in enumerate(rows):
        for c in columns:
            require_text(r[c], where, f"row {i}'s value in column {c!r}")
    return [transcript_row(r[sec.prompt_column], r[sec.response_column], r, f"{where}: row {i}")
            or {"prompt": r[sec.prompt_column], "response": r[sec.response_column]}
            for i, r in enumerate(rows)]


def split_conversation(messages, where: str, what: str) -> dict:
    """{"prompt": the messages before the last, "response": [the last]}: SFT on a whole
    conversation trains on its last assistant turn, the earlier turns its context (TRL trains on
    every token of it, or with `assistant_only_loss` on every assistant turn)."""
    require_text(messages, where, what)
    if isinstance(messages, str) or messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise UserError(f"{where}: {what} does not end with an assistant message after at least "
                        "one other message; SFT trains on the last assistant message, in the "
                        "context of those before it")
    return {"prompt": messages[:-1], "response": messages[-1:]}


def encode_examples(tokenizer, rows: list[dict], sec, max_prompt_length: int,
                    tools: Optional[list[dict]] = None) -> list[Example]:
    """Token ids and loss masks; examples whose response is cut away entirely are dropped.
    A tool transcript (a row with "messages") trains every assistant turn of its response,
    with the tools' schemas of its row, else `tools` (rollout.tools / rollout.environment)."""
    check_conversations(tokenizer, [r for r in rows if "messages" not in r],
                        ("prompt", "response"), "sft.data")
    if any("messages" in r for r in rows):
        check_template(tokenizer)
    out = []
    for row in rows:
        if "messages" in row:
            ids, mask = encode_transcript(
                tokenizer, row["messages"], row_tools(row["tools"], tools, row["where"]),
                max_prompt_length=max_prompt_length, max_length=sec.train.max_length,
                where=row["where"], train_from=row["train_from"])
        else:
            p, r = encode_pair(tokenizer, row["prompt"], row["response"],
                               chat_template=sec.chat_template, append_eos=sec.append_eos,
                               max_prompt_length=max_prompt_length,
                               max_length=sec.train.max_length)
            ids, mask = p + r, [0] * len(p) + [1] * len(r)
        if mask:
            mask[0] = 0  # the first token has no context to be predicted from (nor, packed, any)
        if sum(mask):
            out.append(Example(ids, mask))
    if len(out) < len(rows):
        log.warning("sft: %d of %d examples have no response token left after cutting to "
                    "sft.train.max_length and were dropped", len(rows) - len(out), len(rows))
    if not out:
        raise UserError("sft: no example has a response token; check sft.response_column and "
                        "sft.train.max_length")
    return out


def collate(rows: list[list[Example]], pad_id: int,
            attention: Optional[Attention] = None) -> Batch:
    """Rows of one or (packed, `attention` given) several examples -> a right-padded Batch.

    Packed, each example keeps its own positions and attends only to itself, through the
    explicit mask of modeling/packing.py (a sliding window and masks by layer type included),
    the one PPO's packed rows use; unpacked, a 2-D mask and positions that skip nothing."""
    width = max(sum(len(e.ids) for e in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    pos = torch.zeros((B, width), dtype=torch.long)
    unit = -1 - torch.arange(B * width).view(B, width)  # padding: a unit of its own, seen by none
    loss = torch.zeros((B, width))
    for b, row in enumerate(rows):
        at = 0
        for s, e in enumerate(row):
            n = len(e.ids)
            ids[b, at:at + n] = torch.tensor(e.ids)
            loss[b, at:at + n] = torch.tensor(e.loss_mask, dtype=torch.float)
            pos[b, at:at + n] = torch.arange(n)
            mask[b, at:at + n] = 1
            unit[b, at:at + n] = s
            at += n
    if attention is None:
        return Batch(ids, mask, position_ids_from_mask(mask), loss)
    return Batch(ids, mask_for(unit, torch.zeros_like(unit), pos, attention), pos, loss)


def sft_loss_sums(peft_model, batch: Batch, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p over the response tokens, their count) of one micro-batch.

    The hidden state at t predicts token t+1, so states 0..L-2 score tokens 1..L-1; logits are
    made chunk by chunk (lora_ppo.rl.logprobs), never as one (B, L, V) tensor.
    """
    lm = peft_model.get_base_model()
    device = lm.get_input_embeddings().weight.device
    b = Batch(*(mask_to(t, device) for t in batch))
    h = lm.get_decoder()(input_ids=b.input_ids, attention_mask=b.attention_mask,
                         position_ids=b.position_ids, use_cache=False).last_hidden_state
    # the model's own distribution: what its forward does after the head (modeling/heads.py)
    head = lm.get_output_embeddings()
    logprobs, _ = logprobs_and_entropy_from_hidden(
        h[:, :-1], head, b.input_ids[:, 1:], chunk_size=chunk_size, with_entropy=False,
        transform=logits_transform(lm.config), frozen_weight=frozen_weight(head))
    m = b.loss_mask[:, 1:]
    return -(logprobs * m).sum(), m.sum()


class SFTModel(torch.nn.Module):
    """The peft model whose forward is `sft_loss_sums` of a batch: what the DeepSpeed engine
    wraps, so every training forward goes through `engine(...)` (ZeRO-3 counts its micro-steps
    there; see lora_ppo/ppo/update.py)."""

    def __init__(self, peft_model: torch.nn.Module, chunk_size: int):
        super().__init__()
        self.peft_model, self.chunk_size = peft_model, chunk_size

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return sft_loss_sums(self.peft_model, batch, self.chunk_size)


def make_rows(examples: list[Example], packed: bool, max_length: int) -> list[list[Example]]:
    if not packed:
        return [[e] for e in examples]
    return [[examples[i] for i in row]
            for row in first_fit([len(e.ids) for e in examples], max_length)]


def train_sft(cfg: Config, resume: Optional[str] = None, overwrite: bool = False, *,
              dataset=None, eval_dataset=None) -> Path:
    """Run SFT; returns the output adapter directory. `resume`: "latest" or a checkpoint path;
    `overwrite`: replace an earlier SFT run in output_dir (else it is refused); `dataset` /
    `eval_dataset`: rows in memory in place of sft.data / sft.eval.data (lora_ppo.api)."""
    sec = cfg.sft
    st, train_rows, eval_rows = setup_stage(cfg, "sft",
                                            lambda spec, field: read_pairs(spec, sec, field),
                                            resume, overwrite, dataset, eval_dataset)
    tok, n_prompt, max_len = st.tokenizer, cfg.model.max_prompt_length, sec.train.max_length
    tools = config_schemas(cfg.rollout)  # tool transcripts without a tools column use these
    train = make_rows(encode_examples(tok, train_rows, sec, n_prompt, tools), sec.packing,
                      max_len)
    evals = make_rows(encode_examples(tok, eval_rows, sec, n_prompt, tools), sec.packing,
                      max_len) if eval_rows else []
    peft_model = load_stage_model(st)
    lm = peft_model.get_base_model()
    attention = None
    if sec.packing:
        masks = explicit_attentions(lm.config, lm.get_input_embeddings().weight.dtype)
        if not masks:
            raise UserError(f"sft.packing needs sdpa or eager attention, the model uses "
                            f"{lm.config._attn_implementation}; set sft.packing=false")
        attention = masks[0]
    chunk = chunk_rows(lm.get_output_embeddings().out_features, cfg.model.logits_chunk_mib)
    start_training(st, SFTModel(peft_model, chunk), len(train))
    micro, accum = sec.train.micro_batch_size, sec.train.batch_size // sec.train.micro_batch_size

    def batches(rows: list[list[Example]]):
        for s in range(0, len(rows), micro):
            yield collate(rows[s:s + micro], tok.pad_token_id, attention)

    def train_step(idx: list[int]) -> dict:
        rows = [train[i] for i in idx]
        tokens = sum(sum(e.loss_mask) for row in rows for e in row)
        peft_model.train()
        loss_sum, n_tok = 0.0, 0.0
        for b in batches(rows):
            s, n = st.engine(b)
            # Token mean over the whole batch: DeepSpeed divides by accum again (update.py).
            st.engine.backward(s / (tokens / accum))
            st.engine.step()
            loss_sum, n_tok = loss_sum + s.item(), n_tok + n.item()
        n_all = sum(len(e.ids) for row in rows for e in row)
        loss_sum, n_tok, n_all = all_sum([loss_sum, n_tok, float(n_all)])
        return {"loss": loss_sum / n_tok, "tokens/response": n_tok, "tokens/all": n_all}

    @torch.no_grad()
    def evaluate() -> dict:
        peft_model.eval()
        shard = evals[st.dist.rank::st.dist.world_size]
        sums = [0.0, 0.0]
        for b in (batches(shard) if shard else []):
            s, n = sft_loss_sums(peft_model, b, chunk)
            sums = [sums[0] + s.item(), sums[1] + n.item()]
        loss_sum, n_tok = all_sum(sums)
        return {"eval/loss": loss_sum / max(n_tok, 1.0)}

    fit(st, len(train), train_step, evaluate if evals else None,
        lambda out: write_peft_adapter(peft_model, out),
        bar_keys=(("loss", "loss"), ("eval/loss", "eval")))
    return Path(cfg.output_dir) / "adapter"
