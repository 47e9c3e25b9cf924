"""The model of the `grpo-tools` workload: a small Llama with a Qwen 2.5-style chat tokenizer and
template (lora_ppo.builtin.chat), trained on benchmarks/tools_task.py's transcripts until it calls
the calculator in the template's format, 2 or 3 times per problem, then saved as a plain
transformers directory that both sides of benchmarks/bench_vs_trl.py load.

    python benchmarks/tools_model.py --size tools-sft --out /tmp/tools-sft   # ~5 min on 2 cores

"SFT" here is a full-parameter fine-tune of the random-init model on the rendered transcripts
(loss on every token after the system turn), not `lora-ppo sft`: a LoRA on a random trunk would
take far longer to learn the format on CPU, and the benchmark needs only a model that makes
well-formed calls, the same for both sides. The last line printed is the share of sampled turns
(temperature 1, as in the rollouts) whose text parses as a call or a final answer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import tools_task  # noqa: E402

# build_tiny_model arguments and the fine-tune of each size; "tiny-tools" checks the harness.
SIZES = {
    "tools-sft": {"model": {"vocab_size": 768, "hidden_size": 256, "intermediate_size": 688,
                            "num_layers": 4, "num_heads": 4, "num_kv_heads": 4},
                  "train": {"steps": 200, "batch": 8, "lr": 3e-3}},
    "tiny-tools": {"model": {"vocab_size": 768, "hidden_size": 64, "intermediate_size": 128,
                             "num_layers": 2, "num_heads": 4, "num_kv_heads": 4},
                   "train": {"steps": 150, "batch": 16, "lr": 3e-3}},
}
TRANSCRIPT_SEED = 7  # the prompts of a run are drawn with other seeds (workload.py)

# transformers' response template for Qwen-style output, TRL 1.16's own for Qwen 2.5 / 3
# (`trl/chat_template_utils.py::qwen3_template`), saved with the tokenizer: TRL sets it only
# for templates it knows by their exact text, and this one's system prompt is shortened. Both
# sides then parse calls with `tokenizer.parse_response`.
RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "reasoning_content": {"open": "<think>", "close_pattern": r"</think>\s*",
                              "content": "text"},
        "tool_calls": {"open": "<tool_call>", "close_pattern": r"</tool_call>\s*",
                       "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}


def tool_schemas() -> list[dict]:
    from transformers.utils import get_json_schema

    return [get_json_schema(tools_task.Calculator.calculate)]


def build_tokenizer(vocab_size: int):
    """lora_ppo.builtin.chat's Qwen 2.5-style tokenizer (digits one per token), trained on the
    rendered transcripts."""
    from lora_ppo.builtin import chat

    texts = chat.render(tools_task.transcripts(2000, seed=TRANSCRIPT_SEED + 1), tool_schemas())
    tok = chat.build_chat_tokenizer(texts, vocab_size=vocab_size)
    tok.response_template = RESPONSE_TEMPLATE
    return tok


def batches(tok, n_steps: int, batch: int, seed: int):
    """(ids, labels) per step: rendered transcripts, right-padded, labels -100 on the system turn
    and the padding."""
    import torch

    schemas, start = tool_schemas(), tok.convert_tokens_to_ids("<|im_start|>")
    convs = tools_task.transcripts(n_steps * batch, seed=seed)
    for k in range(n_steps):
        rows = [tok.apply_chat_template(c, tools=schemas, tokenize=True, return_dict=False)
                for c in convs[k * batch:(k + 1) * batch]]
        width = max(len(r) for r in rows)
        ids = torch.full((batch, width), tok.pad_token_id)
        labels = torch.full((batch, width), -100)
        for i, r in enumerate(rows):
            user = r.index(start, 1)  # the system turn ends where the second turn starts
            ids[i, :len(r)] = torch.tensor(r)
            labels[i, user:len(r)] = torch.tensor(r[user:])
        yield ids, labels


def train(model, tok, steps: int, batch: int, lr: float, seed: int = TRANSCRIPT_SEED) -> float:
    """Full-parameter fine-tune, AdamW, linear warm-up then cosine decay; the last loss."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps))))
    model.train()
    t0, loss = time.perf_counter(), float("nan")
    for k, (ids, labels) in enumerate(batches(tok, steps, batch, seed)):
        out = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        if k % 50 == 0 or k == steps - 1:
            print(f"step {k}: loss {loss:.3f} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr,
                  flush=True)
    model.eval()
    return loss


def build(size: str, out: Path) -> Path:
    """Build, fine-tune and save `size` into `out` (atomically); `out` if it is there already."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    from lora_ppo.builtin.tiny import build_tiny_model

    spec = SIZES[size]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tok = build_tokenizer(spec["model"]["vocab_size"])
    build_tiny_model(tmp, **spec["model"], max_position_embeddings=1024, tokenizer=tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    loss = train(model, tok, **spec["train"])
    model.save_pretrained(tmp)
    (tmp / "sft.json").write_text(json.dumps({"size": size, **spec, "final_loss": loss}))
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(SIZES), default="tools-sft")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    print(build(a.size, Path(a.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
