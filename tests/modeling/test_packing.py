"""Padding-free forwards, trimmed micro-batches and the merged policy for generation give what
the padded, unmerged forward gives: the speed-ups may not change a log-prob."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import make_adapter_dir, tiny_config, update_with

from lora_ppo.generation.folded import can_fold, decodes_in_fp32, folded_policy
from lora_ppo.generation.generate import generate
from lora_ppo.modeling.packing import PADDED, Attention, Layout, pack
from lora_ppo.ppo.collect import collect, generate_samples, score_samples
from lora_ppo.ppo.loop import setup

STOPS = "rollout.stop_token_ids=[" + ",".join(str(i) for i in range(300, 340)) + "]"


def _run(model_dir, out, *extra):
    run = setup(tiny_config(model_dir, out, "rollout.max_new_tokens=10", STOPS,
                            "value.head_init_std=0.5", *extra))
    with torch.no_grad():  # non-trivial LoRA weights: B = 0 would make every adapter a no-op
        for p in run.ac.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    return run


def assert_grads_close(actual, expected, name):
    """Equal to fp32 round-off: a gradient sums hundreds of products per component, in another
    order per layout, so its components differ by ~1e-7 of the largest (measured: up to 5e-7),
    which is more than 1e-4 of a small component."""
    torch.testing.assert_close(actual, expected, rtol=1e-4,
                               atol=max(1e-5, 2e-6 * expected.abs().max().item()), msg=name)


def test_pack_by_hand():
    # two sequences: prompt [5, 6] + response [7, 8, 9]; prompt [4] + response [3] (then padding)
    q = torch.tensor([[5, 6], [0, 4]])
    qm = torch.tensor([[1, 1], [0, 1]])
    r = torch.tensor([[7, 8, 9], [3, 0, 0]])
    rm = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    p = pack(q, qm, r, rm)
    # capacity = the longest sequence (5); first-fit decreasing puts them in two rows
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 0, 0, 0]]
    # token t of sequence i is predicted by its (prompt length - 1 + t)-th state
    assert p.predicting.tolist() == [[1, 2, 3], [5, 6, 6]] and p.real_tokens == 7
    # short sequences share a row
    q2, qm2 = torch.tensor([[1], [2], [3]]), torch.ones(3, 1, dtype=torch.long)
    r2, rm2 = torch.tensor([[7, 7, 7], [8, 0, 0], [9, 0, 0]]), torch.tensor(
        [[1.0, 1, 1], [1, 0, 0], [1, 0, 0]])
    p2 = pack(q2, qm2, r2, rm2)
    assert p2.input_ids.tolist() == [[1, 7, 7, 7], [2, 8, 3, 9]]
    assert p2.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]


def _seqs(lengths):
    """Prompts of 1 token and responses making up sequences of these lengths."""
    q, qm = torch.ones(len(lengths), 1, dtype=torch.long), torch.ones(len(lengths), 1)
    r = torch.full((len(lengths), max(lengths) - 1), 7)
    rm = (torch.arange(max(lengths) - 1) < torch.tensor(lengths)[:, None] - 1).float()
    return q, qm.long(), r, rm


def test_rows_are_as_wide_as_their_attention_is_worth():
    # 100, 70, 60, 40 tokens: rows of the longest (100) take three rows, 300 slots for 270
    # tokens; attention of hidden 768 (width cost 1 / 4608) makes one row of 270 cheaper
    wc = 1 / (6 * 768)
    assert pack(*_seqs([100, 70, 60, 40])).input_ids.shape == (3, 100)
    assert pack(*_seqs([100, 70, 60, 40]), width_cost=wc).input_ids.shape == (1, 270)
    # equal lengths: wider rows would only add attention
    assert pack(*_seqs([50] * 4), width_cost=wc).input_ids.shape == (4, 50)
    # a tiny hidden size makes width dear: back to rows of the longest
    assert pack(*_seqs([100, 70, 60, 40]), width_cost=1 / 6).input_ids.shape == (3, 100)
    # never wider than max_width, unless one unit is
    assert pack(*_seqs([100, 70, 60, 40]), width_cost=wc, max_width=160).input_ids.shape[1] <= 160
    assert pack(*_seqs([100, 70]), width_cost=wc, max_width=50).input_ids.shape == (2, 100)


@pytest.mark.integration
def test_packed_forward_equals_the_padded_one(tiny_model_dir, tmp_path):
    """Log-probs, entropy and values of varied-length sequences, shared value head and critic
    adapter, with gradient flowing (the update's path): the same to fp32 round-off."""
    for mode in ("shared", "adapter"):
        run = _run(tiny_model_dir, tmp_path / mode, f"value.mode={mode}")
        s = generate_samples(run, run.prompts.take(8))
        lengths = s.response_mask.sum(1)
        assert lengths.min() < lengths.max() and s.query_mask.sum(1).unique().numel() > 1
        batch = (s.query_ids, s.query_mask, s.response_ids, s.response_mask)
        # rows wider than the longest sequence, holding several (packing.py::_capacity)
        rows = run.ac.pack(*batch, layout=Layout(packed=True)).input_ids
        assert rows.shape[1] > int((s.query_mask.sum(1) + lengths).max()) and len(rows) < 8
        run.ac.train()
        padded = run.ac(*batch, temperature=0.8, chunk_size=7, with_entropy=True)
        packed = run.ac(*batch, temperature=0.8, chunk_size=7, with_entropy=True,
                        layout=Layout(packed=True))
        m = s.response_mask
        for a, b in zip(padded, packed):
            torch.testing.assert_close(a * m, b * m, rtol=0, atol=1e-5)
        # and the gradients of a loss through both paths agree
        grads = []
        for out in (padded, packed):
            run.ac.zero_grad(set_to_none=True)
            ((out.logprobs + out.values) * m).sum().backward()
            grads.append({n: p.grad.clone() for n, p in run.ac.named_parameters()
                          if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for n in grads[0]:
            assert_grads_close(grads[1][n], grads[0][n], n)


@pytest.mark.integration
def test_a_trimmed_micro_batch_scores_as_the_full_width_one(tiny_model_dir, tmp_path):
    run = _run(tiny_model_dir, tmp_path / "run", "model.padding_free=false")
    ro = collect(run, run.prompts.take(8))[0]
    short = ro.response_mask.sum(1).argsort()[:2]  # the two shortest responses
    mb = ro.index(short)
    assert mb.response_ids.shape[1] < ro.response_ids.shape[1]  # trimmed
    with torch.no_grad():
        lp, _, v = run.ac(mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask,
                          temperature=1.0, chunk_size=64)
    torch.testing.assert_close(lp * mb.response_mask, mb.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(v * mb.response_mask, mb.values, rtol=0, atol=1e-5)


@pytest.mark.integration
def test_generation_with_the_merged_policy_is_exact_and_restores_the_weights(tiny_model_dir,
                                                                              tmp_path):
    """An init adapter with random B (and dropout in its saved config): sampling with the policy
    folded into the fp32 weights draws the same tokens as the unmerged policy from the same
    seed, and every base weight is the same tensor, bit for bit, afterwards."""
    sft = make_adapter_dir(tiny_model_dir, tmp_path / "sft", seed=1, dropout=0.1)
    run = _run(tiny_model_dir, tmp_path / "run", f"model.init_adapter={sft}")
    ac, cfg = run.ac, run.cfg
    assert can_fold(ac.peft_model)
    base = {n: (p, p.detach().clone()) for n, p in ac.named_parameters() if "lora_" not in n}
    ids = [list(p.ids) for p in run.prompts.take(6)]
    draws = {}
    for merge in (False, True):
        rc = dataclasses.replace(cfg.rollout, fold_for_generation=merge)
        torch.manual_seed(11)
        draws[merge] = generate(ac, ids, rc, run.seams.decode, run.stop_ids,
                                run.tokenizer.pad_token_id)
    assert torch.equal(draws[False].response_ids, draws[True].response_ids)
    for n, p in ac.named_parameters():
        if "lora_" not in n:
            assert p is base[n][0] and torch.equal(p, base[n][1]), n
    # while merged, the forward is the base layer alone, with W + scale * B @ A in it
    q = torch.tensor([ids[0]])
    with torch.no_grad():
        want = ac.causal_lm(input_ids=q).logits
        with folded_policy(ac.peft_model):
            got = ac.causal_lm(input_ids=q).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (want - ac.causal_lm(input_ids=q).logits).abs().max() == 0


@pytest.mark.integration
def test_an_update_trains_the_same_adapter_padding_free_or_not(tiny_model_dir, tmp_path,
                                                               low_ids_reward):
    """One PPO update (2 optimizer steps) on the same rollout, padded as before or padding-free
    with length-sorted micro-batches: the weights move the same way (Adam turns round-off in
    near-zero gradient components into up to lr-sized steps, so the moves are compared as a
    whole, and the tokens are not all equal in length)."""
    from lora_ppo.ppo.loop import add_advantages, add_rewards

    moves = {}
    for free in (False, True):
        run = _run(tiny_model_dir, tmp_path / str(free), f"model.padding_free={free}",
                   "ppo.minibatch_size=4", "ppo.micro_batch_size=2", "ppo.optim.learning_rate=1e-3",
                   f"reward.function={low_ids_reward}")
        if not free:
            torch.manual_seed(5)
            ro, raw = collect(run, run.prompts.take(8))
            ro = add_advantages(run, add_rewards(run, ro, raw, run.kl_ctl.value))
            assert ro.response_mask.sum(1).unique().numel() > 2
        before = {n: p.detach().clone() for n, p in run.ac.named_parameters() if p.requires_grad}
        update_with(run, ro, torch.Generator().manual_seed(0))
        moves[free] = torch.cat([(p.detach() - before[n]).flatten()
                                 for n, p in run.ac.named_parameters() if p.requires_grad])
    assert moves[False].norm() > 0
    rel = ((moves[True] - moves[False]).norm() / moves[False].norm()).item()
    assert rel < 1e-3, rel


@pytest.mark.integration
def test_the_samplers_logprobs_and_values_are_the_scoring_forwards(tiny_model_dir, tmp_path):
    """rollout.sampler_logprobs: the log-probs and shared-head values kept while decoding (static
    KV cache, merged policy, left padding, several generation chunks, temperature) are what the
    padded scoring forward over the finished sequences gives, to fp32 round-off; and the
    dynamic cache draws the same tokens as the static one."""
    run = _run(tiny_model_dir, tmp_path / "run", "rollout.temperature=0.7",
               "rollout.generation_batch_size=3")
    ac, rc = run.ac, run.cfg.rollout
    assert decodes_in_fp32(ac.peft_model)
    ids = [list(p.ids) for p in run.prompts.take(7)]
    drawn = {}
    for static in (True, False):
        torch.manual_seed(4)
        drawn[static] = generate(ac, ids, rc, run.seams.decode._replace(static_kv_cache=static),
                                 run.stop_ids, run.tokenizer.pad_token_id, score=True)
    s = drawn[True]
    assert torch.equal(s.response_ids, drawn[False].response_ids)
    assert s.response_mask.sum(1).unique().numel() > 1 and s.values.abs().max() > 0.1
    with torch.no_grad():
        ac.eval()
        lp, _, v = ac(s.query_ids, s.query_mask, s.response_ids, s.response_mask,
                      temperature=0.7, chunk_size=64)
    m = s.response_mask
    torch.testing.assert_close(s.logprobs, lp * m, rtol=0, atol=1e-5)
    torch.testing.assert_close(s.values, v * m, rtol=0, atol=1e-5)
    # the rollout takes them as they are, and still runs the reference forward
    ro = score_samples(run, s)
    assert torch.equal(ro.logprobs, s.logprobs) and ro.ref_logprobs is not None


# -- a group's prompt encoded once (issue 22) -------------------------------------------------

def test_shared_prompt_pack_by_hand():
    # samples 0 and 1 answer prompt [5, 6]; sample 2 answers [4]
    q = torch.tensor([[5, 6], [5, 6], [0, 4]])
    qm = torch.tensor([[1, 1], [1, 1], [0, 1]])
    r = torch.tensor([[7, 8, 9], [3, 2, 0], [1, 0, 0]])
    rm = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 0, 0]])
    p = pack(q, qm, r, rm, group=True, attention=Attention("sdpa"))
    # the group: the prompt once, then each response at the positions after it
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 3, 2], [4, 1, 0, 0, 0, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 0, 0, 0, 0, 0]]
    # token 0 of both members is predicted by the prompt's last state (flat index 1)
    assert p.predicting.tolist() == [[1, 2, 3], [1, 5, 6], [7, 8, 8]] and p.real_tokens == 9
    allowed = p.attention_mask[0, 0].int().tolist()
    assert allowed[5] == [1, 1, 0, 0, 0, 1, 0]  # member 2's first token: the prompt and itself
    assert allowed[6] == [1, 1, 0, 0, 0, 1, 1]
    assert allowed[4] == [1, 1, 1, 1, 1, 0, 0]  # member 1 never sees member 2
    # a sliding window of 2: position 4 sees positions 3 and 4 only
    w = pack(q, qm, r, rm, group=True, attention=Attention("sdpa", window=2))
    assert w.attention_mask[0, 0].int().tolist()[4] == [0, 0, 0, 1, 1, 0, 0]


