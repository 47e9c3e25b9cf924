"""Peak memory of a PPO run, predicted from the model's config.json alone (FLOPs: flops.py).

Nothing is loaded: the architecture (hidden size, layers, heads, kv heads, intermediate size,
vocab) comes from config.json (arch.py) and the batch shapes from the training config. Every
phase of an update peaks at

    resident state  base weights + adapters + optimizer state and gradients (after step 1)
  + phase transient generation: KV cache of one generation batch + one prefill layer (+ the
                                conversations waiting between turns, with tools)
                    scoring:    one no-grad layer of one micro-batch, or a logits chunk
                    update:     saved activations of one micro-batch + the backward's temporaries

and the run's peak is the largest phase. `device="gpu"` predicts the CUDA allocator peak
(torch.cuda.max_memory_allocated, bf16 compute); `device="cpu"` predicts what benchmarks/bench.py
measures on a CPU: peak resident memory (VmHWM) minus the resident memory before the model was
loaded, in fp32 (docs/benchmarks.md compares the two and gives the error).

The activation counts (elements saved per token and layer) are read off transformers'
LlamaDecoderLayer under autograd; they are written out next to each formula below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

from lora_ppo.config import Config
from lora_ppo.errors import UserError
from lora_ppo.generation.continuous import ANSWER_CHUNK, PREFILL_SHARE, continuous_slack
from lora_ppo.modeling.loading import quantization_mode
from lora_ppo.rl.logprobs import ENTROPY_BLOCKS, chunk_rows
from lora_ppo.runtime.ds_config import read_ds_config, zero_stage
from lora_ppo.sizing.arch import Arch, lora_param_count, param_counts, read_arch

MIB = 2**20
# What the CPU measurement sees besides tensors: pages of shared libraries' code first run by a
# forward/backward/generate (file-backed, so they count in RSS), allocator and thread state.
# benchmarks/bench.py measured 28-40 MiB of it on a 0.3M-parameter model, whose tensors are
# about 1 MiB (docs/benchmarks.md, "Calibration"); the spread is page-cache dependent.
CPU_RUNTIME_OVERHEAD = 36 * MIB


def weight_bytes(arch: Arch, mode: str, double_quant: bool, dtype_bytes: int) -> int:
    """Bytes of the frozen base as loaded by modeling/loading.py.

    none: every weight in the compute dtype. 8bit (LLM.int8): 1 byte per linear weight plus one
    fp32 scale per output row (`SCB`). 4bit: 0.5 byte per linear weight plus per block of 64 an
    fp32 absmax, or with double quantization a uint8 absmax plus an fp32 per 256 blocks (QLoRA
    sec. 2, bitsandbytes blocksize 64). Quantized models get their other weights cast to fp32 by
    peft's prepare_model_for_kbit_training.
    """
    pc = param_counts(arch)
    if mode == "none":
        return pc.total * dtype_bytes
    if mode == "8bit":
        rows = arch.layers * sum(o for _, o in arch.linears().values())
        return pc.linear + 4 * rows + 4 * pc.other
    if mode == "4bit":
        blocks = pc.linear / 64
        absmax = blocks + 4 * blocks / 256 if double_quant else 4 * blocks
        return int(pc.linear / 2 + absmax) + 4 * pc.other
    raise UserError(f"quantization.mode={mode!r} is not one of none, 8bit, 4bit")


def optimizer_bytes(trainable: int, precision: str, zero_stage: int, device: str,
                    bucket: int, overlap_comm: bool) -> int:
    """DeepSpeed + client AdamW state of `trainable` parameters, beyond the module's copy.

    AdamW: exp_avg + exp_avg_sq, 8 B/param in fp32. ZeRO-0 fp32: param.grad, 4 B. ZeRO-1/2 keep
    an fp32 master partition (a clone even in fp32, zero/stage_1_and_2.py) with its fp32 grad,
    plus a reduce bucket of `reduce_bucket_size` elements (x2 with overlap_comm) allocated with
    torch.empty at each backward: the GPU allocator counts all of it, a CPU's RSS only the pages
    written (about the trainable size). bf16: module copy in bf16 (counted by the caller), an fp32
    master and fp32 grads (bf16 optimizer at ZeRO-0, ZeRO partition at 1/2).
    """
    adam = 8 * trainable
    if zero_stage == 0:
        grads = 4 * trainable if precision == "fp32" else (4 + 4 + 2) * trainable
        return adam + grads
    elem = 4 if precision == "fp32" else 2
    n_buckets = 2 if overlap_comm else 1
    touched = n_buckets * bucket if device == "gpu" else min(bucket, trainable)
    return adam + (4 + 4) * trainable + elem * touched


# --- activations -----------------------------------------------------------------------------

def _saved_per_token_layer(arch: Arch) -> int:
    """Elements autograd keeps per token and decoder layer (LoRA on the linears, frozen base).

    input_layernorm: its input x and its output (kept by lora_A of q/k/v)          2 H
    attention: q after rope, k and v repeated to all heads (GQA under a padding
               mask), the SDPA output (o_proj's input is the same storage)          4 nh*hd
    post_attention_layernorm: input and output                                     2 H
    MLP: gate, up, silu(gate), silu(gate)*up (kept by down_proj's lora_A)          4 I
    (rope's cos/sin, the rank-r lora_A outputs and the norms' rstd are negligible.) Checked with
    saved_tensors_hooks on a 4-layer model: 148 MiB saved against 152 MiB from this count (k, v
    were not repeated there: no padding, so SDPA ran GQA itself).
    """
    return 4 * arch.hidden + 4 * arch.heads * arch.head_dim + 4 * arch.intermediate


def _nograd_layer_peak(arch: Arch) -> int:
    """Elements per token live at the worst point of a no-grad decoder layer: the residual,
    silu(gate), up, the LoRA branch's output and its scaled copy, and their product (5 I)."""
    return 2 * arch.hidden + 5 * arch.intermediate


class MemoryEstimate(NamedTuple):
    """Bytes, by component and by phase; `peak` is the largest phase."""

    components: dict[str, int]
    phases: dict[str, int]
    device: str

    @property
    def peak(self) -> int:
        return max(self.phases.values())


@dataclass(frozen=True)
class Shapes:
    """The batch shapes an estimate is for (defaults: from the config, worst case).

    `group`: samples that share one encoded prompt (rollout.samples_per_prompt with
    model.shared_prompt, else 1); `cache_slack`: KV-cache columns beyond prompt + new tokens
    (continuous batching shifts its rows left when they fill up: generation/continuous.py);
    `turns`: a multi-turn rollout (rollout.tools or rollout.environment), whose conversations
    between turns keep caches of their own; `answers`: the rows that answer one prompt
    (rollout.samples_per_prompt), which the decode batch encodes once whatever
    model.shared_prompt says."""

    micro_batch: int
    generation_batch: int
    prompt_len: int
    new_tokens: int
    group: int = 1
    cache_slack: int = 0
    turns: bool = False
    answers: int = 1

    def tokens(self, samples: int) -> int:
        """Tokens a forward over `samples` consecutive samples holds at most: each distinct
        prompt once, every response."""
        return prompts_in(samples, self.group) * self.prompt_len + samples * self.new_tokens


def prompts_in(samples: int, n: int) -> int:
    """Distinct prompts in `samples` consecutive samples, n to a prompt, at most. Within one
    group: one; whole groups: one each; otherwise the batch may start and end inside a group:
    one more."""
    if n == 1:
        return samples
    if n % samples == 0:
        return 1
    if samples % n == 0:
        return samples // n
    return min(samples, -(-samples // n) + 1)


def shapes_from_config(cfg: Config) -> Shapes:
    n = cfg.rollout.samples_per_prompt
    samples = cfg.rollout.prompts_per_update * n
    # the update keeps groups together only when minibatches hold whole groups (update.py)
    group = (n if cfg.model.shared_prompt and cfg.model.padding_free
             and cfg.ppo.minibatch_size % n == 0 else 1)
    new = cfg.rollout.max_new_tokens
    return Shapes(cfg.ppo.micro_batch_size, min(cfg.rollout.generation_batch_size, samples),
                  cfg.model.max_prompt_length, new, group,
                  continuous_slack(new) if cfg.rollout.continuous_batching else 0,
                  bool(cfg.rollout.tools or cfg.rollout.environment), n)


def _ds_settings(cfg: Config) -> tuple[int, int, bool]:
    """(zero stage, reduce_bucket_size, overlap_comm) of the run's DeepSpeed config."""
    raw, _ = read_ds_config(cfg.deepspeed.config)
    zero = raw.get("zero_optimization", {})
    stage = zero_stage(raw)
    overlap = zero.get("overlap_comm")
    return stage, int(zero.get("reduce_bucket_size", 5e8)), bool(
        stage == 3 if overlap is None else overlap)


def _generation_bytes(arch: Arch, sh: Shapes, s: int) -> tuple[int, int]:
    """(KV cache, generation transient): the static KV cache of one decode batch (prompt + new
    tokens + the continuous batching's slack per row), plus the largest of: one layer's columns
    being shifted; a prefill's widest layer and the cache it writes besides the decode batch's
    (generation/continuous.py). Continuous batching prefills at most a quarter of the slots' prompts at
    a time into their own cache, copied in; batched decoding prefills the batch's distinct
    prompts into the decode cache itself, and a group's rows are copies of its prompt's.

    With turns, a conversation between turns waits on a cache of its own beside the batch's. Rows
    in flight (live or waiting) stay at most the slots (continuous.py's admit), each at most
    prompt + max_new_tokens tokens (the budget counts the tools'): at most one more cache of the
    batch without its slack. (Batched decoding encodes such a row again: nothing waits.) Rows
    taking their answers in their slots take up to ANSWER_CHUNK ids each in one forward of the
    batch: a prefill of that many tokens a row, into the decode cache itself.

    Where a group's rows share a prompt (samples_per_prompt > 1), continuous batching keeps one
    more copy of each shared prompt beside the batch's cache, for its decode steps' attention
    (generation/shared_prompts.py): at most the batch's distinct prompts."""
    gb, T = sh.generation_batch, sh.prompt_len + sh.new_tokens + sh.cache_slack
    kv_row = 2 * arch.kv_heads * arch.head_dim  # K and V elements per token and layer
    kv_cache = arch.layers * gb * T * kv_row * s
    prompt_tokens = sh.tokens(gb) - gb * sh.new_tokens  # the distinct prompts of a batch
    if sh.cache_slack:  # continuous: the distinct prompts of at most ceil(gb / 4) rows
        rows = -(-gb // PREFILL_SHARE)
        prefill_tokens = sh.tokens(rows) - rows * sh.new_tokens
        extra_cache = prefill_tokens
    else:
        prefill_tokens = prompt_tokens
        extra_cache = prompt_tokens if prompt_tokens < gb * sh.prompt_len else 0
    prefill = (prefill_tokens * _nograd_layer_peak(arch)
               + extra_cache * arch.layers * kv_row) * s
    waiting = (arch.layers * gb * (sh.prompt_len + sh.new_tokens) * kv_row * s
               if sh.turns and sh.cache_slack else 0)
    answers = (gb * min(ANSWER_CHUNK, sh.new_tokens) * _nograd_layer_peak(arch) * s
               if sh.turns and sh.cache_slack else 0)
    shared = (prompts_in(gb, sh.answers) * sh.prompt_len * arch.layers * kv_row * s
              if sh.cache_slack and sh.answers > 1 else 0)
    return kv_cache, kv_cache + waiting + shared + max(gb * T * kv_row * s // arch.layers,
                                                       prefill, answers)


def _logits_bytes(rows: int, vocab: int, s: int) -> int:
    """One logits chunk as rl/logprobs.py's _PickLogProb holds it: the head's output in the
    activation dtype, reduced in place in fp32 (a copy when that dtype is narrower)."""
    return rows * vocab * (4 + (s if s < 4 else 0))


def own_logits_bytes(positions: int, vocab: int, s: int, grad: bool) -> int:
    """What the model's own forward's logits add where lora_ppo takes them (a post-processing
    of the head's output it does not know; ActorCritic.use_own_logits): the (positions, V)
    logits whole in the activation dtype, and with a gradient as much again for what that
    post-processing keeps for its backward (one tensor, e.g. a tanh's output)."""
    return positions * vocab * s * (2 if grad else 1)


def _scoring_bytes(arch: Arch, sh: Shapes, s: int, chunk: int) -> int:
    """No grad, one micro-batch (ppo/rollout.py scores in micro-batches): the trunk's output,
    then the widest of one layer and one logits chunk."""
    tokens = sh.tokens(sh.micro_batch)
    rows = min(chunk, sh.micro_batch * sh.new_tokens)
    return tokens * arch.hidden * s + max(tokens * _nograd_layer_peak(arch) * s,
                                          _logits_bytes(rows, arch.vocab, s))


def _update_bytes(cfg: Config, arch: Arch, sh: Shapes, s: int, trainable: int) -> tuple[int, int]:
    """(saved activations, update transient) of one micro-batch.

    Saved by each forward with grad (policy; critic too in adapter mode): every layer's
    activations, or with gradient checkpointing only each layer's input; plus the final norm's
    input and output. Autograd runs the newest graph first, so in adapter mode the critic's
    backward (a layer's input grads at a time) ends before the policy's starts; that one begins
    at the logits chunks: one buffer turned into its own gradient in place, and the gradient in
    the activation dtype when that is narrower (with an entropy gradient, ppo.ent_coef != 0,
    autograd's ~5 (rows, V) fp32; both measured in tests/rl/test_logprobs.py). A frozen LM head
    holds its chunk in the forward only (rl/logprobs.py::_PickLogProbFrozenHead), on top of the
    forward's saved tensors: the same sum. With checkpointing a layer is recomputed when its
    turn comes.
    """
    L, H, mb = arch.layers, arch.hidden, sh.micro_batch
    tokens = sh.tokens(mb)  # a shared prompt is encoded once per micro-batch
    per_layer = _saved_per_token_layer(arch)
    mlp_grads = 3 * arch.intermediate + 2 * H  # a layer's input grads at the widest point
    if cfg.model.gradient_checkpointing:
        saved_one = tokens * (L * H + 2 * H) * s
        layer_bwd = tokens * (per_layer + mlp_grads) * s
    else:
        saved_one = tokens * (L * per_layer + 2 * H) * s
        layer_bwd = tokens * mlp_grads * s
    rows = chunk_rows(arch.vocab, cfg.model.logits_chunk_mib)
    rows = min(rows, mb * sh.new_tokens)
    # One chunk: its buffer, the entropy metric's temporary (an eighth of it) and, in a narrower
    # dtype, the gradient's cast. A frozen head (LoRA on the decoder) holds it in the forward
    # only, a trained one in the backward too: the same bytes on top of one forward's saved.
    logits_bwd = (5 * rows * arch.vocab * 4 if cfg.ppo.ent_coef
                  else _logits_bytes(rows, arch.vocab, s) + rows * arch.vocab * 4 // ENTROPY_BLOCKS
                  + (rows * arch.vocab * s if s < 4 else 0))
    saved = (2 if cfg.algorithm.value_mode == "adapter" else 1) * saved_one
    step_tmp = 2 * 4 * trainable  # AdamW's temporaries (denominator, update) after backward
    return saved, max(saved + layer_bwd, saved_one + max(logits_bwd, layer_bwd), step_tmp)


def estimate_memory(cfg: Config, arch: Arch, device: str = "gpu",
                    shapes: Optional[Shapes] = None, own_logits: bool = False) -> MemoryEstimate:
    """Predicted peak of each phase of an update (see the module docstring for what is counted).
    `own_logits`: the run takes the model's own forward's logits (`own_logits_bytes`), as the
    setup's check decides for a family whose logit post-processing lora_ppo does not know."""
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
    sh = shapes or shapes_from_config(cfg)
    s = 2 if device == "gpu" else 4  # activation bytes: bf16 on a GPU (auto), fp32 on a CPU
    precision = "bf16" if device == "gpu" else "fp32"
    q = cfg.quantization
    mode = quantization_mode(q, device)  # auto: 4bit on a GPU, none on a CPU
    weights = weight_bytes(arch, mode, q.double_quant, s)
    lora = lora_param_count(arch, cfg.lora.r, cfg.lora.target_modules)
    value_mode = cfg.algorithm.value_mode
    n_train = 2 if value_mode == "adapter" else 1
    kinds = getattr(cfg.reward, "kinds", [cfg.reward.source])
    n_frozen = int(bool(cfg.model.init_adapter)) + int("adapter" in kinds)
    heads = 0 if value_mode == "none" else n_train * (arch.hidden + 1)  # value head(s)
    trainable = n_train * lora + heads
    # Trainable LoRA weights live in the module in the training dtype (DeepSpeed casts them to
    # bf16 and keeps the fp32 master); frozen adapters stay fp32 (peft autocast_adapter_dtype).
    adapters = trainable * (4 if precision == "fp32" else 2) + 4 * n_frozen * lora
    stage, bucket, overlap = _ds_settings(cfg)
    optim = optimizer_bytes(trainable, precision, stage, device, bucket, overlap)
    if stage > 0 and "offload" in cfg.deepspeed.config and device == "gpu":
        optim = 0  # ZeRO-Offload: master, grads and Adam state live in CPU memory

    kv_cache, generation = _generation_bytes(arch, sh, s)
    scoring = _scoring_bytes(arch, sh, s, chunk_rows(arch.vocab, cfg.model.logits_chunk_mib))
    saved, update = _update_bytes(cfg, arch, sh, s, trainable)
    gb = sh.generation_batch
    if own_logits:
        update += own_logits_bytes(sh.micro_batch * sh.new_tokens, arch.vocab, s, grad=True)
        scoring += own_logits_bytes(sh.micro_batch * sh.new_tokens, arch.vocab, s, grad=False)

    # bitsandbytes dequantizes one linear's weight to the compute dtype for each matmul with
    # more than one row (bitsandbytes/autograd/_functions.py, matmul_4bit / MatMul8bitLt).
    dequant = max(i * o for i, o in arch.linears().values()) * s if mode != "none" else 0
    generation, scoring, update = generation + dequant, scoring + dequant, update + dequant
    if mode == "none" and s == 4 and cfg.rollout.fold_for_generation and stage != 3:
        # An fp32 base generates with the policy merged into new copies of the adapted
        # weights (generation/folded.py::folded_policy): one more copy of the decoder linears meanwhile.
        targeted = (param_counts(arch).linear if cfg.lora.target_modules == ["all-linear"] else
                    arch.layers * sum(i * o for n, (i, o) in arch.linears().items()
                                      if n in cfg.lora.target_modules))
        generation += targeted * 4
    if "model" in kinds and cfg.reward.model:
        # A separate sequence-classification reward model, unquantized in the compute dtype:
        # its trunk (no LM head) plus a one-layer widest no-grad activation of a scoring batch.
        rm = read_arch(cfg.reward.model)
        weights += (param_counts(rm).total - (0 if rm.tied else rm.vocab * rm.hidden)) * s
        scoring += gb * (sh.prompt_len + sh.new_tokens) * _nograd_layer_peak(rm) * s
    mapped = 0
    if device == "cpu" and mode != "none":
        # transformers maps model.safetensors privately (mmap) and keeps the unquantized weights
        # as views into it, so the pages of the linear weights, read while quantizing, stay in
        # the RSS. Clean pages the kernel may drop, but RSS (and VmHWM) counts them.
        mapped = param_counts(arch).linear * arch.checkpoint_bytes
    resident = weights + mapped + adapters + optim
    extra = CPU_RUNTIME_OVERHEAD if device == "cpu" else 0
    components = {"weights": weights, "checkpoint_pages": mapped, "adapters": adapters,
                  "optimizer": optim, "kv_cache": kv_cache, "activations": saved, "runtime": extra}
    phases = {"generation": resident + generation + extra, "scoring": resident + scoring + extra,
              "update": resident + update + extra}
    return MemoryEstimate(components, phases, device)
