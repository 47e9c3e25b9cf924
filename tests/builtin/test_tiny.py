"""The locally built tiny Llama: loads with plain transformers, Llama-like tokenizer, caching."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_ppo.builtin import tiny
from lora_ppo.builtin.corpus import review_corpus
from lora_ppo.errors import UserError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The default test size (vocab 512, hidden 64, 2 layers), built once for the module."""
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.mark.integration
def test_saved_dir_loads_offline_with_plain_transformers(model_dir):
    assert (model_dir / "model.safetensors").is_file()
    # A fresh interpreter with the hub switched off and no lora_ppo import: what a user gets.
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "ids = tok('review of the diner :', return_tensors='pt').input_ids\n"
        "print(json.dumps({'arch': type(model).__name__, 'dtype': str(model.dtype),\n"
        "                  'shape': list(model(ids).logits.shape), 'pad': tok.pad_token}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(model_dir)], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    # "<s>review of the diner :" is <s> plus at least one token per word.
    assert info["arch"] == "LlamaForCausalLM" and info["dtype"] == "torch.float32"
    assert info["shape"][0] == 1 and info["shape"][1] >= 6 and info["shape"][2] == 512
    assert info["pad"] is None


def test_tokenizer_is_llama_like(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.pad_token is None and tok.pad_token_id is None
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert tok.bos_token_id != tok.eos_token_id
    ids = tok("the food was great").input_ids
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]  # <s> once, in front
    assert tok.eos_token_id not in ids  # Llama appends no </s>
    assert tok("the food was great", add_special_tokens=False).input_ids == ids[1:]
    assert len(tok) == 512


def test_tokenizer_round_trips_text(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [t for t, _ in review_corpus(300, seed=123)]  # not the texts it was trained on
    texts += ["Hello, World! 42 caf\u00e9 \u2713", "  two  spaces\nand a newline"]
    ids = tok(texts).input_ids
    assert tok.batch_decode(ids, skip_special_tokens=True) == texts
    # The corpus words are mostly single tokens: fewer than 2 tokens per word on average.
    corpus_ids = ids[:300]
    n_words = sum(len(t.split()) for t in texts[:300])
    assert sum(len(row) - 1 for row in corpus_ids) < 2 * n_words


def test_chat_template(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "review the diner"},
                {"role": "assistant", "content": "the food was great ."}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<s>user: review the diner\nassistant: the food was great .</s>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>user: review the diner\nassistant:"
    ids = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # no double <s>


def test_same_seed_same_weights_and_caller_rng_untouched(model_dir, tmp_path):
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    again = tiny.build_tiny_model(tmp_path / "again", seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # init ran in a forked RNG
    other = tiny.build_tiny_model(tmp_path / "other", seed=1)
    a, b, c = (load_file(d / "model.safetensors") for d in (model_dir, again, other))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"],
                           c["model.layers.0.self_attn.q_proj.weight"])
    # Different seeds, one tokenizer: a policy and a reward model can share token ids.
    assert (model_dir / "tokenizer.json").read_text() == (other / "tokenizer.json").read_text()


def test_forward_gives_batch_time_vocab_logits(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.tie_word_embeddings) == (64, 2, 4, 2, False)
    ids = torch.randint(512, (3, 7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (3, 7, 512) and logits.dtype == torch.float32
    # Random init with std 0.02: logits start near zero, so the loss is near ln(vocab).
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), ids.reshape(-1))
    assert abs(loss.item() - math.log(512)) < 0.2  # ln 512 = 6.238


def test_pretrain_lowers_the_loss_and_saves(model_dir, tmp_path):
    work = shutil.copytree(model_dir, tmp_path / "model")
    before = load_file(work / "model.safetensors")
    seen = []
    result = tiny.pretrain(work, steps=20, batch_size=8, seq_len=32, log_every=5,
                           progress=seen.append)
    assert [s["step"] for s in seen] == [5, 10, 15, 20]
    # Step 1 sees the random init: loss ~ ln 512 = 6.24. Twenty steps at lr 3e-3 (warmup 2
    # steps, then cosine) learn at least the unigram statistics of the corpus.
    assert abs(result["first_loss"] - math.log(512)) < 0.3
    assert result["loss"] == seen[-1]["loss"] < seen[0]["loss"] < result["first_loss"]
    assert result["loss"] < result["first_loss"] - 1.0
    assert result["tokens"] == 20 * 8 * 32
    after = load_file(work / "model.safetensors")
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])


def test_pretrain_rejects_bad_arguments(model_dir):
    with pytest.raises(UserError, match="seq_len=512"):
        tiny.pretrain(model_dir, steps=1, seq_len=512)
    with pytest.raises(UserError, match="steps=0"):
        tiny.pretrain(model_dir, steps=0)


def test_build_tokenizer_rejects_a_vocab_below_the_byte_alphabet():
    with pytest.raises(UserError, match="vocab_size=100"):
        tiny.build_tokenizer(["a b c"], vocab_size=100)


def test_ensure_builtin_model_builds_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_PPO_CACHE", str(tmp_path / "cache"))
    logs = []
    path = tiny.ensure_builtin_model(size="test", log=logs.append)
    assert path.parent == tmp_path / "cache" / "models"
    assert path.name.startswith("test-") and len(path.name) == len("test-") + 10
    assert any("building" in line for line in logs)
    marker = path / "lora_ppo_build.json"
    assert json.loads(marker.read_text())["size"] == "test"
    mtime = marker.stat().st_mtime_ns
    AutoModelForCausalLM.from_pretrained(path)  # a complete, loadable model

    logs.clear()
    assert tiny.ensure_builtin_model(size="test", log=logs.append) == path
    assert logs == [] and marker.stat().st_mtime_ns == mtime  # reused, not rebuilt
    # An explicit cache_dir wins over the environment variable.
    assert tiny.builtin_model_dir(tmp_path / "elsewhere", size="test").parent == (
        tmp_path / "elsewhere" / "models")
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]


def test_ensure_builtin_model_crash_leaves_no_finished_looking_dir(tmp_path, monkeypatch):
    # A recipe that pre-trains 2 steps, and a log that dies at the pre-training report: by then
    # the weights and tokenizer are written into the temp dir.
    recipe = {"model": tiny.SIZES["test"]["model"],
              "pretrain": {"steps": 2, "batch_size": 2, "seq_len": 16, "lr": 1e-3}}
    monkeypatch.setitem(tiny.SIZES, "crashy", recipe)

    def dying_log(line):
        if line.startswith("pre-training"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny.ensure_builtin_model(tmp_path, size="crashy", log=dying_log)
    models = tmp_path / "models"
    assert [p.suffix for p in models.iterdir()] == [".lock"]  # no target, no temp dir left
    path = tiny.ensure_builtin_model(tmp_path, size="crashy", log=lambda line: None)
    assert json.loads((path / "lora_ppo_build.json").read_text())["pretrain_result"]["steps"] == 2


def test_ensure_builtin_model_user_errors(tmp_path):
    with pytest.raises(UserError, match="'huge'"):
        tiny.ensure_builtin_model(tmp_path, size="huge")
    squatter = tiny.builtin_model_dir(tmp_path, size="test")
    squatter.mkdir(parents=True)
    with pytest.raises(UserError, match="delete it"):
        tiny.ensure_builtin_model(tmp_path, size="test")
