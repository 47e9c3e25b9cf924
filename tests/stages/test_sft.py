"""SFT: the loss mask, packing, and real runs of train_sft on a tiny Llama (DeepSpeed on CPU)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import tiny_config

from lora_ppo.builtin.corpus import sft_pairs as builtin_pairs
from lora_ppo.builtin.corpus import write_jsonl
from lora_ppo.modeling.loading import load_base_model, load_tokenizer
from lora_ppo.modeling.packing import Attention, explicit_attentions
from lora_ppo.modeling.packing import first_fit as pack
from lora_ppo.stages.common import encode_pair
from lora_ppo.stages.sft import (
    Example,
    collate,
    encode_examples,
    make_rows,
    sft_loss_sums,
    train_sft,
)

CPU = torch.device("cpu")
PROMPT, RESPONSE = "review of the diner :", " the food was great ."


pytestmark = pytest.mark.usefixtures("restore_env")  # it trains in this process


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_config(tiny_model_dir, "x").model, str(tiny_model_dir))


def _masked_text(tok, ex: Example, covered: bool) -> str:
    ids = [t for t, m in zip(ex.ids, ex.loss_mask) if bool(m) == covered]
    return tok.decode(ids)


def test_loss_mask_covers_the_response_and_eos_only(tok, tiny_model_dir):
    sec = tiny_config(tiny_model_dir, "x").sft
    (ex,) = encode_examples(tok, [{"prompt": PROMPT, "response": RESPONSE}], sec, 16)
    p = tok(PROMPT)["input_ids"]  # <s> prepended by the tokenizer, as PPO tokenises prompts
    r = tok(RESPONSE, add_special_tokens=False)["input_ids"]
    assert ex.ids == p + r + [tok.eos_token_id]
    assert ex.loss_mask == [0] * len(p) + [1] * (len(r) + 1)
    assert _masked_text(tok, ex, True) == RESPONSE + "</s>"
    assert _masked_text(tok, ex, False) == "<s>" + PROMPT


def test_loss_mask_with_the_chat_template(tok, tiny_model_dir):
    sec = tiny_config(tiny_model_dir, "x", "sft.chat_template=true").sft
    (ex,) = encode_examples(tok, [{"prompt": PROMPT, "response": RESPONSE.strip()}], sec, 64)
    # The tiny template: "<s>user: {prompt}\nassistant: {response}</s>\n"; the template closes the
    # turn with </s> itself, so no second EOS is appended, and BOS appears once.
    assert _masked_text(tok, ex, False) == f"<s>user: {PROMPT}\nassistant:"
    assert _masked_text(tok, ex, True) == RESPONSE + "</s>\n"
    assert ex.ids.count(tok.bos_token_id) == 1 and ex.ids.count(tok.eos_token_id) == 1
    assert ex.loss_mask == sorted(ex.loss_mask)  # prompt zeros, then response ones


def test_cutting_keeps_the_end_of_the_prompt_and_the_start_of_the_response(tok):
    p, r = encode_pair(tok, PROMPT, RESPONSE, chat_template=False, append_eos=True,
                       max_prompt_length=3, max_length=5)
    full_p = tok(PROMPT)["input_ids"]
    full_r = tok(RESPONSE, add_special_tokens=False)["input_ids"]
    assert p == full_p[-3:] and r == full_r[:2]


def test_first_fit_decreasing_packing_by_hand():
    # SFT packs with modeling/packing.py's packer. Longest first: 6 opens row 0 (room 2); 5 and
    # 4 fit nowhere: rows 1 (room 3), 2 (room 4); 3 goes to the first room that fits, row 1
    # (3 -> 0); 2 to row 0 (2 -> 0).
    assert pack([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    assert pack([8, 1], 8) == [[0], [1]]


def test_block_causal_mask_by_hand():
    """SFT's packed rows take PPO's explicit mask (modeling/packing.py::mask_for): a row of two
    examples and one padding slot, beside a row of four tokens."""
    rows = [[Example([5, 6], [0, 1]), Example([7], [0])], [Example([1, 2, 3, 4], [0, 1, 1, 1])]]
    expected = torch.tensor([[1, 0, 0, 0],
                             [1, 1, 0, 0],
                             [0, 0, 1, 0],    # the second example sees only itself
                             [0, 0, 0, 1]]).bool()  # padding sees only padding
    assert torch.equal(collate(rows, 0, Attention("sdpa")).attention_mask[0, 0], expected)
    additive = collate(rows, 0, Attention("eager", dtype=torch.float32)).attention_mask[0, 0]
    assert torch.equal(additive == 0, expected)
    assert (additive[~expected] == torch.finfo(torch.float32).min).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tok, tiny_model_dir, attn):
    from peft import LoraConfig, get_peft_model

    cfg = tiny_config(tiny_model_dir, "x")
    base = load_base_model(cfg, str(tiny_model_dir), CPU)
    base.set_attn_implementation(attn)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear")).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)  # make the adapter matter
    examples = encode_examples(tok, builtin_pairs(12), cfg.sft, 16)
    rows = make_rows(examples, packed=True, max_length=64)
    assert len(rows) < len(examples)  # several examples share a row
    with torch.no_grad():
        s_packed, n_packed = sft_loss_sums(
            model, collate(rows, tok.pad_token_id, explicit_attentions(base.config, torch.float32)[0]),
            64)
        s_plain, n_plain = sft_loss_sums(
            model, collate([[e] for e in examples], tok.pad_token_id), 64)
    assert n_packed == n_plain == sum(sum(e.loss_mask) for e in examples)
    torch.testing.assert_close(s_packed, s_plain, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_packed_sft_past_a_sliding_window_is_the_models_own_loss(tok, tiny_model_dir, tmp_path,
                                                                  family):
    """Packed rows on a sliding-window family (Mistral: one window on every layer; Gemma 2: a
    mask per layer type), every example longer than the window of 8: the packed loss is the sum
    of each example's own cross-entropy under the model's own forward (transformers builds the
    window into its mask there). A block-diagonal causal mask without the window, SFT's own
    before it packed with modeling/packing.py, lets tokens see past the window."""
    from families import SLIDING_WINDOW, build_family_model
    from peft import LoraConfig, get_peft_model

    model_dir = build_family_model(family, tmp_path / family, tiny_model_dir)
    cfg = tiny_config(model_dir, "x")
    base = load_base_model(cfg, str(model_dir), CPU)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear")).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    examples = encode_examples(tok, builtin_pairs(8), cfg.sft, 16)
    assert min(len(e.ids) for e in examples) > SLIDING_WINDOW
    rows = make_rows(examples, packed=True, max_length=96)
    assert len(rows) < len(examples)
    attention = explicit_attentions(base.config, torch.float32)[0]
    assert attention.window == SLIDING_WINDOW
    with torch.no_grad():
        total, n = sft_loss_sums(model, collate(rows, tok.pad_token_id, attention), 64)
        own = 0.0
        for ex in examples:
            labels = torch.tensor([ex.ids]).masked_fill(torch.tensor([ex.loss_mask]) == 0, -100)
            own += model(input_ids=torch.tensor([ex.ids]), labels=labels).loss * sum(ex.loss_mask)
    assert n == sum(sum(e.loss_mask) for e in examples)
    torch.testing.assert_close(total, own, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", ["cohere", "granite"])
def test_sft_loss_is_the_models_own_loss(tok, tiny_model_dir, tmp_path, family):
    """Cohere and Granite scale the head's logits in their forward; the SFT loss is the model's
    own cross-entropy (transformers' loss with labels), not the raw head's."""
    from families import build_family_model
    from peft import LoraConfig, get_peft_model

    model_dir = build_family_model(family, tmp_path / family, tiny_model_dir)
    cfg = tiny_config(model_dir, "x")
    torch.manual_seed(0)
    model = get_peft_model(load_base_model(cfg, str(model_dir), CPU),
                           LoraConfig(r=4, target_modules="all-linear")).eval()
    examples = encode_examples(tok, builtin_pairs(3), cfg.sft, 16)
    with torch.no_grad():
        for ex in examples:
            batch = collate([[ex]], tok.pad_token_id)
            total, n = sft_loss_sums(model, batch, 64)
            labels = torch.tensor([ex.ids]).masked_fill(
                torch.tensor([ex.loss_mask]) == 0, -100)
            own = model(input_ids=torch.tensor([ex.ids]), labels=labels).loss
            torch.testing.assert_close(total / n, own, rtol=1e-5, atol=1e-5)


def _response_loss(model_dir, adapter, cfg, examples, tok):
    """Mean response-token loss of `examples` under base (+ adapter), loaded the plain-peft way."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load_base_model(cfg, str(model_dir), CPU)
    if adapter is None:  # a fresh LoRA adapter has B = 0: it is the base itself
        model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    else:
        model = PeftModel.from_pretrained(base, str(adapter))
    batch = collate([[e] for e in examples], tok.pad_token_id)
    with torch.no_grad():
        s, n = sft_loss_sums(model.eval(), batch, 64)
    return (s / n).item()


def _sft_config(model_dir, out, data, *extra):
    return tiny_config(model_dir, out, f"sft.data={data}", "sft.eval.size=0",
                       "sft.train.epochs=10", "sft.train.batch_size=8",
                       "sft.train.micro_batch_size=4", "sft.optim.learning_rate=0.01",
                       "sft.train.max_length=48", "lora.r=8", "lora.alpha=16", *extra)


@pytest.mark.integration
def test_sft_lowers_the_response_loss_and_writes_a_plain_peft_adapter(tok, tiny_model_dir,
                                                                        tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", builtin_pairs(16))
    cfg = _sft_config(tiny_model_dir, tmp_path / "out", data)
    out = train_sft(cfg)
    assert out == tmp_path / "out" / "adapter"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                     "adapter_model.safetensors"]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp dir
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "sft" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == list(range(1, 21))  # 16 rows / 8 = 2 steps x 10 epochs
    examples = encode_examples(tok, builtin_pairs(16), cfg.sft, 16)
    before = _response_loss(tiny_model_dir, None, cfg, examples, tok)
    after = _response_loss(tiny_model_dir, out, cfg, examples, tok)
    # The random model starts near ln(512) = 6.24 nats per token. LoRA cannot scale its random
    # lm_head (std 0.02) or final norm, so no hidden state can lift a logit by much more than
    # 0.02 * 8 * 8 = 1.3; 20 steps take about 0.4 nats off. Without training nothing moves.
    assert before > 6.0 and after < before - 0.25, (before, after)
    assert abs(rows[0]["loss"] - before) < 0.05  # step 1 is logged before any update
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.25


@pytest.mark.integration
def test_resume_from_a_checkpoint_reproduces_the_adapter(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "pairs.jsonl", builtin_pairs(16))
    a, b = tmp_path / "a", tmp_path / "b"
    overrides = ("sft.train.max_steps=4", "checkpoint.every=2", "checkpoint.keep=5")
    train_sft(_sft_config(tiny_model_dir, a, data, *overrides))
    # b: a copy of a's run stopped after step 2 (its later checkpoint and output removed).
    shutil.copytree(a / "sft", b / "sft")
    shutil.rmtree(b / "sft" / "checkpoints" / "step-4")
    train_sft(_sft_config(tiny_model_dir, b, data, *overrides), resume="latest")
    wa = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    steps = [json.loads(ln)["step"] for ln in (b / "sft" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.integration
@pytest.mark.parametrize("command", ["sft", "train-reward"])
def test_resume_latest_restarts_a_run_killed_before_its_first_checkpoint(tiny_model_dir,
                                                                          tmp_path, command):
    """What a kill before the first complete checkpoint leaves (the stage's config.yaml, some
    metrics lines, a checkpoint cut off mid-write): the plain command is refused with a message
    naming `--resume latest`, and that command starts the run again from step 0 and ends with
    the adapter of a run that was never stopped, bit for bit."""
    from helpers import run_cli
    from safetensors.torch import load_file

    section, adapter = {"sft": ("sft", "adapter"),
                        "train-reward": ("reward_model", "reward_adapter")}[command]
    args = [f"model.path={tiny_model_dir}", "quantization.mode=none", "sft.data=builtin:reviews",
            "reward_model.data=builtin:preferences",
            "model.max_prompt_length=16", "lora.r=4", "lora.alpha=8", "checkpoint.every=2",
            "logging.progress=false", "logging.tensorboard=false",
            *(f"{section}.{k}" for k in ("train.max_steps=3", "train.batch_size=4",
                                         "train.micro_batch_size=4", "eval.size=4",
                                         "train.max_length=48"))]
    a, b = tmp_path / "a", tmp_path / "b"
    res = run_cli(command, *args, f"output_dir={a}")
    assert res.returncode == 0, res.stderr[-2000:]
    # b: a's run as a kill during its first checkpoint write would have left it.
    run_dir = b / section
    shutil.copytree(a / section, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    (run_dir / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text()
                                           .splitlines(keepends=True)[0])
    partial = run_dir / "checkpoints" / ".step-2.tmp"
    shutil.copytree(a / section / "checkpoints" / "step-2", partial)
    (partial / "COMPLETE").unlink()
    refused = run_cli(command, *args, f"output_dir={b}")
    assert refused.returncode == 2 and f"lora-ppo {command} --resume latest" in refused.stderr
    res = run_cli(command, *args, f"output_dir={b}", "--resume", "latest")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no complete checkpoint" in res.stdout and "from step 0" in res.stdout
    wa, wb = (load_file(str(d / adapter / "adapter_model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    steps = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").open()]
    assert steps == [1, 2, 3]


@pytest.mark.integration
def test_sft_on_a_4bit_base_lowers_the_loss(tok, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", builtin_pairs(16))
    cfg = _sft_config(tiny_model_dir, tmp_path / "out", data, "quantization.mode=4bit",
                      "sft.train.max_steps=10")
    out = train_sft(cfg)
    examples = encode_examples(tok, builtin_pairs(16), cfg.sft, 16)
    base = load_base_model(cfg, str(tiny_model_dir), CPU)
    assert "Linear4bit" in {type(m).__name__ for m in base.modules()}
    before = _response_loss(tiny_model_dir, None, cfg, examples, tok)
    after = _response_loss(tiny_model_dir, out, cfg, examples, tok)
    assert after < before - 0.15, (before, after)


@pytest.mark.parametrize("overrides, expected", [
    (["sft.train.batch_size=6"], "sft.train.batch_size=6 is not a multiple of sft.train.micro_batch_size=4"),
    (["sft.train.max_length=16"], "sft.train.max_length=16 leaves no room for a response"),
    (["reward_model.margin=1", "reward_model.margin_column=m"], "both set a margin"),
    (["sft.optim.lr_schedule=step"], "sft.optim.lr_schedule='step' is not one of"),
])
def test_bad_stage_config_fails_at_load_time(overrides, expected):
    from lora_ppo.config.load import load_config
    from lora_ppo.errors import UserError

    with pytest.raises(UserError) as e:
        load_config(None, ["model.max_prompt_length=16", *overrides])
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("args, expected", [
    (["sft.response_column=answer"], "has no column 'answer'"),
    (["sft.response_column=answer"], "set sft.response_column to one of them"),
    (["sft.eval.size=0", "--resume", "{out}/sft/checkpoints/step-3"], "not a complete checkpoint"),
])
@pytest.mark.integration
def test_cli_bad_input_is_one_line_and_exit_2(tiny_model_dir, tmp_path, args, expected):
    from helpers import run_cli

    data = write_jsonl(tmp_path / "pairs.jsonl", builtin_pairs(16))
    out = tmp_path / "out"
    res = run_cli("sft", f"model.path={tiny_model_dir}", f"output_dir={out}", f"sft.data={data}",
                  "quantization.mode=none", "model.max_prompt_length=16",
                  *(a.format(out=out) for a in args))
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("lora-ppo: error:") and expected in lines[-1], lines[-1]
    assert "Traceback" not in res.stderr
    assert not (out / "adapter").exists()


# TRL's conversational SFT formats: whole conversations, and prompt-completion pairs of messages.
TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT},
         {"role": "assistant", "content": RESPONSE.strip()}]


@pytest.mark.parametrize("rows, overrides", [
    ([{"messages": TURNS}], []),
    ([{"prompt": TURNS[:2], "completion": TURNS[2:]}], ["sft.response_column=completion"]),
    ([{"prompt": TURNS[:2], "response": TURNS[2]["content"]}], []),
])
def test_conversations_train_on_the_last_assistant_message(tok, tiny_model_dir, tmp_path, rows,
                                                           overrides):
    """The prompt renders as PPO renders a conversational prompt (system message kept, ending
    where the assistant's reply begins); the loss covers the reply as the template writes it."""
    from lora_ppo.stages.sft import read_pairs

    sec = tiny_config(tiny_model_dir, "x", *overrides).sft
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    (ex,) = encode_examples(tok, read_pairs(str(data), sec, "sft.data"), sec, 64)
    head = tok.apply_chat_template(TURNS[:2], tokenize=False, add_generation_prompt=True)
    assert head == f"<s>system: Be brief.\nuser: {PROMPT}\nassistant:"
    assert _masked_text(tok, ex, False) == head
    assert _masked_text(tok, ex, True) == RESPONSE + "</s>\n"
    assert ex.loss_mask == sorted(ex.loss_mask)


@pytest.mark.parametrize("rows, match", [
    ([{"messages": TURNS[:2]}], "row 0's conversation in column 'messages' does not end with an "
                                "assistant message after at least one other message"),
    ([{"messages": TURNS[2:]}], "does not end with an assistant message after at least one"),
    ([{"text": "hello"}], "has no column 'prompt' \\(columns: text\\); set sft.prompt_column to "
                          "one of them, or sft.messages_column to a column of whole conversations"),
    ([{"prompt": 3, "response": "x"}], "row 0's value in column 'prompt' is 3, neither a string "
                                       "nor a list of messages"),
])
def test_conversational_rows_it_cannot_take(tmp_path, tiny_model_dir, rows, match):
    from lora_ppo.errors import UserError
    from lora_ppo.stages.sft import read_pairs

    data = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(UserError, match=match):
        read_pairs(str(data), tiny_config(tiny_model_dir, "x").sft, "sft.data")


def test_conversations_need_a_chat_template(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from lora_ppo.errors import UserError

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    with pytest.raises(UserError, match="^sft.data holds conversations .* no chat template"):
        encode_examples(tok, [{"prompt": TURNS[:2], "response": "x"}],
                        tiny_config(tiny_model_dir, "x").sft, 64)


@pytest.mark.integration
def test_sft_on_a_file_of_conversations(tiny_model_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["response"].strip()}]}
            for r in builtin_pairs(16)]
    data = write_jsonl(tmp_path / "conversations.jsonl", rows)
    out = train_sft(_sft_config(tiny_model_dir, tmp_path / "out", data, "sft.train.max_steps=2"))
    assert (out / "adapter_model.safetensors").is_file()
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "sft" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
