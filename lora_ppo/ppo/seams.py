"""Seam checks at setup: what PPO computes is what the model computes, on a few probe tokens.

lora_ppo runs the trunk and the LM head itself (chunked log-probs, packed rows, its own decode
loop), so each way it leaves `*ForCausalLM.forward` is a seam where an architecture can differ
from the ones tested most: a post-processing of the logits after the head, an attention mask
built without the position ids that separate packed sequences (OPT) or from a 2-D mask only
(Bloom's ALiBi), dropout probabilities kept as floats on modules (OPT), a quantized kernel chosen
by train/eval mode (bitsandbytes 8-bit on a CPU). Before training, `check_seams` runs, under the
policy adapter made non-zero for the check and restored bit for bit after it:

1. logits   our trunk + head + `logits_transform` against the model's own `forward().logits`
            (log-softmax, max abs difference): a mismatch is refused, naming the model type;
2. modes    a train-mode forward against an eval-mode one (no grad): a mismatch is refused,
            naming the model type and the quantization;
3. layouts  log-probs of probe sequences in packed rows (a shared prompt; an explicit mask; the
            model's own detection of restarting position ids) against the padded forward; the
            first layout that agrees is used, one line saying so when it is not the preferred;
4. decoding the sampler's log-probs (KV cache, continuous batching) against the padded forward:
            continuous batching, then the static cache, are given up, one line each, where they
            do not agree.

Each check costs a few forwards of ~30 tokens. The outcome is cached per model, settings and
library versions under $LORA_PPO_CACHE/seams (`model.seam_check=auto`), so a model already
checked starts at once; `always` checks again, `off` trusts the preferred layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import json
import os
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from lora_ppo.errors import UserError
from lora_ppo.generation.generate import DecodePath, sample
from lora_ppo.generation.samples import left_pad
from lora_ppo.io.atomic import atomic_write_text
from lora_ppo.io.checkpoint import base_fingerprint
from lora_ppo.modeling.actor_critic import ActorCritic
from lora_ppo.modeling.loading import quantization_mode
from lora_ppo.modeling.packing import PADDED, Attention, Layout, explicit_attentions
from lora_ppo.modeling.roles import POLICY
from lora_ppo.rl.logprobs import transform_logits

SEAM_VERSION = 1


class Seams(NamedTuple):
    """What setup decided: the layout of scoring and update forwards, and the decode path. The
    run keeps it beside the user's config (`Run.seams`), which it never rewrites."""

    layout: Layout
    decode: DecodePath
    notes: tuple[str, ...] = ()  # one line per fallback taken


def tolerance(ac: ActorCritic) -> float:
    """Max |difference| of log-probs that counts as round-off: fp32 computes agree to ~1e-6,
    bf16 and fp16 to ~1e-2 (other matmul shapes, other rounding)."""
    dtype = ac.causal_lm.get_input_embeddings().weight.dtype
    return 1e-4 if dtype == torch.float32 else 5e-2


def preferred(ac: ActorCritic, cfg) -> list[tuple[str, Layout]]:
    """Candidate layouts, best first: a shared prompt (n > 1), an explicit mask, the model's
    detection of restarting positions, padded. Only those `cfg` allows."""
    if not cfg.model.padding_free:
        return [("padded", PADDED)]
    masks = explicit_attentions(ac.causal_lm.config,
                                ac.causal_lm.get_input_embeddings().weight.dtype)
    out = []
    if cfg.model.shared_prompt and cfg.rollout.samples_per_prompt > 1:
        out += [("shared prompt", Layout(True, True, a)) for a in masks]
    out += [("packed", Layout(True, False, a)) for a in masks]
    out += [("packed (position ids)", Layout(True, False, None)), ("padded", PADDED)]
    return out


# -- probes -----------------------------------------------------------------------------------

