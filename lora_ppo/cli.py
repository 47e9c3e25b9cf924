"""`lora-ppo` / `python -m lora_ppo`: train, sft, train-reward, demo, export, merge, estimate,
config-docs.

Bad input exits with code 2 and one line on stderr; no traceback.

Each command imports what it runs inside its own function, deliberately: `lora-ppo --help` and a
usage error answer without loading torch, and `main` sets what DeepSpeed and MKL read when they
load (DS_ACCELERATOR, MKL_NUM_THREADS) before anything imports them.
Under the `deepspeed` launcher each rank gets `--local_rank=N`: it is accepted and ignored (the
rank is read from the environment, which the launcher also sets).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from lora_ppo.errors import Interrupted, UserError

PRESETS = Path(__file__).resolve().parent / "builtin" / "presets"


def _quiet() -> None:
    """Keep the console for our progress bar: library chatter goes to WARNING and above."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    # transformers 5 deprecates gradient_checkpointing_* names that peft still calls.
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*checkpointing.*")
    # DeepSpeed 0.19 still calls torch.distributed collectives that torch 2.13 renamed.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # bitsandbytes 0.50 warns on every CPU start that its optional hub kernel cannot be loaded,
    # and `kernels` 0.19 (which bitsandbytes asks for it) that it skips the publisher trust check
    # offline; datasets logs its own lines before the error that lora_ppo turns into one line.
    for name in ("bitsandbytes", "kernels", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# The three training commands: the command of lora_ppo/api.py, help, and where the result
# lands ({out}: output_dir).
TRAINING = {
    "train": ("train", "PPO fine-tuning of a LoRA policy",
              "metrics in {out}/metrics.jsonl, checkpoints in {out}/checkpoints"),
    "sft": ("sft", "supervised fine-tuning of a LoRA adapter (config section sft)",
            "adapter in {out}/adapter (use it as model.init_adapter), metrics in "
            "{out}/sft/metrics.jsonl"),
    "train-reward": ("reward_model",
                     "train a reward adapter + score head on preference pairs (section "
                     "reward_model)",
                     "reward adapter in {out}/reward_adapter (use it as reward.adapter), metrics "
                     "in {out}/reward_model/metrics.jsonl"),
}


def cmd_training(args) -> int:
    from lora_ppo.api import run_command  # the code the Python entry points run

    command, _, done = TRAINING[args.command]
    cfg, _ = run_command(command, args.config, args.overrides, args.resume, args.overwrite)
    if os.environ.get("RANK", "0") == "0":  # one line under a launcher, not one per rank
        print("done: " + done.format(out=Path(cfg.output_dir)))
    return 0


def resume_command(args) -> str:
    """The command that continues an interrupted run: the saved config is the run's, so only
    what locates it (--config, an output_dir override) is repeated."""
    import shlex

    words = ["lora-ppo", args.command] + (["--config", args.config] if args.config else [])
    words += [o for o in args.overrides if o.startswith("output_dir=")] + ["--resume", "latest"]
    return shlex.join(words)


def cmd_demo(args) -> int:
    from lora_ppo.builtin.demo import run_demo
    from lora_ppo.builtin.tools_demo import run_tools_demo
    from lora_ppo.config.load import load_config

    cfg = load_config(PRESETS / f"{args.preset}.yaml", args.overrides)
    if args.preset == "tools":
        run_tools_demo(cfg, overwrite=args.overwrite)
    else:
        run_demo(cfg, preset=args.preset, overwrite=args.overwrite)
    return 0


def cmd_export(args) -> int:
    from lora_ppo.io.export import export

    export(args.checkpoint, args.out, force=args.force)
    return 0


def cmd_merge(args) -> int:
    from lora_ppo.io.export import merge

    merge(args.checkpoint, args.out, dtype=args.dtype, force=args.force, into=args.into,
          device=args.device, max_shard_size=args.max_shard_size, verify=args.verify)
    return 0


def cmd_config_docs(args) -> int:
    from lora_ppo.config.reference import config_reference

    text = config_reference()
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


# -- estimate: predicted peak memory from config.json only (lora_ppo/sizing/) --------------------
def cmd_estimate(args) -> int:
    import json

    from lora_ppo.api import config_path
    from lora_ppo.builtin.specs import builtin_arch
    from lora_ppo.config.load import load_config
    from lora_ppo.modeling.loading import quantization_mode
    from lora_ppo.sizing import suggest
    from lora_ppo.sizing.arch import param_counts, read_arch
    from lora_ppo.sizing.memory import estimate_memory

    cfg = load_config(config_path(args.config) if args.config else None, args.overrides)
    arch = builtin_arch(cfg.model.path) or read_arch(cfg.model.path)
    if args.gpu_mib <= 0:
        raise UserError(f"--gpu-mib {args.gpu_mib} must be > 0 (the card's memory in MiB)")
    if args.json:
        print(json.dumps(suggest.report(cfg, arch, args.device, args.gpu_mib, args.own_logits),
                         indent=1))
        return 0
    sug = suggest.suggest_batch_sizes(cfg, arch, args.gpu_mib, args.device,
                                      own_logits=args.own_logits)
    title = (f"{cfg.model.path}: {param_counts(arch).total / 1e6:.1f}M params, "
             f"quantization {quantization_mode(cfg.quantization, args.device)}, {args.device} "
             f"({'bf16' if args.device == 'gpu' else 'fp32'})")
    print(suggest.format_table(estimate_memory(cfg, arch, args.device, own_logits=args.own_logits),
                               sug, title))
    return 0


def _estimate_parser(sub) -> None:
    e = sub.add_parser("estimate", help="predict peak memory from the config and the model's "
                                        "config.json, and suggest batch sizes that fit a card")
    e.add_argument("--config", help="YAML config file or preset name")
    e.add_argument("overrides", nargs="*", metavar="section.key=value")
    e.add_argument("--gpu-mib", type=float, default=24576, help="memory of the card (MiB)")
    e.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                   help="gpu: CUDA allocator peak in bf16; cpu: peak RSS over the pre-load "
                        "baseline in fp32 (what benchmarks/bench.py measures on a CPU)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.add_argument("--own-logits", action="store_true",
                   help="count the model's own forward's logits, which setup takes (one line "
                        "says so) for a family whose logit post-processing lora_ppo does not know")
    e.set_defaults(fn=cmd_estimate)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2) like every other bad input."""

    def error(self, message: str):
        print(f"lora-ppo: error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def _merge_args(sp) -> None:
    """merge's own flags (lora_ppo/io/export.py::merge)."""
    sp.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                    help="dtype of the written weights (default auto: the dtype the base is "
                         "stored in); the merge itself is computed in fp32 per tensor")
    sp.add_argument("--into", choices=["original", "dequantized"], default="original",
                    help="original: the base's own unquantized weights (default); dequantized: "
                         "the 4-bit/8-bit weights the policy was trained on, dequantized, so the "
                         "merged model behaves like the trained one")
    sp.add_argument("--device", default="cpu",
                    help="where each tensor's merge is computed (default cpu; e.g. cuda)")
    sp.add_argument("--max-shard-size", default=None, metavar="SIZE",
                    help="cut output shards at SIZE (e.g. 2GB); default: the base's own shards. "
                         "Peak memory is about one output shard plus one tensor")
    sp.add_argument("--verify", choices=["auto", "probe", "tensors"], default="auto",
                    help="tensors: compare the first and last merged tensor of each kind with "
                         "peft's merge (always done, bounded memory); probe: also compare logits "
                         "on probe texts, which loads whole models (auto: only for bases up to "
                         "512 MiB)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lora-ppo", description="Memory-efficient RLHF: PPO with LoRA on one "
                "(quantized) base model, driven by DeepSpeed.")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def train_args(sp):
        sp.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config fields, e.g. ppo.epochs=2 model.path=/models/x")
        sp.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="resume from the latest complete checkpoint in output_dir, or PATH")
        sp.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run of this command in output_dir (without it, "
                             "a used output_dir is refused)")
        sp.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)

    for name, (_, helptext, _) in TRAINING.items():
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--config", help="YAML config file or preset name (e.g. demo)")
        train_args(sp)
        sp.set_defaults(fn=cmd_training)
    d = sub.add_parser("demo", help="the built-in end-to-end run on a small local model: reward "
                       "adapter -> PPO (4-bit, ZeRO-2) -> merged export; --preset grpo: GRPO "
                       "with a verifiable reward (arithmetic), no reward model, no critic; "
                       "--preset tools: SFT -> GRPO and PPO with a calculator tool")
    d.add_argument("--preset", choices=["demo", "grpo", "trl_grpo", "tools"], default="demo",
                   help="demo: RLHF on reviews with a learned reward; grpo: critic-free GRPO on "
                        "additions checked by a function; trl_grpo: the same task with TRL "
                        "1.16 GRPOTrainer's defaults; tools: an agent with a calculator, SFT on "
                        "transcripts, then GRPO and PPO with a critic")
    d.add_argument("overrides", nargs="*", metavar="section.key=value")
    d.add_argument("--overwrite", action="store_true",
                   help="replace what is in output_dir even if an earlier demo did not write it")
    d.set_defaults(fn=cmd_demo)
    for name, fn, helptext in (("export", cmd_export, "export a checkpoint as a PEFT adapter"),
                               ("merge", cmd_merge, "merge the adapter into the base weights")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("checkpoint", help="a checkpoint directory (output_dir/checkpoints/"
                        "step-N), or a run's output_dir for its latest complete checkpoint")
        sp.add_argument("--out", required=True, help="output directory")
        sp.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
        if name == "merge":
            _merge_args(sp)
        sp.set_defaults(fn=fn)
    c = sub.add_parser("config-docs", help="print the configuration reference (Markdown)")
    c.add_argument("--out", help="write to this file instead of stdout")
    c.set_defaults(fn=cmd_config_docs)
    _estimate_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives positionals only before the first option: `train --config c.yaml
    # --resume latest ppo.epochs=2` leaves the override over; overrides may stand anywhere.
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides += extra
    resume = getattr(args, "resume", None)
    if resume and "=" in resume and not Path(resume).exists():
        # `--resume ppo.epochs=2`: argparse took the override for --resume's optional PATH.
        args.overrides.insert(0, resume)
        args.resume = "latest"
    if args.command == "demo":
        # The demo's figures are the README's, reproducible bit for bit: MKL's multithreaded
        # matmuls sum in a run-dependent order on a CPU (3 runs of the GRPO preset parted at
        # updates 2 to 6 with 2 threads, and never with 1). Set before torch loads MKL; at the
        # demo's sizes one thread costs no time (docs/troubleshooting.md, "Reproducibility").
        os.environ.setdefault("MKL_NUM_THREADS", "1")
    _quiet()
    try:
        code = args.fn(args)
    except UserError as e:
        print(f"lora-ppo: error: {e}", file=sys.stderr)
        code = 2
    except Interrupted as e:  # Ctrl-C or SIGTERM: stopped after an update, with a checkpoint
        if os.environ.get("RANK", "0") == "0":
            under = " under the same launcher" if int(os.environ.get("WORLD_SIZE", "1")) > 1 \
                else ""
            print(f"lora-ppo: stopped by {e.signame} after {e.unit} {e.step}, checkpoint "
                  f"{e.checkpoint}; continue with `{resume_command(args)}`{under}",
                  file=sys.stderr)
        code = e.code  # 130 (SIGINT), 143 (SIGTERM)
    except KeyboardInterrupt:
        print("lora-ppo: interrupted", file=sys.stderr)
        code = 130
    if "torch.distributed" in sys.modules:  # only commands that loaded torch can hold a group
        from lora_ppo.runtime.dist import shutdown_distributed

        code = shutdown_distributed(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
