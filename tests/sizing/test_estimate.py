"""The memory estimator: hand-computed sizes, checks against real bitsandbytes/peft/FLOP counts,
the batch-size suggestion, and `lora-ppo estimate`."""

import json

import pytest
import torch
from helpers import run_cli, write_yaml

from lora_ppo.config.load import load_config
from lora_ppo.errors import UserError
from lora_ppo.sizing import flops, suggest
from lora_ppo.sizing import memory as est
from lora_ppo.sizing.arch import Arch, arch_from_config, lora_param_count, param_counts, read_arch

# A small Llama: head_dim 16/4 = 4, so q/o are 16 wide, k/v 2*4 = 8 wide.
SMALL = {"vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 32, "tie_word_embeddings": False,
         "dtype": "float32"}


@pytest.fixture
def small_dir(tmp_path):
    """A model directory holding only config.json: the estimator must not need more."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(SMALL))
    return d


def small_cfg(model_dir, *overrides):
    return load_config(None, [
        f"model.path={model_dir}", "quantization.mode=none", "lora.r=4",
        "lora.target_modules=[all-linear]", "value.mode=shared",
        "model.gradient_checkpointing=false", "model.max_prompt_length=8",
        "rollout.max_new_tokens=4", "rollout.prompts_per_update=8", "rollout.generation_batch_size=4",
        "ppo.minibatch_size=8", "ppo.micro_batch_size=2", "deepspeed.config=zero0",
        *overrides])


def test_arch_reads_config_json_with_llama_defaults(small_dir):
    arch = read_arch(str(small_dir))
    assert arch == Arch(vocab=100, hidden=16, layers=2, heads=4, kv_heads=2, head_dim=4,
                            intermediate=32, tied=False, checkpoint_bytes=4)
    # No kv heads given: as many as heads; no tie flag: PretrainedConfig's default (tied).
    d = {k: v for k, v in SMALL.items() if k not in ("num_key_value_heads", "tie_word_embeddings")}
    a = arch_from_config(d)
    assert (a.kv_heads, a.tied) == (4, True)
    with pytest.raises(UserError, match="intermediate_size"):
        arch_from_config({k: v for k, v in SMALL.items() if k != "intermediate_size"})


def test_builtin_arch_is_read_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_PPO_CACHE", str(tmp_path))
    from lora_ppo.builtin.specs import builtin_arch

    arch = builtin_arch("builtin:demo")
    assert (arch.vocab, arch.hidden, arch.layers, arch.kv_heads) == (1024, 128, 4, 2)
    assert list(tmp_path.iterdir()) == []  # nothing was built or written


def test_param_and_lora_counts_by_hand(small_dir):
    arch = read_arch(str(small_dir))
    # per layer: q 16*16=256, k 16*8=128, v 128, o 256, gate/up/down 16*32=512 each -> 2304
    pc = param_counts(arch)
    assert pc.linear == 2 * 2304
    # embeddings + untied lm_head 2*100*16 = 3200, norms (2 per layer + final) 5*16 = 80
    assert pc.other == 3280
    # r * (in + out): q 4*32, k 4*24, v 4*24, o 4*32, gate/up/down 4*48 -> 1024 per layer
    assert lora_param_count(arch, 4, ["all-linear"]) == 2 * 1024
    assert lora_param_count(arch, 4, ["q_proj", "v_proj"]) == 2 * (128 + 96)
    with pytest.raises(UserError, match="qkv_proj"):
        lora_param_count(arch, 4, ["qkv_proj"])


def test_weight_bytes_by_hand(small_dir):
    arch = read_arch(str(small_dir))
    other_fp32 = 3280 * 4  # quantized models keep embeddings, head and norms in fp32
    assert est.weight_bytes(arch, "none", True, 2) == (4608 + 3280) * 2
    # 4-bit: 0.5 B/weight; 4608/64 = 72 blocks; double quant: 72 uint8 absmax + 4 B per 256 blocks
    assert est.weight_bytes(arch, "4bit", True, 2) == int(2304 + 72 + 4 * 72 / 256) + other_fp32
    # plain 4-bit: one fp32 absmax per block of 64
    assert est.weight_bytes(arch, "4bit", False, 2) == 2304 + 4 * 72 + other_fp32
    # 8-bit: 1 B/weight + an fp32 scale per output row (16+8+8+16+32+32+16 = 128 rows per layer)
    assert est.weight_bytes(arch, "8bit", True, 2) == 4608 + 4 * 256 + other_fp32


def _real_bytes(model) -> int:
    """Parameter bytes plus bitsandbytes' quantization constants (4-bit absmax, 8-bit SCB)."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
            if qs.nested:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
        scb = getattr(p, "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total


@pytest.mark.parametrize("mode,double", [("4bit", True), ("4bit", False), ("8bit", True)])
def test_weight_bytes_match_real_bitsandbytes_model(wide_model_dir, tmp_path, mode, double):
    from lora_ppo.modeling.loading import load_base_model

    cfg = load_config(None, [f"model.path={wide_model_dir}", f"quantization.mode={mode}",
                             f"quantization.double_quant={str(double).lower()}"])
    model = load_base_model(cfg, str(wide_model_dir), torch.device("cpu"))
    arch = read_arch(str(wide_model_dir))
    predicted = est.weight_bytes(arch, mode, double, 4)
    assert abs(predicted - _real_bytes(model)) <= 4 * arch.layers * 7  # rounding per linear


def test_lora_and_param_counts_match_real_peft_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    arch = read_arch(str(tiny_model_dir))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert param_counts(arch).total == sum(p.numel() for p in base.parameters())
    for targets in (["all-linear"], ["q_proj", "down_proj"]):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=8, target_modules=targets[0] if len(targets) == 1
                                          else targets))
        real = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        assert lora_param_count(arch, 8, targets) == real


