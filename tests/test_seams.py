"""Where PPO meets transformers, peft and DeepSpeed: each invariant checked where it can fail.

Adapters have random non-zero B and dropout in their saved configs, value heads have non-zero
weights, checkpointing is on and off, every ds_configs/ file runs, and the multi-rank test runs
under the real `deepspeed` launcher.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import (
    make_adapter_dir,
    run_cli,
    tiny_config,
    train_on_two_ranks,
    two_rank_yaml,
    update_with,
)

from lora_ppo.generation.samples import Samples
from lora_ppo.io.data import encode
from lora_ppo.ppo.collect import collect
from lora_ppo.ppo.loop import add_advantages, add_rewards, setup
from lora_ppo.ppo.rollout import logprobs_and_values
from lora_ppo.runtime.ds_config import DS_CONFIG_DIR

# Ordinary token ids that also end a response: a random model then stops at varied lengths.
STOPS = "rollout.stop_token_ids=[" + ",".join(str(i) for i in range(300, 340)) + "]"




def _trainable(run) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in run.ac.named_parameters()
            if p.requires_grad}


def _rollout(run, n):
    prompts = run.prompts.take(n)
    ro, raw = collect(run, prompts)
    return add_advantages(run, add_rewards(run, ro, raw, run.kl_ctl.value))


# -- 1. the rollout samples from the distribution PPO scores --------------------------------------

@pytest.mark.integration
def test_sampled_first_token_follows_the_scored_distribution(tiny_model_dir, tmp_path):
    """A checkpoint generation_config.json that sets top_k, top_p, repetition_penalty, min_p and
    no_repeat_ngram_size must not change what is sampled: the first response token of 4096
    rollouts of one prompt follows exp(logprobs) as scoring computes them (chi-square)."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "top_k": 5, "top_p": 0.5, "repetition_penalty": 1.5, "min_p": 0.1,
        "no_repeat_ngram_size": 1, "temperature": 0.3, "bos_token_id": 1, "eos_token_id": 2}))
    n = 4096
    run = setup(tiny_config(model_dir, tmp_path / "run", "rollout.max_new_tokens=1",
                            f"rollout.prompts_per_update={n}", "rollout.generation_batch_size=1024",
                            "rollout.temperature=0.7", "ppo.minibatch_size=8",
                            "ppo.micro_batch_size=8"))
    prompt = encode(run.tokenizer, ["review of the pizza place :"], False, 16)[0]
    ro = collect(run, [prompt] * n)[0]
    first = ro.response_ids[:, 0]
    vocab = run.ac.causal_lm.config.vocab_size
    # The scored distribution of the first token: every token of the vocabulary as a response.
    every = logprobs_and_values(run.ac, Samples(
        ro.query_ids[:1].expand(vocab, -1), ro.query_mask[:1].expand(vocab, -1),
        torch.arange(vocab)[:, None], torch.ones(vocab, 1), torch.zeros(vocab, dtype=torch.bool)),
        temperature=0.7, chunk_size=1024, batch_size=512)
    p = every.logprobs[:, 0].double().exp()
    assert abs(p.sum().item() - 1) < 1e-4
    counts = torch.bincount(first, minlength=vocab).double()
    expected = n * p
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    df = vocab - 1
    # Under the scored distribution chi2 ~ df +- sqrt(2 df); top-k 5 alone gives ~ n * vocab / 5.
    assert chi2 < df + 6 * math.sqrt(2 * df), (chi2, df, int((counts > 0).sum()))
    assert (counts > 0).sum() > 0.9 * vocab  # a near-uniform model: nearly every token appears


@pytest.mark.parametrize("field, value", [("top_k", 5), ("top_p", 0.9)])
def test_truncated_sampling_is_refused(tiny_model_dir, tmp_path, field, value):
    from lora_ppo.errors import UserError

    with pytest.raises(UserError, match=f"rollout.{field}={value}.*scores the full softmax"):
        tiny_config(tiny_model_dir, tmp_path, f"rollout.{field}={value}")


# -- 4. dropout, init/reward adapters, non-zero heads: the first minibatch has ratio 1 ---------

