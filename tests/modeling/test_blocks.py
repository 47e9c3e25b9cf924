"""Blocked attention over packed rows (modeling/blocks.py, modeling/block_sdpa.py): the scores it
computes are the dense mask's, so outputs and gradients equal the dense call's, and a model's
packed forward with blocks equals its padded forward, on every family whose attention takes them."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES, build_family_model
from helpers import tiny_config

import lora_ppo.modeling.block_sdpa as block_sdpa
from lora_ppo.modeling.blocks import CALL_COST, _split
from lora_ppo.modeling.blocks import attend as blocked
from lora_ppo.modeling.packing import Attention, pack
from lora_ppo.ppo.loop import setup


def _batch(gen: torch.Generator, prompts: list[int], n: int, low: int = 16, high: int = 500):
    """n samples per prompt (prompt lengths given), responses of varied lengths: left-padded
    queries (B, Q), right-padded responses (B, R)."""
    qs, rs = [], []
    for q_len in prompts:
        q = torch.randint(low, high, (q_len,), generator=gen).tolist()
        for _ in range(n):
            qs.append(q)
            rs.append(torch.randint(low, high, (int(torch.randint(1, 12, (1,), generator=gen)),),
                                    generator=gen).tolist())
    Q, R = max(map(len, qs)), max(map(len, rs))
    q_ids, q_mask = torch.zeros(len(qs), Q, dtype=torch.long), torch.zeros(len(qs), Q)
    r_ids, r_mask = torch.zeros(len(rs), R, dtype=torch.long), torch.zeros(len(rs), R)
    for i, (q, r) in enumerate(zip(qs, rs)):
        q_ids[i, Q - len(q):], q_mask[i, Q - len(q):] = torch.tensor(q), 1
        r_ids[i, :len(r)], r_mask[i, :len(r)] = torch.tensor(r), 1
    return q_ids, q_mask, r_ids, r_mask


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("window", [None, 4])
def test_blocked_attention_equals_the_dense_mask(group, window):
    """Rows holding several units (and unused slots), a sliding window or none: the output at
    every token and the gradients of q, k and v equal the dense masked call's to round-off."""
    gen = torch.Generator().manual_seed(0)
    packed = pack(*_batch(gen, [7, 3, 9, 5], 3), group=group, blocks=True,
                  attention=Attention("sdpa", window), width_cost=0.05)
    assert len(packed.input_ids) < 12 and (packed.input_ids == 0).any()  # several per row, idle
    P, C = packed.input_ids.shape
    q, k, v = (torch.randn(P, 3, C, 8, generator=gen, requires_grad=True) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=packed.attention_mask)
    dense = dense.transpose(1, 2)
    out = blocked(packed.blocks, q, k, v, 0.0, None)
    real = (packed.input_ids != 0)[:, :, None, None]
    torch.testing.assert_close(out * real, dense * real, rtol=0, atol=1e-6)
    w = torch.randn(dense.shape, generator=gen) * real
    want = torch.autograd.grad((dense * w).sum(), (q, k, v))
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    if group:  # a group's siblings never see each other: fewer scores than the dense rows
        assert packed.blocks.cost() < P * C * C


@pytest.mark.parametrize("window", [None, 4])
def test_keeping_the_kernel_s_outputs_gives_the_dense_gradients(window):
    """The path a CPU update takes (`_Kept`: the flash kernel's own forward and backward, its
    outputs kept instead of a second forward), grouped-query heads (4 on 2) and a scale: the
    output and the gradients of q, k and v equal the dense masked call's to round-off (a
    prompt's key gradients summed over the branches that gathered it), at idle slots too."""
    gen = torch.Generator().manual_seed(4)
    packed = pack(*_batch(gen, [7, 3, 9, 5], 3), group=True, blocks=True,
                  attention=Attention("sdpa", window), width_cost=0.05)
    P, C = packed.input_ids.shape
    q = torch.randn(P, 4, C, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(P, 2, C, 8, generator=gen, requires_grad=True) for _ in range(2))
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                           attn_mask=packed.attention_mask, scale=0.4)
    dense = dense.transpose(1, 2)
    assert block_sdpa._keeps(q, 0.0)
    out = block_sdpa._Kept.apply(q, k, v, packed.blocks, 0.4)
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-6)  # an idle slot: its own value
    w = torch.randn(dense.shape, generator=gen)
    want = torch.autograd.grad((dense * w).sum(), (q, k, v))
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not block_sdpa._keeps(q, 0.1)  # dropout: _Recomputed draws its mask again


