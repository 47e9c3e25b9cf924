"""Multi-turn decoding: a row that ends a turn the environment answers continues after the
answer, on its own cache; the tokens and log-probs are those of encoding the conversation again
at every turn, and those one forward over the whole trajectory scores."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from families import FAMILIES, build_family_model
from helpers import scored_drawn, tiny_config

from lora_ppo.generation.generate import generate
from lora_ppo.ppo.loop import setup

# Ordinary ids that also end a turn: a random model then ends turns at varied lengths.
STOPS = list(range(300, 400))


class Echo:
    """A stand-in environment: after each of a row's first `turns` turns it answers with ids
    that depend on the row and the turn (so rows differ), then lets the trajectory end."""

    def __init__(self, turns: int = 2):
        self.turns, self.seen, self.calls = turns, {}, []

    def end_turns(self, rows, turns):
        out = []
        for r, ids in zip(rows, turns):
            assert ids and ids[-1] in STOPS  # the turn, its stop id included
            k = self.seen.get(r, 0)
            self.seen[r] = k + 1
            self.calls.append((r, len(ids)))
            out.append(None if k >= self.turns else [20 + r % 7, 30 + k, 40 + len(ids) % 5])
        return out


def _run(model_dir, out, *extra):
    run = setup(tiny_config(model_dir, out, "rollout.max_new_tokens=48",
                            "rollout.temperature=0.9",
                            "rollout.stop_token_ids=[" + ",".join(map(str, STOPS)) + "]",
                            "value.head_init_std=0.5", *extra))
    with torch.no_grad():  # non-trivial adapters: B = 0 would make the policy the base
        for p in run.ac.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    return run


def _trajectories(run, ids, *, continuous, reuse_cache, slots, turns=2):
    torch.manual_seed(7)
    echo = Echo(turns)
    rollout = dataclasses.replace(run.cfg.rollout, generation_batch_size=slots)
    decode = run.seams.decode._replace(continuous_batching=continuous, turn_cache=reuse_cache)
    s = generate(run.ac, ids, rollout, decode, run.stop_ids, run.tokenizer.pad_token_id,
                 turns=echo)
    return s, echo


@pytest.mark.integration
def test_cached_turns_equal_a_reencode_at_every_turn_and_one_forward(tiny_model_dir, tmp_path):
    """Rows of varied prompts, two environment answers each, 3 slots so rows leave and rejoin
    while others decode: keeping each conversation's cache, encoding it again at every turn,
    and batches (re-encoding) give every row the same tokens, environment mask and log-probs;
    and the sampler's log-probs of the model's tokens are what one scoring forward over the
    whole trajectory gives (1e-5)."""
    run = _run(tiny_model_dir, tmp_path / "run")
    ids = [list(p.ids) for p in run.prompts.take(6)]
    kept, echo = _trajectories(run, ids, continuous=True, reuse_cache=True, slots=3)
    assert len(echo.calls) >= 12  # every row answered twice, then ended
    env = kept.env_mask
    assert env.sum(1).tolist() == [6.0] * 6  # two answers of three ids per row
    assert kept.has_eos.all()  # each ended by its own stop id, none by the budget
    for continuous, reuse, slots in ((True, False, 3), (False, False, 4), (True, True, 6)):
        other, _ = _trajectories(run, ids, continuous=continuous, reuse_cache=reuse, slots=slots)
        assert torch.equal(other.response_ids, kept.response_ids), (continuous, reuse, slots)
        assert torch.equal(other.env_mask, env)
        torch.testing.assert_close(other.logprobs, kept.logprobs, rtol=0, atol=1e-5)
    actions = kept.response_mask * (1 - env)
    with torch.no_grad():
        run.ac.eval()
        lp, _, _ = run.ac(kept.query_ids, kept.query_mask, kept.response_ids, kept.response_mask,
                          temperature=0.9, chunk_size=64, with_values=False)
    torch.testing.assert_close(kept.logprobs, lp * actions, rtol=0, atol=1e-5)
    assert (kept.logprobs * env).abs().max() == 0  # the environment's tokens are no action


class Varied:
    """A stand-in environment answering each row's first turn with 1-5 ids (its length varies
    by row), then ending the trajectory."""

    def __init__(self):
        self.answered = set()

    def end_turns(self, rows, turns):
        out = []
        for r in rows:
            out.append(None if r in self.answered else [40 + j for j in range(1 + r % 5)])
            self.answered.add(r)
        return out


@pytest.mark.integration
def test_each_way_an_answer_enters_the_batch_is_exact(tiny_model_dir, tmp_path, monkeypatch):
    """Teacher-forced tokens end the turns where the test says (continuous.py's module doc):
    rows 1-4 call their tool at the same step and take the first id of their answers (2-5 ids)
    while row 0 still decodes, then, once row 0 has called too, the next ids of all five in one
    forward (as many as the shortest answer has left; the longer ones go on a step at a time
    while the others draw), in a batch compacted meanwhile; rows
    5 and 6, whose prompts are short enough to leave room left of the write column, rejoin from
    caches of their own (and end). Each row's log-probs are those of encoding the conversation
    again at every turn, and of one forward over the trajectory."""
    from lora_ppo.generation import continuous
    from lora_ppo.generation.generate import sample
    from lora_ppo.modeling.roles import POLICY

    run = _run(tiny_model_dir, tmp_path / "run")
    prompts = [list(range(5, 25))] * 3 + [list(range(7, 27)), list(range(9, 29)),
                                          list(range(9, 17)), list(range(3, 11))]
    forced = torch.randint(100, 300, (7, 24), generator=torch.Generator().manual_seed(1))
    forced[1:, 3] = STOPS[0]  # rows 1-6 end their first turn with their 4th token
    forced[0, 4] = STOPS[1]   # row 0 with its 5th
    forced[5, 5] = forced[6, 6] = STOPS[2]  # rows 5, 6 end right after their answers
    forced[:, 14:] = STOPS[2]  # every row's second turn ends by then (its trajectory too)
    seen = {"answer_step": [], "_continue": 0, "fed_while_drawing": 0}
    answer_step, cont, step = (continuous._Batch.answer_step, continuous._Batch._continue,
                               continuous._Batch.step)

    def spy_answer(batch, live):
        seen["answer_step"].append(sorted(len(q) for q in batch.feed.values()))
        return answer_step(batch, live)

    def spy_continue(batch, *a):
        seen["_continue"] += 1
        return cont(batch, *a)

    def spy_step(batch, live):
        seen["fed_while_drawing"] += bool(batch.feed) and len(batch.feed) < int(live.sum())
        return step(batch, live)

    monkeypatch.setattr(continuous._Batch, "answer_step", spy_answer)
    monkeypatch.setattr(continuous._Batch, "_continue", spy_continue)
    monkeypatch.setattr(continuous._Batch, "step", spy_step)

    def drawn(reuse_cache):
        with torch.no_grad(), run.ac.role(POLICY, train=False):
            return sample(run.ac, prompts, max_new_tokens=24, temperature=0.9, greedy=True,
                          stop_ids=STOPS, pad_id=run.tokenizer.pad_token_id,
                          generation_batch_size=7, forced=forced, score=True, values=False,
                          turns=Varied(), reuse_cache=reuse_cache)

    kept = drawn(True)
    assert seen["answer_step"] and max(seen["answer_step"][0]) > min(seen["answer_step"][0])
    assert seen["fed_while_drawing"] > 0 and seen["_continue"] == 2
    again = drawn(False)
    assert torch.equal(again.tokens, kept.tokens) and torch.equal(again.env_mask, kept.env_mask)
    assert kept.env_mask.sum(1).tolist() == [1 + r % 5 for r in range(7)]
    torch.testing.assert_close(kept.logprobs, again.logprobs, rtol=0, atol=1e-5)
    lp, actions = scored_drawn(run, prompts, kept, 0.9)
    assert actions.sum() > 40
    torch.testing.assert_close(kept.logprobs * actions, lp * actions, rtol=0, atol=1e-5)


@pytest.mark.integration
def test_an_answer_that_does_not_fit_ends_the_trajectory(tiny_model_dir, tmp_path):
    """The token budget counts the model's and the environment's tokens: an answer that leaves
    no room for a token of the model's own is not written, and the row ends truncated."""
    run = _run(tiny_model_dir, tmp_path / "run", "rollout.max_new_tokens=12")
    ids = [list(p.ids) for p in run.prompts.take(4)]
    s, echo = _trajectories(run, ids, continuous=True, reuse_cache=True, slots=4, turns=50)
    lengths = s.response_mask.sum(1)
    assert (lengths <= 12).all()
    assert (~s.has_eos).all()  # every row wanted more answers than fit
    assert echo.calls  # the hook was asked


@pytest.mark.integration
def test_waiting_conversations_stay_within_what_the_estimator_counts(tiny_model_dir, tmp_path,
                                                                     monkeypatch):
    """sizing/memory.py counts the caches of the conversations between turns as at most one
    more decode batch: rows in flight (in a slot or waiting) never more than the slots, and each
    waiting cache at most prompt + max_new_tokens long. Checked after every turn that ends."""
    from lora_ppo.generation import continuous

    run = _run(tiny_model_dir, tmp_path / "run")
    ids = [list(p.ids) for p in run.prompts.take(6)]
    bound = max(len(p) for p in ids) + run.cfg.rollout.max_new_tokens
    seen = []
    ended = continuous._Batch._ended

    def checked(batch, slots):
        ended(batch, slots)
        waiting = [enc[0][0][0].shape[2] for _, enc, _ in batch.ready]  # layer 0's keys' length
        in_slots = int((batch.row >= 0).sum())
        seen.append((in_slots, len(waiting)))
        assert in_slots + len(waiting) <= batch.slots
        assert all(n <= bound for n in waiting)

    monkeypatch.setattr(continuous._Batch, "_ended", checked)
    _trajectories(run, ids, continuous=True, reuse_cache=True, slots=3)
    assert max(w for _, w in seen) >= 1  # conversations did wait between turns


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_keeps_a_conversation_s_cache_exactly(family, tiny_model_dir, tmp_path):
    """Every family at tiny size, on the decode path its setup check chose (continuous batching
    where its cache allows it): keeping each conversation's cache across turns gives the tokens
    and log-probs of encoding it again at every turn, and the sampler's log-probs are those of
    one forward over the whole trajectory (1e-5). What holds for Llama's cache need not hold for
    a family whose positions, attention bias or cache layers differ."""
    model = build_family_model(family, tmp_path / family, tiny_model_dir)
    run = _run(model, tmp_path / "run", "model.seam_check=always")
    ids = [list(p.ids) for p in run.prompts.take(4)]
    continuous = run.seams.decode.continuous_batching
    kept, echo = _trajectories(run, ids, continuous=continuous, reuse_cache=True, slots=2)
    assert len(echo.calls) >= 8
    again, _ = _trajectories(run, ids, continuous=continuous, reuse_cache=False, slots=2)
    assert torch.equal(again.response_ids, kept.response_ids)
    torch.testing.assert_close(again.logprobs, kept.logprobs, rtol=0, atol=1e-5)
    env = kept.env_mask
    with torch.no_grad():
        run.ac.eval()
        lp, _, _ = run.ac(kept.query_ids, kept.query_mask, kept.response_ids, kept.response_mask,
                          temperature=0.9, chunk_size=64, with_values=False)
    torch.testing.assert_close(kept.logprobs, lp * kept.response_mask * (1 - env), rtol=0,
                               atol=1e-5)
