"""Reward model: the Bradley-Terry math by hand, and a real train_reward run whose saved adapter,
loaded as PPO's `reward.source=adapter`, scores the held-out pairs as the trained model did."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import make_adapter_dir, tiny_config

from lora_ppo.generation.samples import left_pad
from lora_ppo.io.data import hold_out
from lora_ppo.modeling.actor_critic import build_actor_critic
from lora_ppo.modeling.loading import load_base_model, load_tokenizer
from lora_ppo.modeling.roles import REWARD
from lora_ppo.ppo.reward_sources import AdapterReward
from lora_ppo.stages.common import encode_pair
from lora_ppo.stages.reward_model import (
    Pair,
    bradley_terry_loss,
    collate_pairs,
    metrics_from_sums,
    read_pairs,
    stat_sums,
    train_reward,
)

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("restore_env")  # it trains in this process


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([1.0, 2.0, 1.0])
    # differences 0, -2, 2: -log sigmoid(d) = log(1 + e^-d) = log 2, log(1 + e^2), log(1 + e^-2)
    expected = torch.tensor([math.log(2), math.log(1 + math.e ** 2), math.log(1 + math.e ** -2)])
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), expected)
    # margin 1 on the last pair: d - m = 1 -> log(1 + e^-1) = 0.3133
    margin = torch.tensor([0.0, 0.0, 1.0])
    assert bradley_terry_loss(chosen, rejected, margin)[2].item() == pytest.approx(0.313262, 1e-5)
    # A hopeless pair stays finite (logsigmoid, not log(sigmoid)): -log sigmoid(-200) = 200.
    assert bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0])).item() == 200.0


def test_metrics_from_sums_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    losses = bradley_terry_loss(chosen, rejected)
    m = metrics_from_sums(stat_sums(chosen, rejected, losses), "eval/")
    # Pair 1 right (2 > 1), pair 2 wrong (0 < 1); scores {2, 0, 1, 1}: mean 1, var (1+1+0+0)/4.
    assert m["eval/accuracy"] == 0.5
    assert m["eval/reward/chosen"] == 1.0 and m["eval/reward/rejected"] == 1.0
    assert m["eval/reward/margin"] == 0.0 and m["eval/reward/mean"] == 1.0
    assert m["eval/reward/std"] == pytest.approx(math.sqrt(0.5))
    assert m["eval/loss"] == pytest.approx(losses.mean().item())


def test_collate_pairs_puts_chosen_then_rejected_right_padded():
    ids, mask = collate_pairs([Pair([1, 5, 6], [1, 7], 0.0), Pair([1, 8], [1, 9, 9, 9], 0.0)], 0)
    assert ids.tolist() == [[1, 5, 6, 0], [1, 8, 0, 0], [1, 7, 0, 0], [1, 9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def _rm_config(model_dir, out, *extra):
    return tiny_config(model_dir, out, "reward_model.train.max_steps=30", "reward_model.train.batch_size=16",
                       "reward_model.train.micro_batch_size=16", "reward_model.eval.size=64",
                       "reward_model.optim.learning_rate=0.003", "reward_model.train.max_length=64",
                       "lora.r=8", "lora.alpha=16", *extra)


def _base_storages(module):
    return {p.untyped_storage().data_ptr() for n, p in module.named_parameters()
            if "lora_" not in n and "head.linear" not in n}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    cfg = _rm_config(tiny_model_dir, out)
    return cfg, train_reward(cfg)


@pytest.mark.integration
def test_reward_model_learns_the_preference_and_writes_the_adapter_layout(trained):
    from safetensors.torch import load_file

    cfg, out = trained
    rows = [json.loads(ln) for ln in (out.parent / "reward_model" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    last = rows[-1]
    # Chosen and rejected differ only in sentiment words; 64 held-out pairs, 30 steps.
    assert last["eval/accuracy"] >= 0.9, last
    assert last["eval/reward/margin"] > 0 and last["eval/loss"] < math.log(2)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=0.05)  # untrained: r_c ~ r_r
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                     "adapter_model.safetensors",
                                                     "score_head.safetensors"]
    head = load_file(str(out / "score_head.safetensors"))
    assert {k: tuple(v.shape) for k, v in head.items()} == {"weight": (1, 64), "bias": (1,)}


@pytest.mark.integration
def test_saved_adapter_as_ppo_reward_source_gives_the_trained_scores(trained, tiny_model_dir,
                                                                     tmp_path):
    cfg, out = trained
    rows = [json.loads(ln) for ln in (out.parent / "reward_model" / "metrics.jsonl").open()]
    logged = rows[-1]
    ppo_cfg = tiny_config(tiny_model_dir, tmp_path, "reward.source=adapter",
                          f"reward.adapter={out}")
    plain = load_base_model(ppo_cfg, str(tiny_model_dir), CPU)
    n_plain, numel_plain = len(_base_storages(plain)), sum(p.numel() for p in plain.parameters())
    del plain
    ac = build_actor_critic(ppo_cfg, load_base_model(ppo_cfg, str(tiny_model_dir), CPU))
    # One copy of the base with the reward adapter attached: same tensors, same element count.
    assert REWARD in ac.adapters()
    assert len(_base_storages(ac)) == n_plain
    assert sum(p.numel() for n, p in ac.named_parameters()
               if "lora_" not in n and "head.linear" not in n) == numel_plain

    # The held-out pairs of the run, laid out as a PPO rollout: left-padded prompts, right-padded
    # responses (EOS last, as a finished response).
    sec, tok = cfg.reward_model, load_tokenizer(cfg.model, str(tiny_model_dir))
    _, held_out = hold_out(read_pairs(sec.data, sec, "x"), None, sec.eval.size, cfg.seed, "x")
    scores = {}
    for key in ("chosen", "rejected"):
        enc = [encode_pair(tok, r["prompt"], r[key], chat_template=False, append_eos=True,
                           max_prompt_length=cfg.model.max_prompt_length,
                           max_length=sec.train.max_length) for r in held_out]
        q_ids, q_mask = left_pad([p for p, _ in enc], tok.pad_token_id)
        width = max(len(r) for _, r in enc)
        r_ids = torch.full((len(enc), width), tok.pad_token_id)
        r_mask = torch.zeros((len(enc), width))
        for i, (_, r) in enumerate(enc):
            r_ids[i, :len(r)], r_mask[i, :len(r)] = torch.tensor(r), 1.0
        tensors = {"query_ids": q_ids, "query_mask": q_mask, "response_ids": r_ids,
                   "response_mask": r_mask}
        scores[key] = AdapterReward(ac, generation_batch_size=16)([""] * len(enc), [""] * len(enc), tensors)
    accuracy = (scores["chosen"] > scores["rejected"]).float().mean().item()
    assert accuracy == logged["eval/accuracy"]
    assert scores["chosen"].mean().item() == pytest.approx(logged["eval/reward/chosen"], abs=1e-4)
    assert scores["rejected"].mean().item() == pytest.approx(logged["eval/reward/rejected"],
                                                              abs=1e-4)


@pytest.mark.integration
def test_reward_adapter_can_start_from_the_sft_adapter(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    sft = make_adapter_dir(tiny_model_dir, tmp_path / "sft", seed=3)  # r=4, unlike lora.r=8
    cfg = _rm_config(tiny_model_dir, tmp_path / "out", f"reward_model.init_adapter={sft}",
                     "reward_model.train.max_steps=1", "reward_model.eval.size=0")
    out = train_reward(cfg)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    start = load_file(str(sft / "adapter_model.safetensors"))
    end = load_file(str(out / "adapter_model.safetensors"))
    assert start.keys() == end.keys()
    # One step of AdamW (lr 0.003) moves each weight by about lr, from the SFT weights.
    assert all((end[k] - start[k]).abs().max() < 0.01 for k in start)
    assert any(not torch.equal(end[k], start[k]) for k in start)


def test_pairs_from_a_file_and_a_missing_column_names_its_field(tmp_path):
    from lora_ppo.config.load import load_config
    from lora_ppo.errors import UserError
    from lora_ppo.stages.reward_model import read_pairs

    rows = [{"q": "p1", "good": "a", "bad": "b", "m": 0.5}, {"q": "p2", "good": "c", "bad": "d",
                                                             "m": 1.0}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sec = load_config(None, ["reward_model.prompt_column=q", "reward_model.chosen_column=good",
                             "reward_model.rejected_column=bad",
                             "reward_model.margin_column=m"]).reward_model
    assert read_pairs(str(path), sec, "reward_model.data") == [
        {"prompt": "p1", "chosen": "a", "rejected": "b", "margin": 0.5, "implicit": False},
        {"prompt": "p2", "chosen": "c", "rejected": "d", "margin": 1.0, "implicit": False}]
    sec.rejected_column = "worse"
    with pytest.raises(UserError, match=r"has no column 'worse' .*; set "
                                        r"reward_model.rejected_column to one of them"):
        read_pairs(str(path), sec, "reward_model.data")


# TRL's preference formats beyond an explicit prompt column of strings.
USER = [{"role": "system", "content": "Review it."}, {"role": "user", "content": "the diner :"}]
GOOD, BAD = " the food was great .", " the food was cold ."


def _assistant(text):
    return [{"role": "assistant", "content": text.strip()}]


@pytest.mark.parametrize("row, prompt, chosen, rejected", [
    # implicit prompt, strings: parted at the last whitespace before the first difference
    ({"chosen": "the diner :" + GOOD, "rejected": "the diner :" + BAD},
     "the diner : the food was", " great .", " cold ."),
    ({"chosen": "Q: 2+2? A:\n\n4", "rejected": "Q: 2+2? A:\n\n5"}, "Q: 2+2? A:", "\n\n4", "\n\n5"),
    ({"chosen": "Yes.", "rejected": "No."}, "", "Yes.", "No."),
    # implicit prompt, conversations: parted at the first message that differs
    ({"chosen": USER + _assistant(GOOD), "rejected": USER + _assistant(BAD)},
     USER, _assistant(GOOD), _assistant(BAD)),
    # explicit prompt, conversations
    ({"prompt": USER, "chosen": _assistant(GOOD), "rejected": _assistant(BAD)},
     USER, _assistant(GOOD), _assistant(BAD)),
])
def test_trls_preference_formats(tmp_path, tiny_model_dir, row, prompt, chosen, rejected):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    sec = tiny_config(tiny_model_dir, "x").reward_model
    (out,) = read_pairs(str(path), sec, "reward_model.data")
    assert (out["prompt"], out["chosen"], out["rejected"]) == (prompt, chosen, rejected)
    assert out["implicit"] == ("prompt" not in row)


def test_a_conversational_pair_is_the_templates_conversation(tmp_path, tiny_model_dir):
    """Explicit or implicit, a conversational pair scores prompt + response as the chat template
    renders the whole conversation, with the prompt ending where PPO's prompts end."""
    from lora_ppo.stages.reward_model import encode_pairs

    cfg = tiny_config(tiny_model_dir, "x", "reward_model.train.max_length=128")
    tok = load_tokenizer(cfg.model, str(tiny_model_dir))
    pairs = []
    for name, row in (("explicit", {"prompt": USER, "chosen": _assistant(GOOD),
                                    "rejected": _assistant(BAD)}),
                      ("implicit", {"chosen": USER + _assistant(GOOD),
                                    "rejected": USER + _assistant(BAD)})):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        pairs += encode_pairs(tok, read_pairs(str(path), cfg.reward_model, "x"),
                              cfg.reward_model, 64)
    explicit, implicit = pairs
    assert explicit == implicit
    assert tok.decode(explicit.chosen) == tok.apply_chat_template(USER + _assistant(GOOD),
                                                                  tokenize=False)
    assert tok.decode(explicit.rejected) == f"<s>system: Review it.\nuser: the diner :\n" \
                                            f"assistant:{BAD}</s>\n"
    head = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    n = len(tok(head, add_special_tokens=False)["input_ids"])
    assert explicit.chosen[:n] == explicit.rejected[:n]  # one prompt, PPO's token boundary