def _probe(ac: ActorCritic, pad_id: int, gen: torch.Generator):
    """Four samples, left-padded prompts and right-padded responses, ids away from special
    tokens. The first two share a prompt (a group); lengths are chosen so that packing puts two
    sequences in one row both grouped (5 + 4 + 6 = 15 with 5, under the longest, 20) and not
    (9 with 11), and so that a small sliding window is crossed."""
    vocab = ac.vocab
    low = min(16, vocab // 4)

    def ids(n):
        return torch.randint(low, vocab, (n,), generator=gen).tolist()

    shared = ids(5)
    prompts, responses = [shared, shared, ids(2), ids(12)], [ids(4), ids(6), ids(3), ids(8)]
    q_ids, q_mask = left_pad(prompts, pad_id)
    width = max(len(r) for r in responses)
    r_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    r_mask = torch.zeros(len(responses), width)
    for i, r in enumerate(responses):
        r_ids[i, :len(r)] = torch.tensor(r)
        r_mask[i, :len(r)] = 1.0
    return [t.to(ac.device) for t in (q_ids, q_mask, r_ids, r_mask)]


@contextlib.contextmanager
def _nonzero_adapters(ac: ActorCritic, gen: torch.Generator):
    """Every trainable LoRA B made random for the body (B = 0 would hide an adapter's own
    dropout or path), then put back bit for bit."""
    saved = [(p, p.detach().clone()) for n, p in ac.named_parameters()
             if p.requires_grad and "lora_B" in n]
    try:
        with torch.no_grad():
            for p, _ in saved:
                p.add_(torch.randn(p.shape, generator=gen).to(p) * 0.05)
        yield
    finally:
        with torch.no_grad():
            for p, original in saved:
                p.copy_(original)


def _logprobs(ac, batch, layout: Layout) -> torch.Tensor:
    lp, _, _ = ac(*batch, temperature=1.0, chunk_size=4096, with_values=False, layout=layout)
    return lp * batch[3]


def _max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# -- the checks -------------------------------------------------------------------------------

def _logits_diff(ac: ActorCritic, batch) -> float:
    """Our log-softmax of the probes against the model's own forward's."""
    q_ids, _, r_ids, _ = batch
    ids = torch.cat([q_ids[3:], r_ids[3:]], 1)  # the one unpadded probe: prompt + response
    h = ac.hidden(ids, torch.ones_like(ids))
    ours = transform_logits(ac.lm_head(h), 1.0, ac.logits_transform).log_softmax(-1)
    theirs = ac.causal_lm(input_ids=ids).logits.float().log_softmax(-1)
    return _max(ours, theirs)


def _modes_diff(ac: ActorCritic, batch) -> float:
    was = ac.training
    try:
        ac.train()
        train = _logprobs(ac, batch, PADDED)
        ac.eval()
        return _max(train, _logprobs(ac, batch, PADDED))
    finally:
        ac.train(was)


def _layout_diff(ac: ActorCritic, batch, layout: Layout, reference: torch.Tensor) -> float:
    try:
        return _max(_logprobs(ac, batch, layout), reference)
    except Exception:  # noqa: BLE001 - a model that cannot take this layout fails the check
        return float("inf")


def _decode_diff(ac: ActorCritic, batch, reference: torch.Tensor, pad_id: int,
                 continuous: bool, static: bool) -> float:
    """The sampler's own log-probs of the probe responses (teacher-forced through the decode
    loop by drawing each probe token: uniforms are not needed, the tokens are given) against
    the padded forward's."""
    q_ids, q_mask, r_ids, r_mask = batch
    prompts = [q[m.bool()].tolist() for q, m in zip(q_ids.cpu(), q_mask.cpu())]
    try:
        drawn = sample(ac, prompts, max_new_tokens=r_ids.shape[1], temperature=1.0,
                       greedy=True, stop_ids=[-1], pad_id=pad_id, generation_batch_size=2,
                       continuous=continuous,
                       static_cache=static, score=True, forced=r_ids)
    except Exception:  # noqa: BLE001 - a cache this model cannot use fails the check
        return float("inf")
    return _max(drawn.logprobs.to(r_mask.device) * r_mask, reference)


def check_seams(ac: ActorCritic, cfg, pad_id: int) -> Seams:
    """Run the checks (module doc) under the policy in eval mode; refuse what cannot be made
    exact, fall back where a slower path is exact."""
    gen = torch.Generator().manual_seed(1234)  # the run's own random streams stay untouched
    tol = tolerance(ac)
    kind = ac.causal_lm.config.model_type
    notes = []
    with _nonzero_adapters(ac, gen), ac.role(POLICY, train=False), torch.no_grad():
        batch = _probe(ac, pad_id, gen)
        d = _logits_diff(ac, batch)
        if not d <= tol:
            raise UserError(
                f"model type {kind}: lora_ppo's logits differ from the model's own forward by "
                f"{d:.3g} (a post-processing of the LM head's output it does not know); "
                "training it would optimise another distribution than the model samples; "
                "report the model type so it can be supported")
        d = _modes_diff(ac, batch)
        if not d <= tol:
            raise UserError(
                f"model type {kind} with quantization.mode={quantization_mode(cfg.quantization)}: "
                "a train-mode "
                f"forward differs from an eval-mode one by {d:.3g} (dropout left in the model, "
                "or a kernel chosen by the mode), so the first PPO ratio would not be 1; try "
                "quantization.mode=none or 4bit")
        reference = _logprobs(ac, batch, PADDED)
        candidates = preferred(ac, cfg)
        chosen = next(((name, layout) for name, layout in candidates
                       if _layout_diff(ac, batch, layout, reference) <= tol))
        if chosen[1] != candidates[0][1]:
            notes.append(f"model type {kind}: {candidates[0][0]} rows do not give the padded "
                         f"forward's log-probs; scoring and updates use {chosen[0]} rows")
        continuous, static = cfg.rollout.continuous_batching, cfg.rollout.static_kv_cache
        for _ in range(3):
            if _decode_diff(ac, batch, reference, pad_id, continuous, static) <= tol:
                break
            if continuous:
                continuous = False
                notes.append(f"model type {kind}: continuous batching does not decode what the "
                             "forward scores; rows decode in batches (rollout.continuous_"
                             "batching=false)")
            elif static:
                static = False
                notes.append(f"model type {kind}: the static KV cache does not decode what the "
                             "forward scores; decoding uses a dynamic cache "
                             "(rollout.static_kv_cache=false)")
            else:
                raise UserError(f"model type {kind}: the KV-cached decode differs from the "
                                "forward it is scored by; it cannot be sampled exactly")
    return Seams(chosen[1], DecodePath(continuous, static), tuple(notes))


# -- the cache of outcomes --------------------------------------------------------------------

def _key(ac: ActorCritic, cfg, model_path: str) -> str:
    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    adapter = cfg.model.init_adapter
    facts = {
        "seam_version": SEAM_VERSION, "base": base_fingerprint(model_path), "versions": versions,
        "quantization": [quantization_mode(cfg.quantization, ac.device.type),
                         cfg.quantization.quant_type,
                         cfg.quantization.double_quant],
        "dtype": str(ac.causal_lm.get_input_embeddings().weight.dtype),
        "device": ac.device.type,
        "attn": getattr(ac.causal_lm.config, "_attn_implementation", None),
        "lora": [cfg.lora.r, cfg.lora.target_modules],
        "init_adapter": None if not adapter else hashlib.sha256(
            (Path(adapter) / "adapter_config.json").read_bytes()).hexdigest(),
        "wanted": [cfg.model.padding_free, cfg.model.shared_prompt,
                   cfg.rollout.samples_per_prompt > 1, cfg.rollout.continuous_batching,
                   cfg.rollout.static_kv_cache],
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def _cache_dir() -> Path:
    return Path(os.environ.get("LORA_PPO_CACHE") or Path.home() / ".cache" / "lora_ppo") / "seams"


def _to_json(s: Seams) -> dict:
    a = s.layout.attention
    return {"packed": s.layout.packed, "group": s.layout.group,
            "attention": None if a is None else [a.implementation, a.window, list(a.layer_types),
                                                 str(a.dtype).removeprefix("torch.")],
            "continuous_batching": s.decode.continuous_batching,
            "static_kv_cache": s.decode.static_kv_cache,
            "notes": list(s.notes)}


def _from_json(d: dict) -> Seams:
    a = d["attention"]
    attention = None if a is None else Attention(a[0], a[1], tuple(a[2]), getattr(torch, a[3]))
    return Seams(Layout(d["packed"], d["group"], attention),
                 DecodePath(d["continuous_batching"], d["static_kv_cache"]), tuple(d["notes"]))


def seams_for(ac: ActorCritic, cfg, pad_id: int, model_path: str) -> tuple[Seams, Optional[str]]:
    """The seams of this model and settings (`model.seam_check`): cached, checked, or trusted;
    and a progress line when the checks ran."""
    mode = cfg.model.seam_check
    if mode == "off":
        best = preferred(ac, cfg)[0][1]
        return Seams(best, DecodePath(cfg.rollout.continuous_batching,
                                      cfg.rollout.static_kv_cache)), None
    path = _cache_dir() / f"{_key(ac, cfg, model_path)}.json"
    if mode == "auto" and path.is_file():
        try:
            return _from_json(json.loads(path.read_text())), None
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # an unreadable entry is checked again and rewritten
    t0 = time.perf_counter()
    seams = check_seams(ac, cfg, pad_id)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(_to_json(seams), indent=1))
    except OSError:
        pass  # a read-only cache only costs the check next time
    return seams, (f"seam check ({time.perf_counter() - t0:.1f} s): the model's logits, its "
                   "train and eval modes, the packed rows and the decode loop agree")