@pytest.mark.integration
@pytest.mark.parametrize("value_mode", ["shared", "adapter"])
def test_first_minibatch_ratio_is_one_with_nontrivial_adapters(tiny_model_dir, tmp_path,
                                                                value_mode):
    """An init adapter and a reward adapter saved with lora_dropout=0.1 and random B, a critic
    adapter with dropout 0.1, a non-zero value head, checkpointing on: the first minibatch of an
    update sees ratio 1 and approx_kl 0 (dropout is off in every adapter), and the values and
    reward scores do not depend on the mode the model is in."""
    sft = make_adapter_dir(tiny_model_dir, tmp_path / "sft", seed=1, dropout=0.1)
    rm = make_adapter_dir(tiny_model_dir, tmp_path / "rm", seed=2, head=True, dropout=0.1)
    run = setup(tiny_config(tiny_model_dir, tmp_path / "run", f"model.init_adapter={sft}",
                            "reward.source=adapter", f"reward.adapter={rm}", "lora.dropout=0.1",
                            f"value.mode={value_mode}", "value.head_init_std=0.5",
                            "model.gradient_checkpointing=true", "rollout.max_new_tokens=8",
                            "ppo.minibatch_size=8", "ppo.micro_batch_size=4", STOPS))
    assert run.ac.value_head.linear.weight.abs().max() > 0.1
    ro = _rollout(run, 8)
    assert ro.values.abs().max() > 1e-2 and ro.kl.abs().max() < 1e-5  # policy == reference (SFT)
    stats = update_with(run, ro, torch.Generator().manual_seed(0))
    assert stats.optimizer_steps == 1  # the whole rollout is the first minibatch
    assert abs(stats.ratio - 1.0) < 1e-6, stats
    assert abs(stats.approx_kl) < 1e-8 and stats.clipfrac == 0.0, stats
    assert stats.value_clipfrac == 0.0, stats


@pytest.mark.integration
@pytest.mark.parametrize("kind, lora", [
    ("dora", {"use_dora": True}), ("lora_bias", {"lora_bias": True}),
    ("rslora", {"use_rslora": True}), ("plain", {}),
    ("modules_to_save", {"modules_to_save": ["lm_head"]})])
def test_first_minibatch_ratio_is_one_with_the_adapter_a_user_brings(tiny_model_dir, tmp_path,
                                                                     kind, lora):
    """A starting adapter (B std 0.2) of each kind, fp32 base, rollout.fold_for_generation at
    its default: the sampler generates with the policy folded into the weights and its log-probs
    are the rollout's, so the first minibatch sees ratio 1 only if the fold is peft's forward.
    Before, DoRA (magnitude / weight norm) and lora_bias (B's bias) were folded as plain LoRA:
    ratio 1.0005 / 1.0019, clipfrac 0.18 / 0.13 on this model."""
    sft = make_adapter_dir(tiny_model_dir, tmp_path / "sft", seed=1, **lora)
    run = setup(tiny_config(tiny_model_dir, tmp_path / "run", f"model.init_adapter={sft}",
                            "rollout.max_new_tokens=8", STOPS))
    assert run.seams.decode.fold  # the fold is taken, and checked at setup
    ro = _rollout(run, 8)
    assert ro.kl.abs().max() < 1e-5  # policy == reference (the same adapter)
    stats = update_with(run, ro, torch.Generator().manual_seed(0))
    assert stats.optimizer_steps == 1
    assert abs(stats.ratio - 1.0) < 1e-6 and abs(stats.approx_kl) < 1e-8, (kind, stats)
    assert stats.clipfrac == 0.0, (kind, stats)


# -- 3. gradient checkpointing on and off give the same update --------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("value_mode", ["shared", "adapter"])
def test_checkpointing_on_and_off_train_the_same_weights(tiny_model_dir, tmp_path, low_ids_reward,
                                                         value_mode):
    from lora_ppo.ppo.loop import train

    weights = {}
    for gc in (False, True):
        run = train(tiny_config(
            tiny_model_dir, tmp_path / f"gc{gc}", f"model.gradient_checkpointing={gc}",
            f"value.mode={value_mode}", "value.head_init_std=0.3", "ppo.optim.learning_rate=0.01",
            "ppo.total_updates=2", "ppo.epochs=2", "ppo.minibatch_size=4",
            "ppo.micro_batch_size=2", f"reward.function={low_ids_reward}", STOPS))
        weights[gc] = _trainable(run)
    off, on = weights[False], weights[True]
    assert off.keys() == on.keys()
    critic = [n for n in off if ".critic." in n and "lora_B" in n]
    assert (value_mode == "adapter") == bool(critic)
    for n in critic:  # the critic adapter learnt something
        assert off[n].abs().max() > 0, n
    for n in off:
        torch.testing.assert_close(on[n], off[n], rtol=0, atol=1e-6, msg=n)


