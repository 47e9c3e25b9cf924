"""`lora-ppo demo` (the README's main command) end to end at reduced size, through the real CLI:
the demo preset with a tiny model and a few steps, everything else as a user runs it (4-bit base,
reward adapter trained first, ZeRO-2, merge)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli

from lora_ppo.io.metrics import REQUIRED

pytestmark = pytest.mark.slow


def test_demo_pipeline_at_reduced_size(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "demo"
    res = run_cli("demo", f"output_dir={out}", f"model.path={tiny_model_dir}",
                  "model.max_prompt_length=16", "reward_model.train.max_steps=6",
                  "reward_model.eval.every=3", "reward_model.eval.size=16",
                  "reward_model.train.max_length=64", "rollout.prompts_per_update=8",
                  "rollout.generation_batch_size=8", "rollout.max_new_tokens=6",
                  "ppo.total_updates=3", "ppo.minibatch_size=8", "ppo.micro_batch_size=4",
                  "ppo.optim.learning_rate=0.01", "data.eval_every=3", "data.eval_size=2",
                  "checkpoint.every=3")
    assert res.returncode == 0, res.stderr[-3000:]

    # Progress through every stage, and samples with scores before and after training.
    for stage in ("stage 0/3", "stage 1/3", "stage 2/3", "stage 3/3"):
        assert stage in res.stdout, res.stdout[-2000:]
    both = res.stdout + res.stderr
    assert both.count("[eval/greedy]") == 2 * 2  # 2 prompts at update 0 and at update 3
    assert "(score " in both

    # PPO ran on the 4-bit base with the reward adapter the demo trained.
    cfg = (out / "config.yaml").read_text()
    assert "mode: 4bit" in cfg and "source: adapter" in cfg and "config: zero2" in cfg
    assert (out / "reward_adapter" / "score_head.safetensors").is_file()

    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(k in rows[0] for k in REQUIRED), set(REQUIRED) - set(rows[0])
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").rglob("*"))

    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["updates"] == 3 and summary["merge_max_logit_diff"] < 1e-3
    assert set(summary["export_check"]) == {"what", "base", "merged"}
    assert "merged model, loaded with plain transformers" in res.stdout

    # The merged export is a plain transformers model that differs from the base where PPO
    # trained it.
    merged = out / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok("review of the movie :", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids.shape[1]
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    new = load_file(str(merged / "model.safetensors"))
    changed = [k for k in base if "q_proj" in k and not torch.equal(base[k], new[k])]
    assert changed, "the merged q_proj weights equal the base: the policy was not merged"
