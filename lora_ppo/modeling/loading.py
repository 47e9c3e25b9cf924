"""Load the one base model and its tokenizer, quantized or not, ready for LoRA.

The base is loaded once per process; every role (policy, reference, critic, reward) is a view of
it through peft adapters (see actor_critic.py).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import torch

from lora_ppo.config.sections import ModelConfig, QuantizationConfig
from lora_ppo.config.tree import Config
from lora_ppo.errors import UserError, first_line

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a GPU that supports it, fp32 elsewhere (CPU bf16 matmul is ~400x slower)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name == "fp16" and device.type == "cpu":
        raise UserError("quantization.compute_dtype=fp16 needs a GPU; use fp32 (or auto) on a CPU")
    return DTYPES[name]


def resolve_model_path(path: str | None) -> str:
    """A saved transformers model directory, or a hub id (when online or in the hub's cache)."""
    if not path:
        raise UserError("model.path is not set; point it at a saved transformers model "
                        "directory")
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"model.path={path} has no config.json; point it at a saved "
                            "transformers model directory")
        return str(p)
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise UserError(f"model.path={path} does not exist; point it at a local model directory")
    return path


def load_tokenizer(cfg: ModelConfig, model_path: str):
    """Tokenizer with a pad token and left padding (generation appends on the right).

    A missing pad token is set to EOS: no embedding row is added (that would mean resizing a
    possibly quantized embedding), and pad ids never decide what is real: every mask in the
    toolkit is kept explicitly, so an EOS that ends a response is never mistaken for padding.
    """
    from transformers import AutoTokenizer

    src = cfg.tokenizer_path or model_path
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {src}: {first_line(e)}")
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer at {src} has no EOS token; PPO needs one to end responses")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def quantization_mode(q: QuantizationConfig, device_type: str | None = None) -> str:
    """quantization.mode with `auto` resolved: 4bit on a GPU, none on a CPU. `device_type`
    ("cuda"/"gpu" or "cpu"): the device the base is for; None: this machine's."""
    if q.mode != "auto":
        return q.mode
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return "4bit" if device_type in ("cuda", "gpu") else "none"


def quantization_config(q: QuantizationConfig, compute_dtype: torch.dtype,
                        mode: str | None = None):
    """transformers' BitsAndBytesConfig of `q` (`mode`: the mode already resolved), or None."""
    from transformers import BitsAndBytesConfig

    mode = mode or quantization_mode(q)
    if mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                                  bnb_4bit_use_double_quant=q.double_quant,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base_model(cfg: Config, model_path: str, device: torch.device):
    """The base causal LM on `device`, quantized per `cfg.quantization`, frozen, dropout off."""
    from peft import prepare_model_for_kbit_training
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    dtype = resolve_compute_dtype(cfg.quantization.compute_dtype, device)
    qcfg = quantization_config(cfg.quantization, dtype,
                               quantization_mode(cfg.quantization, device.type))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=dtype, quantization_config=qcfg,
                device_map={"": device} if qcfg is not None else None,
                trust_remote_code=cfg.model.trust_remote_code,
            )
        except (OSError, ValueError, SafetensorError) as e:  # a truncated or corrupt shard
            raise UserError(f"cannot load model.path={model_path}: {first_line(e)}; check that "
                            "its weight files are complete (re-copy or re-download them)")
    if qcfg is None:
        model.to(device)
    else:
        # Casts the remaining non-quantized weights (norms, embeddings) to fp32 for stable
        # training and makes embedding outputs require grad so gradient checkpointing can
        # backpropagate into the LoRA weights (QLoRA recipe, peft docs).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_differentiable_on_cpu(model)
        one_8bit_kernel(model)
    model.requires_grad_(False)
    if cfg.model.gradient_checkpointing:
        set_gradient_checkpointing(model, True)
    disable_dropout(model)
    model.config.use_cache = False
    return model


