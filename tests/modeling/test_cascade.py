"""Cascade attention (modeling/cascade.py): a decode step's attention with each group's shared
prompt read once equals the attention over every row's own copy of it; and the wrapped `sdpa`
takes it only for the cache layer it was planned for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_ppo.modeling import block_sdpa, cascade


def _batch(dtype=torch.float32):
    """A decode batch of 7 rows over 30 columns, 4 query heads on 2 key/value heads: rows 0-2
    share prefix 0 (9 tokens), rows 3-4 prefix 1 (5 tokens, so the stack is padded), row 5 has
    none (its own columns from its start), row 6 is a free slot (only the column it writes).
    Each row's prefix columns hold a copy of its prefix; its start differs (a row placed later,
    a batch shifted left)."""
    gen = torch.Generator().manual_seed(3)
    B, hk, H, W, D, col = 7, 2, 4, 30, 8, 29
    key, value = (torch.randn(B, hk, W, D, generator=gen).to(dtype) for _ in range(2))
    query = torch.randn(B, H, 1, D, generator=gen).to(dtype)
    prefixes = [(torch.randn(hk, n, D, generator=gen).to(dtype),
                 torch.randn(hk, n, D, generator=gen).to(dtype)) for n in (9, 5)]
    rows = {0: (0, 4), 1: (0, 4), 2: (0, 10), 3: (1, 12), 4: (1, 13), 5: (-1, 8), 6: (-1, col)}
    mask = torch.zeros(B, W, dtype=torch.bool)
    prefix_of = torch.full((B,), -1)
    own_from = torch.zeros(B, dtype=torch.long)
    for r, (c, start) in rows.items():
        mask[r, start:col + 1] = True
        prefix_of[r] = c
        if c >= 0:
            n = prefixes[c][0].shape[1]
            key[r, :, start:start + n], value[r, :, start:start + n] = prefixes[c]
        own_from[r] = start + (prefixes[c][0].shape[1] if c >= 0 else 0)
    P = max(k.shape[1] for k, _ in prefixes)
    stacked = [torch.zeros(2, hk, P, D, dtype=dtype) for _ in range(2)]
    for c, (k, v) in enumerate(prefixes):
        stacked[0][c, :, :k.shape[1]], stacked[1][c, :, :v.shape[1]] = k, v
    lo = int(own_from.min())
    p = cascade.plan(prefix_of, torch.tensor([9, 5]), own_from, mask, lo)
    return query, key, value, mask, stacked, p, col


def _dense(query, key, value, mask, scale):
    groups = query.shape[1] // key.shape[1]
    k, v = (x.repeat_interleave(groups, dim=1) for x in (key, value))
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask[:, None, None], scale=scale)
    return out.transpose(1, 2)


def test_a_shared_prefix_read_once_equals_every_row_s_own_copy():
    query, key, value, mask, stacked, p, col = _batch()
    assert p.rows.tolist() == [0, 1, 2, 3, 4] and p.members.shape == (2, 3)
    out = cascade.attend(query, key[:, :, p.lo:col + 1], value[:, :, p.lo:col + 1], *stacked, p,
                         0.3)
    torch.testing.assert_close(out, _dense(query, key, value, mask, 0.3), rtol=0, atol=1e-6)


def test_in_bf16_it_is_as_close_to_fp32_as_the_dense_attention_is():
    """bf16 inputs: the scores and the softmax are taken in fp32, the output is bf16."""
    exact = _dense(*_batch()[:4], None)
    query, key, value, mask, stacked, p, col = _batch(torch.bfloat16)
    out = cascade.attend(query, key[:, :, p.lo:col + 1], value[:, :, p.lo:col + 1], *stacked, p,
                         None)
    assert out.dtype == torch.bfloat16
    dense_err = (_dense(query, key, value, mask, None).float() - exact).abs().max()
    assert (out.float() - exact).abs().max() <= 2 * dense_err


def _attention_module():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    config._attn_implementation = "sdpa"
    return LlamaAttention(config, layer_idx=0)


def test_the_wrapped_sdpa_takes_the_cascade_only_for_the_layer_it_was_planned_for(monkeypatch):
    """Inside `key_window` with a plan, a one-query call whose keys are the planned layer's
    (by data pointer) goes through cascade.attend and equals the dense attention; another
    layer's keys, a call of several queries, and calls outside the window's body take
    transformers' own function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    block_sdpa.install()
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    query, key, value, mask, stacked, p, col = _batch()
    W = key.shape[2]
    module = _attention_module()
    mask4 = mask[:, None, None]
    dense = _dense(query, key, value, mask, 0.3)
    calls = []
    real = cascade.attend

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(cascade, "attend", spy)
    other = key.clone()
    with block_sdpa.key_window(W, 0, col + 1, (p, {key.data_ptr(): tuple(stacked)})):
        out, _ = sdpa(module, query, key, value, mask4, scaling=0.3)
        assert len(calls) == 1
        torch.testing.assert_close(out, dense, rtol=0, atol=1e-6)
        sdpa(module, query, other, value, mask4, scaling=0.3)  # not the planned layer
        two = torch.cat([query, query], 2)
        sdpa(module, two, key, value, mask4.expand(-1, -1, 2, -1), scaling=0.3)
        assert len(calls) == 1
    sdpa(module, query, key, value, mask4, scaling=0.3)
    assert len(calls) == 1


@pytest.mark.parametrize("members", [(1,), (4, 1, 2)])
def test_the_plan_lists_each_group_s_rows_once(members):
    """Groups of any size (one row of its own included): every row with a prefix is in its
    group's row of `members` exactly once, `rows` in the order of members[valid]."""
    prefix_of = torch.tensor([c for c, n in enumerate(members) for _ in range(n)] + [-1])
    prefix_of = prefix_of[torch.randperm(len(prefix_of), generator=torch.Generator().manual_seed(0))]
    mask = torch.ones(len(prefix_of), 6, dtype=torch.bool)
    p = cascade.plan(prefix_of, torch.tensor([2] * len(members)), torch.zeros(len(prefix_of),
                     dtype=torch.long), mask, 0)
    assert p.members.shape == (len(members), max(members))
    for c, n in enumerate(members):
        rows = p.members[c][p.valid[c]].tolist()
        assert len(rows) == n and all(prefix_of[r] == c for r in rows)
    assert p.rows.tolist() == p.members[p.valid].tolist()
    assert sorted(p.rows.tolist()) == (prefix_of >= 0).nonzero().squeeze(-1).tolist()
