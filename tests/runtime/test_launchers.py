"""Launchers (runtime/dist.py::check_launch): what `accelerate launch` 1.16 really does on a CPU
machine, run for real; the environments that would run another number of processes than
asked are refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, clean_env, free_port, resume_yaml

from lora_ppo.errors import UserError
from lora_ppo.runtime.dist import check_launch

# what accelerate's simple launcher sets when --num_processes 2 asked for more than it starts
SIMPLE_2 = {"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "no",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_launches_that_would_run_another_number_of_processes_are_refused():
    with pytest.raises(UserError, match=r"^accelerate launch started 1 process, not the "
                                        r"--num_processes asked for .*`torchrun --nproc_per_node"):
        check_launch(SIMPLE_2)
    with pytest.raises(UserError, match="OMPI_COMM_WORLD_SIZE=4: started by MPI"):
        check_launch({"OMPI_COMM_WORLD_SIZE": "4"})
    with pytest.raises(UserError, match=r"accelerate's DeepSpeed settings are not read \("
                                        r"ACCELERATE_DEEPSPEED_ZERO_STAGE=3\)"):
        check_launch({"RANK": "0", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    check_launch({**SIMPLE_2, "RANK": "0"})  # torchrun's variables: fine
    check_launch({"ACCELERATE_USE_CPU": "True"})  # accelerate with one process: fine
    check_launch({})


def _accelerate(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "accelerate")
    return subprocess.run([exe, "launch", *args], capture_output=True, text=True, cwd=REPO,
                          env=clean_env(), timeout=timeout)


@pytest.mark.slow
def test_accelerate_launch_runs_the_ranks_asked_for_or_is_refused(tiny_model_dir,
                                                                  low_ids_reward, tmp_path):
    """On this CPU machine `accelerate launch --num_processes 2` runs one process (its simple
    launcher): refused in one line naming the launchers that work. With --multi_gpu it starts
    two ranks the torchrun way, which train as `deepspeed --num_gpus 2` does."""
    cfg = resume_yaml(tmp_path / "cfg.yaml", tiny_model_dir, low_ids_reward)
    args = ["-m", "lora_ppo", "train", "--config", str(cfg), "ppo.total_updates=1",
            "rollout.prompts_per_update=4"]
    res = _accelerate("--num_processes", "2", *args, f"output_dir={tmp_path / 'one'}")
    assert res.returncode != 0
    ours = [ln for ln in res.stderr.splitlines() if ln.startswith("lora-ppo: error: ")]
    assert ours == ["lora-ppo: error: accelerate launch started 1 process, not the "
                    "--num_processes asked for (it starts several only with --multi_gpu, or on "
                    "a machine with several GPUs); use `torchrun --nproc_per_node N -m lora_ppo "
                    "...`, `deepspeed --num_gpus N --module lora_ppo ...` or `accelerate launch "
                    "--multi_gpu --num_processes N -m lora_ppo ...`"], res.stderr[-3000:]
    assert "exit status 2" in res.stderr and not (tmp_path / "one").exists()

    out = tmp_path / "two"
    res = _accelerate("--multi_gpu", "--num_processes", "2", "--main_process_port",
                      str(free_port()), *args, f"output_dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.loads((out / "checkpoints" / "step-1" / "state.json").read_text())
    assert state["world_size"] == 2
    assert {p.name for p in (out / "checkpoints" / "step-1").glob("rank-*.pt")} == {
        "rank-0.pt", "rank-1.pt"}
    assert res.stdout.count("done: ") == 1  # one line, from rank 0
