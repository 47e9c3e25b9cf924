"""export and merge: plain peft and plain transformers read what they write."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import clean_env, run_cli, tiny_config
from safetensors.torch import load_file, save_file

from lora_ppo.errors import UserError
from lora_ppo.io.export import export, merge
from lora_ppo.ppo import checkpoint as ppo_checkpoint

# Loads a merged model with peft made unimportable, and dumps its logits and greedy generation.
PLAIN_LOAD = """
import sys
sys.modules["peft"] = None  # `import peft` now raises ImportError
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(input_ids=ids).logits
    gen = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False,
                         pad_token_id=model.config.eos_token_id)
torch.save({"logits": logits, "gen": gen}, sys.argv[3])
"""


def _trained_checkpoint(model_dir: Path, out: Path, *overrides: str) -> dict:
    """A real Run (DeepSpeed engine, ZeRO-0) whose trainable weights are moved off their init
    (LoRA B starts at 0, which would make every adapter a no-op), saved as step 3; plus the
    toolkit's own log-probs and values on fixed sequences, computed from the live model."""
    from lora_ppo.ppo.loop import setup

    run = setup(tiny_config(model_dir, out, *overrides))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in run.ac.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    query = torch.randint(3, 400, (2, 5), generator=gen)
    response = torch.randint(3, 400, (2, 4), generator=gen)
    run.ac.eval()
    with torch.no_grad():
        logprobs, _, values = run.ac(query, torch.ones_like(query), response, torch.ones(2, 4),
                                     temperature=1.0, chunk_size=64)
    run.step, run.episode = 3, 24
    return {"path": ppo_checkpoint.save(run), "run": run, "ids": torch.cat([query, response], 1),
            "logprobs": logprobs, "values": values}


@pytest.fixture(scope="module")
def shared(tiny_model_dir, tmp_path_factory):
    base = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("base") / "model")
    return _trained_checkpoint(base, tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="module")
def quantized(tiny_model_dir, tmp_path_factory):
    """Trained on a 4-bit base, with a critic adapter (value.mode=adapter)."""
    return _trained_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("q4"),
                               "quantization.mode=4bit", "value.mode=adapter")


def _plain_peft(model_dir: Path, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def _response_logprobs(model, ids: torch.Tensor, query_len: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, query_len - 1:-1]
    return logits.log_softmax(-1).gather(-1, ids[:, query_len:, None]).squeeze(-1)


@pytest.mark.integration
def test_export_is_a_plain_peft_adapter(shared, tmp_path):
    out = export(shared["path"], tmp_path / "exported")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    model_dir = Path(shared["run"].model_path)
    peft_model = _plain_peft(model_dir, out)  # a fresh base, plain peft
    torch.testing.assert_close(_response_logprobs(peft_model, shared["ids"], 5),
                               shared["logprobs"], rtol=0, atol=1e-5)
    head = load_file(out / "value" / "value_head.safetensors")
    live = shared["run"].ac.value_head.linear
    assert torch.equal(head["weight"], live.weight) and torch.equal(head["bias"], live.bias)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["episode"] == 24
    assert manifest["base_model"]["path"] == str(model_dir)
    assert manifest["base_model"]["weights"] == manifest["trained_on"]["weights"]
    assert manifest["config"]["lora"]["r"] == 4
    from transformers import AutoTokenizer

    tok, base_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(model_dir)
    assert tok("a fine blender").input_ids == base_tok("a fine blender").input_ids
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # no temp dir left beside it


@pytest.mark.integration
def test_export_of_a_run_dir_takes_its_latest_complete_checkpoint(shared, tmp_path):
    run_dir = shared["path"].parent.parent
    incomplete = run_dir / "checkpoints" / "step-9"  # newer, but never sealed
    incomplete.mkdir()
    try:
        out = export(run_dir, tmp_path / "exported")
    finally:
        incomplete.rmdir()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["step"] == 3

    empty_run = tmp_path / "empty_run"
    (empty_run / "checkpoints" / "step-1").mkdir(parents=True)  # never sealed
    with pytest.raises(UserError, match="run directory without a complete checkpoint"):
        export(empty_run, tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


@pytest.mark.integration
def test_export_critic_adapter_and_head(quantized, tmp_path):
    from peft import get_peft_model_state_dict

    out = export(quantized["path"], tmp_path / "exported")
    critic = _plain_peft(Path(quantized["run"].model_path), out / "value")
    want = get_peft_model_state_dict(quantized["run"].ac.peft_model, adapter_name="critic")
    got = get_peft_model_state_dict(critic)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k].float()), k
    assert (out / "value" / "value_head.safetensors").is_file()


