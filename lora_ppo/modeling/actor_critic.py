"""One base model, four roles: policy, reference, value function and reward, through peft adapters.

    policy     LoRA adapter `policy` (trainable)
    reference  the base with adapters disabled, or the frozen adapter `reference` when the policy
               starts from an SFT adapter (the reference must be the SFT model, not the raw base)
    value      `shared`: a head on the policy's last hidden state (one forward for both);
               `adapter`: trainable adapter `critic` plus its own head
    reward     frozen adapter `reward` plus a score head, loaded from a reward-adapter directory

No role holds a copy of the base weights. Roles are switched with `ActorCritic.role(name)`, a
context manager that restores the previous adapter and train/eval mode even if the body raises.

Forwards never build the (B, T, V) logits: `hidden()` returns the trunk's last hidden state and
log-probs are computed from it chunk by chunk (lora_ppo.rl.logprobs).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Optional

import peft
import torch
from torch import nn

from lora_ppo.config import Config
from lora_ppo.errors import UserError
from lora_ppo.modeling.block_sdpa import attach
from lora_ppo.modeling.heads import (
    REWARD_HEAD_FILE,
    ScalarHead,
    frozen_weight,
    load_scalar_head,
    logits_transform,
)
from lora_ppo.modeling.loading import disable_dropout, set_gradient_checkpointing
from lora_ppo.modeling.lora_grad import fast_lora_training
from lora_ppo.modeling.own_logits import own_logprobs
from lora_ppo.modeling.packing import PADDED, Layout, Packed, pack, position_ids_from_mask
from lora_ppo.modeling.roles import CRITIC, POLICY, REFERENCE, REWARD
from lora_ppo.rl.logprobs import IDENTITY, logprobs_and_entropy_from_hidden


class PolicyOutputs(NamedTuple):
    """What one forward of the actor-critic gives for the response tokens."""

    logprobs: torch.Tensor            # (B, R) float32, log pi(token) at the temperature
    entropy: Optional[torch.Tensor]   # (B, R) float32, or None
    values: Optional[torch.Tensor]    # (B, R) float32 V(state before token), or None


def width_cost(config) -> Optional[float]:
    """Attention's cost per key relative to a token's linear work, which sets how wide packed
    rows are made (modeling/packing.py::_capacity): ~1 / (6 hidden) for a decoder layer. None
    for eager attention, which materialises (rows, heads, C, C) weights: its rows stay as wide
    as the longest unit, so its memory does not grow with the width."""
    if getattr(config, "_attn_implementation", None) in (None, "eager"):
        return None
    return 1.0 / (6 * config.get_text_config().hidden_size)


class ActorCritic(nn.Module):
    """The peft model with named adapters, plus the value head(s) and optional reward head.

    Built by `build_actor_critic`; holds one base. Only LoRA weights of trainable adapters and
    the value head are trainable.
    """

    def __init__(self, peft_model: nn.Module, value_mode: str, value_head: Optional[ScalarHead],
                 reward_head: Optional[ScalarHead], has_reference_adapter: bool):
        super().__init__()
        self.peft_model = peft_model
        self.value_mode = value_mode
        self.value_head = value_head
        self.reward_head = reward_head
        self.has_reference_adapter = has_reference_adapter
        # set_adapter() in peft flips requires_grad of every adapter; we keep our own record of
        # what is trainable and restore it after each switch, so DeepSpeed's view never changes.
        self._trainable = {id(p): p.requires_grad for p in self.parameters()}
        self._role = POLICY  # the role forwards run under now (see checkpoint_contexts)
        # What the model's own forward does after the LM head (modeling/heads.py), and how the
        # scoring and update forwards lay out a batch (ppo/seams.py decides it at setup).
        self.logits_transform = logits_transform(self.causal_lm.config)
        self.layout: Layout = PADDED
        self.width_cost = width_cost(self.causal_lm.config)  # of packed rows
        # blocks on every mask of a blocked layout, not only where they save work: the seam
        # check's probes are too small to save any, and must take the path all the same
        self.every_mask_blocked = False
        # Logits from the model's own forward instead of trunk + head + logits_transform
        # (use_own_logits: the setup's fallback for a post-processing it does not know).
        self.own_logits = False
        self.keep_mask = True  # its forward takes a boolean logits_to_keep (own_logits.py)
        # The dtype of the run's torch autocast (a DeepSpeed config's `torch_autocast` block),
        # or None: the engine runs the update's forwards under it, `precision()` the others.
        self.autocast: Optional[torch.dtype] = None

    # -- structure ---------------------------------------------------------------------------
    @property
    def causal_lm(self) -> nn.Module:
        return self.peft_model.get_base_model()

    @property
    def lm_head(self) -> nn.Module:
        return self.causal_lm.get_output_embeddings()

    @property
    def vocab(self) -> int:
        """Width of the logits (the LM head's outputs)."""
        return getattr(self.lm_head, "out_features", None) or self.causal_lm.config.vocab_size

    @property
    def device(self) -> torch.device:
        return self.causal_lm.get_input_embeddings().weight.device

    def adapters(self) -> list[str]:
        return list(self.peft_model.peft_config)

    def _activate(self, name: str) -> None:
        self.peft_model.set_adapter(name)
        self._restore_trainable()

    def _restore_trainable(self) -> None:
        for p in self.parameters():
            p.requires_grad_(self._trainable[id(p)])

    # -- roles -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _adapters_as(self, name: str) -> Iterator[None]:
        """The adapter state of role `name` for the body (no mode change); restored after."""
        prev_adapter, prev_role = self.peft_model.active_adapter, self._role
        self._role = name
        try:
            if name == REFERENCE and not self.has_reference_adapter:
                with self.peft_model.disable_adapter():
                    yield
                return
            if name not in self.adapters():
                raise ValueError(f"no adapter for role '{name}'; have {self.adapters()}")
            if prev_adapter != name:
                self._activate(name)
            yield
        finally:
            # peft's set_adapter and disable_adapter both rewrite requires_grad; put ours back.
            switched = self.peft_model.active_adapter != prev_adapter
            if switched:
                self.peft_model.set_adapter(prev_adapter)
            if switched or name == REFERENCE:
                self._restore_trainable()
            self._role = prev_role

    @contextlib.contextmanager
    def role(self, name: str, train: Optional[bool] = None) -> Iterator[ActorCritic]:
        """Make `name` the active role for the body; restore adapter and mode afterwards.

        `train` sets train/eval mode inside the body (None keeps it). The reference without an
        SFT adapter runs under peft's `disable_adapter()`, i.e. the plain base.
        """
        prev_training = self.training
        try:
            if train is not None:
                self.train(train)
            with self._adapters_as(name):
                yield self
        finally:
            self.train(prev_training)

    def precision(self) -> contextlib.AbstractContextManager:
        """The run's torch autocast for forwards outside the DeepSpeed engine (sampling,
        scoring, the setup's checks), as the engine runs the update's (DeepSpeed's
        runtime/torch_autocast.py::autocast_if_enabled); a no-op without one."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, ...]:
        """`context_fn` of torch.utils.checkpoint: recompute a block under the role it ran in.

        With gradient checkpointing the backward re-runs each decoder layer's forward, after
        `role()` has switched back to the policy: without this the critic's layers were
        recomputed with the policy adapter, and its gradients went to the wrong weights.
        Called at forward time, so the role captured is the one the forward ran under.
        """
        return contextlib.nullcontext(), self._adapters_as(self._role)

    # -- forwards ----------------------------------------------------------------------------
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state (B, L, H) of the trunk under the active role; no logits."""
        decoder = self.causal_lm.get_decoder()
        out = decoder(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return out.last_hidden_state

    def _predicting_states(self, query_ids, query_mask, response_ids, response_mask,
                           packed: Optional[Packed]) -> torch.Tensor:
        """(B, R, H): the trunk's states that predict each response token, from a padded forward
        (position Q-1 .. Q+R-2 of query ++ response) or a packed one (modeling/packing.py)."""
        if packed is None:
            ids = torch.cat([query_ids, response_ids], 1)
            mask = torch.cat([query_mask, response_mask.long()], 1)
            q, r = query_ids.shape[1], response_ids.shape[1]
            return self.hidden(ids, mask)[:, q - 1:q - 1 + r]
        out = self.causal_lm.get_decoder()(input_ids=packed.input_ids,
                                           position_ids=packed.position_ids,
                                           attention_mask=packed.attention_mask, use_cache=False)
        h = out.last_hidden_state
        return h.reshape(-1, h.shape[-1])[packed.predicting]

    def pack(self, query_ids, query_mask, response_ids, response_mask,
             layout: Optional[Layout] = None) -> Optional[Packed]:
        """The packed rows of a batch under `layout` (default: the run's), or None for padded."""
        layout = self.layout if layout is None else layout
        if not layout.packed:
            return None
        blocks = (True if self.every_mask_blocked else None) if layout.blocks else False
        packed = pack(query_ids, query_mask, response_ids, response_mask, group=layout.group,
                      attention=layout.attention, width_cost=self.width_cost, blocks=blocks)
        attach(packed.attention_mask, packed.blocks)  # SDPA computes only the blocks seen
        return packed

    def forward(self, query_ids: torch.Tensor, query_mask: torch.Tensor,
                response_ids: torch.Tensor, response_mask: torch.Tensor, *, temperature: float,
                chunk_size: int, role: str = POLICY, with_values: bool = True,
                with_entropy: bool = False, entropy_grad: bool = True,
                layout: Optional[Layout] = None) -> PolicyOutputs:
        """Log-probs, entropy and values of the response tokens; query (B, Q), response (B, R).

        The hidden state at position Q-1+t predicts response token t, so logits and values are
        read from positions Q-1 .. Q+R-2 (values are V(state before token t), as in TRL). The
        rollout's scoring and the update both call this (the update through `engine(...)`, so
        DeepSpeed sees every training forward), so with no update in between the PPO ratio is
        1 (to fp32 round-off when the sampler's own log-probs are used). `role=REFERENCE` gives
        the reference log-probs (no values). Values come from the policy trunk (value.mode=shared,
        same forward) or the critic adapter (adapter). `layout`: padded, packed or grouped rows
        (default: the run's, `self.layout`); every layout gives the same numbers.
        """
        batch = (query_ids, query_mask, response_ids, response_mask)
        packed = self.pack(*batch, layout=layout)
        values = None
        # Only at real response tokens: the (B, R) grid is padded to the longest response, and
        # the head is the widest matmul of a forward (0 at the padding, masked anyway).
        real = response_mask.bool()
        if not real.any():  # still call the head: under ZeRO-3 the ranks gather it together
            real = torch.ones_like(real)
        kw = dict(temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy,
                  entropy_grad=entropy_grad)
        with self._adapters_as(role):
            if self.own_logits:  # the model's own forward's logits (ppo/seams.py decides)
                lp, ent, h = own_logprobs(self, query_ids, query_mask, response_ids, real, **kw)
            else:
                h = self._predicting_states(*batch, packed)  # (B, R, H): states predicting
                # The head is called as a module, chunk by chunk: a LoRA on it runs, and ZeRO-3
                # gathers its weights around each call (also when the backward makes a chunk
                # again).
                lp, ent = logprobs_and_entropy_from_hidden(
                    h[real][None], self.lm_head, response_ids[real][None],
                    transform=self.logits_transform, frozen_weight=frozen_weight(self.lm_head),
                    **kw)
            logprobs = _scatter(lp[0], real)
            entropy = None if ent is None else _scatter(ent[0], real)
            if with_values and role == POLICY and self.value_mode == "shared":
                values = self.value_head(h)
        if with_values and role == POLICY and self.value_mode == "adapter":
            with self._adapters_as(CRITIC):
                values = self.value_head(self._predicting_states(*batch, packed))
        return PolicyOutputs(logprobs, entropy, values)

    def use_own_logits(self) -> None:
        """Score, update and sample with the model's own forward's logits, padded rows (the
        setup's fallback for a post-processing of the head's output lora_ppo does not know)."""
        self.own_logits, self.logits_transform, self.layout = True, IDENTITY, PADDED

    def reward_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              last_index: torch.Tensor) -> torch.Tensor:
        """Reward-model score (B,) at position `last_index` (B,) (the last real token)."""
        if self.reward_head is None:
            raise UserError("reward.source=adapter but no reward adapter is loaded; set reward.adapter")
        with self._adapters_as(REWARD):
            h = self.hidden(input_ids, attention_mask)
        rows = torch.arange(h.shape[0], device=h.device)
        return self.reward_head(h[rows, last_index])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def _scatter(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(N,) values at the N True places of `where` (B, R), zeros elsewhere; differentiable."""
    return values.new_zeros(where.shape).masked_scatter(where, values)


def lora_config(lora) -> peft.LoraConfig:
    """peft's LoraConfig of a fresh adapter from the config's `lora` section."""
    targets = lora.target_modules
    return peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        bias="none", task_type="CAUSAL_LM", inference_mode=False,
    )


def check_adapter_dir(path: str, field: str) -> None:
    p = Path(path)
    if not (p / "adapter_config.json").is_file():
        raise UserError(f"{field}={path} is not a PEFT adapter directory (no adapter_config.json); "
                        "point it at a directory written by save_pretrained or lora-ppo export")


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape (.+?) from "
                            r"checkpoint, the shape in current model is (.+?)\.?$", re.M)


@contextlib.contextmanager
def adapter_fits(path: str, field: str, model_path: str) -> Iterator[None]:
    """Turn peft's multi-line size-mismatch error (an adapter trained on another base) into one
    line that names the field, the first mismatching tensor and both shapes."""
    try:
        yield
    except RuntimeError as e:
        m = _SIZE_MISMATCH.search(str(e))
        if m is None:
            raise
        name, saved, live = m.groups()
        raise UserError(f"{field}={path} was trained on another base: {name} is "
                        f"{saved.replace('torch.Size', '')} in the adapter, "
                        f"{live.replace('torch.Size', '')} in model.path={model_path}; use an "
                        "adapter trained on this base") from None


def build_actor_critic(cfg: Config, base: nn.Module) -> ActorCritic:
    """Attach the adapters of every role to `base` (already loaded, frozen)."""
    hidden_size = base.config.hidden_size
    device = next(base.parameters()).device
    model_path = getattr(base, "name_or_path", "")
    if cfg.model.init_adapter:
        check_adapter_dir(cfg.model.init_adapter, "model.init_adapter")
        with adapter_fits(cfg.model.init_adapter, "model.init_adapter", model_path):
            peft_model = peft.PeftModel.from_pretrained(base, cfg.model.init_adapter,
                                                   adapter_name=POLICY, is_trainable=True)
            peft_model.load_adapter(cfg.model.init_adapter, adapter_name=REFERENCE,
                                    is_trainable=False)
    else:
        peft_model = peft.get_peft_model(base, lora_config(cfg.lora), adapter_name=POLICY)
    value_mode = cfg.algorithm.value_mode
    if value_mode == "adapter":
        peft_model.add_adapter(CRITIC, lora_config(cfg.lora))
    reward_head = None
    if "adapter" in cfg.reward.kinds:
        check_adapter_dir(cfg.reward.adapter, "reward.adapter")
        with adapter_fits(cfg.reward.adapter, "reward.adapter", model_path):
            peft_model.load_adapter(cfg.reward.adapter, adapter_name=REWARD, is_trainable=False)
        reward_head = load_scalar_head(Path(cfg.reward.adapter) / REWARD_HEAD_FILE, hidden_size,
                                       device)
        reward_head.requires_grad_(False)
    peft_model.set_adapter(POLICY)
    # Trainable: the policy adapter and (adapter mode) the critic adapter; nothing else.
    for name, p in peft_model.named_parameters():
        p.requires_grad_(("lora_" in name) and (f".{POLICY}." in name or f".{CRITIC}." in name))
    # PPO runs without dropout (lm-human-preferences; TRL's `disable_dropout_in_model`), also in
    # adapters that were saved with lora_dropout > 0 (SFT recipes often are): the base's dropout
    # was turned off at load time, before these adapters brought their own.
    disable_dropout(peft_model)
    fast_lora_training(peft_model, (POLICY, CRITIC))
    # value.mode=none (the critic-free estimators): no head, nothing of a value function at all.
    value_head = (None if value_mode == "none"
                  else ScalarHead(hidden_size, cfg.value.head_init_std).to(device))
    ac = ActorCritic(peft_model, value_mode, value_head, reward_head,
                     has_reference_adapter=bool(cfg.model.init_adapter))
    if cfg.model.gradient_checkpointing:
        # Re-enabled with the role-aware recomputation (ActorCritic.checkpoint_contexts).
        set_gradient_checkpointing(base, True, context_fn=ac.checkpoint_contexts)
    return ac