@pytest.mark.parametrize("row, match", [
    ({"chosen": USER + [{"role": "user", "content": "x"}], "rejected": USER + _assistant(BAD)},
     "row 0's chosen and rejected conversations do not share the messages before an assistant "
     "message of each"),
    ({"chosen": _assistant(GOOD), "rejected": _assistant(BAD)}, "do not share the messages"),
    ({"chosen": "a b", "rejected": _assistant(BAD)},
     "row 0's chosen and rejected are not both strings or both conversations"),
    ({"prompt": "p", "chosen": 1, "rejected": "b"},
     "row 0's value in column 'chosen' is 1, neither a string nor a list of messages"),
    ({"good": "a", "bad": "b"}, r"has no column 'chosen' \(columns: good, bad\); set "
                                "reward_model.chosen_column to one of them"),
])
def test_preference_rows_it_cannot_take(tmp_path, tiny_model_dir, row, match):
    from lora_ppo.errors import UserError

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match=match):
        read_pairs(str(path), tiny_config(tiny_model_dir, "x").reward_model, "reward_model.data")


@pytest.mark.integration
def test_train_reward_on_implicit_conversational_pairs(tiny_model_dir, tmp_path, capsys):
    from lora_ppo.builtin.corpus import preference_pairs

    rows = [{k: [{"role": "user", "content": r["prompt"]}, *_assistant(r[k])]
             for k in ("chosen", "rejected")} for r in preference_pairs(24, seed=3)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _rm_config(tiny_model_dir, tmp_path / "out", f"reward_model.data={path}",
                     "reward_model.train.max_steps=2", "reward_model.eval.size=8",
                     "reward_model.train.batch_size=8", "reward_model.train.micro_batch_size=8")
    out = train_reward(cfg)
    assert (out / "score_head.safetensors").is_file()
    assert ("reward_model: no column 'prompt': each pair's prompt is the beginning its chosen and "
            "rejected responses share (TRL's implicit prompt)") in capsys.readouterr().out
