"""Seam checks at setup: what PPO computes is what the model computes, on a few probe tokens.

lora_ppo runs the trunk and the LM head itself (chunked log-probs, packed rows, its own decode
loop), so each way it leaves `*ForCausalLM.forward` is a seam where an architecture can differ
from the ones tested most: a post-processing of the logits after the head, an attention mask
built without the position ids that separate packed sequences (OPT) or from a 2-D mask only
(Bloom's ALiBi), dropout probabilities kept as floats on modules (OPT), a quantized kernel chosen
by train/eval mode (bitsandbytes 8-bit on a CPU). Before training, `check_seams` runs, under the
policy adapter made non-zero for the check and restored bit for bit after it:

1. logits   our trunk + head + `logits_transform` against the model's own `forward().logits`
            (log-softmax, max abs difference): on a mismatch (a post-processing of the head's
            output lora_ppo does not know) scoring, updates and sampling take the forward's own
            logits (modeling/own_logits.py), padded rows, one line naming the model type and the
            memory it costs; refused only if that path too differs;
2. modes    a train-mode forward against an eval-mode one (no grad): a mismatch is refused,
            naming the model type and the quantization;
3. layouts  log-probs of probe sequences in packed rows (a shared prompt; an explicit mask; the
            model's own detection of restarting position ids) against the padded forward; the
            first layout that agrees is used, one line saying so when it is not the preferred;
4. decoding the sampler's log-probs, decoded as the run decodes (the policy folded into the
            weights where rollout.fold_for_generation folds it, continuous batching with its
            cache's shift-left, the static cache) against the padded forward: the fold, then
            continuous batching, then the static cache, are given up, one line each, where they
            do not agree.

Every check runs with the adapter the run starts from (model.init_adapter: DoRA, lora_bias,
rsLoRA, modules_to_save as saved) and in the run's precision: the parameters cast to
deepspeed.precision as DeepSpeed will cast them, under the run's torch autocast if it has one.

Each check costs a few forwards of ~30 tokens. The outcome is cached per model, settings and
library versions (seam_cache.py), so a model already checked starts at once.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from lora_ppo.config import Config
from lora_ppo.errors import UserError
from lora_ppo.generation.folded import can_fold, folded_policy, unfoldable
from lora_ppo.generation.generate import DecodePath, sample
from lora_ppo.generation.samples import left_pad
from lora_ppo.modeling.actor_critic import ActorCritic
from lora_ppo.modeling.loading import quantization_mode
from lora_ppo.modeling.packing import PADDED, Layout, explicit_attentions, position_ids_from_mask
from lora_ppo.modeling.roles import POLICY
from lora_ppo.rl.logprobs import transform_logits
from lora_ppo.runtime.ds_config import resolve_precision
from lora_ppo.sizing.memory import own_logits_bytes

SEAM_VERSION = 2  # 2: the fold, the shift-left and the run's precision are checked


class Seams(NamedTuple):
    """What setup decided: the layout of scoring and update forwards, and the decode path. The
    run keeps it beside the user's config (`Run.seams`), which it never rewrites."""

    layout: Layout
    decode: DecodePath
    notes: tuple[str, ...] = ()  # one line per fallback taken
    own_logits: bool = False  # logits from the model's own forward (ActorCritic.use_own_logits)


def _reduced(ac: ActorCritic) -> bool:
    """Whether the forwards compute in bf16 / fp16: such weights, or the run's autocast."""
    dtype = ac.causal_lm.get_input_embeddings().weight.dtype
    return dtype != torch.float32 or ac.autocast is not None


def tolerance(ac: ActorCritic) -> float:
    """Max |difference| of log-probs that counts as round-off, beyond `_rtol`'s share: fp32
    computes agree to ~1e-6, bf16 and fp16 to ~1e-2 (other matmul shapes, other rounding)."""
    return 5e-2 if _reduced(ac) else 1e-4


def _rtol(ac: ActorCritic) -> float:
    """The share of each log-prob's magnitude that also counts as round-off: 0 in fp32; in bf16
    and fp16 2^-6, four ulps of bf16's 8-bit mantissa. Logits of a trained model are tens, one
    bf16 ulp of 16..32 is 0.0625: the demo model's probe log-probs (down to -25) differed by
    0.06..0.08 between the decode loop and the forward, every decode path alike."""
    return 2.0 ** -6 if _reduced(ac) else 0.0


