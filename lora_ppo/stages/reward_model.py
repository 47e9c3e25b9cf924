"""Reward model, RLHF stage 2: a LoRA adapter plus a scalar score head on the same base.

    r(x, y) = head(h(x ++ y)[last real token])                     (B,)
    loss    = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - m)

the Bradley-Terry preference loss (InstructGPT, Ouyang et al. 2022, eq. 1) with an optional
margin m (Llama 2, Touvron et al. 2023, eq. 2). The score is read at the last real token, the
same position PPO's `reward.source=adapter` reads (ActorCritic.score), with positions that skip
padding as in the rollout, so the saved adapter scores a PPO response as it scored the pair.

Output `<output_dir>/reward_adapter/`: the PEFT adapter files plus `score_head.safetensors`
(`weight` (1, H), `bias` (1,)), the layout `reward.adapter` loads as the frozen `reward` adapter.

Logged per step and on the held-out pairs (`eval/` prefix): `loss`, `accuracy` (share of pairs
with r_chosen > r_rejected), `reward/chosen`, `reward/rejected` (means), `reward/margin`
(mean r_chosen - r_rejected), `reward/mean` and `reward/std` over both responses.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lora_ppo.config import Config
from lora_ppo.errors import UserError
from lora_ppo.io.data import read_table, require_columns, require_text, require_values, shown
from lora_ppo.modeling.heads import REWARD_HEAD_FILE, ScalarHead
from lora_ppo.modeling.packing import position_ids_from_mask
from lora_ppo.rl.rewards import last_token_index
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


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float
                       = 0.0) -> torch.Tensor:
    """-log sigmoid(chosen - rejected - margin); chosen, rejected: (B,) -> (B,).

    logsigmoid rather than log(sigmoid(.)) so a large negative difference does not give log(0).
    """
    return -F.logsigmoid(chosen - rejected - margin)


class RewardModel(nn.Module):
    """The peft model with one trainable adapter, plus the score head; what the engine trains."""

    def __init__(self, peft_model: nn.Module, head: ScalarHead):
        super().__init__()
        self.peft_model, self.head = peft_model, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores (B,) fp32 at the last real token of each (B, L) row."""
        decoder = self.peft_model.get_base_model().get_decoder()
        h = decoder(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask),
                    use_cache=False).last_hidden_state
        rows = torch.arange(h.shape[0], device=h.device)
        return self.head(h[rows, last_token_index(attention_mask)])


class Pair(NamedTuple):
    chosen: list[int]    # prompt + chosen response ids
    rejected: list[int]  # prompt + rejected response ids
    margin: float


def read_pairs(spec: str, sec, field: str) -> list[dict]:
    """Rows {"prompt", "chosen", "rejected", "margin", "implicit"} in TRL's preference formats:
    an explicit prompt column, or (data without one) the prompt implicit in both responses,
    their shared beginning (`split_shared_prompt`); strings or conversations."""
    rows = read_table(spec, field)
    where = f"{field}={shown(spec)}"
    implicit = sec.prompt_column not in rows[0]
    names = ([] if implicit else ["prompt_column"]) + ["chosen_column", "rejected_column"] + (
        ["margin_column"] if sec.margin_column else [])
    columns = {getattr(sec, n): f"reward_model.{n}" for n in names}
    require_columns(rows, columns, where)
    require_values(rows, columns, where)
    out = []
    for i, r in enumerate(rows):
        m = float(r[sec.margin_column]) if sec.margin_column else sec.margin
        if not math.isfinite(m):
            raise UserError(f"{where}: margin {m} in column {sec.margin_column!r} is not "
                            "finite; fix the data")
        for c in columns:
            if c != sec.margin_column:
                require_text(r[c], where, f"row {i}'s value in column {c!r}")
        chosen, rejected = r[sec.chosen_column], r[sec.rejected_column]
        if implicit:
            prompt, chosen, rejected = split_shared_prompt(chosen, rejected, where, i)
        else:
            prompt = r[sec.prompt_column]
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": m,
                    "implicit": implicit})
    return out