def test_buckets_hold_every_block_once_and_cost_no_more_than_one_bucket():
    gen = torch.Generator().manual_seed(1)
    spans = [(list(range(int(a))), list(range(int(a) + int(b)))) for a, b in
             zip(torch.randint(1, 200, (300,), generator=gen),
                 torch.randint(1, 300, (300,), generator=gen))]
    buckets = _split(spans)
    assert sorted(map(id, (s for b in buckets for s in b))) == sorted(map(id, spans))

    def cost(bucket):
        return len(bucket) * max(len(q) for q, _ in bucket) * max(len(k) for _, k in bucket)

    assert 1 < len(buckets) <= 64
    assert sum(cost(b) + CALL_COST for b in buckets) < cost(spans) + CALL_COST


@contextlib.contextmanager
def counting_blocked_calls():
    """The blocked path's calls in the body (without a gradient, or recomputing, or keeping
    the kernel's outputs), counted (the real functions run)."""
    calls = []
    real = block_sdpa.attend, block_sdpa.blocks_mod.attend_keeping

    def counting(f):
        def counted(*args):
            calls.append(1)
            return f(*args)
        return counted

    block_sdpa.attend, block_sdpa.blocks_mod.attend_keeping = (counting(f) for f in real)
    try:
        yield calls
    finally:
        block_sdpa.attend, block_sdpa.blocks_mod.attend_keeping = real


def _attention_module(heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    config = LlamaConfig(hidden_size=32, num_attention_heads=heads, num_key_value_heads=kv_heads)
    config._attn_implementation = "sdpa"
    return LlamaAttention(config, layer_idx=0)


def test_sdpa_takes_the_blocks_only_from_the_mask_they_were_made_for():
    """transformers' `sdpa` (wrapped): a mask with blocks attached runs the blocked path (grouped
    query heads repeated as transformers repeats them), equal to the same mask without blocks;
    an argument the blocked path does not implement reaches transformers' own function (which
    refuses a softcap)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    gen = torch.Generator().manual_seed(2)
    packed = pack(*_batch(gen, [6, 4], 4), group=True, blocks=True,
                  attention=Attention("sdpa"), width_cost=0.05)
    mask = block_sdpa.attach(packed.attention_mask, packed.blocks)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert getattr(sdpa, "lora_ppo_blocks", False)
    assert block_sdpa.attached(mask) is not None
    assert block_sdpa.attached(mask.clone()) is None  # another tensor carries none
    module = _attention_module()
    P, C = packed.input_ids.shape
    q = torch.randn(P, 4, C, 8, generator=gen)
    k, v = (torch.randn(P, 2, C, 8, generator=gen) for _ in range(2))
    with counting_blocked_calls() as calls:
        out, _ = sdpa(module, q, k, v, mask, scaling=0.3)
        ref, _ = sdpa(module, q, k, v, mask.clone(), scaling=0.3)
        assert len(calls) == 1
        real = (packed.input_ids != 0)[:, :, None, None]
        torch.testing.assert_close(out * real, ref * real, rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="softcap"):
            sdpa(module, q, k, v, mask, scaling=0.3, softcap=5.0)
        assert len(calls) == 1


def _trunk_outputs(run, batch, packed):
    """The states predicting each response token and the LoRA gradients of a fixed random
    projection of them (values of the head), with the run's adapters."""
    run.ac.train()
    run.ac.zero_grad(set_to_none=True)
    h = run.ac._predicting_states(*batch, packed)
    m = batch[3].bool()
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(7))
    (h * w)[m].sum().backward()
    grads = {n: p.grad.clone() for n, p in run.ac.named_parameters() if p.grad is not None}
    return h.detach()[m], grads


