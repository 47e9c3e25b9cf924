"""Run by tests/ppo/test_rank_invariance.py, under the `deepspeed` launcher with 2 ranks or as a
plain process (1 rank): one PPO update on a FIXED global batch, then dump the trainable weights.

Usage: rank_worker.py OUT_DIR NAME=CONFIG.yaml [NAME=CONFIG.yaml ...]

Every process builds the same global batch of `ROWS` samples (token ids from a seeded generator,
response lengths that differ across ranks: the first half short, the second half long), scores
all of it with the real model (old log-probs, values, reference log-probs), and keeps its own
share of rows, rank r the r-th slice, whole groups. Scores are injected (a fixed tensor), so the
reward function never runs. Then the loop's own steps 2-4: add_rewards, add_advantages, and
ppo_update with one minibatch and one epoch. With world size W the config's rollout.prompts_per_update
and ppo.minibatch_size are the global ones divided by W.
"""

import sys
from pathlib import Path

import torch
from helpers import update_with

from lora_ppo.builtin.specs import resolve_builtins
from lora_ppo.cli import _quiet
from lora_ppo.config.load import load_config
from lora_ppo.generation.samples import Samples, left_pad
from lora_ppo.ppo.collect import score_samples
from lora_ppo.ppo.loop import add_advantages, add_rewards, setup
from lora_ppo.runtime.dist import shutdown_distributed

ROWS = 16
# rank 0's half of the global batch is short, rank 1's long (issue 20: 1,2,2,3 against 6,6,6,6)
LENGTHS = [1, 2, 2, 3, 1, 2, 3, 3, 6, 6, 6, 6, 5, 6, 6, 6]


def global_batch(pad_id: int, width: int, env: bool = False) -> tuple[Samples, torch.Tensor]:
    """The fixed samples of the whole batch and their raw scores (ROWS,). `env`: trajectories,
    positions 1-2 of every response of 4 or more tokens the environment's (rank 1's half holds
    most of them, so the ranks count different numbers of the policy's tokens)."""
    g = torch.Generator().manual_seed(1234)
    prompts = [torch.randint(10, 250, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 9, (ROWS,), generator=g)]
    query_ids, query_mask = left_pad(prompts, pad_id)
    response_ids = torch.randint(10, 250, (ROWS, width), generator=g)
    lengths = torch.tensor(LENGTHS)
    response_mask = (torch.arange(width)[None] < lengths[:, None]).float()
    response_ids = response_ids.masked_fill(response_mask == 0, pad_id)
    scores = torch.randn(ROWS, generator=g)
    has_eos = lengths < width  # the responses that reached the length cap are truncated
    env_mask = None
    if env:
        env_mask = torch.zeros(ROWS, width)
        env_mask[lengths >= 4, 1:3] = 1.0
    return Samples(query_ids, query_mask, response_ids, response_mask, has_eos,
                   env_mask=env_mask), scores


def one_update(cfg_path: str, env: bool = False) -> dict:
    cfg = resolve_builtins(load_config(cfg_path, []))
    run = setup(cfg)
    rank, world = run.dist.rank, run.dist.world_size
    samples, scores = global_batch(run.tokenizer.pad_token_id, max(LENGTHS), env)
    ro = score_samples(run, samples)  # every rank scores the whole batch: the same old log-probs
    share = torch.arange(rank * ROWS // world, (rank + 1) * ROWS // world, device=scores.device)
    ro = ro.index(share.to(ro.query_ids.device))
    ro = add_advantages(run, add_rewards(run, ro, scores[share].to(ro.query_ids.device),
                                         run.kl_ctl.value))
    before = trainable(run.ac)
    update_with(run, ro, run.generator)
    return {"before": before, "weights": trainable(run.ac), "rank": rank, "world_size": world}


def trainable(ac) -> dict:
    return {n: p.detach().float().cpu().clone() for n, p in ac.named_parameters()
            if p.requires_grad}


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    _quiet()
    out, results = Path(args[0]), {}
    for spec in args[1:]:
        name, _, path = spec.partition("=")
        results[name] = one_update(path, env=name.endswith("_env"))
    rank = next(iter(results.values()))["rank"]
    torch.save(results, out / f"rank{rank}.pt")
    shutdown_distributed()