def split_shared_prompt(chosen, rejected, where: str, i: int) -> tuple:
    """(prompt, chosen, rejected) of a pair whose prompt is implicit: the beginning both share
    (TRL's `extract_prompt`). Conversations part at the first message that differs, and both
    responses must begin with an assistant message there. Strings part at the last whitespace
    before the first character that differs, that whitespace going to the responses, so each
    response starts at a word, as the policy's responses start after a prompt (TRL moves one
    space back only, and can part them inside a word)."""
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise UserError(f"{where}: row {i}'s chosen and rejected are not both strings or both "
                        "conversations; give one kind")
    n = next((k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
             min(len(chosen), len(rejected)))
    if isinstance(chosen, str):
        cut = max((k for k in range(n) if chosen[k].isspace()), default=0)
        while cut and chosen[cut - 1].isspace():  # the whole run of whitespace ("\n\n")
            cut -= 1
        return chosen[:cut], chosen[cut:], rejected[cut:]
    if n == 0 or not all(len(x) > n and x[n]["role"] == "assistant" for x in (chosen, rejected)):
        raise UserError(f"{where}: row {i}'s chosen and rejected conversations do not share the "
                        "messages before an assistant message of each, which would be the "
                        "prompt; give a prompt column, or pairs that part at the assistant's reply")
    return chosen[:n], chosen[n:], rejected[n:]


def encode_pairs(tokenizer, rows: list[dict], sec, max_prompt_length: int) -> list[Pair]:
    check_conversations(tokenizer, rows, ("prompt", "chosen", "rejected"), "reward_model.data")
    out = []
    for row in rows:
        seqs = []
        for key in ("chosen", "rejected"):
            p, r = encode_pair(tokenizer, row["prompt"], row[key], chat_template=sec.chat_template,
                               append_eos=sec.append_eos, max_prompt_length=max_prompt_length,
                               max_length=sec.train.max_length)
            seqs.append(p + r)
        out.append(Pair(seqs[0], seqs[1], row["margin"]))
    return out


def collate_pairs(pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, mask (2B, L), right-padded: the B chosen sequences, then the B rejected ones, so
    both responses of a pair go through one forward."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def pair_scores(model, pairs: list[Pair], pad_id: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen (B,), r_rejected (B,)); `model` is the RewardModel or, to train, its engine."""
    ids, mask = collate_pairs(pairs, pad_id)
    r = model(ids.to(device), mask.to(device))
    return r[:len(pairs)], r[len(pairs):]


def stat_sums(chosen: torch.Tensor, rejected: torch.Tensor, losses: torch.Tensor) -> list[float]:
    """Sums that add up over micro-batches and ranks: n, correct, loss, r_c, r_r, r_c^2, r_r^2."""
    c, r = chosen.detach().double(), rejected.detach().double()
    return [float(len(c)), (c > r).sum().item(), losses.detach().double().sum().item(),
            c.sum().item(), r.sum().item(), c.pow(2).sum().item(), r.pow(2).sum().item()]


def metrics_from_sums(s: list[float], prefix: str = "") -> dict:
    n, correct, loss, sc, sr, qc, qr = s
    mean = (sc + sr) / (2 * n)
    var = max((qc + qr) / (2 * n) - mean * mean, 0.0)
    return {f"{prefix}loss": loss / n, f"{prefix}accuracy": correct / n,
            f"{prefix}reward/chosen": sc / n, f"{prefix}reward/rejected": sr / n,
            f"{prefix}reward/margin": (sc - sr) / n, f"{prefix}reward/mean": mean,
            f"{prefix}reward/std": math.sqrt(var)}


def write_reward_adapter(model: RewardModel, out: Path) -> None:
    """The PEFT adapter files and score_head.safetensors (weight (1, H), bias (1,)) into `out`."""
    from safetensors.torch import save_file

    write_peft_adapter(model.peft_model, out)
    head = {k: v.detach().float().cpu().contiguous()
            for k, v in model.head.linear.state_dict().items()}
    save_file(head, str(out / REWARD_HEAD_FILE))


def train_reward(cfg: Config, resume: Optional[str] = None, overwrite: bool = False, *,
                 dataset=None, eval_dataset=None) -> Path:
    """Train the reward adapter; returns its directory. `resume`: "latest" or a checkpoint;
    `overwrite`: replace an earlier reward-model run in output_dir (else it is refused);
    `dataset` / `eval_dataset`: rows in memory in place of reward_model.data / eval.data."""
    sec = cfg.reward_model
    st, train_rows, eval_rows = setup_stage(cfg, "reward_model",
                                            lambda spec, field: read_pairs(spec, sec, field),
                                            resume, overwrite, dataset, eval_dataset)
    tok, n_prompt = st.tokenizer, cfg.model.max_prompt_length
    if st.dist.rank == 0 and any(r["implicit"] for r in train_rows + eval_rows):
        print(f"reward_model: no column {sec.prompt_column!r}: each pair's prompt is the "
              "beginning its chosen and rejected responses share (TRL's implicit prompt)",
              flush=True)
    train = encode_pairs(tok, train_rows, sec, n_prompt)
    evals = encode_pairs(tok, eval_rows, sec, n_prompt) if eval_rows else []
    peft_model = load_stage_model(st, sec.init_adapter, "reward_model.init_adapter")
    hidden = peft_model.get_base_model().config.hidden_size
    head = ScalarHead(hidden, sec.head_init_std).to(st.dist.device)
    model = RewardModel(peft_model, head)
    start_training(st, model, len(train))
    micro = sec.train.micro_batch_size

    def train_step(idx: list[int]) -> dict:
        model.train()
        sums = [0.0] * 7
        for s in range(0, len(idx), micro):
            pairs = [train[i] for i in idx[s:s + micro]]
            # Through the engine: ZeRO-3 counts its micro-steps in engine.forward (update.py).
            r_chosen, r_rejected = pair_scores(st.engine, pairs, tok.pad_token_id,
                                               st.dist.device)
            margin = torch.tensor([p.margin for p in pairs], device=r_chosen.device)
            losses = bradley_terry_loss(r_chosen, r_rejected, margin)
            st.engine.backward(losses.mean())  # DeepSpeed divides by the accumulation steps
            st.engine.step()
            sums = [a + b for a, b in zip(sums, stat_sums(r_chosen, r_rejected, losses))]
        n_tok = float(sum(len(train[i].chosen) + len(train[i].rejected) for i in idx))
        *sums, n_tok = all_sum(sums + [n_tok])
        return {**metrics_from_sums(sums), "tokens/all": n_tok}

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        shard = evals[st.dist.rank::st.dist.world_size]
        sums = [0.0] * 7
        for s in range(0, len(shard), micro):
            pairs = shard[s:s + micro]
            r_chosen, r_rejected = pair_scores(model, pairs, tok.pad_token_id, st.dist.device)
            margin = torch.tensor([p.margin for p in pairs], device=r_chosen.device)
            losses = bradley_terry_loss(r_chosen, r_rejected, margin)
            sums = [a + b for a, b in zip(sums, stat_sums(r_chosen, r_rejected, losses))]
        return metrics_from_sums(all_sum(sums), "eval/")

    fit(st, len(train), train_step, evaluate if evals else None,
        lambda out: write_reward_adapter(model, out),
        bar_keys=(("loss", "loss"), ("accuracy", "acc"), ("eval/accuracy", "eval")))
    return Path(cfg.output_dir) / "reward_adapter"
