"""benchmarks/ other than bench.py (test_bench.py): the comparison with TRL (bench_vs_trl.py,
lora_ppo_side.py, peers/), what its two sides share (workload.py), curves.py, dapo_vs_grpo.py and
the GPU check's refusal. The peers run in venvs of their own (benchmarks/peers/setup.sh); CI has
only the project's, so the test that runs them skips without them."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, clean_env

BENCHMARKS = REPO / "benchmarks"
PEERS_ROOT = Path(os.environ.get("LORA_PPO_PEERS", "/tmp/lora_ppo_peers"))
PEER_VENVS = ("trl011", "trl116")


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- nothing from outside the repository -----------------------------------------------------

# What benchmark files may import: the standard library, the project and its dependencies, the
# peers' (trl), and the benchmark modules beside them.
THIRD_PARTY = {"torch", "transformers", "peft", "trl", "datasets", "deepspeed", "filelock",
               "bitsandbytes", "safetensors", "accelerate", "tokenizers", "lora_ppo"}


def test_benchmark_files_import_nothing_from_outside_the_repository():
    files = sorted(BENCHMARKS.rglob("*.py")) + sorted(BENCHMARKS.rglob("*.sh"))
    local = {p.stem for p in BENCHMARKS.rglob("*.py")}
    assert {"bench_vs_trl", "meters", "workload"} <= local and len(files) > 10
    for path in files:
        text = path.read_text()
        for needle in ("shared/peer", "../shared", '"shared" / "peer"', "parents[2]"):
            assert needle not in text, f"{path.relative_to(REPO)} reaches outside: {needle!r}"
        if path.suffix != ".py":
            continue
        for node in ast.walk(ast.parse(text)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in THIRD_PARTY or top in local, (
                    f"{path.relative_to(REPO)} imports {name}")


@pytest.mark.integration
def test_the_files_the_peers_import_need_only_the_standard_library():
    # -S: no site-packages, as in a venv without lora_ppo (the peers import these by path)
    res = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                          "import meters, workload; print(sorted(set(sys.modules) & {'torch', "
                          "'transformers', 'lora_ppo'}))", str(BENCHMARKS)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr


# --- what both sides share: benchmarks/workload.py -------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_side_reads_its_own_peak_not_its_parents(tmp_path):
    # Linux starts a child's getrusage ru_maxrss at the parent's resident size; the sides'
    # peak (meters.maxrss_mib) must be the child's own: a parent holding 256 MiB starts a
    # child that holds almost nothing.
    child = tmp_path / "child.py"
    child.write_text(f"import sys, resource\nsys.path.insert(0, {str(BENCHMARKS)!r})\n"
                     "import meters\nprint(meters.maxrss_mib(), "
                     "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n")
    parent = tmp_path / "parent.py"
    parent.write_text(f"import subprocess, sys\nbig = bytearray(256 * 2**20)\n"
                      "big[::4096] = b'x' * len(big[::4096])\n"
                      f"print(subprocess.run([sys.executable, {str(child)!r}], "
                      "capture_output=True, text=True, check=True).stdout)\n")
    out = subprocess.run([sys.executable, str(parent)], capture_output=True, text=True,
                         check=True)
    own, inherited = map(float, out.stdout.split())
    assert inherited > 256, inherited  # what the sides used to read
    assert own < 128, own


def test_even_reward_by_hand():
    wl = load("workload")
    # [2, 3, 4, 5]: half even -> 0; [2]: all even -> 1; [1, 3, 5]: none -> -1; []: -1
    assert wl.even_reward([[2, 3, 4, 5], [2], [1, 3, 5], []]) == [0.0, 1.0, -1.0, -1.0]
    assert wl.even(["p"], ["c"], completion_ids=[[6, 7, 8, 10]]) == [0.5]


def test_random_prompt_ids_are_in_range_seeded_and_of_their_lengths():
    wl = load("workload")
    w = {**wl.WORKLOADS["variable"], "steps": 3}
    ids = wl.random_prompt_ids(w, 403, 8192, seed=0)
    assert len(ids) == 3 * w["batch"] and ids == wl.random_prompt_ids(w, 403, 8192, seed=0)
    assert all(8 <= len(p) <= 64 and all(403 <= t < 8192 for t in p) for p in ids)
    assert len({len(p) for p in ids}) > 5  # lengths vary
    fixed = wl.random_prompt_ids(wl.WORKLOADS["fixed"], 3, 8192, seed=1)
    assert {len(p) for p in fixed} == {16} and fixed != wl.random_prompt_ids(
        wl.WORKLOADS["fixed"], 3, 8192, seed=2)


def test_grpo_prompts_encode_to_exactly_prompt_len_ids(tiny_model_dir):
    from transformers import AutoTokenizer

    wl = load("workload")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)  # adds <s>, as Llama's tokenizers do
    w = {**wl.WORKLOADS["grpo-variable"], "stop_ids": 20, "prompt_len": 12, "steps": 2}
    texts = wl.make_prompts(tok, w, seed=0)
    assert len(texts) == 2 * w["prompts"] and texts == wl.make_prompts(tok, w, seed=0)
    lo = wl.min_prompt_id(tok, w)
    for text in texts:
        ids = tok(text)["input_ids"]
        assert len(ids) == 12 and ids[0] == tok.bos_token_id
        assert all(t >= lo for t in ids[1:]), (lo, ids)
    assert wl.digest(texts) == wl.digest(list(texts)) != wl.digest(texts[::-1])


def test_summary_by_hand():
    wl = load("workload")
    step = {"cpu_s": 1.0, "other_cpu_load": 0.0, "samples": 4, "prompt_tokens": 40,
            "rollout_s": 1.0, "update_s": 1.0, "gen_s": 0.5}
    steps = [{**step, "wall_s": 9.0, "gen_tokens": 8, "mean_reward": 0.5},  # the warm-up step
             {**step, "wall_s": 2.0, "gen_tokens": 20, "mean_reward": 0.0},
             {**step, "wall_s": 3.0, "gen_tokens": 30, "mean_reward": 1.0, "other_cpu_load": 0.25}]
    s = wl.summarize(steps, after_load_mib=100.0, peak_mib=160.0)
    assert s["gen_tokens_per_s"] == 50 / 5  # steps 1-2: 50 tokens in 5 s
    assert s["all_tokens_per_s"] == 130 / 5 and s["gen_tokens_per_cpu_s"] == 25.0
    assert s["median_step_s"] == 2.5 and s["median_gen_s"] == 0.5 and s["median_rest_s"] == 2.0
    assert s["mean_resp_len"] == (2 + 5 + 7.5) / 3 and s["rss_above_load_mib"] == 60.0
    assert s["max_other_cpu_load"] == 0.25 and s["rewards_finite"]
    assert wl.summarize(steps[:1], 100.0, 160.0)["warmup_steps"] == 0  # one step: it counts


def test_every_tiny_workload_keeps_its_micro_batch_a_divisor():
    wl = load("workload")
    for name, w in wl.WORKLOADS.items():
        t = wl.tiny(w)
        if w.get("tools"):  # the task's prompts, the budget of its rounds
            assert t == {**w, "model": "tiny-tools", "prompts": 2}, name
        else:
            assert t["model"] in wl.MODELS and t["prompt_len"] <= 32 and t["gen_len"] <= 24, name
        if w["algo"] == "grpo":
            assert (t["prompts"] * t["n"]) % t["micro"] == 0, name
        assert wl.resolve(name, steps=2, make_tiny=True) == {**t, "steps": 2}
        assert wl.resolve(json.dumps(t)) == t


# --- the tool workload: benchmarks/tools_task.py ---------------------------------------------

def test_tool_task_by_hand():
    tt = load("tools_task")
    # 12 * 34 + 56: 408, then 408 + 56 = 464 (2 calls); 12 * 34 + 56 * 78: 408, 4368, 4776
    assert tt.steps((12, 34, 56)) == [("12 * 34", 408), ("408 + 56", 464)]
    assert tt.steps((12, 34, 56, 78)) == [("12 * 34", 408), ("56 * 78", 4368), ("408 + 4368", 4776)]
    assert tt.value((12, 34, 56, 78)) == 4776 and tt.expression((12, 34, 56)) == "12 * 34 + 56"
    env = tt.Calculator()
    assert env.reset(answer=464, prompt="x") is None and env.answer == 464
    assert env.calculate("408 + 56") == "464" and env.calculate("(2 - 5) * 3") == "-9"
    with pytest.raises(ValueError):
        env.calculate("__import__('os')")
    rows = tt.prompt_rows(20, seed=0)
    assert rows == tt.prompt_rows(20, seed=0) and {len(r["prompt"]) for r in rows} == {1}
    for conv in tt.transcripts(20, seed=1):  # solved: 2 or 3 rounds, the right final answer
        answer = int(conv[-1]["content"].split()[-1].rstrip("."))
        assert tt.tool_rounds(conv[1:]) in (2, 3) and tt.correct([conv[1:]], [answer]) == [1.0]
        for m in conv:
            if m["role"] == "assistant" and m.get("tool_calls"):
                expr = m["tool_calls"][0]["function"]["arguments"]["expression"]
                assert str(tt.evaluate(expr)) == conv[conv.index(m) + 1]["content"]


def test_tool_rounds_and_reward_count_answered_calls_only():
    tt = load("tools_task")
    call = {"type": "function", "function": {"name": "calculate", "arguments": {"expression": "1"}}}
    turn = {"role": "assistant", "content": "", "tool_calls": [call]}
    result = {"role": "tool", "name": "calculate", "content": "1"}
    # two answered calls, then a call left unanswered (the turn limit), then no final answer
    assert tt.tool_rounds([turn, result, turn, result, turn]) == 2
    assert tt.tool_rounds([{"role": "assistant", "content": "The answer is 7."}]) == 0
    assert tt.tool_rounds("plain text") == 0
    done = [turn, result, {"role": "assistant", "content": "The answer is 7."}]
    assert tt.correct([done, done, [turn], "7 or 8"], [7, 8, 7, 8]) == [1.0, 0.0, 0.0, 1.0]
    # failures: an error result (both tools write str({'error': ...})), a call left as text
    error = {"role": "tool", "name": "calculate", "content": str({"error": "Tool mul not found."})}
    unparsed = {"role": "assistant", "content": '<tool_call>\n{"name": </tool_call>'}
    assert tt.tool_failures(done) == 0 and tt.tool_failures([turn, error, unparsed]) == 2


def test_tool_summary_by_hand():
    wl = load("workload")
    # 3 samples: rounds 2, 3, 0; 30 of 100 completion tokens the model's -> 70% the tools'
    steps = [{"tool_rounds": [2, 3], "tool_failures": [0, 1], "gen_tokens": 20,
              "completion_tokens": 80},
             {"tool_rounds": [0], "tool_failures": [2], "gen_tokens": 10, "completion_tokens": 20}]
    s = wl.tool_summary(steps)
    assert s["tool_failures"] == 3
    assert s["mean_tool_rounds"] == 5 / 3 and s["frac_2_to_3_rounds"] == 2 / 3
    assert s["tool_rounds_hist"] == {"0": 1, "2": 1, "3": 1} and s["env_token_frac"] == 0.7


@pytest.fixture(scope="session")
def tiny_tools_model(tmp_path_factory):
    """benchmarks/tools_model.py's tiny-tools size (2 layers, trained ~50 s on the transcripts):
    it calls the calculator, if not always well."""
    tm = load("tools_model")
    return tm.build("tiny-tools", tmp_path_factory.mktemp("tools") / "tiny-tools")


@pytest.mark.integration
def test_lora_ppo_side_runs_the_tool_workload(tiny_tools_model, tmp_path):
    """lora_ppo's side of grpo-tools: the task's environment and reward through
    rollout.environment, the model's own tokens counted apart from the tools'."""
    out = tmp_path / "side.json"
    res = subprocess.run([sys.executable, str(BENCHMARKS / "lora_ppo_side.py"), "--workload",
                          "grpo-tools", "--tiny", "--steps", "2", "--model-dir",
                          str(tiny_tools_model), "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO, timeout=600, env=clean_env())
    assert res.returncode == 0, res.stderr[-2000:]
    side = json.loads(out.read_text())
    steps, summary = side["steps"], side["summary"]
    assert summary["samples_per_step"] == [16, 16] and side["prompts"]["count"] == 4
    assert all(len(s["tool_rounds"]) == 16 for s in steps)
    assert all(s["completion_tokens"] > s["gen_tokens"] > 0 for s in steps)  # tools answered
    assert sum(summary["tool_rounds_hist"].values()) == 32 and summary["mean_tool_rounds"] > 0
    assert "rollout.environment=" + str(BENCHMARKS / "tools_task.py") + ":Calculator" in \
        side["overrides"]


# --- the driver and its sides ----------------------------------------------------------------

@pytest.mark.integration
def test_bench_vs_trl_without_a_peer_venv_names_the_setup_and_exits_2(tmp_path):
    res = subprocess.run([sys.executable, str(BENCHMARKS / "bench_vs_trl.py"), "--workload",
                          "grpo-fixed", "--tiny", "--out", str(tmp_path / "x.json")],
                         capture_output=True, text=True, timeout=60,
                         env={**clean_env(), "LORA_PPO_PEERS": str(tmp_path / "none")})
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "bash benchmarks/peers/setup.sh trl116" in lines[0]


@pytest.mark.integration
def test_peer_setup_usage_error_exits_2():
    res = subprocess.run(["bash", str(BENCHMARKS / "peers" / "setup.sh"), "trl999"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("usage: bash benchmarks/peers/setup.sh")


@pytest.mark.integration
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_lora_ppo_side_runs(algo, tiny_model_dir, tmp_path):
    """The lora_ppo side the driver (and benchmarks/gpu_check.py) runs in its own process: it
    calls lora_ppo's setup and ppo_step, so a move of a name there must break this test, not
    the benchmark."""
    if algo == "ppo":
        w = {"algo": "ppo", "model": "tiny", "batch": 4, "mini": 2, "prompt_len": 8,
             "prompt_min": 4, "gen_len": 6, "stop_ids": 20, "grad_ckpt": False, "steps": 2}
    else:
        w = {"algo": "grpo", "model": "tiny", "prompts": 2, "n": 2, "micro": 2, "prompt_len": 8,
             "gen_len": 6, "stop_ids": 20, "grad_ckpt": False, "steps": 2}
    out = tmp_path / "side.json"
    res = subprocess.run([sys.executable, str(BENCHMARKS / "lora_ppo_side.py"), "--workload",
                          json.dumps(w), "--model-dir", str(tiny_model_dir), "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO, timeout=300, env=clean_env())
    assert res.returncode == 0, res.stderr[-2000:]
    side = json.loads(out.read_text())
    steps, summary = side["steps"], side["summary"]
    assert len(steps) == 2 and all(s["gen_tokens"] > 0 for s in steps)
    assert summary["samples_per_step"] == [4, 4] and summary["rss_above_load_mib"] > 0
    # prompts per run: PPO 4 a step, GRPO 2 (each answered twice), over 2 steps
    assert summary["stop_token_counted"] and side["prompts"]["count"] == (8 if algo == "ppo" else 4)


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["variable", "grpo-variable", "grpo-tools"])
def test_bench_vs_trl_against_the_peers_at_a_tiny_size(workload, tmp_path):
    """Both sides of a comparison, TRL in its peer venv: the same prompts and samples per step,
    figures from both, TRL's sampling unwarped (GRPO)."""
    missing = [v for v in PEER_VENVS if not (PEERS_ROOT / v / "bin" / "python").is_file()]
    if missing:
        pytest.skip(f"no peer venvs {missing} in {PEERS_ROOT}: bash benchmarks/peers/setup.sh")
    out = tmp_path / "cmp.json"
    res = subprocess.run([sys.executable, str(BENCHMARKS / "bench_vs_trl.py"), "--workload",
                          workload, "--tiny", "--repeats", "1", "--steps", "2", "--cache",
                          str(tmp_path / "cache"), "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO, timeout=600, env=clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith(f"{workload} gen_len ") and "WARNING" not in res.stdout
    (p,) = json.loads(out.read_text())["points"]
    assert p["same_prompts"] and p["same_samples_per_step"]
    (trl,), (lp,) = p["runs"]["trl"], p["runs"]["lora_ppo"]
    assert trl["tokens_per_s"] > 0 and lp["tokens_per_s"] > 0 and p["speed_ratio"]["min"] > 0
    assert trl["versions"]["trl"] == ("0.11.4" if workload == "variable" else "1.16.0")
    if workload.startswith("grpo"):
        assert trl["sampling_unwarped"] is True
    if workload == "grpo-tools":  # both sides ran tool rounds, and say how many
        assert trl["mean_tool_rounds"] > 0 and lp["mean_tool_rounds"] > 0
        assert "tool rounds/sample TRL " in res.stdout


# --- curves.py, dapo_vs_grpo.py, the GPU check -----------------------------------------------

@pytest.mark.integration
def test_gpu_check_refuses_cleanly_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check would run")
    res = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "gpu.json")],
                         capture_output=True, text=True, cwd=REPO, timeout=60, env=clean_env())
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("gpu_check: "), res
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.integration
def test_curves_bins_runs_by_generated_tokens(tmp_path):
    # Run a: 2 updates of 4 responses of length 10 (40 tokens each); run b: 1 update of 8
    # responses of length 10 (80 tokens). An eval row (no raw score) is skipped.
    def write(name, rows):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    a = write("a", [{"objective/raw_scores": 1.0, "objective/kl": 0.1, "response/length": 10.0,
                     "episode": 4},
                    {"eval/score": 9.0},
                    {"objective/raw_scores": 3.0, "objective/kl": 0.3, "response/length": 10.0,
                     "episode": 8}])
    b = write("b", [{"objective/raw_scores": 5.0, "objective/kl": 0.5, "response/length": 10.0,
                     "episode": 8}])
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "curves.py"), f"a={a}", f"b={b}",
                          "--bins", "2"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "| generated tokens | a score | a KL | b score | b KL |"
    assert lines[2] == "| 0-40 | 1.000 | 0.100 | - | - |"
    assert lines[3] == "| 40-80 | 3.000 | 0.300 | 5.000 | 0.500 |"


