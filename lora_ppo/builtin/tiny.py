"""Tiny Llama-architecture models and tokenizers built locally, for tests and the demo.

Nothing can be downloaded from a model hub here, so we write our own: a byte-level BPE tokenizer
trained on the review corpus (`lora_ppo.builtin.corpus`) and a random-init `LlamaForCausalLM`, saved with
`save_pretrained` so that plain `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained(dir)`
load them offline, exactly like a hub checkpoint. `pretrain` teaches the demo-size model to write
reviews; `ensure_builtin_model` builds one once into a cache and reuses it.

The tokenizer copies Llama's quirks on purpose, because the toolkit must handle them:
`<s>` is prepended by the post-processor (TemplateProcessing, as in Llama 2/3 tokenizer.json),
`</s>` is never appended, and there is NO pad token.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from filelock import FileLock  # a transformers dependency; serialises concurrent builders
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lora_ppo.builtin import arithmetic, calculator, chat
from lora_ppo.builtin.corpus import review_corpus
from lora_ppo.errors import UserError
from lora_ppo.io.atomic import TMP_TAG, replace_dir

BOS, EOS, UNK = "<s>", "</s>", "<unk>"

# One line per message, the assistant's turns closed by </s> so that a model trained on the
# template learns to stop; `add_generation_prompt` opens an assistant turn ("assistant:" with no
# trailing space: the byte-level BPE puts the space in front of the next word).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)

# Bump when a change here would build a different model: it is part of the cache dir name.
BUILDER_VERSION = 1

ARITH_STEPS = 100  # pre-training steps of the `arith` model (see SIZES)

# Built-in sizes for `ensure_builtin_model`: the architecture and, for "demo", the pre-training
# run. Changing any value here changes the cache dir name, so a stale cache is never reused.
# "demo" measured on this project's 2-core CPU box (1 thread, other jobs running): 600 steps in
# 93 CPU-seconds, loss 6.95 -> 3.06 (step 100) -> 0.93 (300) -> 0.87 (600); sampled at
# temperature 1, 64/64 continuations end with </s> and 3/64 mix positive and negative words
# (21/64 after 300 steps). A 2-thread step takes ~0.08 s on an idle box: ~50 s for 600 steps.
SIZES: dict[str, dict] = {
    "test": {
        "model": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                  "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "max_position_embeddings": 256},
        "pretrain": None,
    },
    "demo": {
        # vocab 1024 rather than 512: every corpus word becomes one token (1.07 tokens per word
        # against 1.68), so the same steps see twice the reviews.
        "model": {"vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256,
                  "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                  "max_position_embeddings": 256},
        "pretrain": {"steps": 600, "batch_size": 32, "seq_len": 48, "lr": 3e-3},
    },
    # The critic-free demo's task (builtin/arithmetic.py): additions "a + b = c", a tokenizer of
    # their own, pre-trained only briefly so that many sums come out wrong and a reward function
    # that checks them has something to teach (`lora-ppo demo --preset grpo`).
    "arith": {
        "model": {"vocab_size": 300, "hidden_size": 128, "intermediate_size": 256,
                  "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "max_position_embeddings": 64},
        "corpus": "arithmetic", "max_operand": arithmetic.MAX_OPERAND,
        "pretrain": {"steps": ARITH_STEPS, "batch_size": 32, "seq_len": 32, "lr": 3e-3},
    },
    # The tools demo's model (builtin/calculator.py, builtin/chat.py): a Qwen 2.5-style chat
    # tokenizer and template, pre-trained on conversations without tools (arithmetic answered
    # from its head, mostly wrongly, and answers read from the context) and on calls of another
    # tool (`lookup`), so that it knows the call format and copies digits into a call and out
    # of a result, but does not call the calculator: SFT on calculator transcripts teaches that
    # (`lora-ppo demo --preset tools`). Windows of 256 tokens: a prompt with the tools' schemas
    # is ~190 tokens. Copying digits appears late: 900 steps (6-13 minutes on 2 CPU cores), the
    # loss ~0.31 at step 600 and ~0.2 at 900, where the copy is learnt.
    "tools": {
        "model": {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 384,
                  "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                  "max_position_embeddings": 512},
        "corpus": "tools", "tokenizer": "chat", "lookup_share": chat.LOOKUP_SHARE,
        "max_operand": calculator.MAX_OPERAND, "calculator_version": calculator.VERSION,
        "pretrain": {"steps": 900, "batch_size": 16, "seq_len": 256, "lr": 3e-3},
    },
}

_N_TOKENIZER_TEXTS = 5000  # reviews the default tokenizer is trained on
_N_PRETRAIN_TEXTS = 20000  # most reviews in the pre-training stream (about 480k tokens)
_MARKER = "lora_ppo_build.json"  # written last inside the build dir; names how it was built


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (GPT-2 / Llama 3 style, no unknown bytes).

    decode(encode(x), skip_special_tokens=True) == x for any string x: the 256 byte symbols are
    all in the vocab, so `<unk>` exists for Llama look-alike configs but is never produced.
    """
    n_reserved = 256 + 3  # byte alphabet + <s> </s> <unk>
    if vocab_size <= n_reserved:
        raise UserError(f"vocab_size={vocab_size} is too small for a byte-level BPE; "
                        f"use more than {n_reserved} (e.g. 512)")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Prepend <s> like Llama's tokenizer.json: "$A" is the text, "$B" the second of a pair.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        chat_template=CHAT_TEMPLATE, model_max_length=4096,
    )


