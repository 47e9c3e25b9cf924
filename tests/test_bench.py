"""benchmarks/bench.py and the meters every benchmark shares (benchmarks/meters.py): the
per-phase measurements, and a real run on a tiny model."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import REPO, clean_env

BENCH = REPO / "benchmarks" / "bench.py"
METERS = REPO / "benchmarks" / "meters.py"
TINY = ["--vocab", "512", "--hidden", "64", "--intermediate", "128", "--layers", "2",
        "--heads", "4", "--kv-heads", "2", "--batch", "4", "--micro-batch", "2",
        "--prompt-len", "8", "--new-tokens", "4", "--updates", "1", "--warmup", "0",
        "--threads", "1", "--ds-config", "zero0"]
PHASE_FIELDS = {"seconds", "tokens", "tokens_per_s", "flops", "flops_per_s", "matmul_peak_share",
                "useful_flops_per_s", "useful_peak_share", "peak_mib", "predicted_mib",
                "prediction_error", "other_cpu_share", "contention"}


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(*args, env=None, timeout=300):
    full_env = {**clean_env(), **(env or {})}
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)


def test_other_cpu_share_formula():
    # 3 busy CPU-seconds on the machine, 1 of them ours, over 2 s on 2 CPUs: 2 / 4 = 50%
    meters = load(METERS)
    assert meters.other_cpu_share(3.0, 1.0, 2.0, 2) == 0.5
    assert meters.other_cpu_share(1.0, 1.5, 2.0, 2) == 0.0  # clock-tick rounding


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_phase_meter_sees_another_process_spinning():
    meters = load(METERS)
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\n"
                                "while time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)  # let it start
        with meters.PhaseMeter(0) as meter:
            time.sleep(1.5)  # we use ~no CPU; the spinner uses one CPU all along
    finally:
        spinner.wait()
    # one busy CPU out of ncpu; other helpers' load can only add to it
    assert meter.other_share >= 0.8 / meter.ncpu, vars(meter)
    assert meter.own_cpu_s < 0.3


def test_step_clock_laps_from_the_previous_lap():
    meters = load(METERS)
    clock = meters.StepClock()
    clock.start()
    time.sleep(0.2)
    first = clock.lap()
    time.sleep(0.1)
    second = clock.lap()  # from the first lap's end, not from start()
    assert 0.2 <= first["wall_s"] < 0.3 and 0.1 <= second["wall_s"] < 0.2, (first, second)
    assert first["cpu_s"] < 0.1 and 0 <= second["other_cpu_load"] <= 1


# Per-phase peaks in a fresh process with the bench's malloc setting: a 64 MiB block allocated
# and freed before a phase must not show in that phase, and two phases report their own peaks.
_PEAK_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    import torch
    spec = importlib.util.spec_from_file_location("meters", sys.argv[1])
    meters = importlib.util.module_from_spec(spec); spec.loader.exec_module(meters)
    base = meters.status_bytes("VmRSS")
    x = torch.ones(16 * 2**20)  # 64 MiB, touched
    del x
    with meters.PhaseMeter(base) as small:
        y = torch.ones(4 * 2**20)  # 16 MiB
        del y
    with meters.PhaseMeter(base) as large:
        z = torch.ones(32 * 2**20)  # 128 MiB
        del z
    print(json.dumps({"small": small.peak_bytes / 2**20, "large": large.peak_bytes / 2**20}))
""")


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_per_phase_peak_rss_resets_between_phases():
    env = {**clean_env(), "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(METERS)], env=env,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "clear_refs" in proc.stderr:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    assert proc.returncode == 0, proc.stderr
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 15 < peaks["small"] < 24, peaks  # 16 MiB, not the 64 MiB freed before the phase
    assert 127 < peaks["large"] < 136, peaks


@pytest.mark.integration
def test_bench_one_update_on_a_tiny_model_writes_every_phase_and_field(tmp_path):
    out = tmp_path / "bench.json"
    res = run_bench(*TINY, "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["command"].startswith("python") and "--hidden 64" in report["command"]
    assert report["machine"]["malloc_mmap_threshold"] == "65536"  # re-executed with it
    (run,) = report["runs"]
    assert run["malloc_mmap_threshold"] == "65536"
    assert set(run["phases"]) == {"generation", "scoring", "update"}
    for name, phase in run["phases"].items():
        assert PHASE_FIELDS <= set(phase), (name, set(phase))
        assert phase["seconds"] > 0 and phase["tokens"] > 0 and phase["flops"] > 0, phase
        assert 0 < phase["matmul_peak_share"] and phase["peak_mib"] > 0, phase
        # the real tokens' FLOPs never exceed what the padded shapes cost
        assert 0 < phase["useful_flops_per_s"] <= phase["flops_per_s"] * (1 + 1e-9), phase
    # batch 4 x 4 new tokens at most; scoring covers prompt (8) + response tokens
    assert run["phases"]["generation"]["tokens"] <= 16
    assert run["shapes"]["prompt_len"] == 8
    assert run["phases"]["update"]["executed_flops"] > run["phases"]["update"]["flops"]
    assert "| update |" in res.stdout  # the markdown table


@pytest.mark.integration
def test_bad_sweep_key_exits_2():
    res = run_bench("--sweep", "colour=red", "--malloc-default", timeout=120)
    assert res.returncode == 2 and "--sweep" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_sweep_runs_each_point_in_its_own_process(tmp_path):
    out = tmp_path / "sweep.json"
    res = run_bench(*TINY, "--sweep", "seq=8,16", "--malloc-default", "--cache-dir",
                    str(tmp_path / "c"), "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["shapes"]["prompt_len"] for r in runs] == [4, 8]
    # timing mode reaches the children: glibc's own thresholds there too
    assert [r["malloc_mmap_threshold"] for r in runs] == [None, None]
    # twice the sequence: more scoring FLOPs
    assert runs[1]["phases"]["scoring"]["flops"] > runs[0]["phases"]["scoring"]["flops"]


@pytest.mark.slow
def test_bench_under_the_deepspeed_launcher(tmp_path):
    out = tmp_path / "ds.json"
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = clean_env()
    with socket.socket() as sock:  # a free port: other test runs may share the machine
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    res = subprocess.run([launcher, "--num_gpus", "2", "--master_port", port, str(BENCH),
                          *TINY, "--ds-config", "zero2", "--cache-dir", str(tmp_path / "c"),
                          "--out", str(out)], capture_output=True, text=True, timeout=600,
                         env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["world_size"] == 2
    assert run["phases"]["generation"]["tokens"] > 0
