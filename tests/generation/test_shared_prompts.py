"""A group's prompt read once in the decode steps (generation/shared_prompts.py, cascade
attention in modeling/cascade.py): every row draws the tokens, with the log-probs, that it draws
when each row reads its own copy of the prompt, and those one forward over the whole trajectory
scores; with turns (rows leaving and rejoining, answers taken in their slots), a group's rows
entering the batch at different steps, and in every family that decodes with continuous
batching."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, build_family_model
from helpers import scored_drawn, tiny_config
from transformers import StaticCache

from lora_ppo.generation import shared_prompts
from lora_ppo.generation.continuous import decode_continuous
from lora_ppo.generation.kv_cache import continuous_batching_fits
from lora_ppo.generation.sampler import Sampler
from lora_ppo.modeling import cascade
from lora_ppo.modeling.roles import POLICY
from lora_ppo.ppo.loop import setup

STOPS = list(range(300, 400))  # ordinary ids that also end a turn: turns of varied lengths


class Echo:
    """Answers each row's first two turns with ids that depend on the row and the turn."""

    def __init__(self):
        self.seen = {}

    def end_turns(self, rows, turns):
        out = []
        for r, ids in zip(rows, turns):
            k = self.seen.get(r, 0)
            self.seen[r] = k + 1
            out.append(None if k >= 2 else [20 + r % 7, 30 + k, 40 + len(ids) % 5][:1 + r % 3])
        return out


def _run(model_dir, out, *extra):
    run = setup(tiny_config(model_dir, out, "rollout.max_new_tokens=40", "rollout.temperature=0.9",
                            "rollout.stop_token_ids=[" + ",".join(map(str, STOPS)) + "]", *extra))
    with torch.no_grad():  # non-trivial adapters: B = 0 would make the policy the base
        for p in run.ac.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    return run


def _drawn(run, prompts, slots, shared):
    torch.manual_seed(11)
    uniforms = torch.rand(len(prompts), 40)
    s = Sampler(run.ac, prompts, max_new_tokens=40, temperature=0.9, greedy=False,
                stop_ids=STOPS, pad_id=run.tokenizer.pad_token_id, uniforms=uniforms, score=True,
                turns=Echo())
    with torch.no_grad(), run.ac.role(POLICY, train=False):
        decode_continuous(s, slots, reuse_cache=True, cascade=shared)
    return s.out.drawn(True)


def _check(run, slots, monkeypatch, cascaded=True):
    """3 groups of 4 rows (prompts of 3 lengths); `slots` fewer than the rows, so that the last
    group's rows enter as others leave, at different columns. `cascaded`: the model's attention
    goes through transformers' attention functions, where the cascade is taken."""
    prompts = ([list(range(5, 17))] * 4 + [list(range(9, 16))] * 4
               + [list(range(30, 40))] * 4)
    calls, starts = [], []
    real_attend, real_plan = cascade.attend, shared_prompts.SharedPrompts.plan

    def spy_attend(*args):
        calls.append(args[3].shape[0])
        return real_attend(*args)

    def spy_plan(shared, live, start, col, mask, cache):
        out = real_plan(shared, live, start, col, mask, cache)
        if out is not None:  # the starts of the rows that share each prefix
            for c in range(out[0].members.shape[0]):
                rows = out[0].members[c][out[0].valid[c]]
                starts.append(len(set(start[rows].tolist())))
        return out

    monkeypatch.setattr(cascade, "attend", spy_attend)
    monkeypatch.setattr(shared_prompts.SharedPrompts, "plan", spy_plan)
    shared = _drawn(run, prompts, slots, True)
    assert max(starts) >= 2  # rows of one prefix at different columns
    if cascaded:
        assert calls and max(calls) >= 2  # steps read prefixes shared by several rows
    n = len(calls)
    own = _drawn(run, prompts, slots, False)
    assert len(calls) == n  # without sharing, no cascade
    assert shared.env_mask.any()
    assert torch.equal(own.tokens, shared.tokens) and torch.equal(own.env_mask, shared.env_mask)
    torch.testing.assert_close(shared.logprobs, own.logprobs, rtol=0, atol=1e-5)
    lp, actions = scored_drawn(run, prompts, shared, 0.9)
    torch.testing.assert_close(shared.logprobs * actions, lp * actions, rtol=0, atol=1e-5)


@pytest.mark.integration
def test_a_group_s_prompt_read_once_draws_what_each_row_s_own_copy_draws(tiny_model_dir,
                                                                         tmp_path, monkeypatch):
    _check(_run(tiny_model_dir, tmp_path / "run"), 6, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_reads_a_group_s_prompt_once_exactly(family, tiny_model_dir, tmp_path,
                                                         monkeypatch):
    """What holds for Llama's attention need not for a family whose cache layout, attention
    module or positions differ: each family with continuous batching (its setup check's
    choice), the same checks."""
    model = build_family_model(family, tmp_path / family, tiny_model_dir)
    run = _run(model, tmp_path / "run", "model.seam_check=always")
    if not (run.seams.decode.continuous_batching and continuous_batching_fits(
            StaticCache(config=run.ac.causal_lm.config, max_cache_len=1))):
        pytest.skip("no continuous batch: a sliding window's cache, or the seam check's choice "
                    f"{run.seams.decode}")
    # Bloom computes its attention itself (its alibi bias added in a baddbmm), not through
    # transformers' attention functions: every row reads its own copy, exactly as before
    _check(run, 6, monkeypatch, cascaded=family != "bloom")
