"""Rollouts: truncation and masks, generation hygiene, reward sources, and ratio 1 at the start."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config

from lora_ppo.generation.samples import left_pad, truncate_after_stop
from lora_ppo.io.data import Prompt
from lora_ppo.modeling.loading import is_gradient_checkpointing
from lora_ppo.ppo.collect import collect
from lora_ppo.ppo.loop import add_advantages, add_rewards, setup
from lora_ppo.ppo.reward_functions import FunctionReward, RewardError, load_function
from lora_ppo.ppo.update import micro_batch_loss
from lora_ppo.rl.masked import masked_mean

EOS, STOP, PAD = 2, 7, 2


def test_truncate_after_first_stop_token():
    resp = torch.tensor([
        [5, 6, EOS, 9, 9],      # EOS in the middle: kept, the rest cut
        [5, 6, 8, 9, 10],       # no EOS at all: everything real, has_eos False
        [EOS, 4, 4, 4, 4],      # a one-token response (just EOS)
        [5, STOP, 6, EOS, 1],   # an extra stop token ends it first
    ])
    ids, mask, has_eos = truncate_after_stop(resp, [EOS, STOP], PAD)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert ids.tolist() == [[5, 6, EOS, PAD, PAD], [5, 6, 8, 9, 10], [EOS, PAD, PAD, PAD, PAD],
                            [5, STOP, PAD, PAD, PAD]]
    assert has_eos.tolist() == [True, False, True, True]


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory, reward_file):
    cfg = tiny_config(tiny_model_dir, tmp_path_factory.mktemp("run"), "model.gradient_checkpointing=true",
                      f"reward.function={reward_file}:count_a", "rollout.max_new_tokens=10")
    return setup(cfg)


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rf") / "rewards.py"
    path.write_text(
        "def count_a(prompts, completions, **kw):\n"
        "    return [c.count('a') / (len(c) + 1) for c in completions]\n"
        "def boom(prompts, completions, **kw):\n"
        "    if any('x' in c for c in completions):\n"
        "        raise ValueError('no x allowed')\n"
        "    return [0.0] * len(completions)\n"
        "def nan_at_1(prompts, completions, **kw):\n"
        "    return [0.0, float('nan')] + [0.0] * (len(completions) - 2)\n"
        "def short(prompts, completions, **kw):\n"
        "    return [0.0]\n")
    return path


@pytest.mark.integration
def test_first_update_sees_ratio_one_and_zero_kl(run):
    """LoRA B starts at zero and dropout is off: policy == reference, and the update's
    log-probs (train mode, grad, micro-batches) equal the rollout's (eval, no grad, chunks)."""
    prompts = run.prompts.take(8)
    ro, raw = collect(run, prompts)
    ro = add_advantages(run, add_rewards(run, ro, raw, run.kl_ctl.value))
    assert ro.kl.abs().max().item() < 1e-5
    run.ac.train()
    micro = ro.index(torch.arange(4))
    lp, _, values = run.ac(micro.query_ids, micro.query_mask, micro.response_ids,
                           micro.response_mask, temperature=1.0, chunk_size=7)
    m = micro.response_mask
    assert ((lp - micro.logprobs) * m).abs().max().item() < 1e-5
    assert ((values - micro.values) * m).abs().max().item() < 1e-5
    _, stats = micro_batch_loss(run.engine, micro, run.cfg.ppo, run.cfg.algorithm,
                                micro.response_mask.sum().expand(4), temperature=1.0,
                                chunk_rows=run.chunk_rows, kl_coef=0.0)
    assert abs(stats.ratio / stats.tokens - 1.0) < 1e-5  # sums over the micro-batch's tokens
    assert stats.approx_kl / stats.tokens < 1e-6 and stats.clipfrac == 0.0
    # The score sits on the last real token: rewards sum to score - kl_coef * KL.
    torch.testing.assert_close((ro.rewards * m.new_ones(1)).sum(1)[:4],
                               ro.scores[:4] - run.kl_ctl.value * ro.kl[:4].sum(1))
    assert masked_mean(ro.advantages, ro.response_mask).abs().item() < 1e-5


@pytest.mark.integration
def test_generation_hygiene_restores_model_state(run):
    """Generation runs in eval mode (so transformers' checkpointing, active only in training,
    stays out of it) and feeds one new token per step after the prompt (the KV cache is used);
    train mode and checkpointing are as before afterwards."""
    lm = run.ac.causal_lm
    seen = []
    hook = lm.get_decoder().register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((run.ac.training, kwargs["input_ids"].shape[1])),
        with_kwargs=True)
    run.ac.train()
    try:
        assert is_gradient_checkpointing(lm)
        collect(run, run.prompts.take(2))[0]
    finally:
        hook.remove()
    generation_calls = seen[:-2]  # the last two forwards are the scoring passes
    assert len(generation_calls) > 1 and all(not training for training, _ in generation_calls)
    # each of the 2 prompts is prefilled once (continuous batching prefills a quarter of the
    # slots at a time), every other forward feeds one token per row
    widths = [n for _, n in generation_calls]
    assert widths[0] > 1 and sum(n > 1 for n in widths) == 2 and len(widths) > 2, seen
    assert run.ac.training and is_gradient_checkpointing(lm)


def test_reward_function_loading(reward_file):
    assert load_function(f"{reward_file}:count_a")(prompts=["p"], completions=["aa"]) == [2 / 3]
    assert load_function("lora_ppo.builtin.rewards:positive_sentiment")(
        prompts=["p"], completions=["great"])[0] > 0


@pytest.mark.parametrize("spec, match", [
    ("boom", "reward function .*boom raised ValueError: no x allowed on sample 2"),
    ("nan_at_1", "returned nan for sample 1"),
    ("short", "returned 1 scores for 3 samples"),
])
def test_bad_rewards_name_function_and_sample(reward_file, spec, match):
    fn = FunctionReward(f"{reward_file}:{spec}")
    ids = {"prompt_ids": [[1]] * 3, "completion_ids": [[2]] * 3}
    with pytest.raises(RewardError, match=match):
        fn([Prompt("p", (1,))] * 3, ["ok", "fine", "x"], ids)


@pytest.mark.parametrize("spec, match", [
    ("no_colon", "must be 'module:function'"),
    ("/no/such/file.py:f", "does not exist"),
    ("lora_ppo.builtin.rewards:nope", "has no function 'nope'"),
    ("no_such_module_xyz:f", "importing no_such_module_xyz failed"),
])
def test_bad_reward_spec(spec, match):
    from lora_ppo.errors import UserError

    with pytest.raises(UserError, match=match):
        load_function(spec)
