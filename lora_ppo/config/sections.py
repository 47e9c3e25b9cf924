"""The sections of the config tree that `lora-ppo train` reads: the model and its adapters, the
reward, the rollout and PPO (run_sections.py: data, DeepSpeed, logging and checkpoints).

The string under each field is its documentation (read by `config.reference.field_docs`, so
docs/config.md is generated from these files and cannot drift).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional, Union

from lora_ppo.config.checks import NONNEG, OPEN_UNIT, POSITIVE, PROBABILITY, UNIT


@dataclass
class ModelConfig:
    path: Optional[str] = None
    """Local directory of the base causal LM (a hub id also works when online)."""
    tokenizer_path: Optional[str] = None
    """Tokenizer directory when it is not the model directory."""
    init_adapter: Optional[str] = None
    """PEFT adapter directory (e.g. from SFT) that the policy starts from; the reference then is a
    frozen copy of it, not the raw base."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint. Off: only turn on for models you trust."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: less memory for more compute. Turned off during
    generation and restored after."""
    padding_free: bool = True
    """Scoring and update forwards run on the real tokens only: each batch's sequences packed
    end to end into rows, positions restarting per sequence (transformers turns them into a
    block-diagonal causal mask; flash-attention into varlen boundaries). The log-probs equal the
    padded forward's to float round-off (tested). Off: each micro-batch is padded to its own
    widest sequence instead."""
    shared_prompt: bool = True
    """With rollout.samples_per_prompt > 1, the scoring and update forwards encode a group's
    prompt once: a packed row holds the prompt followed by its n responses, each attending to
    the prompt and to itself only (an explicit attention mask). The numbers equal n separate
    sequences' to float round-off (tested). Needs model.padding_free; a model whose attention
    cannot take the mask falls back to ordinary packing (ppo/seams.py)."""
    block_attention: bool = True
    """Packed rows' attention with an SDPA mask computes only the blocks each token sees (a
    response its prompt and itself, not its siblings nor other sequences of the row), not the
    whole (row x row) square: for a group of 8 tool-calling trajectories after a 214-token
    prompt, 27% of the scores (modeling/blocks.py). Equal to the dense mask's to float
    round-off; the seam check compares it with the padded forward like every layout."""
    seam_check: Literal["auto", "always", "off"] = "auto"
    """Check at setup, on a few probe tokens, that lora_ppo's logits, packed rows and decode loop
    give what the model's own forward gives, and that train and eval modes agree; fall back to
    an exact path (one line each) or refuse (ppo/seams.py). `auto`: once per model,
    settings and library versions (the outcome is cached under $LORA_PPO_CACHE/seams); `always`:
    every run; `off`: trust the fastest layout unchecked."""
    max_prompt_length: Annotated[int, POSITIVE] = 256
    """Prompts longer than this many tokens are cut from the left (the end of a prompt matters most)."""
    logits_chunk_mib: Annotated[float, POSITIVE] = 32.0
    """MiB of fp32 logits made at a time when scoring, in the update and in SFT: the LM head runs over
    rows of (batch*length) in chunks of this size whatever the vocabulary, instead of one batch x
    length x vocab tensor. A frozen LM head (LoRA on the decoder) holds one chunk at a time in the
    forward only; a trained head or ppo.ent_coef != 0 one chunk (about 5 with ent_coef) in the
    backward too, made again there unless one chunk holds every row. 32 MiB is 210 rows of a 40k
    vocabulary, 56 of a 150k one: on a CPU the head's matmul runs as fast at that size; a GPU
    needs a few hundred rows to keep it compute-bound (the recipes set theirs)."""


@dataclass
class QuantizationConfig:
    mode: Literal["auto", "none", "8bit", "4bit"] = "auto"
    """Load the base with bitsandbytes in 4-bit or 8-bit, or unquantized (`none`). `auto`: 4bit
    on a GPU (QLoRA's memory), none on a CPU (where the memory does not decide what fits and
    4-bit matmuls cost time)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type (QLoRA's NormalFloat4 or plain FP4)."""
    double_quant: bool = True
    """Quantize the 4-bit quantization constants too (QLoRA): about 0.4 bit/param saved."""
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Dtype that quantized matmuls compute in; `auto` is bf16 on a GPU that has it, else fp32."""


@dataclass
class LoraConfig:
    r: Annotated[int, POSITIVE] = 16
    """LoRA rank of the policy (and critic) adapter."""
    alpha: Annotated[int, POSITIVE] = 32
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: Annotated[float, PROBABILITY] = 0.0
    """LoRA dropout. PPO needs 0: dropout makes the update's log-probs differ from the rollout's,
    so the ratio is not 1 on the first minibatch (lm-human-preferences runs PPO without dropout)."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get LoRA: names like `q_proj`, or `all-linear` for every linear layer but the
    output head."""


@dataclass
class ValueConfig:
    mode: Literal["auto", "shared", "adapter", "none"] = "auto"
    """`shared`: a scalar head on the policy trunk (one forward gives logits and values);
    `adapter`: a separate trainable `critic` LoRA adapter plus head on the same base, so value
    learning does not disturb the policy (one more forward per micro-batch); `none`: no value
    function is built, trained, checkpointed or exported (the critic-free estimators). `auto`:
    `shared` with ppo.advantage_estimator=gae, `none` with the others."""
    head_init_std: float = 0.0
    """Std of the value head's initial weights; 0 starts every value at 0."""


@dataclass
class RewardConfig:
    source: Literal["function", "adapter", "model"] = "function"
    """Where scores come from: a Python `function`, the frozen reward `adapter` on the same base, or
    a separate sequence-classification `model`. For several at once, see `sources`."""
    function: Union[str, list[str], None] = None
    """`module:function` or `path/to/file.py:function`, called as TRL 1.16 calls a reward
    function, `fn(prompts=..., completions=..., completion_ids=..., <each other column>=...,
    trainer_state=..., log_extra=..., log_metric=..., prompt_ids=...) -> list[float]`
    (docs/coming_from_trl.md); a signature that cannot take that is refused at setup. A list of
    them: their sum weighted by `function_weights` (TRL's `reward_funcs`)."""
    function_weights: list[float] = field(default_factory=list)
    """One weight per entry of `function` when it is a list (TRL's `reward_weights`): score =
    sum_i function_weights[i] * f_i. Empty: all 1."""
    adapter: Optional[str] = None
    """Directory of a reward adapter with its score head (from `lora-ppo train-reward`)."""
    clip: Annotated[Optional[float], POSITIVE] = None
    """Clip scores to [-clip, clip] after the EOS penalty."""
    normalize: bool = False
    """Normalise scores by a running mean and std over all scores seen so far."""
    missing_eos_penalty: Optional[float] = None
    """Subtracted from the score of a response that never emitted EOS (TRL's missing_eos_penalty)."""
    overlong_buffer: Annotated[Optional[int], POSITIVE] = None
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), the interval L_cache in tokens: a
    response longer than rollout.max_new_tokens - overlong_buffer loses overlong_penalty x
    (excess / overlong_buffer) of its score, linearly up to the whole overlong_penalty at
    rollout.max_new_tokens. Added before the EOS penalty, clipping and normalisation. None: off."""
    overlong_penalty: Annotated[float, NONNEG] = 1.0
    """The penalty at rollout.max_new_tokens when overlong_buffer is set (DAPO: 1, half the
    distance between a right answer's reward of +1 and a wrong one's -1)."""
    # -- the SFT / reward-model stages (lora_ppo.stages) added these ------------------------------
    model: Optional[str] = None
    """Directory of a separate reward model loaded with AutoModelForSequenceClassification (source
    `model`). It reads the decoded prompt + completion text, re-tokenised with its own tokenizer,
    so its vocabulary may differ from the policy's. Costs a second model in memory."""
    model_tokenizer: Optional[str] = None
    """Tokenizer directory of the `model` reward model when it is not the model directory."""
    model_label: Annotated[int, NONNEG] = 0
    """Which logit of the `model` reward model is the score (0 for a one-logit reward model; e.g.
    1 = the positive class of a two-class sentiment classifier)."""
    sources: list[Literal["function", "adapter", "model"]] = field(default_factory=list)
    """Several reward sources summed with `weights`, e.g. `[function, adapter]`; each is set up by
    its own field above (`function`, `adapter`, `model`). Empty: `source` alone, weight 1.
    Clipping, normalisation and the EOS penalty apply to the weighted sum."""
    weights: list[float] = field(default_factory=list)
    """One weight per entry of `sources`: score = sum_k weights[k] * score_k. Empty: all 1."""

    @property
    def kinds(self) -> list[str]:
        """The sources in use: `sources`, or [`source`] when it is empty."""
        return list(self.sources) or [self.source]

    @property
    def kind_weights(self) -> list[float]:
        """The weight of each entry of `kinds`."""
        return list(self.weights) or [1.0] * len(self.kinds)