# -- 6. the heads under bf16 ----------------------------------------------------------------------

@pytest.mark.integration
def test_value_head_computes_in_fp32_under_bf16(tiny_model_dir, tmp_path):
    """DeepSpeed's bf16 casts every module parameter, the heads' too (their fp32 master copy
    lives in the optimizer); the head still computes in fp32, from the bf16 weights."""
    run = setup(tiny_config(tiny_model_dir, tmp_path / "run", "deepspeed.precision=bf16",
                            "value.head_init_std=0.5", "rollout.max_new_tokens=3"))
    head = run.ac.value_head
    assert head.linear.weight.dtype == torch.bfloat16
    h = torch.randn(2, 3, head.linear.in_features, dtype=torch.bfloat16)
    v = head(h)
    assert v.dtype == torch.float32
    want = torch.nn.functional.linear(h.float(), head.linear.weight.float(),
                                      head.linear.bias.float()).squeeze(-1)
    torch.testing.assert_close(v, want, rtol=0, atol=1e-6)


# -- 7. no hook leaks per rollout ---------------------------------------------------------------------

@pytest.mark.integration
def test_rollouts_do_not_add_hooks(tiny_model_dir, tmp_path):
    run = setup(tiny_config(tiny_model_dir, tmp_path / "run", "model.gradient_checkpointing=true",
                            "rollout.max_new_tokens=3"))
    emb = run.ac.causal_lm.get_input_embeddings()

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in run.ac.modules())

    collect(run, run.prompts.take(4))[0]
    before, emb_before = hooks(), len(emb._forward_hooks)
    for _ in range(3):
        collect(run, run.prompts.take(4))[0]
    assert (hooks(), len(emb._forward_hooks)) == (before, emb_before)


# -- 8. update statistics do not depend on the micro-batch split --------------------------------------

@pytest.mark.integration
def test_update_stats_do_not_depend_on_the_micro_batch_split(tiny_model_dir, tmp_path,
                                                             low_ids_reward):
    runs = {m: setup(tiny_config(tiny_model_dir, tmp_path / str(m), f"ppo.micro_batch_size={m}",
                                 "ppo.minibatch_size=8", "rollout.max_new_tokens=10",
                                 "ppo.optim.learning_rate=0.01", "value.head_init_std=0.3",
                                 f"reward.function={low_ids_reward}", STOPS))
            for m in (1, 8)}
    ro = _rollout(runs[8], 8)
    lengths = ro.response_mask.sum(1)
    assert lengths.min() < lengths.max()  # micro-batches of unequal token counts
    stats = {m: update_with(r, ro, torch.Generator().manual_seed(0))
             for m, r in runs.items()}
    for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac",
                "value_clipfrac", "ratio"):
        a, b = getattr(stats[1], key), getattr(stats[8], key)
        assert abs(a - b) < 1e-6, (key, a, b)


# -- 2. micro-batch split invariance through the CLI, for every ds_configs/ file ---------------------

