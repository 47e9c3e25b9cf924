"""What fits a GPU: the largest micro and generation batch sizes whose predicted peak
(memory.py) stays under a budget, the estimate as a table, and the JSON report of
`lora-ppo estimate`."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

from lora_ppo.config import Config
from lora_ppo.sizing.arch import Arch, lora_param_count, param_counts
from lora_ppo.sizing.memory import MIB, MemoryEstimate, estimate_memory, shapes_from_config


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


class Suggestion(NamedTuple):
    micro_batch_size: Optional[int]       # None: not even 1 fits
    generation_batch_size: Optional[int]
    estimate: MemoryEstimate              # at the suggested sizes (or at 1 when nothing fits)
    budget: int                           # bytes the peak must stay under


def suggest_batch_sizes(cfg: Config, arch: Arch, gpu_mib: float, device: str = "gpu",
                        headroom: float = 0.1, own_logits: bool = False) -> Suggestion:
    """The largest micro_batch_size (a divisor of ppo.minibatch_size) and generation_batch_size
    (a divisor of rollout.prompts_per_update) whose phases fit in (1 - headroom) * gpu_mib.

    headroom covers what the estimate leaves out: the CUDA context lives outside the allocator,
    and fragmentation makes reserved memory exceed allocated (typically 5-10%).
    """
    budget = int(gpu_mib * MIB * (1 - headroom))
    base = shapes_from_config(cfg)

    def est(mb: int, gb: int) -> MemoryEstimate:
        return estimate_memory(cfg, arch, device, dataclasses.replace(
            base, micro_batch=mb, generation_batch=gb), own_logits)

    micro = next((m for m in _divisors_desc(cfg.ppo.minibatch_size)
                  if est(m, 1).phases["update"] <= budget), None)
    gen = next((g for g in _divisors_desc(cfg.rollout.prompts_per_update)
                if max(est(1, g).phases["generation"], est(1, g).phases["scoring"]) <= budget),
               None)
    return Suggestion(micro, gen, est(micro or 1, gen or 1), budget)


def format_table(est: MemoryEstimate, sug: Optional[Suggestion] = None,
                 title: str = "") -> str:
    """A readable table of components, phases and the suggestion."""
    lines = [title] if title else []
    lines.append(f"{'component':<22}{'MiB':>12}")
    lines += [f"{k:<22}{v / MIB:>12.1f}" for k, v in est.components.items()]
    lines.append(f"{'phase peak':<22}{'MiB':>12}")
    lines += [f"{k:<22}{v / MIB:>12.1f}" for k, v in est.phases.items()]
    lines.append(f"{'peak':<22}{est.peak / MIB:>12.1f}")
    if sug is not None:
        if sug.micro_batch_size is None or sug.generation_batch_size is None:
            lines.append(f"does not fit in {sug.budget / MIB:.0f} MiB even at batch size 1: "
                         "turn on gradient checkpointing, quantize, or shorten sequences")
        else:
            lines.append(f"fits {sug.budget / MIB:.0f} MiB with ppo.micro_batch_size="
                         f"{sug.micro_batch_size} rollout.generation_batch_size="
                         f"{sug.generation_batch_size} (peak {sug.estimate.peak / MIB:.1f} MiB)")
    return "\n".join(lines)


def report(cfg: Config, arch: Arch, device: str, gpu_mib: float, own_logits: bool = False) -> dict:
    """Everything `lora-ppo estimate --json` prints, in MiB."""
    est = estimate_memory(cfg, arch, device, own_logits=own_logits)
    sug = suggest_batch_sizes(cfg, arch, gpu_mib, device, own_logits=own_logits)
    return {"device": device, "arch": arch.__dict__,
            "params": param_counts(arch).total,
            "lora_params_per_adapter": lora_param_count(arch, cfg.lora.r, cfg.lora.target_modules),
            "components_mib": {k: v / MIB for k, v in est.components.items()},
            "phases_mib": {k: v / MIB for k, v in est.phases.items()}, "peak_mib": est.peak / MIB,
            "budget_mib": sug.budget / MIB, "fits": est.peak <= sug.budget,
            "suggested": {"ppo.micro_batch_size": sug.micro_batch_size,
                          "rollout.generation_batch_size": sug.generation_batch_size,
                          "peak_mib": sug.estimate.peak / MIB}}