@dataclass
class RolloutConfig:
    prompts_per_update: Annotated[int, POSITIVE] = 64
    """Prompts per PPO update on each rank (the rollout's prompts; with samples_per_prompt n, the
    rollout holds prompts_per_update x n samples)."""
    generation_batch_size: Annotated[int, POSITIVE] = 16
    """Rows decoded at once (the decode batch); lower it if generation runs out of memory."""
    max_new_tokens: Annotated[int, POSITIVE] = 128
    """Most tokens per response; with tools or an environment, the model's and the tools' tokens
    of the whole trajectory (TRL's max_completion_length)."""
    temperature: Annotated[float, POSITIVE] = 1.0
    """Sampling temperature; log-probs are taken at the same temperature. Responses are drawn
    from exactly softmax(logits / temperature), whatever the checkpoint's generation_config.json
    says (docs/ppo.md, "Sampling exactly the scored distribution")."""
    top_k: Annotated[int, NONNEG] = 0
    """Must stay 0 (off). Top-k sampling is refused: PPO scores the full softmax, and the KL of a
    truncated policy to the reference is infinite wherever their supports differ."""
    top_p: Annotated[float, OPEN_UNIT] = 1.0
    """Must stay 1.0 (off), for the reason given under `top_k`."""
    samples_per_prompt: Annotated[int, POSITIVE] = 1
    """Responses sampled per prompt (n): a rollout holds prompts_per_update x n samples. The n
    samples of a prompt form a group, kept together (and on one rank) for the group baselines
    of ppo.advantage_estimator (GRPO, RLOO)."""
    fold_for_generation: bool = True
    """Generate with the policy adapter folded into the base weights (one matmul per linear per
    token instead of three), and put the base weights back untouched afterwards (a fold, not the
    `lora-ppo merge` export). Only where it is
    exact: an unquantized fp32 base outside ZeRO-3 (in bf16 the rounding of W + BA is as large as
    the update); costs one copy of the adapted weights during generation."""
    sampler_logprobs: bool = True
    """Take the rollout's old log-probs (and shared-head values) from the sampling forward
    instead of a second policy forward over the finished sequences, where the two agree to fp32
    round-off: an fp32 unquantized policy with value.mode shared or none. Elsewhere (bf16,
    4-bit, a critic adapter) they are always recomputed."""
    continuous_batching: bool = True
    """A row that stops leaves the decode batch and the next prompt of the rollout takes its
    slot, so the batch stays full until the prompts run out (then finished rows are dropped).
    Each row draws from its own uniforms, so the tokens do not depend on it. Not used with a
    sliding-window KV cache or ZeRO-3 over several ranks (docs/ppo.md, "Doing less work");
    off: rows decode in batches of generation_batch_size, finished rows dropped."""
    static_kv_cache: bool = True
    """Decode into one preallocated key/value buffer (transformers' StaticCache) instead of a
    cache that is concatenated at every token; the sampled tokens are the same. Turn off for a
    model whose cache layout StaticCache does not know."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a response besides the tokenizer's EOS."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (Yu et al. 2025, §3.2): groups whose scores, as the reward source
    gave them, are all equal (no score signal) are dropped, and further rounds of fresh prompts
    are sampled until every rank holds `prompts_per_update` groups whose scores vary, at most
    `max_extra_rounds` more. Needs samples_per_prompt >= 2. Metrics: sampling/* (docs/metrics.md)."""
    max_extra_rounds: Annotated[int, NONNEG] = 3
    """With dynamic_sampling: the most sampling rounds per update after the first. A rollout still
    not full after them is filled with dropped groups, so every update has the same size (they
    carry no score signal, as in a run without dynamic sampling)."""
    # -- agents: tools, environments, custom rollouts (lora_ppo/agents, docs/agents.md) ---------
    environment: Optional[str] = None
    """`file.py:Class` or `module:Class`: an environment as TRL 1.16's environment_factory takes
    it. One instance per sample (pooled: constructed once, reset before each rollout);
    `reset(**row)` gets the dataset row's columns and may return a string, appended to the
    prompt's last message; its public methods (type hints and a docstring with an Args section
    on each) are the tools; an optional `get_reward()` is one more reward source, weight 1."""
    tools: list[str] = field(default_factory=list)
    """Tools without an environment, each `file.py:function` or `module:function` (TRL's
    `tools`): typed, with a docstring with an Args section; sync or async (coroutines run
    concurrently). The prompts are rendered with the chat template and the tools' JSON schemas;
    the model's tool calls are parsed in its own format (docs/agents.md)."""
    max_tool_calls: Annotated[Optional[int], POSITIVE] = None
    """Most turns per sample whose tool calls are run (TRL's max_tool_calling_iterations: the
    calls of one turn count once); a turn that calls tools after that many ends the trajectory,
    its calls unanswered. None: no limit but max_new_tokens, which counts the model's and the
    tools' tokens of the whole trajectory (TRL's max_completion_length)."""
    rollout_func: Optional[str] = None
    """`file.py:function`: a custom rollout in place of lora_ppo's sampling (TRL's rollout_func),
    `fn(prompts, ctx) -> dict` with prompt_ids, completion_ids, logprobs and optionally env_mask
    (1 model token, 0 environment token); its return is checked (docs/agents.md)."""


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (`ppo.optim`, `sft.optim`, `reward_model.optim`)."""

    learning_rate: Annotated[float, POSITIVE] = 1e-5
    """AdamW learning rate of the trainable weights (LoRA adapters and heads)."""
    weight_decay: Annotated[float, NONNEG] = 0.0
    """AdamW weight decay."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule over all optimizer steps."""
    warmup_steps: Annotated[int, NONNEG] = 0
    """Optimizer steps of linear warmup."""
    max_grad_norm: Annotated[float, POSITIVE] = 1.0
    """Gradient clipping (global L2 norm), done by DeepSpeed."""


