"""What the SFT and reward-model stages share: data, tokenisation, setup, the loop, checkpoints.

Both stages train one LoRA adapter (plus, for the reward model, a score head) on the same base
and with the same DeepSpeed layer as PPO (lora_ppo.runtime.engine). Their run files live under
`<output_dir>/<stage>/` (metrics.jsonl, tensorboard/, config.yaml, checkpoints/step-N/) so that
one output_dir can hold all three stages without one run's metrics overwriting another's; the
result goes to `<output_dir>/adapter/` (SFT) or `<output_dir>/reward_adapter/` (reward model).

Tokenisation matches what PPO feeds the policy and the reward adapter: prompt ids as the
tokenizer (or the chat template) gives them, then response ids tokenised on their own, so the
boundary between prompt and response is the same token boundary PPO samples at.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from peft import PeftModel, get_peft_model

from lora_ppo.config import Config
from lora_ppo.config.load import save_config
from lora_ppo.errors import Interrupted, UserError
from lora_ppo.io import checkpoint as ck
from lora_ppo.io.atomic import atomic_output_dir
from lora_ppo.io.data import (
    check_chat_template,
    encode_prompts,
    held_out_note,
    hold_out,
    render_prompt,
    template_messages,
)
from lora_ppo.io.metrics import MetricsLogger, check_logging, peak_memory_mib
from lora_ppo.io.run_dir import Start, clear, earlier_run
from lora_ppo.modeling.actor_critic import adapter_fits, check_adapter_dir, lora_config
from lora_ppo.modeling.loading import (
    load_base_model,
    load_tokenizer,
    quantization_mode,
    resolve_model_path,
)
from lora_ppo.modeling.lora_grad import fast_lora_training
from lora_ppo.runtime.dist import DistInfo, seed_everything, setup_distributed
from lora_ppo.runtime.ds_config import run_ds_config
from lora_ppo.runtime.engine import create_engine, gathered_trainable
from lora_ppo.runtime.interrupt import StopSignal

# -- data -------------------------------------------------------------------------------------

def encode_pair(tokenizer, prompt: Union[str, list], response: Union[str, list], *,
                chat_template: bool, append_eos: bool, max_prompt_length: int,
                max_length: int) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one example, cut to fit.

    The prompt is cut from the left to `max_prompt_length` (as PPO cuts it), then the response
    at the end to `max_length` in all. A prompt is a string or a conversation, a response a
    string or the messages that follow the prompt (TRL's conversational format). With a chat
    template (always for a conversation), the prompt is rendered as PPO renders it, ending where
    the assistant's reply begins, and the response is what the template renders after that (for
    the tiny model: " text</s>\\n"; a string response is one assistant message).
    """
    templated = chat_template or not isinstance(prompt, str) or not isinstance(response, str)
    head = render_prompt(tokenizer, prompt, templated)
    (p_ids,) = encode_prompts(tokenizer, [head], templated, max_prompt_length)
    if templated:
        before = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                  else template_messages(prompt))
        after = ([{"role": "assistant", "content": response}] if isinstance(response, str)
                 else template_messages(response))
        full = tokenizer.apply_chat_template(before + after, tokenize=False)
        if not full.startswith(head):
            plain = isinstance(prompt, str) and isinstance(response, str)
            fix = "set chat_template=false" if plain else "its prompt and response cannot be split"
            raise UserError("the chat template does not render the prompt as a prefix of the "
                            f"conversation; {fix}")
        response = full[len(head):]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if append_eos and tokenizer.eos_token_id not in r_ids:
        r_ids = r_ids + [tokenizer.eos_token_id]
    return p_ids, r_ids[:max_length - len(p_ids)]


def check_conversations(tokenizer, rows: list[dict], keys: tuple[str, ...], field: str) -> None:
    """One line if a row holds a conversation and the tokenizer has no chat template."""
    if any(not isinstance(r[k], str) for r in rows for k in keys):
        check_chat_template(tokenizer, True, field)


# -- setup ------------------------------------------------------------------------------------

@dataclass
class Stage:
    """One SFT or reward-model run; `section` is cfg.sft or cfg.reward_model."""

    cfg: Config
    name: str  # "sft" or "reward_model": the config section and the run directory
    dist: DistInfo
    tokenizer: Any
    model_path: str
    ds_config: dict
    run_dir: Path
    start: Optional[Start] = None  # the checkpoint to continue, the earlier files it replaces
    engine: Any = None
    step: int = 0
    total_steps: int = 0
    steps_per_epoch: int = 0

    @property
    def section(self):
        return getattr(self.cfg, self.name)


