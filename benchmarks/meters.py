"""The meters every benchmark reads: resident memory, its peak, CPU time and other processes' share
of the CPUs, per phase or per step.

Standard library only: the peer harnesses (benchmarks/peers/) run in venvs without lora_ppo and
import this file by path, so both sides of a comparison measure with the same code. Linux: every
figure comes from /proc or getrusage.

Memory. `peak_rss_mib` is the kernel's VmHWM, the process's peak resident set, which
`reset_peak` sets back to the current RSS (write 5 to /proc/self/clear_refs, Linux >= 4.0), so
one process can read a peak per phase (benchmarks/bench.py). `maxrss_mib` is the same figure
over the process's whole life (its sides never reset it), what bench_vs_trl compares above the
RSS after the model load; getrusage's ru_maxrss is not used, since it starts at the parent's.

CPU. A machine shared with other jobs slows a benchmark in ways its own timer cannot see, so each
phase or step also records the share of all CPUs' time that other processes used meanwhile:
(machine busy CPU-seconds from /proc/stat - this process's own, children included) / (wall x CPUs).
With one thread on 2 CPUs, a value near 0.5 means another process held the other core throughout.
"""

from __future__ import annotations

import os
import re
import time
from typing import NamedTuple

MIB = 2**20


# --- memory ---------------------------------------------------------------------------------

def status_bytes(key: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) * 1024


def rss_mib() -> float:
    """The resident set now."""
    return status_bytes("VmRSS") / MIB


def peak_rss_mib() -> float:
    """The resident set's peak since the process started or since the last `reset_peak`."""
    return status_bytes("VmHWM") / MIB


def reset_peak() -> None:
    """Set VmHWM to the current RSS, so that the next `peak_rss_mib` is the peak from now on."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def maxrss_mib() -> float:
    """The resident set's peak over the process's own life: VmHWM, which a new program starts
    afresh (unless `reset_peak` set it back). Not getrusage's ru_maxrss: Linux starts a forked
    child's at the parent's resident size and keeps it over exec, so each side that
    bench_vs_trl starts read its driver's RSS (449 MiB in a driver that had just built a model)
    as its own peak until it grew past it, and its "after load" baseline with it."""
    return peak_rss_mib()


# --- CPU -------------------------------------------------------------------------------------

class CpuSample(NamedTuple):
    """A point in time: wall clock, busy CPU-seconds of the whole machine, this process's own."""

    wall_s: float
    busy_s: float
    own_s: float
    ncpu: int


def machine_busy_s() -> tuple[float, int]:
    """(busy CPU-seconds of the whole machine since boot, number of CPUs) from /proc/stat:
    user + nice + system + irq + softirq + steal (guest time is already inside user)."""
    with open("/proc/stat") as f:
        lines = f.read().splitlines()
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, lines[0].split()[1:9])
    ncpu = sum(1 for line in lines if re.match(r"cpu\d", line))
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), ncpu


def own_cpu_s() -> float:
    """CPU-seconds of this process, every thread, and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cpu_sample() -> CpuSample:
    busy, ncpu = machine_busy_s()
    return CpuSample(time.perf_counter(), busy, own_cpu_s(), ncpu)


def other_cpu_share(busy_s: float, own_s: float, seconds: float, ncpu: int) -> float:
    """Share of the machine's CPU capacity other processes used: busy CPU-seconds of the machine
    minus ours, over wall x CPUs. /proc/stat counts in clock ticks (10 ms), so over a short span
    the share can come out below 0 or above 1: it is clipped to [0, 1]."""
    return min(1.0, max(0.0, busy_s - own_s) / (max(seconds, 1e-9) * ncpu))


def between(c0: CpuSample, c1: CpuSample) -> dict:
    """wall_s, cpu_s (ours) and other_cpu_load (other processes' share) from c0 to c1."""
    wall, own = c1.wall_s - c0.wall_s, c1.own_s - c0.own_s
    return {"wall_s": wall, "cpu_s": own,
            "other_cpu_load": other_cpu_share(c1.busy_s - c0.busy_s, own, wall, c1.ncpu)}


class StepClock:
    """Times consecutive steps end to end: each `lap()` covers the time since the previous lap
    (the first since `start()`), so the work between steps (a trainer's bookkeeping, the next
    batch) counts, as it does in a run."""

    def __init__(self) -> None:
        self._last: CpuSample | None = None

    def start(self) -> None:
        self._last = cpu_sample()

    def lap(self) -> dict:
        now = cpu_sample()
        out = between(self._last or now, now)
        self._last = now
        return out


class PhaseMeter:
    """Wall time, peak memory above `baseline` bytes, and other processes' CPU share during a
    `with` block. On a CPU the peak is VmHWM after `reset_peak` at the block's start; on a CUDA
    device (pass `cuda=torch.device`) torch.cuda.max_memory_allocated after resetting it."""

    def __init__(self, baseline: int, cuda=None):
        self.baseline, self.cuda = baseline, cuda

    def __enter__(self) -> PhaseMeter:
        if self.cuda is not None:
            import torch

            torch.cuda.synchronize(self.cuda)
            torch.cuda.reset_peak_memory_stats(self.cuda)
        else:
            reset_peak()
        self.c0 = cpu_sample()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda is not None:
            import torch

            torch.cuda.synchronize(self.cuda)
            peak = torch.cuda.max_memory_allocated(self.cuda)
        else:
            peak = status_bytes("VmHWM")
        c1 = cpu_sample()
        self.seconds = c1.wall_s - self.c0.wall_s
        self.own_cpu_s = c1.own_s - self.c0.own_s
        self.busy_s = c1.busy_s - self.c0.busy_s
        self.ncpu = c1.ncpu
        self.peak_bytes = peak - self.baseline
        self.other_share = other_cpu_share(self.busy_s, self.own_cpu_s, self.seconds, self.ncpu)
