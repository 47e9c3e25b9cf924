"""`lora-ppo demo --preset tools` end to end at reduced size, through the real CLI: a tiny model
with the built-in chat tokenizer, a few SFT steps, two GRPO and two PPO updates with the
calculator environment, each stage merged and checked with plain transformers."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

from lora_ppo.builtin import calculator, chat


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    from lora_ppo.builtin.tiny import build_tiny_model

    tok = chat.build_chat_tokenizer(chat.tokenizer_texts(200), vocab_size=400)
    return build_tiny_model(tmp_path_factory.mktemp("chat") / "m", vocab_size=len(tok),
                            hidden_size=32, intermediate_size=64, num_layers=1,
                            max_position_embeddings=512, tokenizer=tok)


@pytest.mark.integration
def test_bad_input_is_one_line(tmp_path):
    res = run_cli("demo", "--preset", "tools", f"output_dir={tmp_path / 'o'}",
                  "rollout.max_tool_calls=0")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "rollout.max_tool_calls" in res.stderr


@pytest.mark.slow
def test_tools_demo_at_reduced_size(chat_model_dir, tmp_path):
    out = tmp_path / "demo"
    res = run_cli("demo", "--preset", "tools", f"output_dir={out}",
                  f"model.path={chat_model_dir}", "sft.train.max_steps=3",
                  "rollout.prompts_per_update=2", "rollout.max_new_tokens=24",
                  "ppo.total_updates=2", "ppo.minibatch_size=16", "ppo.micro_batch_size=16")
    assert res.returncode == 0, res.stderr[-3000:]
    for stage in ("stage 0/3", "stage 1/3", "stage 2/3", "stage 3/3"):
        assert stage in res.stdout, res.stdout[-2000:]
    summary = json.loads((out / "demo_summary.json").read_text())
    assert list(summary["accuracy"]) == ["base", "SFT", "GRPO", "PPO"]
    assert summary["heldout"]["problems"] == calculator.HELDOUT_N
    assert summary["runs"]["GRPO"]["updates"] == 2 and summary["runs"]["PPO"]["updates"] == 2
    for name in ("grpo", "ppo"):  # the RL runs started from the SFT adapter
        assert f"init_adapter: {out}/sft/adapter" in (out / name / "config.yaml").read_text()
        assert (out / name / "merged" / "model.safetensors").is_file()
    assert "advantage_estimator: gae" in (out / "ppo" / "config.yaml").read_text()
    rows = [json.loads(ln) for ln in (out / "grpo" / "metrics.jsonl").open()]
    assert "tools/call_frequency" in rows[0]
    assert "held-out accuracy on 200 problems" in res.stdout
