"""The streaming merge (lora_ppo/io/merge.py, lora_ppo/io/export.py::merge) against peft's own
merge_and_unload and against the 4-bit model it was trained on, on real tiny models of four
layouts (Llama, GPT-2 Conv1D, Phi-3 fused qkv / gate_up, tied embeddings), built locally."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import REPO, clean_env, make_adapter_dir, run_cli, tiny_config
from safetensors.torch import load_file

from lora_ppo.errors import UserError
from lora_ppo.io import checkpoint as ckpt
from lora_ppo.io import lora_delta, shards
from lora_ppo.io import merge as streaming
from lora_ppo.io.atomic import TMP_TAG, owner_tag, remove_stale
from lora_ppo.io.export import TOLERANCE, merge
from lora_ppo.ppo import checkpoint as ppo_checkpoint

CONFIGS = {
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=64)),
    "phi3": ("Phi3Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                max_position_embeddings=64, pad_token_id=0)),
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=96)),
    "llama_tied": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       vocab_size=96, tie_word_embeddings=True)),
}
# What each case's adapter targets: every layout peft saves differently.
ADAPTERS = {
    "llama": ("llama", dict(target_modules="all-linear", modules_to_save=["lm_head"],
                            rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})),
    "llama_rslora": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"],
                                   use_rslora=True)),
    "gpt2": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], lora_bias=True)),
    "phi3": ("phi3", dict(target_modules=["qkv_proj", "gate_up_proj", "o_proj", "down_proj"])),
    "llama_dora": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj",
                                                 "embed_tokens"], use_dora=True)),
    "gpt2_dora": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], use_dora=True)),
}
IDS = torch.tensor([[1, 5, 9, 14, 3, 27, 40, 2]])


def _bnb_config(mode: str = "4bit"):
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Each architecture with random weights, saved in several shards (100 KB each)."""
    import transformers

    out = {}
    for name, (cls, kwargs) in CONFIGS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kwargs))
        out[name] = tmp_path_factory.mktemp(name) / "base"
        model.save_pretrained(out[name], max_shard_size="100KB")
    return out


def _adapter(base: Path, out: Path, seed: int = 1, **lora) -> Path:
    """A real peft LoRA adapter with random A and B (B = 0 at init would make the merge a
    no-op) and lora_dropout set in its saved config, as SFT recipes leave it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, **lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft takes lora_B.bias (lora_bias=True) for a ZeRO-3 shard
        peft_model.save_pretrained(out)
    return out


def _stream(base: Path, adapter: Path, out: Path, into: str = "original", qcfg=None,
            dtype=torch.float32, max_shard_bytes=None) -> streaming.View:
    """The streaming merge as lora_ppo.io.export.merge runs it, without a training checkpoint."""
    index = shards.read_index(str(base))
    structure = shards.model_structure(str(base), False, qcfg)
    a = lora_delta.read_adapter(adapter, index, structure)
    view = streaming.View(into, torch.float32, structure, lora_delta.untied_keys(a, structure))
    plan = shards.plan_shards(index, view.untied, dtype, max_shard_bytes)
    out.mkdir()
    streaming.write_merged(index, a, view, plan, out, dtype, torch.device("cpu"),
                           log=lambda s: None)
    shards.write_model_files(index, structure, out, dtype, view.untied)
    return view


def _written(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def _peft_merged(base: Path, adapter: Path, quantized: bool) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload; for `quantized`, of the 4-bit model transformers loads, first
    dequantized by transformers (`model.dequantize()`, bitsandbytes' dequantize_4bit)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kw = dict(quantization_config=_bnb_config(), device_map={"": "cpu"}) if quantized else {}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **kw)
    if quantized:
        model = model.dequantize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("quantized", [False, True], ids=["original", "dequantized-4bit"])
@pytest.mark.parametrize("case", list(ADAPTERS))
def test_streaming_merge_equals_peft_merge_and_unload(bases, tmp_path, case, quantized):
    arch, lora = ADAPTERS[case]
    adapter = _adapter(bases[arch], tmp_path / "adapter", **lora)
    out = tmp_path / "merged"
    view = _stream(bases[arch], adapter, out, into="dequantized" if quantized else "original",
                   qcfg=_bnb_config() if quantized else None)
    ours, want = _written(out), _peft_merged(bases[arch], adapter, quantized)
    base = _written(bases[arch])
    assert ours.keys() == base.keys()  # the checkpoint's own names, nothing dropped or added
    changed = 0
    for key, t in ours.items():
        w = want[key]
        if quantized and key.removesuffix(".weight") in view.structure.conv1d:
            w = w.T  # dequantize() turns GPT-2's Conv1D (in, out) into a Linear (out, in)
        assert t.dtype == torch.float32
        assert (t - w).abs().max() <= 1e-6 * w.abs().max(), key
        changed += not torch.equal(t, base[key])
    assert changed >= 6  # the adapter moved the weights (random non-zero A and B)
    if quantized:  # the dequantized view moved the weights nothing targets, too
        assert not torch.equal(ours[_first(base, "down_proj", "mlp.c_proj")],
                               base[_first(base, "down_proj", "mlp.c_proj")])


def _first(tensors: dict, *names: str) -> str:
    return next(k for k in tensors if any(f"{n}.weight" in k for n in names))


@pytest.mark.parametrize("lora", [
    dict(target_modules=["q_proj", "lm_head", "embed_tokens"]),
    dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
], ids=["lora-on-lm_head-and-embeddings", "lm_head-in-modules_to_save"])
def test_tied_embeddings_are_untied_not_both_changed(bases, tmp_path, lora):
    """peft's merge_and_unload adds an lm_head update to the tensor it shares with the
    embeddings; the streaming merge writes both tensors and unties them instead."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = bases["llama_tied"]
    adapter = _adapter(base_dir, tmp_path / "adapter", **lora)
    view = _stream(base_dir, adapter, tmp_path / "merged")
    assert view.untied == {"lm_head.weight": "model.embed_tokens.weight"}
    ours = _written(tmp_path / "merged")
    assert "lm_head.weight" not in _written(base_dir) and "lm_head.weight" in ours
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), str(adapter)).eval()
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert merged.lm_head.weight.data_ptr() != merged.model.embed_tokens.weight.data_ptr()
        with torch.no_grad():
            want = peft_model(input_ids=IDS).logits
            torch.testing.assert_close(merged(input_ids=IDS).logits, want, rtol=0, atol=1e-5)
            with peft_model.disable_adapter():
                assert (peft_model(input_ids=IDS).logits - want).abs().max() > 0.1  # it matters
            peft_merged = peft_model.merge_and_unload()(input_ids=IDS).logits
    if "lm_head" in lora["target_modules"]:  # what the untie avoids, on this peft version
        assert (peft_merged - want).abs().max() > 0.1