@pytest.mark.integration
def test_merged_model_loads_without_peft(shared, tmp_path):
    out = tmp_path / "merged"
    report = merge(shared["path"], out, dtype="fp32", max_shard_size="200KB")
    assert report.max_logit_diff <= 1e-4 and report.quantized_logit_diff is None
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded, with its index
    assert (out / "model.safetensors.index.json").is_file()
    assert not (out / "adapter_config.json").exists()
    torch.save(shared["ids"], tmp_path / "ids.pt")
    res = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out), str(tmp_path / "ids.pt"),
                          str(tmp_path / "plain.pt")], capture_output=True, text=True,
                         env=clean_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    plain = torch.load(tmp_path / "plain.pt")
    peft_model = _plain_peft(Path(shared["run"].model_path), shared["path"] / "policy")
    with torch.no_grad():
        logits = peft_model(input_ids=shared["ids"]).logits
        gen = peft_model.generate(input_ids=shared["ids"], max_new_tokens=8, do_sample=False,
                                  pad_token_id=peft_model.config.eos_token_id)
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=shared["ids"]).logits
    torch.testing.assert_close(plain["logits"], logits, rtol=0, atol=1e-4)
    assert (logits - base_logits).abs().max() > 1e-2  # the adapter matters
    assert torch.equal(plain["gen"], gen)


@pytest.mark.integration
def test_merge_of_a_4bit_trained_adapter(quantized, tmp_path, capsys):
    out = tmp_path / "merged"
    report = merge(quantized["path"], out, dtype="fp32")
    assert report.quantization == "4bit" and report.into == "original"
    assert report.max_logit_diff <= report.tolerance
    assert report.quantized_logit_diff > report.max_logit_diff  # the 4-bit rounding shows
    assert "trained on a 4bit base" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(merged.config, "quantization_config")  # full-precision weights
    peft_model = _plain_peft(Path(quantized["run"].model_path), quantized["path"] / "policy")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=quantized["ids"]).logits,
                                   peft_model(input_ids=quantized["ids"]).logits, rtol=0,
                                   atol=1e-4)


@pytest.mark.integration
def test_failed_merge_check_writes_nothing(shared, tmp_path):
    with pytest.raises(UserError, match="merge check failed.*nothing was written"):
        merge(shared["path"], tmp_path / "merged", dtype="bf16", tolerance=1e-9)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_errors_are_one_line_exit_2(shared, tmp_path):
    """A truncated file, a non-empty --out, a changed base: one line on stderr, exit code 2."""
    def check(res, message):
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and message in lines[-1], res.stderr[-2000:]
        assert lines[-1].startswith("lora-ppo: error: ") and "Traceback" not in res.stderr

    bad = shutil.copytree(shared["path"], tmp_path / "bad")
    weights = bad / "policy" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    check(run_cli("export", str(bad), "--out", str(tmp_path / "a")), "is truncated")
    assert not (tmp_path / "a").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    check(run_cli("export", str(shared["path"]), "--out", str(taken)), "not empty")
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    res = run_cli("export", str(shared["path"]), "--out", str(taken), "--force")
    assert res.returncode == 0 and (taken / "adapter_model.safetensors").is_file(), res.stderr

    # The base the checkpoint names changed since (same shapes, other weights): refused.
    weights_file = Path(shared["run"].model_path) / "model.safetensors"
    original = weights_file.read_bytes()
    try:
        save_file({k: v + 0.01 for k, v in load_file(weights_file).items()}, weights_file,
                  metadata={"format": "pt"})
        check(run_cli("merge", str(shared["path"]), "--out", str(tmp_path / "m")),
              "trained on another base")
    finally:
        weights_file.write_bytes(original)
    assert not (tmp_path / "m").exists()
