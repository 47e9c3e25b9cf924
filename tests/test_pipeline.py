"""The three RLHF stages through the CLI on one tiny base, one YAML, one output_dir:

    lora-ppo sft          -> <out>/adapter/          (policy start and PPO reference)
    lora-ppo train-reward -> <out>/reward_adapter/   (frozen `reward` adapter of the same base)
    lora-ppo train        -> <out>/checkpoints/      (PPO from the SFT adapter, scored by the RM)
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli, write_yaml

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")


def _pipeline_yaml(path, model_dir, out):
    return write_yaml(path, {
        "output_dir": str(out),
        "model": {"path": str(model_dir), "init_adapter": str(out / "adapter"),
                  "gradient_checkpointing": False, "max_prompt_length": 16},
        "quantization": {"mode": "none"},
        "lora": {"r": 8, "alpha": 16},
        "deepspeed": {"config": "zero0"},
        "logging": {"progress": False, "tensorboard": False},
        "checkpoint": {"every": 0},
        "sft": {"data": "builtin:reviews", "train": {"max_steps": 10, "batch_size": 8, "micro_batch_size": 4,
                          "max_length": 48},
                "optim": {"learning_rate": 0.01}, "eval": {"size": 16}},
        "reward_model": {"data": "builtin:preferences",
                         "train": {"max_steps": 30, "batch_size": 16, "micro_batch_size": 16,
                                   "max_length": 64},
                         "optim": {"learning_rate": 0.003}, "eval": {"size": 32}},
        "reward": {"source": "adapter", "adapter": str(out / "reward_adapter")},
        "data": {"prompts": "builtin:reviews"},
        "rollout": {"prompts_per_update": 8, "generation_batch_size": 8, "max_new_tokens": 6},
        "ppo": {"total_updates": 2, "epochs": 1, "minibatch_size": 8, "micro_batch_size": 4,
                "optim": {"learning_rate": 0.001}},
    })


def _metrics(path):
    return [json.loads(ln) for ln in path.open()]


def _reference_and_sft_logprobs(cfg, model_dir):
    """Log-probs of a fixed batch under PPO's reference role, the SFT model loaded the plain-peft
    way, and the raw base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_ppo.modeling.actor_critic import build_actor_critic
    from lora_ppo.modeling.loading import load_base_model, load_tokenizer
    from lora_ppo.modeling.roles import REFERENCE

    tok = load_tokenizer(cfg.model, str(model_dir))
    q = tok(["review of the diner :", "my review of the movie :"], padding=True,
            return_tensors="pt")
    r = tok([" the food was great .", " the plot was dull ."], add_special_tokens=False,
            padding=True, padding_side="right", return_tensors="pt")
    batch = (q["input_ids"], q["attention_mask"], r["input_ids"], r["attention_mask"].float())
    ac = build_actor_critic(cfg, load_base_model(cfg, str(model_dir), CPU))
    with torch.no_grad():
        ref, _, _ = ac(*batch, temperature=1.0, chunk_size=64,
                                   with_values=False, role=REFERENCE)
        out = {"reference": ref * batch[3]}
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                        cfg.model.init_adapter).eval()
        ids, mask = torch.cat([batch[0], batch[2]], 1), torch.cat([batch[1], batch[3].long()], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        n_q, n_r = batch[0].shape[1], batch[2].shape[1]
        for name, model in (("sft", sft), ("base", base)):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            lp = torch.log_softmax(logits[:, n_q - 1:n_q - 1 + n_r], -1)
            out[name] = lp.gather(-1, batch[2].unsqueeze(-1)).squeeze(-1) * batch[3]
    return out


def test_sft_then_reward_model_then_ppo_from_the_sft_adapter(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from lora_ppo.config.load import load_config

    out = tmp_path / "run"
    cfg_path = _pipeline_yaml(tmp_path / "pipeline.yaml", tiny_model_dir, out)

    res = run_cli("sft", "--config", str(cfg_path))
    assert res.returncode == 0, res.stderr[-3000:]
    sft_rows = _metrics(out / "sft" / "metrics.jsonl")
    assert len(sft_rows) == 10 and "eval/loss" in sft_rows[-1]

    res = run_cli("train-reward", "--config", str(cfg_path))
    assert res.returncode == 0, res.stderr[-3000:]
    rm_rows = _metrics(out / "reward_model" / "metrics.jsonl")
    assert rm_rows[-1]["eval/accuracy"] >= 0.8, rm_rows[-1]

    res = run_cli("train", "--config", str(cfg_path))
    assert res.returncode == 0, res.stderr[-3000:]
    ppo_rows = _metrics(out / "metrics.jsonl")
    assert [r["step"] for r in ppo_rows] == [1, 2]
    # The first rollout samples from the policy before any update: policy = SFT = reference, so
    # the k1 KL is 0. Had the reference been the raw base, it would not be.
    assert abs(ppo_rows[0]["objective/kl"]) < 1e-5, ppo_rows[0]
    assert all(torch.isfinite(torch.tensor(r["objective/raw_scores"])) for r in ppo_rows)
    # The stages' files did not collide: each kept its own metrics.
    assert len(_metrics(out / "sft" / "metrics.jsonl")) == 10

    # PPO's reference log-probs are the SFT model's (and the SFT model is not the base).
    cfg = load_config(out / "config.yaml")
    lp = _reference_and_sft_logprobs(cfg, tiny_model_dir)
    torch.testing.assert_close(lp["reference"], lp["sft"], rtol=0, atol=1e-5)
    assert (lp["sft"] - lp["base"]).abs().max() > 1e-2

    # PPO trained the policy starting from the SFT weights.
    sft_w = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    ppo_w = load_file(str(out / "checkpoints" / "step-2" / "policy" /
                          "adapter_model.safetensors"))
    assert sft_w.keys() == ppo_w.keys()
    assert any(not torch.equal(sft_w[k], ppo_w[k]) for k in sft_w)
    assert max((sft_w[k] - ppo_w[k]).abs().max().item() for k in sft_w) < 0.05
