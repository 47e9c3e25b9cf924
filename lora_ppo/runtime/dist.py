"""Where this process sits: launch detection, the process group, collectives, and its exit.

One switch, not a second code path (cf. nanoGPT's `ddp = int(os.environ.get('RANK', -1)) != -1`):
a plain `python -m lora_ppo ...` is a world of size 1 that goes through exactly the same
`deepspeed.initialize` as a multi-rank `deepspeed`/`torchrun` launch. Every helper here is the
identity with one rank.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import socket
import sys
from typing import NamedTuple

import numpy as np
import torch

from lora_ppo.errors import UserError

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (torch's generator also draws the rollouts' samples)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class DistInfo(NamedTuple):
    """Where this process sits in the (possibly size-1) world."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _use_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


def shutdown_distributed(code: int = 0) -> int:
    """End this process's part in a multi-rank run; returns `code` when there is no such run.

    Under a launcher with several ranks, a CPU rank that had finished its work (outputs written
    and closed) sometimes aborted at interpreter exit ("terminate called without an active
    exception", exit -6: a C++ thread of torch's distributed runtime destroyed while joinable),
    and the launcher then reported the whole run as failed. Destroying the process group first
    was not enough (1 failure in ~15 runs of tests/runtime/test_engine.py's launcher test), so a rank of
    a multi-rank run leaves with os._exit after flushing its streams, skipping the static
    destructors. A single process is left alone, its group too: in-process callers (tests, a
    notebook) go on using it, and DeepSpeed keeps a reference to it.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return code
    if torch.distributed.get_world_size() == 1:
        return code
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


LAUNCHERS = ("`torchrun --nproc_per_node N -m lora_ppo ...`, `deepspeed --num_gpus N --module "
             "lora_ppo ...` or `accelerate launch --multi_gpu --num_processes N -m lora_ppo ...`")


def check_launch(env=os.environ) -> None:
    """Refuse a launch that would silently run another number of processes than asked, or
    settings lora_ppo does not read (what accelerate 1.16 does, tested on CPU):

    `accelerate launch --num_processes N` starts N processes the torchrun way (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_*: read below) only with --multi_gpu, --use_deepspeed or on a machine with
    several GPUs; otherwise its simple launcher runs ONE process, with ACCELERATE_USE_CPU and,
    when more were asked, MASTER_ADDR but no RANK. MPI launchers set their own variables
    (OMPI_COMM_WORLD_SIZE, PMI_SIZE) and no RANK: each process would train alone. Its DeepSpeed
    flags (ACCELERATE_DEEPSPEED_*) would be ignored: deepspeed.config decides."""
    if "RANK" not in env:
        if "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env:
            raise UserError("accelerate launch started 1 process, not the --num_processes asked "
                            "for (it starts several only with --multi_gpu, or on a machine with "
                            f"several GPUs); use {LAUNCHERS}")
        for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
            if env.get(var, "1").isdigit() and int(env.get(var, "1")) > 1:
                raise UserError(f"{var}={env[var]}: started by MPI, but lora-ppo takes its rank "
                                f"from RANK/WORLD_SIZE as torchrun and deepspeed set them; use "
                                f"{LAUNCHERS}")
    ds_flags = sorted(k for k in env if k.startswith("ACCELERATE_DEEPSPEED_"))
    if ds_flags:
        raise UserError(f"accelerate's DeepSpeed settings are not read ({ds_flags[0]}="
                        f"{env[ds_flags[0]]}): lora-ppo's is deepspeed.config (zero0..zero3, "
                        "zero2_offload or a JSON file); set it there and launch without them")


def shm_buffer(rank: int, env=os.environ) -> str:
    """The shared-memory segment DeepSpeed's CPU all-reduce creates for `rank` of this run."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
            f"{env.get('MASTER_PORT', '')}_{rank}")


def _release_shm_buffer(rank: int) -> None:
    """Unlink this rank's segment of DeepSpeed's CPU shared-memory all-reduce.

    Under the `deepspeed` launcher (which sets LOCAL_SIZE) DeepSpeed 0.19's CPU communication op
    creates /dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank} for each rank (66 MB)
    and never unlinks it (ops/csrc/cpu/comm/shm.cpp: its shared_close is never called), so every
    such run left its ranks' segments in RAM until the machine restarted: this project's test
    suite had left 308 of them, 20 GB, and starved the machine. Once every rank has mapped every
    rank's segment (shm_initialize maps them all before init_distributed returns; a barrier
    waits for all ranks), each unlinks its own: the mappings stay valid while the processes
    live, and the memory goes with them however they end."""
    local = os.environ.get("LOCAL_SIZE", "")
    # DeepSpeed's own condition (shm_interface.cpp): every rank on this machine; the same on
    # every rank, so all of them reach the barrier or none
    if not (local.isdigit() and int(local) == torch.distributed.get_world_size()):
        return
    torch.distributed.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shm_buffer(rank))


def setup_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed; idempotent; call before importing deepspeed.

    Under the `deepspeed` launcher or `torchrun`, RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* come from
    the environment (the `--local_rank=N` argument the deepspeed launcher also passes is ignored
    by the CLI; LOCAL_RANK carries the same number); `accelerate launch --multi_gpu` sets them
    as torchrun does (check_launch refuses its other launches). A plain process gets a world of
    size 1.
    """
    if not torch.cuda.is_available() and "DS_ACCELERATOR" not in os.environ:
        # DeepSpeed picks its accelerator once, at import; without this it probes for CUDA/XPU/...
        # and warns. Set only when unset, so a user's choice wins.
        os.environ["DS_ACCELERATOR"] = "cpu"
        logger.info("no CUDA device: running DeepSpeed on CPU (DS_ACCELERATOR=cpu), backend gloo")
    check_launch()
    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                          RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    missing = [k for k in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if k not in os.environ]
    if missing:
        raise UserError(f"RANK is set but {', '.join(missing)} is not; launch with `deepspeed` "
                        "or `torchrun`, or unset RANK for a single process")

    import deepspeed

    use_cuda = _use_cuda()
    local_rank = int(os.environ["LOCAL_RANK"])
    if not torch.distributed.is_initialized():
        # DeepSpeed prints "... deepspeed_shm_comm_op built successfully" to stdout when its CPU
        # communication op loads (deepspeed/comm/torch.py::build_shm_op): not our console's line.
        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo",
                                       verbose=False)
        if not use_cuda:
            _release_shm_buffer(torch.distributed.get_rank())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(torch.distributed.get_rank(), local_rank, torch.distributed.get_world_size(),
                    device)


def world_size() -> int:
    """Ranks in the process group (1 without one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: list[float]) -> list[float]:
    """Sum of each value over ranks, in float64 (the values themselves with one rank)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def all_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks, reduced in float64 and returned in t's dtype on t's device
    (t itself with one rank): the `all_sum` that rl/masked.py takes to whiten over all ranks."""
    if world_size() == 1:
        return t
    total = t.detach().to(_collective_device(), torch.float64)
    torch.distributed.all_reduce(total)
    return total.to(t.device, t.dtype)


def all_mean(values: list[float]) -> list[float]:
    """Mean of each value over ranks (the values themselves with one rank)."""
    return [v / world_size() for v in all_sum(values)]


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks of a (B, ...) tensor of the same shape on every rank."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (the object itself with one rank): a decision every rank
    must take alike, e.g. the layout the setup's seam check chose."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a list of `obj` alone with one rank): what differs
    between ranks and must be known to all, e.g. the names of the metrics each rank's reward
    function logged."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
