"""Tiny random models of 14 architecture families, built locally, for tests (no hub access).

`build_family_model(family, out, tokenizer_dir)` saves a random-init float32 causal LM of that
family (`save_pretrained`, safetensors) and copies the tokenizer files of `tokenizer_dir` (the
tiny byte-level BPE of `lora_ppo.builtin.tiny.build_tiny_model`: vocab 512, `<s>` bos, `</s>`
eos, NO pad token) next to it, so `AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)`
and `AutoTokenizer.from_pretrained(out)` load it offline like a hub checkpoint.

Common sizes: hidden 64, 2 layers, 4 heads (head_dim 16 unless noted), 2 KV heads where the
family has grouped-query attention, MLP width 128, vocab 512, max positions 512 (gpt2: 1024, as
released). Every config gets the tokenizer's ids: bos_token_id, eos_token_id, and
pad_token_id=None (the tokenizer has no pad; lora_ppo pads with eos). The families' own defaults
(pad 0 / 1 / 32000, bos 2 / 11 / 50256, ...) would point outside or into the wrong rows of a
512-token vocab, and a non-None pad id also zeroes that embedding row at init (`padding_idx`).

What each family sets beyond the common sizes, and why. The point is that a test built on these
models can FAIL where the released checkpoints differ from Llama: each family keeps the features
(and the dropout values) its released configs ship with; a few values are scaled down so the
feature is active at test lengths (16-32 tokens).

  llama     LlamaConfig exactly as `build_tiny_model` (Llama-2 style: rope_theta 10000, untied
            head, attention_dropout 0.0), except max_position_embeddings 512. The reference.
  mistral   sliding_window=8 (mistralai/Mistral-7B-v0.1 ships 4096; 8 is smaller than the
            sequences tests use, so the window is active), attention_dropout 0.0, untied.
  qwen2     use_sliding_window=False (every released Qwen2/2.5 config; `sliding_window` is then
            None), q/k/v biases (always on in Qwen2 attention), tie_word_embeddings=True and
            rope_theta 1e6 as Qwen2.5-0.5B/1.5B ship them, attention_dropout 0.0.
  gemma     google/gemma-7b shape in miniature: head_dim 32 with 4 heads, so heads*head_dim
            (128) != hidden (64) and o_proj is not square; hidden_act gelu_pytorch_tanh;
            embeddings scaled by sqrt(hidden) inside the model; RMSNorm (1 + w); tied head.
  gemma2    google/gemma-2-2b: layer_types [sliding, full] (released: alternating, sliding
            first), sliding_window=8 (released 4096), attn_logit_softcapping=50.0 (as
            released), final_logit_softcapping=5.0 (released 30.0: lowered so the tanh cap is
            not a no-op on a random model's small logits; see FINAL_SOFTCAP_NOTE below),
            query_pre_attn_scalar=head_dim=32 (released 256 = head_dim), head_dim 32, tied.
  gemma3    text-only Gemma3ForCausalLM (`gemma3_text`), google/gemma-3-1b-pt: layer_types
            [sliding, full] (released: 5 sliding then 1 full, sliding_window_pattern 6),
            sliding_window=8 (released 512), q/k RMSNorm, two rope bases (local 1e4 on sliding
            layers, global 1e6 on full ones, the config's defaults, as released),
            query_pre_attn_scalar=head_dim=32, head_dim 32, tied. final_logit_softcapping and
            attn_logit_softcapping are None, as in the released Gemma-3 configs (the field
            exists; gemma2 covers softcapping).
  phi3      microsoft/Phi-3-mini-4k-instruct: fused qkv_proj and gate_up_proj (the
            architecture), resid_pdrop/embd_pdrop/attention_dropout 0.0 (as released), untied.
            That release ships sliding_window=2047 with max_position_embeddings 4096, i.e. an
            ACTIVE window (half the context); scaled down here to sliding_window=8 so it is
            active at test lengths. (Phi-3-mini-128k / Phi-3.5-mini ship 262144: inactive.)
            original_max_position_embeddings = max_position_embeddings = 512, no rope scaling.
  gpt2      openai-community/gpt2: n_positions 1024, resid_pdrop = embd_pdrop = attn_pdrop =
            0.1 (as released), learned absolute positions (wpe), Conv1D layers (c_attn, c_proj,
            c_fc: transposed weights), gelu_new, tied head. n_inner 128.
  gpt_neox  EleutherAI/pythia-*: partial rotary (partial_rotary_factor 0.25, the old
            `rotary_pct`), use_parallel_residual=True, fused query_key_value with biases,
            attention_dropout = hidden_dropout = 0.0 (as released), untied `embed_out` head.
  opt       facebook/opt-125m: dropout=0.1, attention_dropout=0.0, activation_dropout 0.0,
            layerdrop 0.0 (as released), do_layer_norm_before=True, word_embed_proj_dim = hidden
            (no project_in/out), learned positions with OPT's offset of 2, relu, tied head.
            OPT stores `dropout` as a float on each decoder layer and on the decoder (functional
            dropout), not as nn.Dropout modules. ffn_dim 128.
  bloom     bigscience/bloom-560m: ALiBi (no position embeddings, no rope), word embedding
            LayerNorm, fused query_key_value, hidden_dropout = attention_dropout = 0.0 (as
            released), apply_residual_connection_post_layernorm False, tied head. No GQA.
  falcon    tiiuae/falcon-7b: rotary (alibi=False), new_decoder_architecture=False,
            multi_query=True (ONE shared KV head), parallel_attn=True, bias=False,
            hidden_dropout = attention_dropout = 0.0, tied head; ffn_hidden_size 128.
            Not covered (pass overrides): falcon-40b/180b's new_decoder_architecture=True
            (num_kv_heads 8, grouped qkv layout, two layer norms), falcon-rw-1b's alibi=True
            (multi_query False, parallel_attn False, bias True).
  cohere    CohereForAI/c4ai-command-r-v01: logit_scale=0.0625 (logits multiplied inside the
            model's forward), parallel attention + MLP off one LayerNorm (no bias),
            use_qk_norm False, rope_theta 8e6, attention_dropout 0.0, tied head.
  granite   ibm-granite/granite-3.0-2b-base/-instruct: logits_scaling=8.0 (logits DIVIDED by it),
            embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier =
            1/head_dim (released 0.015625 = 1/64 with head_dim 64; here 1/16 = 0.0625, used in
            place of 1/sqrt(head_dim)), attention_dropout=0.1 (the granite-3.0/3.1 dense configs
            ship 0.1; stored as a float on each attention module), tied head, rope_theta 10000.

`lora_targets(family)` is the value for lora_ppo's `lora.target_modules`: "all-linear" works for
all 14 families with peft 0.21 (peft finds nn.Linear and transformers' Conv1D alike and leaves
out the output embedding), so it is ["all-linear"] everywhere. Careful: that is lora_ppo's
config spelling, which actor_critic turns into the STRING "all-linear" for peft; peft itself
rejects the list ["all-linear"] (NoMatchingPeftModuleError, it looks for a module named
"all-linear"). Calling peft directly, pass "all-linear" or `linear_names(family)`, the leaf
module names "all-linear" resolves to (checked equal for every family).

`build_family_model(..., **overrides)` passes config fields through (e.g. falcon
new_decoder_architecture=True) for one-off variants.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

FAMILIES: tuple[str, ...] = (
    "llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3", "phi3",
    "gpt2", "gpt_neox", "opt", "bloom", "falcon", "cohere", "granite",
)

HIDDEN, LAYERS, HEADS, KV_HEADS, MLP, VOCAB, MAX_POS = 64, 2, 4, 2, 128, 512, 512
SLIDING_WINDOW = 8  # mistral, gemma2, gemma3, phi3: smaller than test sequences, so active
GEMMA_HEAD_DIM = 32  # heads * head_dim = 128 != hidden 64, like gemma-7b / gemma-2 / gemma-3

FINAL_SOFTCAP_NOTE = (
    "gemma2 final_logit_softcapping is 5.0, not the released 30.0: a random model's logits are "
    "within a few tenths of 0, where tanh(z / 30) * 30 equals z to ~1e-5.")

# Files of the tokenizer dir that are the model's, not the tokenizer's.
_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors",
                "model.safetensors.index.json", "lora_ppo_build.json"}


def _config_args(family: str, ids: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(transformers config class name, its kwargs) of `family`; see the module doc."""
    common = dict(vocab_size=VOCAB, **ids)
    llama_like = dict(hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, max_position_embeddings=MAX_POS, **common)
    gemma_like = dict(num_key_value_heads=KV_HEADS, head_dim=GEMMA_HEAD_DIM,
                      tie_word_embeddings=True, attention_dropout=0.0, **llama_like)
    table: dict[str, tuple[str, dict[str, Any]]] = {
        "llama": ("LlamaConfig", dict(
            num_key_value_heads=KV_HEADS, tie_word_embeddings=False, attention_dropout=0.0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **llama_like)),
        "mistral": ("MistralConfig", dict(
            num_key_value_heads=KV_HEADS, sliding_window=SLIDING_WINDOW,
            tie_word_embeddings=False, attention_dropout=0.0, **llama_like)),
        "qwen2": ("Qwen2Config", dict(
            num_key_value_heads=KV_HEADS, use_sliding_window=False, tie_word_embeddings=True,
            attention_dropout=0.0, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            **llama_like)),
        "gemma": ("GemmaConfig", dict(hidden_act="gelu_pytorch_tanh", **gemma_like)),
        "gemma2": ("Gemma2Config", dict(
            query_pre_attn_scalar=GEMMA_HEAD_DIM, sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            final_logit_softcapping=5.0, attn_logit_softcapping=50.0, **gemma_like)),
        "gemma3": ("Gemma3TextConfig", dict(
            query_pre_attn_scalar=GEMMA_HEAD_DIM, sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            final_logit_softcapping=None, attn_logit_softcapping=None, **gemma_like)),
        "phi3": ("Phi3Config", dict(
            num_key_value_heads=KV_HEADS, sliding_window=SLIDING_WINDOW,
            original_max_position_embeddings=MAX_POS, resid_pdrop=0.0, embd_pdrop=0.0,
            attention_dropout=0.0, tie_word_embeddings=False, **llama_like)),
        "gpt2": ("GPT2Config", dict(
            n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=MLP, n_positions=1024,
            resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, tie_word_embeddings=True,
            **common)),
        "gpt_neox": ("GPTNeoXConfig", dict(
            hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, max_position_embeddings=MAX_POS,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.25},
            use_parallel_residual=True, attention_dropout=0.0, hidden_dropout=0.0,
            tie_word_embeddings=False, **common)),
        "opt": ("OPTConfig", dict(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, ffn_dim=MLP, num_attention_heads=HEADS,
            max_position_embeddings=MAX_POS, do_layer_norm_before=True,
            word_embed_proj_dim=HIDDEN, dropout=0.1, attention_dropout=0.0, layerdrop=0.0,
            activation_function="relu", tie_word_embeddings=True, **common)),
        "bloom": ("BloomConfig", dict(
            hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, hidden_dropout=0.0,
            attention_dropout=0.0, apply_residual_connection_post_layernorm=False,
            tie_word_embeddings=True, **common)),
        "falcon": ("FalconConfig", dict(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            ffn_hidden_size=MLP, max_position_embeddings=MAX_POS, alibi=False,
            new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False,
            hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=True, **common)),
        "cohere": ("CohereConfig", dict(
            num_key_value_heads=KV_HEADS, logit_scale=0.0625, use_qk_norm=False,
            attention_dropout=0.0, rope_parameters={"rope_type": "default", "rope_theta": 8e6},
            tie_word_embeddings=True, **llama_like)),
        "granite": ("GraniteConfig", dict(
            num_key_value_heads=KV_HEADS, logits_scaling=8.0, embedding_multiplier=12.0,
            residual_multiplier=0.22, attention_multiplier=1.0 / (HIDDEN // HEADS),
            attention_dropout=0.1, tie_word_embeddings=True, **llama_like)),
    }
    if family not in table:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    return table[family]