def setup_stage(cfg: Config, name: str, read_rows: Callable[[Any, str], list[dict]],
                resume: Optional[str], overwrite: bool, dataset=None, eval_dataset=None
                ) -> tuple[Stage, list[dict], list[dict]]:
    """Distributed init, seeds, tokenizer, the filled DeepSpeed config, and the stage's rows as
    `read_rows(spec, field)` reads them, split into training and held-out rows (no model yet);
    `dataset` / `eval_dataset` (a datasets.Dataset or a list of dicts) stand in for the
    section's data / eval.data. An earlier run of the stage in output_dir is refused unless
    `resume` or `overwrite` (io/run_dir.py); nothing is written here."""
    sec = getattr(cfg, name)
    run_dir = Path(cfg.output_dir) / name
    start = earlier_run(cfg.output_dir, name, resume, overwrite, run_dir)
    model_path = resolve_model_path(cfg.model.path)  # fail on a bad path before anything starts
    dist = setup_distributed()
    seed_everything(cfg.seed + dist.rank)
    tokenizer = load_tokenizer(cfg.model, model_path)
    check_logging(cfg.logging)
    ds_config = run_ds_config(cfg, dist.world_size, dist.device, name,
                              quantization_mode(cfg.quantization, dist.device.type) != "none")
    eval_spec = eval_dataset if eval_dataset is not None else sec.eval.data
    eval_rows = read_rows(eval_spec, f"{name}.eval.data") if eval_spec is not None else None
    train_spec = dataset if dataset is not None else sec.data
    separate = eval_rows is not None
    train_rows, eval_rows = hold_out(read_rows(train_spec, f"{name}.data"), eval_rows,
                                     sec.eval.size, cfg.seed, f"{name}.eval.size")
    note = held_out_note(len(train_rows), len(eval_rows), separate, f"{name}.data",
                         f"{name}.eval.size", f"{name}.eval.data")
    if note and dist.rank == 0:
        print(note, flush=True)
    st = Stage(cfg=cfg, name=name, dist=dist, tokenizer=tokenizer, model_path=model_path,
               ds_config=ds_config, run_dir=run_dir, start=start)
    return st, train_rows, eval_rows


def load_stage_model(st: Stage, init_adapter: Optional[str] = None, field: str = ""):
    """The base, loaded once as `train` loads it, with one trainable LoRA adapter ("default", so
    save_pretrained writes a plain PEFT dir): fresh from `cfg.lora`, or the weights and
    settings of `init_adapter`."""
    if init_adapter:
        check_adapter_dir(init_adapter, field)
    base = load_base_model(st.cfg, st.model_path, st.dist.device)
    if init_adapter:
        with adapter_fits(init_adapter, field, st.model_path):
            model = PeftModel.from_pretrained(base, init_adapter, is_trainable=True)
    else:
        model = get_peft_model(base, lora_config(st.cfg.lora))
    fast_lora_training(model, ["default"])
    return model


def start_training(st: Stage, module: torch.nn.Module, n_train: int) -> None:
    """Count the steps, wrap `module` in the DeepSpeed engine, restore a checkpoint if asked,
    and write the run's config.yaml."""
    train, optim = st.section.train, st.section.optim
    st.steps_per_epoch = n_train // (train.batch_size * st.dist.world_size)
    if st.steps_per_epoch == 0:
        raise UserError(f"{st.name}: {n_train} training rows are fewer than {st.name}.train."
                        f"batch_size={train.batch_size} x {st.dist.world_size} rank(s); lower the "
                        "batch size")
    st.total_steps = train.epochs * st.steps_per_epoch
    if train.max_steps is not None:
        st.total_steps = min(st.total_steps, train.max_steps)
    # max_steps may end the run inside the warmup: the warmup then ends with it.
    optim = dataclasses.replace(optim, warmup_steps=min(optim.warmup_steps, st.total_steps))
    st.engine = create_engine(module, ds_config=st.ds_config, optim=optim,
                              total_steps=st.total_steps)
    if st.start.checkpoint is not None:
        load_checkpoint(st, st.start.checkpoint)  # refuses one this config cannot continue
    if st.dist.rank == 0:  # every check has passed: from here on the stage writes
        clear(st.start.replaces)
        st.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(st.cfg, st.run_dir / "config.yaml")
        if st.start.note:
            print(st.start.note, flush=True)


# -- the loop ---------------------------------------------------------------------------------