def keep_4bit_differentiable_on_cpu(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference (bnb 0.50).

    On a CPU with AVX512-BF16, `Linear4bit.forward` in eval mode without grad repacks its weight
    into a layout served by `gemv_4bit`, which has no autograd kernel, and keeps it that way. The
    next training forward then backpropagates nothing through the frozen base weight: LoRA
    weights below it get wrong gradients, silently (torch only warns). A rollout (eval, no grad)
    is always followed by an update, so the fast path is switched off; compute stays fp32 either
    way. Checked by tests/modeling/test_actor_critic.py.
    """
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def one_8bit_kernel(model: torch.nn.Module) -> None:
    """8-bit layers run the kernel of training mode in eval mode too (bitsandbytes 0.50).

    `Linear8bitLt.forward` sets `state.is_training = self.training`, and on a CPU (or XPU)
    `bnb.matmul` then takes `MatMul8bitFp` in training (the int8 weight dequantized, an fp32
    matmul) but `MatMul8bitLt` in eval (activations quantized to int8 through fp16, outliers
    above the threshold apart): the rollout, scored in eval mode, and the update, in train mode,
    ran different kernels (first-minibatch max |log ratio| 0.058). On CUDA both modes take
    `MatMul8bitLt` (`bitsandbytes/autograd/_functions.py::matmul`), so pinning the training
    path changes nothing there. A forward pre-hook sets the layer to training mode before each
    call; dropout is off everywhere, so nothing else depends on it."""
    import bitsandbytes as bnb

    def training_kernel(module, _args):
        module.training = True

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            m.register_forward_pre_hook(training_kernel)


def set_gradient_checkpointing(model: torch.nn.Module, on: bool, context_fn=None) -> None:
    """Turn activation checkpointing on (non-reentrant) or off on a transformers model.

    `context_fn` goes to torch.utils.checkpoint (the actor-critic passes one that recomputes
    under the right adapter). transformers' enable also registers a forward hook on the input
    embeddings (`enable_input_require_grads`) and keeps only the latest list of such hooks; the
    old ones are removed first, so enabling twice never leaves a hook behind.
    """
    kwargs = {"use_reentrant": False}
    if context_fn is not None:
        kwargs["context_fn"] = context_fn
    with warnings.catch_warnings():
        # transformers 5 renamed gradient_* to activation_*; both names work until v6.
        warnings.filterwarnings("ignore", category=FutureWarning)
        model.disable_input_require_grads()
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if not getattr(model, "_require_grads_hooks", None):
                # Lets gradients reach LoRA weights through checkpointed blocks of a frozen base.
                model.enable_input_require_grads()
        else:
            model.gradient_checkpointing_disable()


def is_gradient_checkpointing(model: torch.nn.Module) -> bool:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        return bool(model.is_gradient_checkpointing)


_DROPOUT = re.compile(r"dropout|pdrop|layerdrop")  # attention_dropout, resid_pdrop, layerdrop...


def disable_dropout(model: torch.nn.Module) -> None:
    """PPO runs without dropout (lm-human-preferences; TRL's `disable_dropout_in_model`): with it
    the update's log-probs differ from the rollout's and the first ratio is not 1.

    Three places hold a dropout probability: nn.Dropout modules; float attributes that a module
    copied from its config at init and passes to functional dropout (OPT's `decoder.dropout` and
    `layers[i].dropout` = 0.1 as released, attention modules' `attention_dropout`, Bloom's and
    Falcon's `hidden_dropout`, OPT's `layerdrop`, which skips whole layers in training); and the
    config itself, read by modules built later. Zeroing only the config after the model was
    built missed the second kind (OPT trained with dropout 0.1). ppo/seams.py checks that a
    train-mode forward equals an eval-mode one, for whatever a new architecture adds."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for key, value in vars(m).items():
            if type(value) is float and value != 0.0 and _DROPOUT.search(key):
                setattr(m, key, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in config.to_dict().items():
            if type(value) is float and value != 0.0 and _DROPOUT.search(key):
                setattr(config, key, 0.0)


def is_quantized(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