def preferred(ac: ActorCritic, cfg: Config) -> list[tuple[str, Layout]]:
    """Candidate layouts, best first: a shared prompt (n > 1), an explicit mask, the model's
    detection of restarting positions, padded. Only those `cfg` allows."""
    if not cfg.model.padding_free or ac.own_logits:
        return [("padded", PADDED)]
    masks = explicit_attentions(ac.causal_lm.config,
                                ac.causal_lm.get_input_embeddings().weight.dtype)
    blocked = [a for a in masks if cfg.model.block_attention and a.implementation == "sdpa"]
    out = []
    if cfg.model.shared_prompt and cfg.rollout.samples_per_prompt > 1:
        out += [("shared prompt (blocks)", Layout(True, True, a, True)) for a in blocked]
        out += [("shared prompt", Layout(True, True, a)) for a in masks]
    out += [("packed (blocks)", Layout(True, False, a, True)) for a in blocked]
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
    """Every trainable LoRA B (a lora_bias's bias too) made random for the body (B = 0 would
    hide an adapter's own dropout or path), and every DoRA magnitude moved off the weight norm
    it starts at, then put back bit for bit."""
    saved = [(n, p, p.detach().clone()) for n, p in ac.named_parameters()
             if p.requires_grad and ("lora_B" in n or "lora_magnitude_vector" in n)]
    try:
        with torch.no_grad():
            for n, p, _ in saved:
                noise = torch.randn(p.shape, generator=gen).to(p) * 0.05
                p.add_(noise) if "lora_B" in n else p.mul_(1 + noise)
        yield
    finally:
        with torch.no_grad():
            for _, p, original in saved:
                p.copy_(original)