def build_tiny_model(
    out_dir: str | Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 256,
    seed: int = 0,
    texts: Iterable[str] | None = None,
    tie_word_embeddings: bool = False,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Path:
    """Write a random-init float32 `LlamaForCausalLM` and its tokenizer to `out_dir`.

    The same arguments give byte-identical weights: init runs under `seed` in a forked RNG, so
    the caller's torch RNG state is left alone. `texts` (default: 5000 reviews of the corpus,
    independent of `seed`, so that a policy and a reward model built with different seeds share
    one tokenizer) train the tokenizer; if they are too few for `vocab_size` tokens, the
    tokenizer comes out smaller and the model's extra embedding rows are never used. A given
    `tokenizer` is used as it is (`texts` ignored).
    """
    if tokenizer is None:
        if texts is None:  # corpus seed fixed: models of any `seed` share one tokenizer
            texts = (text for text, _ in review_corpus(_N_TOKENIZER_TEXTS, seed=0))
        tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.model_max_length = max_position_embeddings
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tie_word_embeddings,
        dtype=torch.float32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def corpus_texts(corpus: str, n: int, seed: int) -> list[str]:
    """`n` texts of a built-in corpus: "reviews" (builtin/corpus.py) or "arithmetic"."""
    if corpus == "arithmetic":
        return arithmetic.texts(n, seed=seed)
    return [text for text, _ in review_corpus(n, seed=seed)]


def _token_stream(tokenizer, n_texts: int, seed: int, corpus: str = "reviews") -> torch.Tensor:
    """The corpus as one 1-D LongTensor "<s> text </s> <s> text </s> ...".

    </s> after each text teaches the model to stop; the tokenizer adds only <s>, like Llama.
    The "tools" corpus is rendered conversations, each ending with the template's <|im_end|>.
    """
    if corpus == "tools":
        return chat.chat_stream(tokenizer, n_texts, seed)
    texts = corpus_texts(corpus, n_texts, seed)
    ids = [tok for row in tokenizer(texts).input_ids for tok in row + [tokenizer.eos_token_id]]
    return torch.tensor(ids, dtype=torch.long)


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warmup over the first 10% of steps, then cosine decay to lr / 10 (as nanoGPT)."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr / 10 + 0.5 * (lr - lr / 10) * (1 + math.cos(math.pi * progress))


def pretrain(
    model_dir: str | Path,
    *,
    steps: int,
    batch_size: int = 32,
    seq_len: int = 48,
    lr: float = 3e-3,
    seed: int = 0,
    corpus: str = "reviews",
    log_every: int = 25,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Causal-LM pre-training on the review corpus, saving the weights back into `model_dir`.

    Each step takes `batch_size` random windows of `seq_len` tokens from the packed corpus stream
    (nanoGPT's get_batch), so windows cross review boundaries and the model learns that </s> is
    followed by <s>. AdamW with warmup + cosine decay and grad-norm clipping at 1.0.

    Every `log_every` steps (and at the last) `progress` gets {"step", "steps", "loss", "lr",
    "seconds"}, loss being the mean over the steps since the previous call. Returns
    {"loss": that mean at the end, "first_loss": step 1's loss, "steps", "seconds", "tokens"}.
    """
    if steps < 1 or batch_size < 1 or seq_len < 2:
        raise UserError(f"pretrain needs steps >= 1, batch_size >= 1, seq_len >= 2; got "
                        f"steps={steps}, batch_size={batch_size}, seq_len={seq_len}")
    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if seq_len > model.config.max_position_embeddings:
        raise UserError(f"seq_len={seq_len} exceeds the model's max_position_embeddings="
                        f"{model.config.max_position_embeddings}; lower seq_len")
    # Reviews for about twice the tokens the steps draw (a review is ~24 tokens), capped; a
    # 20-step test run then tokenizes a few hundred reviews, not 20000.
    n_texts = min(_N_PRETRAIN_TEXTS, max(100, steps * batch_size * seq_len // 10))
    stream = _token_stream(tokenizer, n_texts, seed, corpus)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    start, window, first_loss, stats = time.perf_counter(), [], None, {}
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        offsets = torch.randint(len(stream) - seq_len, (batch_size,), generator=gen)
        batch = torch.stack([stream[o : o + seq_len] for o in offsets.tolist()])  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss  # HF shifts labels by one inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
        first_loss = window[0] if first_loss is None else first_loss
        if (step + 1) % log_every == 0 or step + 1 == steps:
            stats = {"step": step + 1, "steps": steps, "loss": sum(window) / len(window),
                     "lr": optimizer.param_groups[0]["lr"],
                     "seconds": time.perf_counter() - start}
            window = []
            if progress is not None:
                progress(stats)
    model.save_pretrained(model_dir)
    return {"loss": stats["loss"], "first_loss": first_loss, "steps": steps,
            "seconds": time.perf_counter() - start, "tokens": steps * batch_size * seq_len}


def builtin_model_dir(cache_dir: str | Path | None = None, *, size: str = "demo") -> Path:
    """Where `ensure_builtin_model` keeps `size`: <cache>/models/<size>-<hash of its recipe>.

    <cache> is `cache_dir`, else $LORA_PPO_CACHE, else ~/.cache/lora_ppo.
    """
    if size not in SIZES:
        raise UserError(f"unknown built-in model size {size!r}; use one of {sorted(SIZES)}")
    root = cache_dir or os.environ.get("LORA_PPO_CACHE") or Path.home() / ".cache" / "lora_ppo"
    recipe = json.dumps({"builder": BUILDER_VERSION, **SIZES[size]}, sort_keys=True)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:10]
    return Path(root).expanduser() / "models" / f"{size}-{digest}"


def ensure_builtin_model(
    cache_dir: str | Path | None = None, *, size: str = "demo", log: Callable[[str], None] = print
) -> Path:
    """Return the dir of built-in model `size` ("test" or "demo"), building it the first time.

    "test" is a random-init 2-layer model (under a second); "demo" is pre-trained on the review
    corpus (1-3 minutes on 2 CPU cores, progress through `log`). The build happens in a temp
    dir next to the target, renamed into place only when complete (`atomic.replace_dir`), so a
    crash never leaves a dir that looks finished. A file lock makes concurrent
    callers (e.g. several ranks on one machine) wait for one build instead of each running one.
    """
    target = builtin_model_dir(cache_dir, size=size)
    if (target / _MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if (target / _MARKER).is_file():  # built by another process while we waited
            return target
        if target.exists():
            raise UserError(f"{target} exists but has no {_MARKER}, so it was not built by "
                            "ensure_builtin_model; delete it and rerun")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_TAG}", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is readable like any model dir
        try:
            _build_builtin(tmp, size, log)
            replace_dir(tmp, target)  # fsync, then one rename: whole or absent, even on power loss
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"built-in model {size!r} ready at {target}")
    return target


def _build_builtin(out_dir: Path, size: str, log: Callable[[str], None]) -> None:
    recipe = SIZES[size]
    steps = recipe["pretrain"]["steps"] if recipe["pretrain"] else 0
    log(f"building built-in model {size!r} in {out_dir}"
        + (f" (pre-training {steps} steps, {'1-3' if steps <= 400 else '6-13'} minutes on 2 CPU "
           "cores)" if steps else ""))
    corpus = recipe.get("corpus", "reviews")
    tokenizer, texts = None, None
    if recipe.get("tokenizer") == "chat":
        tokenizer = chat.build_chat_tokenizer(chat.tokenizer_texts(),
                                              vocab_size=recipe["model"]["vocab_size"])
    elif corpus != "reviews":
        texts = corpus_texts(corpus, _N_TOKENIZER_TEXTS, seed=0)
    build_tiny_model(out_dir, **recipe["model"], seed=0, texts=texts, tokenizer=tokenizer)
    result = None
    if recipe["pretrain"] is not None:
        def report(s: dict) -> None:
            log(f"pre-training {size!r}: step {s['step']}/{s['steps']} loss {s['loss']:.3f} "
                f"({s['seconds']:.0f} s)")

        log_every = max(1, steps // 12)
        result = pretrain(out_dir, **recipe["pretrain"], seed=0, corpus=corpus, log_every=log_every,
                          progress=report)
    marker = {"size": size, "builder": BUILDER_VERSION, **recipe, "pretrain_result": result}
    (out_dir / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