@pytest.mark.slow
@pytest.mark.parametrize("ds_config", sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
def test_micro_batch_split_gives_the_same_adapter(tiny_model_dir, tmp_path, low_ids_reward, ds_config):
    """micro 4 x 1, 2 x 2 and 1 x 4 through `lora-ppo train`, three updates: the same adapter
    and value head (ZeRO-3 advances its micro-step only in engine.forward)."""
    from safetensors.torch import load_file

    final = {}
    for micro in (4, 2, 1):
        out = tmp_path / f"m{micro}"
        res = run_cli("train", f"model.path={tiny_model_dir}", f"output_dir={out}",
                      "data.prompts=builtin:reviews", "quantization.mode=none",
                      "model.max_prompt_length=16", "lora.r=4",
                      "rollout.prompts_per_update=8", "rollout.generation_batch_size=8",
                      "rollout.max_new_tokens=6", "ppo.minibatch_size=4",
                      f"ppo.micro_batch_size={micro}", "ppo.total_updates=3", "ppo.epochs=1",
                      "ppo.optim.learning_rate=0.01", "value.head_init_std=0.3",
                      f"deepspeed.config={ds_config}", f"reward.function={low_ids_reward}",
                      "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0",
                      STOPS)
        assert res.returncode == 0, res.stderr[-3000:]
        ck = out / "checkpoints" / "step-3"
        final[micro] = {**load_file(ck / "policy" / "adapter_model.safetensors"),
                        **{f"head.{k}": v for k, v in
                           load_file(ck / "value" / "value_head.safetensors").items()}}
    assert any(v.abs().max() > 0 for k, v in final[4].items() if "lora_B" in k)
    # Round-off only: Adam divides each gradient by its own running magnitude, so a 1e-7
    # difference in a near-zero gradient component can move that weight by ~1e-6; dropping all
    # but the last micro-batch (the ZeRO-3 bug) moved weights by ~1e-2.
    for micro in (2, 1):
        for k, v in final[4].items():
            diff = (final[micro][k].float() - v.float()).abs().max().item()
            assert diff < 1e-4, f"micro {micro}: {k} differs by {diff:.3g}"


# -- 5. early_stop_kl decides on the value of all ranks -----------------------------------------------

@pytest.mark.slow
def test_two_ranks_with_early_stop_kl_run_to_the_end(tiny_model_dir, tmp_path, low_ids_reward):
    """Under `deepspeed --num_gpus 2` the ranks see different samples and so different approx_kl;
    with a threshold between them a per-rank decision made them enter different collectives."""
    cfg = two_rank_yaml(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "run",
                        low_ids_reward, total_updates=4, epochs=4,
                        optim={"learning_rate": 0.02}, early_stop_kl=EARLY_STOP_KL)
    r0, r1 = train_on_two_ranks(cfg, tmp_path / "dump", timeout=240)
    assert r0["step"] == r1["step"] == 4
    for n, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][n]), n
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["ppo/epochs"] for r in rows]
    assert min(epochs) < 4, epochs  # the threshold did stop some updates early


EARLY_STOP_KL = 0.0025  # rank 0 stops after epoch 1 of update 1 (0.0031), rank 1 not (0.0021)


# -- 6. what the model's own settings say: a LoRA on lm_head, 8-bit kernels, EOS lists ---------

@pytest.mark.integration
@pytest.mark.parametrize("ds_config", ["zero2", "zero3"])
def test_a_lora_on_lm_head_is_scored_and_trained_under_zero3(tiny_model_dir, tmp_path,
                                                              low_ids_reward, ds_config):
    """An init adapter that targets lm_head (merge and export support it): under ZeRO-3 the
    update's head was a detached, gathered base weight without the LoRA, so the first ratio
    was not 1 and the head's lora_B never moved. Now the head runs as a module everywhere."""
    from lora_ppo.runtime.engine import gathered_trainable

    sft = make_adapter_dir(tiny_model_dir, tmp_path / "sft", seed=1, dropout=0.1,
                           targets=["q_proj", "v_proj", "down_proj", "lm_head"])
    run = setup(tiny_config(tiny_model_dir, tmp_path / "run", f"model.init_adapter={sft}",
                            f"deepspeed.config={ds_config}", "ppo.optim.learning_rate=0.01",
                            "rollout.max_new_tokens=8", f"reward.function={low_ids_reward}",
                            STOPS))

    def head_b():
        with gathered_trainable(run.engine):
            return {n: p.detach().clone() for n, p in run.ac.named_parameters()
                    if "lm_head" in n and "lora_B" in n and p.requires_grad}

    before = head_b()
    assert before and all(v.abs().max() > 0.05 for v in before.values())
    ro = _rollout(run, 8)
    stats = update_with(run, ro, torch.Generator().manual_seed(0))
    assert stats.optimizer_steps == 1 and abs(stats.ratio - 1.0) < 1e-6, stats
    assert abs(stats.approx_kl) < 1e-8, stats
    after = head_b()
    assert all((after[n] - before[n]).abs().max() > 1e-4 for n in before), ds_config