@contextlib.contextmanager
def _in_run_precision(ac: ActorCritic, cfg: Config):
    """The body sees the parameters in the dtype the run trains them in: with
    deepspeed.precision bf16 or fp16 DeepSpeed casts every float parameter of the module to it
    when the engine is built, after these checks (engine.py::_cast_module_mixed_precision);
    here they are cast for the body, and the original tensors put back after it."""
    precision = resolve_precision(cfg.deepspeed.precision, ac.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    saved = []
    try:
        if dtype is not None:
            for p in ac.parameters():
                if p.dtype in floats and p.dtype != dtype:
                    saved.append((p, p.data))
                    p.data = p.data.to(dtype)
        yield
    finally:
        for p, data in saved:
            p.data = data


def _logprobs(ac, batch, layout: Layout) -> torch.Tensor:
    lp, _, _ = ac(*batch, temperature=1.0, chunk_size=4096, with_values=False, layout=layout)
    return lp * batch[3]


def _max(a: torch.Tensor, b: torch.Tensor, rtol: float = 0.0) -> float:
    """Max over elements of |a - b| less `rtol` x |b|: compared with `tolerance`."""
    a, b = a.float(), b.float()
    return float(((a - b).abs() - rtol * b.abs()).max())


# -- the checks -------------------------------------------------------------------------------

def _logits_diff(ac: ActorCritic, batch) -> float:
    """Our log-softmax of the probes against the model's own forward's."""
    q_ids, _, r_ids, _ = batch
    ids = torch.cat([q_ids[3:], r_ids[3:]], 1)  # the one unpadded probe: prompt + response
    h = ac.hidden(ids, torch.ones_like(ids))
    ours = transform_logits(ac.lm_head(h), 1.0, ac.logits_transform).log_softmax(-1)
    theirs = ac.causal_lm(input_ids=ids).logits.float().log_softmax(-1)
    return _max(ours, theirs, _rtol(ac))


def _own_diff(ac: ActorCritic, batch) -> float:
    """Log-probs of the probe responses through lora_ppo's scoring of the model's own logits
    (ActorCritic._own_logprobs) against the model's forward called plainly on the padded rows."""
    q_ids, q_mask, r_ids, r_mask = batch
    mask = torch.cat([q_mask, r_mask.long()], 1)
    logits = ac.causal_lm(input_ids=torch.cat([q_ids, r_ids], 1), attention_mask=mask,
                          position_ids=position_ids_from_mask(mask)).logits
    q, r = q_ids.shape[1], r_ids.shape[1]
    theirs = logits[:, q - 1:q - 1 + r].float().log_softmax(-1)
    theirs = theirs.gather(-1, r_ids[..., None]).squeeze(-1) * r_mask
    return _max(_logprobs(ac, batch, PADDED), theirs, _rtol(ac))


def _own_logits(ac: ActorCritic, cfg: Config, batch, d: float) -> str:
    """Fall back to the model's own forward's logits, where lora_ppo's own differ by `d`; the
    one line saying so and what it costs (sizing/memory.py::own_logits_bytes), or a refusal
    where even that path does not give the model's log-probs."""
    kind = ac.causal_lm.config.model_type
    ac.use_own_logits()
    d_own = _own_diff(ac, batch)
    if not d_own <= tolerance(ac):
        raise UserError(
            f"model type {kind}: lora_ppo's logits differ from the model's own forward by "
            f"{d:.3g}, and scoring that forward's own logits still by {d_own:.3g}; it cannot be "
            "trained exactly; report the model type so it can be supported")
    s = 2 if ac.autocast is not None else ac.causal_lm.get_input_embeddings().weight.element_size()
    mib = own_logits_bytes(cfg.ppo.micro_batch_size * cfg.rollout.max_new_tokens, ac.vocab, s,
                           grad=True) / 2**20
    return (f"model type {kind}: lora_ppo's logits differ from the model's own forward by "
            f"{d:.3g} (a post-processing of the LM head's output it does not know); scoring, "
            "updates and sampling take the model's own forward's logits, on padded rows: "
            f"{mib:.1f} MiB more per update micro-batch (ppo.micro_batch_size x rollout."
            "max_new_tokens x vocab logits; `lora-ppo estimate --own-logits` counts it)")


def _modes_diff(ac: ActorCritic, batch) -> float:
    was = ac.training
    try:
        ac.train()
        train = _logprobs(ac, batch, PADDED)
        ac.eval()
        return _max(train, _logprobs(ac, batch, PADDED), _rtol(ac))
    finally:
        ac.train(was)


def _layout_diff(ac: ActorCritic, batch, layout: Layout, reference: torch.Tensor) -> float:
    ac.every_mask_blocked = True  # the probes take a blocked layout's path (actor_critic.py)
    try:
        return _max(_logprobs(ac, batch, layout), reference, _rtol(ac))
    except Exception:  # noqa: BLE001 - a model that cannot take this layout fails the check
        return float("inf")
    finally:
        ac.every_mask_blocked = False


def _decode_diff(ac: ActorCritic, batch, reference: torch.Tensor, pad_id: int,
                 how: DecodePath) -> float:
    """The sampler's own log-probs of the probe responses (teacher-forced through the decode
    loop by drawing each probe token: uniforms are not needed, the tokens are given), decoded
    as the run will (`how`), against the padded forward's. Each probe twice, two slots: rows
    enter as others stop, and the continuous batch's cache (prompt + 8 + 8 columns for 8-token
    responses, continuous.py::continuous_slack) fills up, so its rows are moved left too."""
    q_ids, q_mask, r_ids, r_mask = batch
    prompts = [q[m.bool()].tolist() for q, m in zip(q_ids.cpu(), q_mask.cpu())] * 2
    try:
        with folded_policy(ac.peft_model) if how.fold else contextlib.nullcontext():
            drawn = sample(ac, prompts, max_new_tokens=r_ids.shape[1], temperature=1.0,
                           greedy=True, stop_ids=[-1], pad_id=pad_id, generation_batch_size=2,
                           continuous=how.continuous_batching, static_cache=how.static_kv_cache,
                           score=True, forced=r_ids.repeat(2, 1))
    except Exception:  # noqa: BLE001 - a cache this model cannot use fails the check
        return float("inf")
    return _max(drawn.logprobs.to(r_mask.device) * r_mask.repeat(2, 1), reference.repeat(2, 1),
                _rtol(ac))


def _decoding(ac: ActorCritic, cfg: Config, batch, reference: torch.Tensor, pad_id: int,
              notes: list[str]) -> DecodePath:
    """The fastest decode path that gives the forward's log-probs: give up the fold, then
    continuous batching, then the static cache, one line each; refuse when none does."""
    kind, rollout = ac.causal_lm.config.model_type, cfg.rollout
    fold = rollout.fold_for_generation and ac.autocast is None and can_fold(ac.peft_model)
    why = unfoldable(ac.peft_model) if rollout.fold_for_generation else None
    if why:
        notes.append(f"model.init_adapter: the policy's {why} cannot be folded into the base "
                     "weights exactly; it generates unfolded (rollout.fold_for_generation="
                     "false)")
    how = DecodePath(rollout.continuous_batching, rollout.static_kv_cache, fold)
    while _decode_diff(ac, batch, reference, pad_id, how) > tolerance(ac):
        if how.fold:
            how = how._replace(fold=False)
            notes.append(f"model type {kind}: the policy folded into the base weights does not "
                         "decode what the forward scores; it generates unfolded "
                         "(rollout.fold_for_generation=false)")
        elif how.continuous_batching:
            how = how._replace(continuous_batching=False)
            notes.append(f"model type {kind}: continuous batching does not decode what the "
                         "forward scores; rows decode in batches (rollout.continuous_"
                         "batching=false)")
        elif how.static_kv_cache:
            how = how._replace(static_kv_cache=False)
            notes.append(f"model type {kind}: the static KV cache does not decode what the "
                         "forward scores; decoding uses a dynamic cache "
                         "(rollout.static_kv_cache=false)")
        else:
            raise UserError(f"model type {kind}: the KV-cached decode differs from the "
                            "forward it is scored by; it cannot be sampled exactly")
    return how


def check_seams(ac: ActorCritic, cfg: Config, pad_id: int) -> Seams:
    """Run the checks (module doc) under the policy in eval mode; refuse what cannot be made
    exact, fall back where a slower path is exact."""
    gen = torch.Generator().manual_seed(1234)  # the run's own random streams stay untouched
    kind = ac.causal_lm.config.model_type
    notes = []
    with (_in_run_precision(ac, cfg), _nonzero_adapters(ac, gen), ac.precision(),
          ac.role(POLICY, train=False), torch.no_grad()):
        tol = tolerance(ac)  # of the run's precision
        batch = _probe(ac, pad_id, gen)
        d = _logits_diff(ac, batch)
        if not d <= tol:
            notes.append(_own_logits(ac, cfg, batch, d))
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
        decode = _decoding(ac, cfg, batch, reference, pad_id, notes)
    return Seams(chosen[1], decode, tuple(notes), ac.own_logits)