def test_untouched_tie_stays_tied_and_shards_follow_the_base(bases, tmp_path):
    """GPT-2 ties lm_head to wte: an adapter on attention leaves the tie (one stored tensor);
    by default the output has the base's shards, and max_shard_bytes re-cuts them."""
    adapter = _adapter(bases["gpt2"], tmp_path / "adapter", target_modules=["c_attn"])
    view = _stream(bases["gpt2"], adapter, tmp_path / "same", dtype=torch.bfloat16)
    assert view.untied == {}
    base_files = json.loads((bases["gpt2"] / shards.INDEX).read_text())["weight_map"]
    index = json.loads((tmp_path / "same" / shards.INDEX).read_text())
    assert len(set(index["weight_map"].values())) == len(set(base_files.values())) > 1
    assert index["weight_map"].keys() == base_files.keys()
    assert index["metadata"]["total_size"] == sum(f.stat().st_size for f in (tmp_path / "same").glob(
        "*.safetensors")) - sum(_header_bytes(f) for f in (tmp_path / "same").glob("*.safetensors"))
    config = json.loads((tmp_path / "same" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config.get("tie_word_embeddings", True) is True
    base = _written(bases["gpt2"])
    for key, t in _written(tmp_path / "same").items():  # unchanged tensors: a plain cast
        assert t.dtype == torch.bfloat16
        assert ".c_attn." in key or torch.equal(t, base[key].to(torch.bfloat16)), key
    _stream(bases["gpt2"], adapter, tmp_path / "cut", max_shard_bytes=20_000)
    assert len(list((tmp_path / "cut").glob("*.safetensors"))) > len(set(base_files.values()))
    _stream(bases["gpt2"], adapter, tmp_path / "one", max_shard_bytes=10**9)
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "one" / shards.INDEX).exists()


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_dequantized_view_is_what_bitsandbytes_loads_4bit_and_8bit(bases):
    """base_view(dequantized) of every weight equals the dequantized weight of the model
    transformers loads in 4-bit / 8-bit; weights it does not quantize (lm_head) pass."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    for mode in ("4bit", "8bit"):
        qcfg = _bnb_config(mode)
        structure = shards.model_structure(str(bases["gpt2"]), False, qcfg)
        view = streaming.View("dequantized", torch.float32, structure, {})
        model = AutoModelForCausalLM.from_pretrained(bases["gpt2"], dtype=torch.float32,
                                                     quantization_config=qcfg, device_map={"": "cpu"})
        base = _written(bases["gpt2"])
        n = 0
        for name, m in model.named_modules():
            if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                w = (bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state) if mode == "4bit"
                     else bnb.functional.int8_vectorwise_dequant(m.weight.data, m.weight.SCB))
                ours = streaming.base_view(base[f"{name}.weight"], f"{name}.weight", view)
                assert torch.equal(ours.T if name in structure.conv1d else ours, w.float()), name
                n += 1
        assert n == len(structure.quantized) == 8  # c_attn, c_proj, c_fc, mlp.c_proj x 2 layers
        assert torch.equal(streaming.base_view(base["transformer.wte.weight"],
                                               "transformer.wte.weight", view),
                           base["transformer.wte.weight"])


def test_bad_adapters_are_refused_with_one_line(bases, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bases["llama"], dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_qalora=True)
                   ).save_pretrained(tmp_path / "qalora")
    with pytest.raises(UserError, match="uses use_qalora.*merge_and_unload"):
        _stream(bases["llama"], tmp_path / "qalora", tmp_path / "out1")
    wrong = _adapter(bases["phi3"], tmp_path / "phi3-adapter", target_modules=["qkv_proj"])
    with pytest.raises(UserError, match="does not hold|has shape"):
        _stream(bases["llama"], wrong, tmp_path / "out2")


# -- the merge entry point on real lora-ppo checkpoints ---------------------------------------------

def _trained_checkpoint(model_dir: Path, out: Path, *overrides: str) -> Path:
    """A real Run's checkpoint (ZeRO-0) with its trainable weights moved off their init."""
    from lora_ppo.ppo.loop import setup

    run = setup(tiny_config(model_dir, out, *overrides))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in run.ac.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    run.step, run.episode = 2, 16
    return ppo_checkpoint.save(run)


@pytest.fixture(scope="module")
def q4(tiny_model_dir, tmp_path_factory):
    return _trained_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("q4"),
                               "quantization.mode=4bit", "lora.dropout=0.05")