def family_config(family: str, tokenizer_dir: str | Path | None = None, **overrides):
    """The config `build_family_model` saves (ids from the tokenizer at `tokenizer_dir`, or
    bos 1 / eos 2 when None, which is what `build_tokenizer` assigns)."""
    if tokenizer_dir is None:
        ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
               "pad_token_id": tok.pad_token_id}
    import transformers

    cls_name, kwargs = _config_args(family, ids)
    return getattr(transformers, cls_name)(**{**kwargs, **overrides, "dtype": torch.float32})


def build_family_model(family: str, out: str | Path, tokenizer_dir: str | Path, *, seed: int = 0,
                       **overrides) -> Path:
    """Save a tiny random float32 `family` model and the tokenizer of `tokenizer_dir` to `out`.

    The same arguments give the same weights: init runs under `seed` in a forked RNG, leaving
    the caller's RNG alone. `overrides` replace or add config constructor arguments (variants,
    e.g. falcon new_decoder_architecture=True, num_kv_heads=2).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, tokenizer_dir = Path(out), Path(tokenizer_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name not in _MODEL_FILES:
            shutil.copy2(f, out / f.name)
    config = family_config(family, tokenizer_dir, **overrides)
    config.save_pretrained(out)
    # transformers 5 picks the tokenizer class by the model type: Qwen2Tokenizer adds its own
    # <|endoftext|> pad (id 512). As in every released checkpoint, the embedding covers every
    # id the tokenizer can produce.
    config.vocab_size = max(config.vocab_size, len(AutoTokenizer.from_pretrained(out)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    return out


def lora_targets(family: str) -> list[str]:
    """lora_ppo's `lora.target_modules` for `family`: ["all-linear"] works for all 14 (with
    peft directly use the string "all-linear" or `linear_names(family)`; see the module doc)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    return ["all-linear"]


# The linear layers "all-linear" resolves to, per family (leaf names; the output head excluded).
LINEAR_NAMES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # transformers Conv1D, not nn.Linear
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "cohere": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "granite": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def linear_names(family: str) -> list[str]:
    """Explicit target_modules equal to what "all-linear" picks for `family`."""
    return list(LINEAR_NAMES[family])