def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled row order of one epoch; depends only on (seed, epoch), so a resumed run
    continues with the same batches."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def fit(st: Stage, n_train: int, train_step: Callable[[list[int]], dict],
        evaluate: Optional[Callable[[], dict]], write_output: Callable[[Path], None],
        bar_keys: tuple[tuple[str, str], ...]) -> None:
    """The shared loop.

    `train_step(row indices)` runs one optimizer step and returns its metrics, already reduced
    over ranks, with "tokens/all" (tokens of all ranks); `evaluate()` returns the held-out
    metrics; `write_output(dir)` writes the stage's adapter into an empty directory. At SIGINT
    or SIGTERM it stops after the current step with a checkpoint (runtime/interrupt.py).
    """
    sec, rank, world = st.section, st.dist.rank, st.dist.world_size
    bs = sec.train.batch_size
    logger = MetricsLogger(st.run_dir, st.cfg, st.total_steps, st.step, enabled=rank == 0,
                           desc=st.name, unit="step", bar_keys=bar_keys)
    logger.truncate_after(st.step)
    with StopSignal() as stop:  # Ctrl-C / SIGTERM: stop after the step, with a checkpoint
        while st.step < st.total_steps:
            epoch, k = divmod(st.step, st.steps_per_epoch)
            start = k * bs * world + rank * bs
            idx = epoch_order(n_train, st.cfg.seed, epoch)[start:start + bs]
            # step 1. forward/backward over the micro-batches, one optimizer step
            t0 = time.perf_counter()
            row = train_step(idx)
            st.step += 1
            dt = time.perf_counter() - t0
            row.update({"step": st.step, "epoch": st.step / st.steps_per_epoch,
                        "lr": st.engine.get_lr()[0], "time/step_s": dt,
                        "tokens_per_s": row.pop("tokens/all") / max(dt, 1e-9),
                        "memory/peak_mib": peak_memory_mib(st.dist.device)})
            # step 2. evaluate on the held-out rows
            last = st.step == st.total_steps
            if evaluate is not None and (last or (sec.eval.every
                                                  and st.step % sec.eval.every == 0)):
                row.update(evaluate())
            logger.log(row)
            # step 3. checkpoint; at a signal, one now and stop
            every, saved = st.cfg.checkpoint.every, None
            if last or (every and st.step % every == 0):
                saved = save_checkpoint(st, write_output)
            signum = None if last else stop.requested()  # collective: every rank alike
            if signum:
                path = saved or save_checkpoint(st, write_output)
                logger.close()
                raise Interrupted(signum, st.step, path, unit="step")
    logger.close()
    # step 4. the stage's output adapter, whole or not at all
    with gathered_trainable(st.engine):  # collective under ZeRO-3: every rank enters
        if rank == 0:
            with atomic_output_dir(output_path(st), force=True) as tmp:
                write_output(tmp)


def output_path(st: Stage) -> Path:
    return Path(st.cfg.output_dir) / ("adapter" if st.name == "sft" else "reward_adapter")


def write_peft_adapter(peft_model, out: Path) -> None:
    """adapter_config.json + adapter_model.safetensors of the "default" adapter into `out`."""
    peft_model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)  # peft's model-card template, not ours


# -- checkpoints (the layout and guarantees of lora_ppo.io.checkpoint) -----------------------------

def save_checkpoint(st: Stage, write_output: Callable[[Path], None]) -> Path:
    """`<run_dir>/checkpoints/step-N/`: the output adapter as it is now (`adapter/`), the
    DeepSpeed state without the frozen base, RNG per rank, state.json and config.yaml, sealed
    and renamed into place by the protocol PPO uses (checkpoint.write_checkpoint)."""
    def weights(tmp: Path) -> None:
        (tmp / "adapter").mkdir()
        write_output(tmp / "adapter")

    def state(tmp: Path) -> None:
        meta = {"format": ck.FORMAT, "stage": st.name, "step": st.step,
                **stage_facts(st), "base": ck.base_fingerprint(st.model_path)}
        (tmp / ck.STATE).write_text(json.dumps(meta, indent=1))
        save_config(st.cfg, tmp / ck.CONFIG)

    # LoRA dropout draws from torch's global generator: it is this stage's only RNG state.
    return ck.write_checkpoint(st.run_dir / "checkpoints", st.step, st.cfg.checkpoint.keep,
                               st.dist, st.engine, {"torch": torch.get_rng_state()}, weights,
                               state)


def stage_facts(st: Stage) -> dict:
    """The protocol's run facts of a stage, its base's quantization resolved."""
    return ck.run_facts(st.dist, st.engine,
                        quantization_mode(st.cfg.quantization, st.dist.device.type))


def load_checkpoint(st: Stage, path: Path) -> None:
    """Restore LoRA weights, head, optimizer, LR schedule, RNG and step from a stage checkpoint."""
    c = ck.open_checkpoint(path)
    if c.state.get("stage") != st.name:
        raise UserError(f"checkpoint {c.path} is from stage {c.state.get('stage', 'train')!r}, not "
                        f"{st.name!r}; resume it with its own command")
    ck.check_fit(c, st.cfg, st.model_path, stage_facts(st), st.name)
    ck.load_engine_state(c, st.engine)
    st.step = int(c.state["step"])
    torch.set_rng_state(torch.load(c.path / f"rank-{st.dist.rank}.pt")["torch"])