def _trained_logits(ck_path: Path) -> torch.Tensor:
    """The model training used: the 4-bit base as lora_ppo loads it + the policy adapter."""
    from peft import PeftModel

    from lora_ppo.modeling.loading import load_base_model, resolve_model_path

    ck = ckpt.open_checkpoint(ck_path)
    base = load_base_model(ck.cfg, resolve_model_path(ck.cfg.model.path), torch.device("cpu"))
    model = PeftModel.from_pretrained(base, str(ck_path / "policy")).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _plain_logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.integration
def test_dequantized_merge_behaves_like_the_4bit_model(q4, tmp_path):
    trained = _trained_logits(q4)
    fp32 = merge(q4, tmp_path / "deq32", dtype="fp32", into="dequantized")
    assert fp32.into == "dequantized" and fp32.max_logit_diff <= fp32.tolerance
    assert fp32.quantized_logit_diff < 1e-4 and fp32.max_tensor_diff <= 1e-6
    torch.testing.assert_close(_plain_logits(tmp_path / "deq32"), trained, rtol=0, atol=1e-4)

    bf16 = merge(q4, tmp_path / "deq16", dtype="bf16", into="dequantized")
    scale = max(1.0, trained.abs().max().item())
    bf16_gap = (_plain_logits(tmp_path / "deq16") - trained).abs().max().item()
    assert bf16.dtype == "bf16" and bf16_gap <= TOLERANCE["bf16"] * scale  # bf16 rounding only
    orig = merge(q4, tmp_path / "orig", dtype="fp32")
    orig_gap = (_plain_logits(tmp_path / "orig") - trained).abs().max().item()
    assert orig.into == "original" and orig_gap > 10 * bf16_gap  # the 4-bit quantization error
    assert orig.weight_gap_to_trained > 100 * fp32.weight_gap_to_trained
    manifest = json.loads((tmp_path / "deq16" / "manifest.json").read_text())
    assert manifest["merge"]["into"] == "dequantized" and manifest["merge"]["dtype"] == "bf16"