def _check_model(model_dir, out, checkpointing: bool):
    run = setup(tiny_config(model_dir, out, "rollout.samples_per_prompt=4",
                            "rollout.prompts_per_update=2", "model.seam_check=always",
                            f"model.gradient_checkpointing={str(checkpointing).lower()}"))
    attention = run.ac.layout.attention
    if attention is None or attention.implementation != "sdpa":
        pytest.skip(f"the seam check chose {run.ac.layout}: no SDPA mask to block")
    with torch.no_grad():  # B = 0 would make every adapter a no-op
        for p in run.ac.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    gen = torch.Generator().manual_seed(4)
    batch = _batch(gen, [9, 6], 4, high=min(500, run.ac.vocab))
    packed = pack(*batch, group=True, attention=attention, blocks=True, width_cost=0.05)
    block_sdpa.attach(packed.attention_mask, packed.blocks)
    with counting_blocked_calls() as calls:
        got_h, got_g = _trunk_outputs(run, batch, packed)
    assert calls, "the model's attention never took the blocks"
    want_h, want_g = _trunk_outputs(run, batch, None)  # padded rows, transformers' own masks
    torch.testing.assert_close(got_h, want_h, rtol=0, atol=1e-5)
    assert got_g.keys() == want_g.keys() and got_g
    for n in want_g:
        scale = want_g[n].abs().max().item()
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-4,
                                   atol=max(1e-5, 2e-6 * scale), msg=n)


@pytest.mark.integration
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_packed_forward_with_blocks_equals_the_padded_one(tiny_model_dir, tmp_path,
                                                           checkpointing):
    _check_model(tiny_model_dir, tmp_path / "run", checkpointing)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_with_sdpa_takes_the_blocks_exactly(family, tiny_model_dir, tmp_path):
    """Sliding windows shorter than the sequences, grouped-query heads, masks by layer type,
    gradient checkpointing: each family's packed forward with blocks is its padded forward."""
    model = build_family_model(family, tmp_path / family, tiny_model_dir)
    _check_model(model, tmp_path / "run", checkpointing=True)


def test_a_decode_step_reads_only_the_key_window_and_gives_the_same_attention():
    """A decode step (one query per row) over a static cache: inside `key_window` the call
    takes columns lo .. hi-1 only, equal to the whole cache's; a mask with a True outside the
    window (a row that sees an earlier column) keeps the whole width."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    block_sdpa.install()
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    gen = torch.Generator().manual_seed(5)
    B, W, lo, hi = 3, 20, 6, 15
    q = torch.randn(B, 4, 1, 8, generator=gen)
    k, v = (torch.randn(B, 2, W, 8, generator=gen) for _ in range(2))
    mask = torch.zeros(B, 1, 1, W, dtype=torch.bool)
    for row, start in enumerate((6, 9, 14)):  # right-aligned rows ending at column hi - 1
        mask[row, ..., start:hi] = True
    module = _attention_module()
    whole, _ = sdpa(module, q, k, v, mask, scaling=0.4)
    with block_sdpa.key_window(W, lo, hi):
        assert block_sdpa._narrowed(k, v, mask)[0].shape[2] == hi - lo
        windowed, _ = sdpa(module, q, k, v, mask, scaling=0.4)
        wider = mask.clone()
        wider[0, ..., 2] = True
        assert block_sdpa._narrowed(k, v, wider) is None
    torch.testing.assert_close(windowed, whole, rtol=0, atol=1e-6)
    assert block_sdpa._narrowed(k, v, mask) is None  # outside the window's body


def test_the_backward_makes_the_blocks_again_with_the_forwards_dropout():
    """The blocked path keeps only q, k and v and recomputes in the backward: with attention
    dropout its gradients are those of the forward that was run (the same dropout mask)."""
    gen = torch.Generator().manual_seed(6)
    packed = pack(*_batch(gen, [7, 5], 4), group=True, blocks=True,
                  attention=Attention("sdpa"), width_cost=0.05)
    P, C = packed.input_ids.shape
    q, k, v = (torch.randn(P, 4, C, 8, generator=gen, requires_grad=True) for _ in range(3))
    w = torch.randn(P, C, 4, 8, generator=gen)
    results = []
    for fn in (blocked, block_sdpa._Recomputed.apply):
        torch.manual_seed(0)
        out = fn(q, k, v, packed.blocks, 0.5, None) if fn is not blocked else \
            blocked(packed.blocks, q, k, v, 0.5, None)
        torch.manual_seed(1)  # the backward must not draw from the generator as it stands
        results.append((out.detach(), torch.autograd.grad((out * w).sum(), (q, k, v))))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    for a, b in zip(grads_b, grads_a):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
