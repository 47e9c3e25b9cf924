"""The policy we train is the model we ship, on every family people fine-tune.

For 14 architectures at tiny size (tests/families.py keeps what distinguishes each released
checkpoint: Gemma 2's logit soft-cap, Cohere's logit_scale, Granite's logits_scaling, OPT's dropout
floats, Bloom's ALiBi, sliding windows shorter than the sequences...), with a random non-zero
adapter and value head, through `loop.setup` (the seam check, the DeepSpeed engine):

- the sampler's log-probs and the scoring forward's (the layout the seam check chose: a shared
  prompt, packed rows, or padded) equal the model's own `forward().logits` of each sequence run
  alone, log-softmaxed at the temperature (1e-5);
- the first minibatch's ratio is 1: the update's forward (train mode, gradient checkpointing,
  through the engine) gives the rollout's log-probs (1e-5).
"""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, build_family_model
from helpers import tiny_config

from lora_ppo.ppo.collect import generate_samples, score_samples
from lora_ppo.ppo.loop import setup
from lora_ppo.rl.logprobs import chunk_rows

pytestmark = pytest.mark.slow

T = 0.7


def _own_logprobs(ac, query, q_mask, response, r_mask) -> torch.Tensor:
    """Each sample alone through the model's own forward: log softmax(logits / T) at its
    response tokens, (B, R), 0 on padding."""
    out = torch.zeros(response.shape)
    for i in range(len(query)):
        q = query[i][q_mask[i].bool()]
        r = response[i][r_mask[i].bool()]
        logits = ac.causal_lm(input_ids=torch.cat([q, r])[None]).logits[0].float()
        logp = (logits / T).log_softmax(-1)[len(q) - 1:len(q) - 1 + len(r)]
        out[i, :len(r)] = logp.gather(-1, r[:, None]).squeeze(-1)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_scored_and_updated_log_probs_are_the_models_own(family, tiny_model_dir,
                                                                 tmp_path):
    model = build_family_model(family, tmp_path / family, tiny_model_dir)
    run = setup(tiny_config(
        model, tmp_path / "run", f"rollout.temperature={T}", "rollout.samples_per_prompt=2",
        "rollout.prompts_per_update=4", "rollout.max_new_tokens=10", "value.head_init_std=0.5",
        "model.gradient_checkpointing=true", "model.seam_check=always",
        "rollout.stop_token_ids=[" + ",".join(str(i) for i in range(300, 330)) + "]"))
    with torch.no_grad():  # B = 0 would make every adapter a no-op
        for p in run.ac.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    torch.manual_seed(0)
    prompts = [p for p in run.prompts.take(4) for _ in range(2)]
    s = generate_samples(run, prompts)
    assert s.logprobs is not None and s.response_mask.sum(1).unique().numel() > 1
    m = s.response_mask
    with torch.no_grad():
        run.ac.eval()
        own = _own_logprobs(run.ac, s.query_ids, s.query_mask, s.response_ids, m)
        scored, _, _ = run.ac(s.query_ids, s.query_mask, s.response_ids, m, temperature=T,
                              chunk_size=64)
    torch.testing.assert_close(s.logprobs, own, rtol=0, atol=1e-5)
    torch.testing.assert_close(scored * m, own, rtol=0, atol=1e-5)
    # The update's first forward: train mode, checkpointing, through the engine.
    ro = score_samples(run, s)
    run.ac.train()
    lp, _, values = run.engine(ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask,
                               temperature=T, chunk_size=chunk_rows(run.ac.vocab, 1.0))
    assert float(((lp.detach() - ro.logprobs) * m).abs().max()) < 1e-5
    # A value is a sum of products of a 0.5-std head with the states (Gemma scales them by
    # sqrt(hidden)): terms of ~100 cancel to values near 0, so fp32 round-off reaches ~3e-5.
    torch.testing.assert_close(values.detach() * m, ro.values, rtol=1e-5, atol=1e-4)
