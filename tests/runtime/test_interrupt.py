"""Ctrl-C and SIGTERM (runtime/interrupt.py): the first finishes the update and saves a
checkpoint, the line names the exact `--resume latest` command, and that command ends where an
uninterrupted run ends; real signals to real processes."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, assert_same_run, clean_env, free_port, resume_yaml, run_cli

from lora_ppo.runtime.interrupt import REPEAT_S, StopSignal


def test_the_first_signal_asks_a_later_ctrl_c_stops_at_once(capfd):
    before = signal.getsignal(signal.SIGINT)
    with StopSignal() as stop:
        assert stop.requested() is None
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next line
        assert stop.requested() == signal.SIGINT
        # what launchers send after forwarding a Ctrl-C: the same request, not a second one
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested() == signal.SIGINT
        time.sleep(REPEAT_S + 0.1)
        with pytest.raises(KeyboardInterrupt):  # a person pressing Ctrl-C again
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before
    assert capfd.readouterr().err == ("lora-ppo: SIGINT: stopping after this update, with a "
                                      "checkpoint (Ctrl-C again to stop at once)\n")
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() == signal.SIGTERM


def _stop_when(cmd: list[str], marker, signum: int, env: dict | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `cmd`, send `signum` once `marker()` is true, and wait for it to end."""
    proc = subprocess.Popen(cmd, env=env or clean_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not marker() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def _named_command(stderr: str) -> list[str]:
    """The `lora-ppo ... --resume latest` command of the stop line, as `python -m lora_ppo`."""
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("lora-ppo: stopped by")]
    words = shlex.split(line.split("`")[1])
    assert words[0] == "lora-ppo" and words[-2:] == ["--resume", "latest"], line
    return words[1:]


RUN = ("rollout.prompts_per_update=4", "ppo.total_updates=5")


@pytest.mark.slow
def test_sigint_mid_run_then_the_named_command_ends_as_the_uninterrupted_run(
        tiny_model_dir, low_ids_reward, tmp_path):
    """SIGINT once update 1 is logged: the update in progress finishes, a checkpoint is saved,
    exit 130, and the one line names `lora-ppo train --config ... --resume latest`; that
    command (without the run's overrides: the saved config is the run's) ends with the weights
    and metrics of a run that was never stopped, bit for bit (CPU, fp32, ZeRO-2)."""
    cfg = resume_yaml(tmp_path / "cfg.yaml", tiny_model_dir, low_ids_reward)
    full = run_cli("train", "--config", str(cfg), *RUN, f"output_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "stopped"
    res = _stop_when([sys.executable, "-m", "lora_ppo", "train", "--config", str(cfg), *RUN,
                      f"output_dir={out}"], lambda: _lines(out / "metrics.jsonl") >= 1,
                     signal.SIGINT)
    assert res.returncode == 130, res.stderr[-3000:]
    named = _named_command(res.stderr)
    assert named == ["train", "--config", str(cfg), f"output_dir={out}", "--resume", "latest"]
    (step,) = [int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir()]
    assert 1 <= step < 5 and _lines(out / "metrics.jsonl") == step
    assert f"stopped by SIGINT after update {step}, checkpoint {out}/checkpoints/step-{step};" \
        in res.stderr
    resumed = run_cli(*named)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/step-{step} at update {step}" in resumed.stdout
    assert_same_run(tmp_path / "full", out, 5)


@pytest.mark.slow
def test_sigterm_stops_a_stage_after_its_step_with_exit_143(tiny_model_dir, tmp_path):
    """The SFT stage's loop under SIGTERM: a checkpoint after the step in progress, exit 143,
    and the named command finishes with the adapter of a run that was never stopped."""
    from safetensors.torch import load_file

    args = [f"model.path={tiny_model_dir}", "quantization.mode=none", "sft.data=builtin:reviews",
            "model.max_prompt_length=16", "lora.r=4", "lora.alpha=8", "checkpoint.every=0",
            "logging.progress=false", "logging.tensorboard=false", "sft.train.max_steps=30",
            "sft.train.batch_size=4", "sft.train.micro_batch_size=4", "sft.eval.size=0",
            "sft.train.max_length=48"]
    a, b = tmp_path / "a", tmp_path / "b"
    res = run_cli("sft", *args, f"output_dir={a}")
    assert res.returncode == 0, res.stderr[-2000:]
    res = _stop_when([sys.executable, "-m", "lora_ppo", "sft", *args, f"output_dir={b}"],
                     lambda: _lines(b / "sft" / "metrics.jsonl") >= 1, signal.SIGTERM)
    assert res.returncode == 143, res.stderr[-3000:]
    assert "lora-ppo: stopped by SIGTERM after step " in res.stderr
    assert not (b / "adapter").exists()  # the stage's output comes at its end only
    named = _named_command(res.stderr)
    assert named == ["sft", f"output_dir={b}", "--resume", "latest"]
    res = run_cli(*named)
    assert res.returncode == 0, res.stderr[-3000:]
    wa, wb = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (a, b))
    import torch

    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_update(
        tiny_model_dir, low_ids_reward, tmp_path):
    """Under the deepspeed launcher, SIGINT to rank 0 alone: the per-update all-reduce stops
    rank 1 after the same update, both write their part of one checkpoint, the launcher exits
    with 130 and one stop line (rank 0's); `--resume latest` on two ranks finishes the run."""
    import psutil

    cfg = resume_yaml(tmp_path / "cfg.yaml", tiny_model_dir, low_ids_reward)
    out = tmp_path / "run"
    launcher = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
                "--master_port", str(free_port()), "--module", "lora_ppo", "train", "--config",
                str(cfg), *RUN, "ppo.total_updates=6", f"output_dir={out}"]
    proc = subprocess.Popen(launcher, env=clean_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _lines(out / "metrics.jsonl") < 1 and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "lora_ppo" in p.cmdline() and p.environ().get("RANK") in ("0", "1")]
    (rank0,) = [p for p in ranks if p.environ()["RANK"] == "0"]
    rank0.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert err.count("lora-ppo: stopped by SIGINT") == 1, err[-3000:]
    (ck,) = (out / "checkpoints").iterdir()
    step = int(ck.name.split("-")[1])
    assert 1 <= step < 6 and (ck / "rank-0.pt").is_file() and (ck / "rank-1.pt").is_file()
    assert _lines(out / "metrics.jsonl") == step
    res = subprocess.run(launcher[:4] + [str(free_port())] + launcher[5:] + ["--resume"],
                         env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _lines(out / "metrics.jsonl") == 6