def _grouped_run(model_dir, out, *extra):
    run = _run(model_dir, out, "rollout.samples_per_prompt=4", "rollout.prompts_per_update=2",
               "rollout.generation_batch_size=3", "rollout.temperature=0.8", *extra)
    assert run.ac.layout.group and run.ac.layout.attention is not None  # the seam check's pick
    return run


@pytest.mark.integration
def test_a_shared_prompt_row_equals_separate_sequences(tiny_model_dir, tmp_path):
    """Log-probs, entropy, values and the gradients of a loss through them, with random non-zero
    adapters and value head: the grouped rows (each prompt once) give what padded separate
    sequences give, to fp32 round-off, with far fewer tokens."""
    run = _grouped_run(tiny_model_dir, tmp_path / "run")
    torch.manual_seed(2)
    prompts = [p for p in run.prompts.take(2) for _ in range(4)]
    s = generate_samples(run, prompts)
    batch = (s.query_ids, s.query_mask, s.response_ids, s.response_mask)
    m = s.response_mask
    assert m.sum(1).unique().numel() > 1
    grouped = pack(*batch, group=True, attention=run.ac.layout.attention)
    assert grouped.real_tokens < pack(*batch).real_tokens - 4 * s.query_mask[0].sum()
    run.ac.train()
    outs, grads = {}, {}
    for name, layout in (("padded", PADDED), ("grouped", run.ac.layout)):
        run.ac.zero_grad(set_to_none=True)
        out = run.ac(*batch, temperature=0.8, chunk_size=7, with_entropy=True, layout=layout)
        ((out.logprobs + out.values) * m).sum().backward()
        outs[name] = [x.detach() * m for x in out]
        grads[name] = {n: p.grad.clone() for n, p in run.ac.named_parameters()
                       if p.grad is not None}
    for a, b in zip(outs["padded"], outs["grouped"]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert grads["padded"].keys() == grads["grouped"].keys() and grads["padded"]
    for n in grads["padded"]:
        assert_grads_close(grads["grouped"][n], grads["padded"][n], n)


@pytest.mark.integration
def test_an_update_trains_the_same_adapter_grouped_or_not(tiny_model_dir, tmp_path,
                                                           low_ids_reward):
    """One update on one rollout (one minibatch of 2 micro-batches, so both lay out the same
    samples): grouped rows and padded ones move the weights the same way (compared as a whole:
    Adam turns round-off in near-zero gradient components into lr-sized steps)."""
    from lora_ppo.ppo.loop import add_advantages, add_rewards

    moves, ro = {}, None
    for name in ("grouped", "padded"):
        run = _grouped_run(tiny_model_dir, tmp_path / name, "ppo.minibatch_size=8",
                           "ppo.micro_batch_size=4", "ppo.optim.learning_rate=1e-3",
                           f"reward.function={low_ids_reward}")
        if ro is None:
            torch.manual_seed(5)
            prompts = [p for p in run.prompts.take(2) for _ in range(4)]
            ro, raw = collect(run, prompts)
            ro = add_advantages(run, add_rewards(run, ro, raw, run.kl_ctl.value))
        if name == "padded":
            run.ac.layout = PADDED
        before = {n: p.detach().clone() for n, p in run.ac.named_parameters() if p.requires_grad}
        update_with(run, ro, torch.Generator().manual_seed(0))
        moves[name] = torch.cat([(p.detach() - before[n]).flatten()
                                 for n, p in run.ac.named_parameters() if p.requires_grad])
    assert moves["padded"].norm() > 0
    rel = ((moves["grouped"] - moves["padded"]).norm() / moves["padded"].norm()).item()
    assert rel < 1e-3, rel


def test_minibatches_of_whole_groups_by_hand():
    from lora_ppo.ppo.update import minibatches

    lengths = torch.tensor([3, 1, 2, 2, 9, 9, 1, 1])  # groups of 2: totals 4, 4, 18, 2
    g = torch.Generator().manual_seed(0)
    batches = minibatches(8, 4, lengths, g, group=2)
    assert len(batches) == 2 and sorted(torch.cat(batches).tolist()) == list(range(8))
    for b in batches:
        pairs = b.view(-1, 2)
        assert ((pairs[:, 0] % 2 == 0) & (pairs[:, 1] == pairs[:, 0] + 1)).all()  # kept whole
        totals = lengths[pairs].sum(1)
        assert (totals[:-1] >= totals[1:]).all()  # longest group first


@pytest.mark.integration
def test_continuous_batching_and_batch_size_do_not_change_a_rows_tokens(tiny_model_dir,
                                                                        tmp_path):
    """Each row draws from its own uniforms: continuous batching with 3 slots, batches of 3,
    and one batch of all rows give every row the same tokens and log-probs (groups of 4 sharing
    a prompt, varied lengths)."""
    run = _grouped_run(tiny_model_dir, tmp_path / "run")
    rc = run.cfg.rollout
    ids = [list(p.ids) for p in run.prompts.take(3) for _ in range(4)]
    drawn = {}
    for continuous, slots in ((True, 3), (False, 3), (False, 12), (True, 5)):
        torch.manual_seed(9)
        drawn[continuous, slots] = generate(
            run.ac, ids, dataclasses.replace(rc, generation_batch_size=slots),
            run.seams.decode._replace(continuous_batching=continuous), run.stop_ids,
            run.tokenizer.pad_token_id, score=True)
    first = drawn[True, 3]
    assert first.response_mask.sum(1).unique().numel() > 2
    for other in drawn.values():
        assert torch.equal(other.response_ids, first.response_ids)
        torch.testing.assert_close(other.logprobs, first.logprobs, rtol=0, atol=1e-5)


def test_eager_attention_keeps_rows_of_the_longest_unit():
    from transformers import LlamaConfig

    from lora_ppo.modeling.actor_critic import width_cost

    config = LlamaConfig(hidden_size=768)
    config._attn_implementation = "sdpa"
    assert width_cost(config) == 1 / (6 * 768)
    config._attn_implementation = "eager"  # (rows, heads, C, C) weights: no wider rows
    assert width_cost(config) is None
    assert pack(*_seqs([100, 70, 60, 40]), width_cost=None).input_ids.shape == (3, 100)