@dataclass
class PPOConfig:
    total_updates: Annotated[int, POSITIVE] = 200
    """Number of PPO updates (rollout + optimisation rounds)."""
    epochs: Annotated[int, POSITIVE] = 4
    """Passes over each rollout."""
    minibatch_size: Annotated[int, POSITIVE] = 16
    """Samples (not prompts) per optimizer step."""
    micro_batch_size: Annotated[int, POSITIVE] = 4
    """Samples per forward/backward, and per scoring forward (the rollout's old and reference
    log-probs); minibatch_size / micro_batch_size is the gradient accumulation."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp",
                                 "reinforce_pp_baseline"] = "gae"
    """`gae`: a learned value function and GAE (Schulman et al. 2015); the critic-free ones need
    no value model: `grpo` (sequence score minus its group's mean, over the group's std; Shao et
    al. 2024), `dr_grpo` (no std division, constant loss normaliser; Liu et al. 2025), `rloo`
    (leave-one-out group baseline; Ahmadian et al. 2024), `reinforce_pp` (per-token KL-penalised
    reward-to-go, whitened over the batch; Hu 2025), `reinforce_pp_baseline` (each score minus
    its group's mean, then reinforce_pp's reward-to-go whitened over the batch; Hu et al. 2025
    v2, OpenRLHF's reinforce_baseline). Formulas: docs/ppo.md. TRL 1.16's GRPOTrainer differs
    from lora_ppo's grpo in two defaults: loss_type=dapo (here loss_aggregation=token_mean) and
    beta=0 (kl_coef=0); the preset `trl_grpo` has TRL's (docs/coming_from_trl.md)."""
    kl_in: Literal["auto", "reward", "loss"] = "auto"
    """Where the KL penalty to the reference goes: `reward` (-kl_coef * KL_t in every token's
    reward, Ziegler et al. 2019) or `loss` (kl_coef * KL as a loss term, GRPO). `auto`: `loss` for
    grpo, dr_grpo and reinforce_pp_baseline, `reward` for the others. With kl_coef 0 (not
    adaptive) the reference forward is skipped entirely."""
    loss_aggregation: Literal["auto", "token_mean", "seq_mean_token_mean", "constant"] = "auto"
    """How per-token losses are averaged over a minibatch: `token_mean` (every token weighs the
    same), `seq_mean_token_mean` (each sequence's token mean, then the mean over sequences: a
    short response's tokens weigh more, GRPO), `constant` (the token sum over sequences x
    rollout.max_new_tokens: no length normalisation, Dr. GRPO). `auto`: seq_mean_token_mean for
    grpo, constant for dr_grpo, token_mean for the others (TRL 1.16's GRPO default,
    loss_type=dapo, is token_mean). token_mean counts the tokens of every rank's minibatch."""
    gamma: Annotated[float, UNIT] = 1.0
    """Discount factor of GAE (and of the REINFORCE++ reward-to-go)."""
    lam: Annotated[float, UNIT] = 0.95
    """GAE lambda."""
    cliprange: Annotated[float, POSITIVE] = 0.2
    """Policy ratio clip epsilon (the lower one when cliprange_high is set)."""
    cliprange_high: Annotated[Optional[float], POSITIVE] = None
    """Upper clip epsilon of the policy ratio, clip(ratio, 1 - cliprange, 1 + cliprange_high):
    DAPO's clip-higher (Yu et al. 2025, §3.1, eps_low 0.2 / eps_high 0.28) leaves more room to
    raise the probability of unlikely tokens. None: cliprange (symmetric)."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """`token`: PPO's ratio pi / pi_old per token. `sequence`: one ratio per response, the
    geometric mean of its token ratios exp(mean_t log(pi / pi_old)), clipped per response (GSPO,
    Zheng et al. 2025, eq. 7; TRL's importance_sampling_level). GSPO clips much tighter
    (cliprange 3e-4, cliprange_high 4e-4) and averages per response
    (loss_aggregation=seq_mean_token_mean)."""
    sampler_importance_sampling_correction: bool = True
    """Weight each token's policy loss by pi_old / pi_sampler (sampler_importance_sampling_mode),
    for the tokens drawn from the decode loop's distribution where it is not the one scored:
    bf16, fp16 or torch autocast, where the two differ by up to ~5e-2 per token (docs/ppo.md
    detail 2d; TRL's vllm_importance_sampling_correction, default true). Never applied where the
    forwards compute in fp32 (a 4-bit or 8-bit base with an fp32 compute dtype too): there the
    two agree to round-off (the sampler's log-probs are the old ones, a weight of 1). The
    mismatch is logged either way (rollout/sampler_kl)."""
    sampler_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate",
                                              "sequence_mask"] = "sequence_mask"
    """How the weights are taken (rl/sampler_correction.py): per token, or one per response (the
    product of its token ratios); `truncate` clips them to [clip_min, clip_max] (truncated IS,
    Yao et al. 2025; OpenRLHF's tis), `mask` zeroes those outside (masked IS; OpenRLHF's icepop
    is token_mask). TRL's vllm_importance_sampling_mode, with its default."""
    sampler_importance_sampling_clip_max: Annotated[Optional[float], POSITIVE] = 3.0
    """Upper bound of the weights (TRL's vllm_importance_sampling_clip_max, 3.0); null: none."""
    sampler_importance_sampling_clip_min: Annotated[Optional[float], NONNEG] = None
    """Lower bound of the weights (TRL's vllm_importance_sampling_clip_min); null: none."""
    cliprange_value: Annotated[float, POSITIVE] = 0.2
    """Value clip around the rollout's values."""
    vf_coef: Annotated[float, NONNEG] = 0.1
    """Weight of the value loss."""
    ent_coef: Annotated[float, NONNEG] = 0.0
    """Weight of the entropy bonus."""
    whiten_advantages: bool = True
    """Whiten GAE's advantages over the valid tokens of the rollout of every rank (the group
    estimators normalise within groups instead; reinforce_pp and reinforce_pp_baseline always
    whiten over the batch)."""
    scale_rewards: Literal["auto", "group", "batch", "none"] = "auto"
    """grpo only: what each reward minus its group's mean is divided by: `group` (the group's std,
    GRPO), `batch` (the std of every sequence reward of the rollout on all ranks; TRL's
    scale_rewards=batch), `none` (nothing: Dr. GRPO's advantage). `auto`: group. The other
    estimators define their own scaling."""
    mask_truncated_completions: bool = False
    """Leave responses that reached rollout.max_new_tokens without EOS out of every loss term
    and its normaliser (DAPO's overlong filtering, Yu et al. 2025 §3.4; TRL's
    mask_truncated_completions). Their scores still count in their group's baseline."""
    kl_estimator: Literal["auto", "k1", "k2", "k3"] = "auto"
    """Per-token KL estimator (k1 = logp - logp_ref, k2, k3; joschu.net/blog/kl-approx.html).
    `auto`: k1 in the reward, k3 in the loss (GRPO's choice: >= 0 per token), but k2 in the loss
    for reinforce_pp_baseline (Hu et al. 2025 v2; OpenRLHF's `--kl_estimator k2`)."""
    kl_coef: Annotated[float, NONNEG] = 0.05
    """Initial (or fixed) coefficient of the KL penalty."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards target_kl (Ziegler et al. 2019)."""
    target_kl: Annotated[float, POSITIVE] = 6.0
    """Target sequence KL of the adaptive controller (nats)."""
    kl_horizon: Annotated[int, POSITIVE] = 10000
    """Horizon of the adaptive controller (samples)."""
    early_stop_kl: Annotated[Optional[float], POSITIVE] = None
    """Stop the epochs of an update once the approximate KL to the rollout policy exceeds this."""