@pytest.mark.integration
def test_8bit_first_minibatch_ratio_is_one(tiny_model_dir, tmp_path, low_ids_reward):
    """bitsandbytes 8-bit on a CPU ran MatMul8bitLt for the rollout (eval mode) and
    MatMul8bitFp in the update (train mode): first-minibatch max |log ratio| 0.058."""
    sft = make_adapter_dir(tiny_model_dir, tmp_path / "sft", seed=1)
    run = setup(tiny_config(tiny_model_dir, tmp_path / "run", "quantization.mode=8bit",
                            f"model.init_adapter={sft}", "value.head_init_std=0.5",
                            "model.gradient_checkpointing=true", "rollout.max_new_tokens=8",
                            f"reward.function={low_ids_reward}", STOPS))
    ro = _rollout(run, 8)
    stats = update_with(run, ro, torch.Generator().manual_seed(0))
    assert stats.optimizer_steps == 1 and abs(stats.ratio - 1.0) < 1e-6, stats
    assert abs(stats.approx_kl) < 1e-8 and stats.clipfrac == 0.0, stats


@pytest.mark.integration
def test_every_eos_id_of_generation_config_ends_a_response(tiny_model_dir, tmp_path, capsys):
    """Llama 3 and Qwen 2.5 instruct checkpoints list several EOS ids in generation_config.json;
    the sampler stopped at the tokenizer's EOS only, so responses ran past the others and
    has_eos was 0. The run's log names the ids it stops at."""
    from transformers import GenerationConfig

    from lora_ppo.ppo.collect import generate_samples
    from lora_ppo.ppo.loop import describe_stops

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    listed = [2, *range(300, 340)]  # the tokenizer's </s> and 40 ordinary ids
    GenerationConfig(eos_token_id=listed, bos_token_id=1).save_pretrained(model)
    run = setup(tiny_config(model, tmp_path / "run", "rollout.max_new_tokens=12"))
    assert run.stop_ids == listed
    torch.manual_seed(0)
    s = generate_samples(run, run.prompts.take(8))
    lengths = s.response_mask.sum(1).long()
    assert s.has_eos.any() and lengths.min() < 12
    for row, n, eos in zip(s.response_ids, lengths, s.has_eos):
        tokens = row[:n].tolist()
        assert not set(tokens[:-1]) & set(listed)  # nothing after the first stop id
        assert eos == (tokens[-1] in listed)
    assert "300 " in describe_stops(run.tokenizer, run.stop_ids)


@pytest.mark.slow
def test_two_ranks_under_zero3_decode_in_lockstep(tiny_model_dir, tmp_path, low_ids_reward):
    """ZeRO-3 over two ranks gathers weights collectively in every forward and head call: the
    ranks decode in batches in lockstep (no continuous batching, no compaction), a rank whose
    rows have all stopped keeps running the forwards and heads with the other, and what the
    sampler drew is what the update's first forward scores (ratio 1), with rows stopping at
    varied steps and every parameter partitioned."""
    import yaml
    from helpers import run_two_ranks

    cfg = two_rank_yaml(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "run", low_ids_reward,
                        total_updates=2, minibatch_size=8, micro_batch_size=4)
    # zero3.json, with every parameter partitioned: below DeepSpeed's persistence threshold
    # (1e5 elements) the tiny model's head would stay whole and need no gathering
    ds = json.loads((DS_CONFIG_DIR / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3_all.json").write_text(json.dumps(ds))
    raw = yaml.safe_load(cfg.read_text())
    raw["deepspeed"]["config"] = str(tmp_path / "zero3_all.json")
    raw["rollout"].update({"max_new_tokens": 12, "stop_token_ids": list(range(300, 360)),
                           "generation_batch_size": 4})
    cfg.write_text(yaml.safe_dump(raw))
    run_two_ranks("--module", "lora_ppo", "train", "--config", str(cfg), timeout=900)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0 < r["response/length"] < 12 for r in rows)  # rows stopped at varied steps
    # one minibatch per update: the update's first forward scores what the sampler drew
    # (a head gathered out of step would have given the sampler other weights)
    for r in rows:
        assert abs(r["policy/ratio"] - 1) < 1e-5 and r["policy/approx_kl"] < 1e-8, r