@pytest.mark.integration
def test_curves_counts_what_dynamic_sampling_dropped(tmp_path):
    # With dynamic sampling an update generated more than its rollout holds: 4 kept responses of
    # length 10, but 100 response tokens over its rounds (sampling/response_tokens), and its
    # score is that of every response sampled (sampling/raw_scores 1.0, not the rollout's 9.0);
    # a null (no dynamic sampling) falls back to length x responses and the rollout's score.
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"objective/raw_scores": 9.0, "objective/kl": 0.1, "response/length": 10.0, "episode": 12,
         "sampling/response_tokens": 100.0, "sampling/raw_scores": 1.0},
        {"objective/raw_scores": 2.0, "objective/kl": 0.2, "response/length": 10.0, "episode": 16,
         "sampling/response_tokens": None, "sampling/raw_scores": None}]))
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "curves.py"), f"d={path}",
                          "--bins", "2"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    # tokens so far: 100, then 100 + 10 x 4 = 140; bins of 70
    assert res.stdout.splitlines()[2:] == ["| 0-70 | - | - |", "| 70-140 | 1.500 | 0.150 |"]


@pytest.mark.integration
def test_dapo_vs_grpo_usage_error_is_one_line_and_exit_2(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dapo_vs_grpo.py"), "--out",
                          str(tmp_path), "--updates", "0"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and res.stderr.strip() == (
        "dapo_vs_grpo.py: --updates 0: must be >= 1"), res.stderr


@pytest.mark.integration
def test_curves_bad_input_is_one_line_and_exit_2(tmp_path):
    empty = tmp_path / "eval_only.jsonl"
    empty.write_text(json.dumps({"eval/score": 1.0}) + "\n")
    for arg in ("no-label", f"a={tmp_path / 'missing.jsonl'}", f"a={empty}"):
        res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "curves.py"), arg],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "Traceback" not in res.stderr