def test_forward_flops_match_torch_flop_counter(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    arch = read_arch(str(tiny_model_dir))
    # eager attention: QK^T and AV as matmuls the counter sees (it has no rule for CPU flash SDPA)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    B, T, rows = 2, 10, 3
    ids = torch.randint(0, arch.vocab, (B, T))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        h = model.get_base_model().model(input_ids=ids).last_hidden_state
        model.get_base_model().lm_head(h[:, -rows:])
    lora = lora_param_count(arch, 4, ["all-linear"])
    assert flops.forward_flops(arch, B, T, lora_params=lora, logit_rows=B * rows) == \
        counter.get_total_flops()


def test_generation_and_update_flops_by_hand(small_dir):
    arch = read_arch(str(small_dir))
    # prefill of 1 x 3 tokens, logits on its last row
    prefill = 2 * 4608 * 3 + 4 * 2 * 3 * 3 * 4 * 4 + 2 * 16 * 100
    # two more tokens, each one row through the linears and the head, attending to 4 and 5
    steps = sum(2 * 4608 + 2 * 16 * 100 + 4 * 2 * ctx * 4 * 4 for ctx in (4, 5))
    assert flops.generation_flops(arch, 1, 3, 3, lora_params=0) == prefill + steps
    fwd = flops.forward_flops(arch, 1, 5, lora_params=0, logit_rows=0)
    head = 2 * 16 * 100 * 2
    attn = 4 * 2 * 5 * 5 * 4 * 4
    model, executed = flops.update_flops(arch, 1, 3, 2, 0, False, epochs=1, grad_ckpt=True)
    assert model == (fwd + head) + (fwd + attn + head)  # backward: input grads, attention 2x
    assert executed == model + head + fwd  # logits recomputed; checkpointing reruns the trunk


def test_estimate_memory_by_hand(small_dir):
    # GPU (bf16 = 2 B), ZeRO-0, shared value head, r=4: see each number's derivation inline.
    e = est.estimate_memory(small_cfg(small_dir), read_arch(str(small_dir)), "gpu")
    trainable = 2048 + 16 + 1  # LoRA + value head
    assert e.components["weights"] == 7888 * 2
    assert e.components["adapters"] == trainable * 2
    assert e.components["optimizer"] == trainable * (8 + 4 + 4 + 2)  # Adam + bf16 optimizer
    # KV cache: layers 2 * gen batch 4 * (T 12 + continuous batching's slack 8) *
    # (K+V: 2 * 2 heads * 4) * 2 B
    assert e.components["kv_cache"] == 2 * 4 * 20 * 16 * 2
    # saved: micro 2 * T 12 * (2 layers * (4*16 + 4*16 + 4*32) + 2*16) * 2 B
    assert e.components["activations"] == 2 * 12 * (2 * 256 + 32) * 2
    resident = 7888 * 2 + trainable * 2 + trainable * 18
    # generation: KV 5120 + a prefill of a quarter of the 4 slots (1 prompt of 8 tokens): the
    # widest layer and its own cache, 8 * (2*16 + 5*32 + 2 layers * 16) * 2 = 3584
    assert e.phases["generation"] == resident + 5120 + 3584
    # scoring, in micro-batches: trunk output 2*12*16*2 = 768 + no-grad layer 2*12*192*2 = 9216
    # (> logits 8*100*(4+2) = 4800)
    assert e.phases["scoring"] == resident + 768 + 9216
    # update: saved 26112 + logits chunk (8 rows * 100: the bf16 logits 2 B, their fp32
    # buffer 4 B, the entropy metric's fp32 temporary 4 B / 8, the bf16 gradient 2 B) = 6800,
    # above a layer's input grads 2*12*128*2 = 6144
    assert e.phases["update"] == resident + 26112 + 6800
    # with an entropy gradient autograd holds ~5 fp32 buffers: 5 * 8 * 100 * 4 = 16000
    e2 = est.estimate_memory(small_cfg(small_dir, "ppo.ent_coef=0.01"), read_arch(str(small_dir)),
                             "gpu")
    assert e2.phases["update"] == resident + 26112 + 16000
    assert e.peak == e.phases["update"]


def test_conversations_waiting_between_turns_are_counted(small_dir):
    """With tools, continuous batching keeps each conversation between turns on a cache of its
    own: at most the 4 slots' rows, each at most prompt 8 + budget 4 tokens: 2 layers * 4 * 12 *
    (K+V: 16) * 2 B = 3072 more in generation; and rows taking their answers in their slots take
    up to min(ANSWER_CHUNK, budget 4) ids each in one forward: 4 rows * 4 * the no-grad layer's
    192 elements * 2 B = 6144, the largest transient (the prefill's was 3584). Nothing else;
    batched decoding keeps none."""
    arch = read_arch(str(small_dir))
    tools = ("rollout.tools=[tools.py:add]",)
    plain, agent = (est.estimate_memory(small_cfg(small_dir, *o), arch, "gpu") for o in ((), tools))
    assert est.shapes_from_config(small_cfg(small_dir, *tools)).turns
    assert (agent.phases["generation"] - plain.phases["generation"]
            == 2 * 4 * 12 * 16 * 2 + 4 * 4 * 192 * 2 - 3584)
    assert agent.components == plain.components
    assert (agent.phases["scoring"], agent.phases["update"]) == (plain.phases["scoring"],
                                                                  plain.phases["update"])
    off = ("rollout.continuous_batching=false",)
    assert (est.estimate_memory(small_cfg(small_dir, *off, *tools), arch, "gpu").phases
            == est.estimate_memory(small_cfg(small_dir, *off), arch, "gpu").phases)


def test_the_models_own_logits_are_counted_where_setup_takes_them(small_dir):
    """A family whose logit post-processing lora_ppo does not know trains on the model's own
    forward's logits (ppo/seams.py), whole: in the update micro 2 x 4 new tokens x vocab
    100 in bf16, twice (the logits, and what the post-processing keeps for its backward) =
    3200 B; in scoring (micro-batches) 2 x 4 x 100 x 2 B once = 1600 B."""
    cfg, arch = small_cfg(small_dir), read_arch(str(small_dir))
    plain, own = est.estimate_memory(cfg, arch, "gpu"), est.estimate_memory(cfg, arch, "gpu",
                                                                            own_logits=True)
    assert own.phases["update"] - plain.phases["update"] == 2 * 4 * 100 * 2 * 2
    assert own.phases["scoring"] - plain.phases["scoring"] == 2 * 4 * 100 * 2
    assert own.phases["generation"] == plain.phases["generation"]
    report = suggest.report(cfg, arch, "gpu", 24576, own_logits=True)
    assert report["phases_mib"]["update"] * 2**20 == pytest.approx(own.phases["update"])


def test_a_shared_prompt_is_counted_once(small_dir):
    """GRPO, 4 samples per prompt sharing its encoding: a micro-batch of 2 holds the prompt once
    (8 + 2 * 4 = 16 tokens, not 2 * 12 = 24), a generation batch of 4 one prompt, and without
    model.shared_prompt every sample carries its own copy."""
    arch = read_arch(str(small_dir))
    grpo = ("ppo.advantage_estimator=grpo", "rollout.samples_per_prompt=4",
            "rollout.prompts_per_update=2", "value.mode=none")
    sh = est.shapes_from_config(small_cfg(small_dir, *grpo))
    assert sh.group == 4 and sh.tokens(2) == 16 and sh.tokens(4) == 24
    assert sh.tokens(6) == 3 * 8 + 6 * 4  # 6 consecutive rows can touch 3 groups
    e = est.estimate_memory(small_cfg(small_dir, *grpo), arch, "gpu")
    # saved: 16 tokens * (2 layers * 256 + 32) * 2 B
    assert e.components["activations"] == 16 * (2 * 256 + 32) * 2
    plain = est.estimate_memory(small_cfg(small_dir, *grpo, "model.shared_prompt=false"), arch,
                                "gpu")
    assert plain.components["activations"] == 24 * (2 * 256 + 32) * 2
    assert e.phases["scoring"] < plain.phases["scoring"]
    # generation prefills at most a quarter of the slots at a time either way, and its decode
    # steps read a copy of each shared prompt (generation/shared_prompts.py) either way
    assert e.phases["generation"] == plain.phases["generation"]
    assert est.shapes_from_config(small_cfg(small_dir, *grpo, "model.shared_prompt=false")
                                  ).answers == 4


def test_the_decode_batch_s_copies_of_shared_prompts_are_counted(small_dir):
    """With continuous batching and 4 rows to a prompt, a batch of 6 rows touches at most 3
    prompts (rows may start and end inside a group): 3 copies of 8 tokens * 2 layers * (K+V:
    2 * 2 heads * 4) * 2 B = 1536 more in generation; one row to a prompt, or batched
    decoding: none."""
    arch = read_arch(str(small_dir))

    def generation(answers, slack):
        return est._generation_bytes(arch, est.Shapes(4, 6, 8, 4, 1, slack, False, answers), 2)

    assert generation(4, 8)[1] - generation(1, 8)[1] == 3 * 8 * 2 * 16 * 2
    assert generation(4, 8)[0] == generation(1, 8)[0]  # the batch's own cache is the same
    assert generation(4, 0) == generation(1, 0)


def test_checkpointing_adapter_mode_and_cpu_mode_change_the_right_terms(small_dir):
    arch = read_arch(str(small_dir))
    base = est.estimate_memory(small_cfg(small_dir), arch, "gpu")
    resident = base.phases["generation"] - 5120 - 3584  # as in test_estimate_memory_by_hand
    ckpt = est.estimate_memory(small_cfg(small_dir, "model.gradient_checkpointing=true"), arch)
    # only layer inputs saved: 2 * 12 * (2*16 + 2*16) * 2 = 3072; then one recomputed layer
    # with its input grads 2 * 12 * (256 + 3*32 + 2*16) * 2 = 18432 beats the logits' 16000
    assert ckpt.components["activations"] == 3072
    assert ckpt.phases["update"] == resident + 3072 + 18432
    adapter = est.estimate_memory(small_cfg(small_dir, "value.mode=adapter"), arch)
    assert adapter.components["activations"] == 2 * base.components["activations"]
    assert adapter.components["adapters"] == 2 * base.components["adapters"]
    cpu4 = est.estimate_memory(small_cfg(small_dir, "quantization.mode=4bit"), arch, "cpu")
    # on a CPU the fp32 checkpoint pages of the quantized linears stay mapped
    assert cpu4.components["checkpoint_pages"] == 4608 * 4
    assert cpu4.components["runtime"] == est.CPU_RUNTIME_OVERHEAD
    assert est.estimate_memory(small_cfg(small_dir, "quantization.mode=4bit"), arch,
                               "gpu").components["checkpoint_pages"] == 0


def test_zero2_bucket_counts_in_full_on_gpu_only():
    # ZeRO-2 fp32, 1000 trainable: Adam 8 + master 4 + its grad 4 per param, plus the bucket
    assert est.optimizer_bytes(1000, "fp32", 2, "cpu", bucket=10**6, overlap_comm=False) == \
        16 * 1000 + 4 * 1000  # only the written pages of the bucket are resident
    assert est.optimizer_bytes(1000, "bf16", 2, "gpu", bucket=10**6, overlap_comm=True) == \
        16 * 1000 + 2 * 2 * 10**6  # two bf16 buckets, allocated whole
    assert est.optimizer_bytes(1000, "fp32", 0, "gpu", bucket=10**6, overlap_comm=False) == \
        12 * 1000


def test_suggestion_picks_largest_sizes_that_fit(small_dir):
    cfg = small_cfg(small_dir, "rollout.generation_batch_size=8")
    arch = read_arch(str(small_dir))

    def at(mb, gb):
        return est.estimate_memory(cfg, arch, "gpu", est.Shapes(mb, gb, 8, 4))

    # a budget between the update peaks of micro 4 and micro 8 (and roomy for generation)
    budget = (at(4, 1).phases["update"] + at(8, 1).phases["update"]) / 2
    assert at(4, 8).phases["generation"] < budget and at(4, 8).phases["scoring"] < budget
    sug = suggest.suggest_batch_sizes(cfg, arch, gpu_mib=budget / est.MIB, headroom=0.0)
    assert (sug.micro_batch_size, sug.generation_batch_size) == (4, 8)
    assert sug.estimate.peak <= sug.budget
    none = suggest.suggest_batch_sizes(cfg, arch, gpu_mib=0.01)
    assert none.micro_batch_size is None and none.generation_batch_size is None
    assert "does not fit" in suggest.format_table(none.estimate, none)


@pytest.mark.integration
def test_cli_estimate_table_json_and_bad_input(tmp_path, small_dir):
    good = write_yaml(tmp_path / "good.yaml", {"model": {"path": str(small_dir)},
                                               "quantization": {"mode": "4bit"}})
    res = run_cli("estimate", "--config", str(good), "--json", "--gpu-mib", "8000")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out["phases_mib"]) == {"generation", "scoring", "update"}
    # a 14k-parameter model fits at the largest divisors of minibatch 16 and batch 64
    assert out["fits"] and out["suggested"]["ppo.micro_batch_size"] == 16
    assert out["suggested"]["rollout.generation_batch_size"] == 64
    own = run_cli("estimate", "--config", str(good), "--json", "--own-logits")
    assert own.returncode == 0, own.stderr
    assert json.loads(own.stdout)["phases_mib"]["update"] > out["phases_mib"]["update"]
    bad = write_yaml(tmp_path / "bad.yaml", {"model": {"path": str(small_dir), "size": 7}})
    res = run_cli("estimate", "--config", str(bad))
    assert res.returncode == 2 and "model.size" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("estimate", f"model.path={tmp_path / 'missing'}", "--device", "cpu")
    assert res.returncode == 2 and "config.json" in res.stderr