@pytest.mark.integration
def test_tensor_check_alone_and_bad_arguments(q4, tmp_path, capsys):
    report = merge(q4, tmp_path / "m", verify="tensors", max_shard_size="50KB")
    assert report.max_logit_diff is None and report.tensors_checked == 14  # 7 kinds x 2 layers
    assert report.shards > 3 and report.update_size > 0
    assert "probe texts skipped" in capsys.readouterr().out
    for kwargs, message in ((dict(dtype="int8"), "--dtype int8"),
                            (dict(device="cuda:7"), "--device cuda:7"),
                            (dict(max_shard_size="lots"), "--max-shard-size lots")):
        with pytest.raises(UserError, match=message):
            merge(q4, tmp_path / "bad", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.integration
def test_dequantized_needs_a_quantized_run_and_cli_default_is_the_bases_dtype(
        tiny_model_dir, tmp_path, capsys):
    """The CLI's merge writes the base's own dtype unless asked (an fp32 base was written in bf16
    by default, issue 28), and bf16 when asked."""
    from lora_ppo.cli import main

    path = _trained_checkpoint(tiny_model_dir, tmp_path / "run")
    with pytest.raises(UserError, match="nothing to dequantize"):
        merge(path, tmp_path / "x", into="dequantized")
    assert main(["merge", str(path), "--out", str(tmp_path / "cli")]) == 0
    assert "shard 1/1 model.safetensors" in capsys.readouterr().out
    assert {t.dtype for t in load_file(tmp_path / "cli" / "model.safetensors").values()} == {
        torch.float32}  # the tiny base is stored in fp32
    assert main(["merge", str(path), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {
        torch.bfloat16}
    assert main(["export", str(path), "--out", str(tmp_path / "cli" / "model.safetensors" / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a directory" in err[0]


@pytest.mark.integration
def test_stale_temp_dirs_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    host = owner_tag().rpartition("-")[0]
    stale = tmp_path / f".out{TMP_TAG}{host}-{dead}"
    live = tmp_path / f".out{TMP_TAG}{host}-{os.getppid()}"  # the parent is alive
    other = tmp_path / f".out{TMP_TAG}otherhost-{dead}"  # a shared filesystem: not ours to judge
    for d in (stale, live, other):
        (d / "half").mkdir(parents=True)
    assert remove_stale(tmp_path / "out") == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def _kill_mid_merge(path: Path, out: Path, sig: int) -> subprocess.Popen:
    """Start `lora-ppo merge` with many small shards; send `sig` once the first is written."""
    proc = subprocess.Popen([sys.executable, "-m", "lora_ppo", "merge", str(path), "--out",
                             str(out), "--max-shard-size", "20KB", "--dtype", "fp32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(), cwd=REPO)
    for line in proc.stdout:
        if "shard 1/" in line:
            break
    assert proc.poll() is None, "merge finished before the signal: the test proves nothing"
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    return proc


@pytest.mark.slow
def test_a_kill_at_any_point_leaves_no_output_and_no_temp_dir(q4, tmp_path):
    proc = _kill_mid_merge(q4, tmp_path / "merged", signal.SIGTERM)
    assert proc.returncode == 143 and list(tmp_path.iterdir()) == []  # cleaned on the way out
    proc = _kill_mid_merge(q4, tmp_path / "merged", signal.SIGKILL)
    left = [p.name for p in tmp_path.iterdir()]
    assert proc.returncode == -9 and len(left) == 1 and TMP_TAG in left[0]  # nothing can clean
    res = run_cli("merge", str(q4), "--out", str(tmp_path / "merged"), "--verify", "tensors")
    assert res.returncode == 0, res.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # the next run removed it


@pytest.mark.slow
def test_bench_merge_script_runs(tmp_path):
    """benchmarks/bench_merge.py at a tiny size: trains, merges in a child, measures its RSS."""
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_merge.py"), "--hidden", "64",
                          "--intermediate", "128", "--layers", "2", "--vocab", "512",
                          "--base-shard-size", "200KB", "--cache-dir", str(tmp_path / "cache"),
                          "--out", str(tmp_path / "bench.json")], capture_output=True, text=True,
                         env=clean_env(), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    run = result["runs"][0]
    assert run["returncode"] == 0 and run["base_shards"] > 1
    assert 0 < run["peak_rss_above_baseline_mib"] < run["peak_rss_mib"]
    shutil.rmtree(tmp_path / "cache")


@pytest.mark.integration
def test_a_run_started_from_a_dora_adapter_merges_into_what_it_trained(tiny_model_dir, tmp_path):
    """Training accepts a DoRA starting adapter (and trains its magnitude); `lora-ppo merge` used
    to refuse it (use_dora). Now its checks pass (peft's merge of sampled modules, logits on the
    probe texts) and the merged model gives the trained policy's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sft = make_adapter_dir(tiny_model_dir, tmp_path / "sft", seed=1, use_dora=True)
    path = _trained_checkpoint(tiny_model_dir, tmp_path / "run", f"model.init_adapter={sft}")
    report = merge(path, tmp_path / "merged", dtype="fp32")
    assert report.max_logit_diff <= report.tolerance and report.max_tensor_diff <= 1e-6
    base = _plain_logits(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trained = PeftModel.from_pretrained(model, str(path / "policy")).eval()
    assert any("lora_magnitude_vector" in n for n, _ in trained.named_parameters())
    with torch.no_grad():
        want = trained(input_ids=IDS).logits
    assert (want - base).abs().max() > 1e-2
    torch.testing.assert_close(_plain_logits(tmp_path / "merged"), want, rtol=0, atol=1e-5)
