"""Trajectories through the loop's steps 2-4: the environment's tokens are context, never actions.
Rewards, the KL, advantages and returns are 0 there, and no loss term (policy, value, KL,
entropy) has any gradient at them, with GAE, GRPO and REINFORCE++."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config

from lora_ppo.generation.generate import generate
from lora_ppo.ppo.collect import sampler_scores, score_samples
from lora_ppo.ppo.loop import add_advantages, add_rewards, setup, update

STOPS = list(range(300, 400))


class Echo:
    """A stand-in environment (the lead's tests/generation/test_turns.py has its twin): answers
    each row's first two turns with three ids, then lets it end."""

    def __init__(self):
        self.seen = {}

    def end_turns(self, rows, turns):
        out = []
        for r, ids in zip(rows, turns):
            k = self.seen[r] = self.seen.get(r, 0) + 1
            out.append(None if k > 2 else [20 + r % 7, 30 + k, 40 + len(ids) % 5])
        return out


def _run(model_dir, out, *extra):
    run = setup(tiny_config(model_dir, out, "rollout.max_new_tokens=40",
                            "rollout.stop_token_ids=[" + ",".join(map(str, STOPS)) + "]",
                            "value.head_init_std=0.5", "ppo.epochs=1", *extra))
    with torch.no_grad():  # non-trivial adapters and head
        for p in run.ac.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    return run


def _rollout(run):
    n = run.cfg.rollout.prompts_per_update * run.cfg.rollout.samples_per_prompt
    prompts = [list(p.ids) for p in run.prompts.take(run.cfg.rollout.prompts_per_update)
               for _ in range(run.cfg.rollout.samples_per_prompt)]
    torch.manual_seed(5)
    samples = generate(run.ac, prompts, run.cfg.rollout, run.seams.decode, run.stop_ids,
                       run.tokenizer.pad_token_id, score=sampler_scores(run), turns=Echo())
    ro = score_samples(run, samples)
    raw = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(ro.response_mask.device)
    return add_advantages(run, add_rewards(run, ro, raw, run.kl_ctl.value))


CASES = {
    "gae": ("ppo.advantage_estimator=gae", "ppo.ent_coef=0.01"),
    "grpo": ("ppo.advantage_estimator=grpo", "rollout.samples_per_prompt=4",
             "rollout.prompts_per_update=2", "ppo.ent_coef=0.01"),
    "reinforce_pp": ("ppo.advantage_estimator=reinforce_pp", "ppo.kl_in=reward"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES)
def test_the_environments_tokens_carry_no_reward_no_advantage_and_no_gradient(
        tiny_model_dir, tmp_path, case):
    run = _run(tiny_model_dir, tmp_path / case, *CASES[case])
    ro = _rollout(run)
    env = ro.env_mask > 0
    assert env.sum() >= 2 * len(ro)  # every trajectory holds environment spans
    for name in ("rewards", "kl", "advantages", "returns"):
        x = getattr(ro, name)
        if x is not None:
            assert x[env].abs().max() == 0, name
    assert ro.advantages[ro.action_mask > 0].abs().max() > 0
    if case == "gae":  # the last model token's advantage: its reward minus its value
        last = (ro.action_mask * torch.arange(ro.action_mask.shape[1])).argmax(1)
        rows = torch.arange(len(ro))
        assert not env[rows, last].any()
    # every output of the update's forwards (log-probs, entropy, values), its gradient read
    # at the micro-batch's environment tokens: the micro-batch's rows found by their ids
    seen = []
    forward = run.ac.forward

    def spy(query_ids, query_mask, response_ids, response_mask, **kw):
        out = forward(query_ids, query_mask, response_ids, response_mask, **kw)
        for t in out:
            if t is not None and t.requires_grad:
                t.retain_grad()
        seen.append((out, response_ids, response_mask))
        return out

    run.ac.forward = spy
    try:
        stats = update(run, ro, run.kl_ctl.value)
    finally:
        del run.ac.forward
    assert stats.optimizer_steps >= 1 and seen
    for out, ids, mask in seen:
        width = ids.shape[1]
        rows = [next(i for i in range(len(ro)) if torch.equal(ro.response_ids[i, :width], row))
                for row in ids]
        env_mb = ro.env_mask[rows, :width] > 0
        grads = [t.grad for t in out if t is not None and t.grad is not None]
        assert grads and env_mb.any()
        for g in grads:
            assert g[env_mb].abs().max() == 0  # no loss term reaches an environment token
            assert g[(mask > 0) & ~env_mb].abs().max() > 0  # the model's tokens do get one
