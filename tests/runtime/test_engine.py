"""lora_ppo.runtime.engine against real DeepSpeed on CPU (gloo, one in-process rank, fp32).

Every engine is checked against plain torch: the same AdamW, the same data, the same clipping
(torch.nn.utils.clip_grad_norm_), so a config that silently dropped clipping, accumulation or a
parameter would disagree with the reference.
"""

import copy
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_ppo.config.sections import OptimConfig
from lora_ppo.errors import UserError
from lora_ppo.runtime.dist import setup_distributed, shutdown_distributed
from lora_ppo.runtime.ds_config import (
    DS_CONFIG_DIR,
    fill_ds_config,
    read_ds_config,
    refuse_unsupported,
    resolve_ds_config,
    resolve_precision,
    zero_stage,
)
from lora_ppo.runtime.engine import create_engine, gathered_trainable, make_lr_scheduler

CONFIG_NAMES = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
LR = 1e-2


@pytest.fixture(scope="module")
def dist():
    # setup_distributed() writes RANK/WORLD_SIZE/MASTER_PORT into os.environ; restore them after
    # this module so subprocesses started by other test files do not inherit a port in use.
    saved = dict(os.environ)
    info = setup_distributed()
    yield info
    os.environ.clear()
    os.environ.update(saved)


class Tiny(torch.nn.Module):
    """A frozen Linear "base" plus a trainable Linear "adapter" on the same input, as in LoRA."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.base = torch.nn.Linear(4, 3)
        self.base.requires_grad_(False)
        self.adapter = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.base(x) + self.adapter(x)


def _gathered_all(model):
    """Every parameter whole under ZeRO-3 (the frozen base too), to compare it."""
    import contextlib

    import deepspeed

    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(list(model.parameters()))


def batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)


def per_sample_loss(model, x, y):
    """(B,) squared error per sample."""
    return (model(x) - y).pow(2).sum(-1)


def build(name, *, micro, accum, max_grad_norm=0.0, schedule="constant", warmup_steps=0):
    raw, source = read_ds_config(name)
    cfg = fill_ds_config(raw, micro_batch_size=micro, grad_accum_steps=accum, world_size=1,
                           max_grad_norm=max_grad_norm, precision="fp32", source=source)
    model = Tiny()
    optim = OptimConfig(learning_rate=LR, weight_decay=0.01, lr_schedule=schedule,
                        warmup_steps=warmup_steps)
    engine = create_engine(model, ds_config=cfg, optim=optim, total_steps=10)
    return model, engine


def train(engine, model, x, y, *, micro, accum):
    """One optimizer step over the full batch x (B = micro * accum), one backward per micro-batch.

    The loss per micro-batch is sum(per-sample loss) / B * accum: engine.backward divides it by
    gradient_accumulation_steps (scale_wrt_gas=True, deepspeed/runtime/engine.py), so the
    accumulated gradient is that of the full-batch mean.
    """
    for i in range(accum):
        mb_x, mb_y = x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]
        loss = per_sample_loss(engine, mb_x, mb_y).sum() / x.shape[0] * accum
        engine.backward(loss)
        engine.step()


def reference(x_batches, *, max_grad_norm):
    """Adapter weights after plain torch AdamW steps, one per batch, full-batch mean loss."""
    model = Tiny()
    opt = torch.optim.AdamW(model.adapter.parameters(), lr=LR, weight_decay=0.01)
    for x, y in x_batches:
        opt.zero_grad()
        per_sample_loss(model, x, y).mean().backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.adapter.parameters(), max_grad_norm)
        opt.step()
    return model.adapter.weight.detach().clone()


@pytest.mark.integration
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_trains_adapter_only_and_clips(dist, name):
    model, engine = build(name, micro=2, accum=1, max_grad_norm=0.5)
    assert engine.gradient_clipping() == 0.5
    with _gathered_all(model):
        base0 = copy.deepcopy(model.base.state_dict())
        adapter0 = model.adapter.weight.detach().clone()
    batches = [batch(2, seed=1), batch(2, seed=2)]
    for x, y in batches:
        train(engine, model, x, y, micro=2, accum=1)
    assert engine.global_steps == 2

    with _gathered_all(model):
        for key, value in model.base.state_dict().items():
            assert torch.equal(value, base0[key]), f"frozen base.{key} changed under {name}"
        adapter = model.adapter.weight.detach().clone()
    assert not torch.allclose(adapter, adapter0)
    clipped, unclipped = reference(batches, max_grad_norm=0.5), reference(batches, max_grad_norm=0)
    # With these batches the gradient norm exceeds 0.5, so clipping changes the second Adam step.
    assert not torch.allclose(clipped, unclipped, atol=1e-4)
    torch.testing.assert_close(adapter, clipped, atol=1e-6, rtol=0)

    if engine.zero_optimization_stage() == 3:
        # Outside the context ZeRO-3 leaves an empty placeholder in the module (the rank's
        # partition lives in ds_tensor); inside, the full weight: of the trainable adapter
        # only, the frozen base stays partitioned.
        assert model.base.weight.numel() == 0 and model.adapter.weight.numel() == 0
        with gathered_trainable(model):
            assert model.adapter.weight.shape == (3, 4) and model.base.weight.numel() == 0


@pytest.mark.integration
@pytest.mark.parametrize("name", ["zero0", "zero2"])
def test_grad_accumulation_matches_full_batch(dist, name):
    x, y = batch(8, seed=3)
    full_model, full = build(name, micro=8, accum=1)
    train(full, full_model, x, y, micro=8, accum=1)

    acc_model, acc = build(name, micro=2, accum=4)
    w0 = acc_model.adapter.weight.detach().clone()
    for i in range(3):
        loss = per_sample_loss(acc, x[2 * i:2 * i + 2], y[2 * i:2 * i + 2]).sum() / 8 * 4
        acc.backward(loss)
        acc.step()
        assert torch.equal(acc_model.adapter.weight, w0), "optimizer stepped before the boundary"
    acc.backward(per_sample_loss(acc, x[6:], y[6:]).sum() / 8 * 4)
    # Adam's first update is ~lr * sign(g), blind to a wrong loss scale, so check the gradient.
    ref = Tiny()
    per_sample_loss(ref, x, y).mean().backward()
    if name == "zero0":
        # Plain fp32 path: DeepSpeed accumulates into .grad until step().
        torch.testing.assert_close(acc_model.adapter.weight.grad, ref.adapter.weight.grad,
                                   atol=1e-6, rtol=0)
    acc.step()
    if name != "zero0":
        # ZeRO keeps gradients in its own buffers and reports the norm of the reduced one.
        ref_norm = torch.cat([p.grad.flatten() for p in ref.adapter.parameters()]).norm()
        assert math.isclose(acc.get_global_grad_norm(), ref_norm.item(), rel_tol=1e-5)
        assert math.isclose(full.get_global_grad_norm(), ref_norm.item(), rel_tol=1e-5)
    assert acc.global_steps == 1 and acc.lr_scheduler.last_epoch == 1
    torch.testing.assert_close(acc_model.adapter.weight, full_model.adapter.weight,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(acc_model.adapter.weight, reference([(x, y)], max_grad_norm=0),
                               atol=1e-5, rtol=0)


@pytest.mark.integration
def test_bf16_zero0_first_adam_step_is_step_one(dist):
    # DeepSpeed's FP16_UnfusedOptimizer (bf16/fp16 at stage 0) takes a dummy step at init;
    # create_engine clears it, so the first real AdamW update has step-1 bias correction.
    raw, source = read_ds_config("zero0")
    cfg = fill_ds_config(raw, micro_batch_size=2, grad_accum_steps=1, world_size=1,
                           max_grad_norm=0.0, precision="bf16", source=source)
    model = Tiny()
    engine = create_engine(model, ds_config=cfg, optim=OptimConfig(learning_rate=LR),
                           total_steps=10)
    assert type(engine.optimizer).__name__ == "FP16_UnfusedOptimizer"
    assert model.adapter.weight.dtype == torch.bfloat16  # DeepSpeed casts the module's floats
    assert not engine.basic_optimizer.state
    master0 = [p.detach().clone() for p in engine.basic_optimizer.param_groups[0]["params"]]
    x, y = batch(2, seed=5)
    engine.backward(per_sample_loss(engine, x.bfloat16(), y.bfloat16()).float().mean())
    engine.step()
    assert {float(s["step"]) for s in engine.basic_optimizer.state.values()} == {1.0}
    # Step 1 of Adam moves every fp32 master weight by lr * g / (|g| + eps) = lr (g != 0).
    master1 = engine.basic_optimizer.param_groups[0]["params"]
    for before, after in zip(master0, master1):
        torch.testing.assert_close((after - before).abs(), torch.full_like(before, LR),
                                   atol=1e-5, rtol=0)


@pytest.mark.integration
def test_engine_steps_scheduler_once_per_optimizer_step(dist):
    # linear, warmup 2 of 10: multipliers 0, 0.5, 1.0, 0.875 after 0..3 optimizer steps.
    model, engine = build("zero2", micro=1, accum=2, schedule="linear", warmup_steps=2)
    x, y = batch(2, seed=4)
    assert engine.get_lr() == [0.0]
    for expected in (0.5, 1.0, 0.875):
        train(engine, model, x, y, micro=1, accum=2)
        assert engine.get_lr() == pytest.approx([LR * expected])


def lrs(schedule, warmup_steps=2, total_steps=10):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make_lr_scheduler(opt, schedule=schedule, warmup_steps=warmup_steps,
                                total_steps=total_steps)
    out = []
    for _ in range(total_steps + 2):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_schedules_by_hand():
    # warmup 2: s/2 -> 0, 0.5; then constant 1.
    assert lrs("constant") == [0.0, 0.5] + [1.0] * 10
    # linear after warmup: (10 - s) / 8 -> s=2: 1, s=3: 7/8, s=6: 4/8, s=10: 0, s=11: clamped 0.
    lin = lrs("linear")
    assert lin[:4] == [0.0, 0.5, 1.0, 0.875]
    assert lin[6] == 0.5 and lin[10] == 0.0 and lin[11] == 0.0
    # cosine: 0.5 * (1 + cos(pi * (s - 2) / 8)) -> s=4: 0.5 + 0.5 * cos(pi/4) = 0.853553,
    # s=6: 0.5, s=10: 0.
    cos = lrs("cosine")
    assert cos[:3] == [0.0, 0.5, 1.0]
    assert cos[4] == pytest.approx(0.8535534) and cos[6] == pytest.approx(0.5)
    assert cos[10] == pytest.approx(0.0, abs=1e-12)
    # no warmup: full lr at step 0.
    assert lrs("linear", warmup_steps=0, total_steps=4)[:5] == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(UserError, match="schedule='step'"):
        lrs("step")
    with pytest.raises(UserError, match="warmup_steps=11, total_steps=10"):
        lrs("linear", warmup_steps=11)


FILL = dict(micro_batch_size=2, grad_accum_steps=4, world_size=3, max_grad_norm=1.0,
            precision="bf16", source="ds_configs/zero2.json")


def test_fill_ds_config_replaces_auto_and_adds_missing():
    raw, _ = read_ds_config("zero2")
    out = fill_ds_config(raw, **FILL)
    assert raw["gradient_accumulation_steps"] == "auto"  # input left alone
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"],
            out["train_batch_size"]) == (2, 4, 2 * 4 * 3)
    assert out["gradient_clipping"] == 1.0
    assert out["bf16"] == {"enabled": True} and out["fp16"] == {"enabled": False}
    assert out["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 50000000,
                                        "allgather_bucket_size": 50000000}  # kept as written
    # Missing keys are set too: DeepSpeed would otherwise default accumulation to 1.
    assert fill_ds_config({}, **FILL)["gradient_accumulation_steps"] == 4
    # Agreeing explicit values pass; max_grad_norm <= 0 is DeepSpeed's "no clipping" (0).
    explicit = {"gradient_clipping": 1.0, "train_batch_size": 24, "bf16": {"enabled": True}}
    assert fill_ds_config(explicit, **FILL)["train_batch_size"] == 24
    assert fill_ds_config({}, **{**FILL, "max_grad_norm": -1})["gradient_clipping"] == 0.0


@pytest.mark.parametrize("raw, words", [
    ({"gradient_accumulation_steps": 8},
     ["ds_configs/zero2.json: gradient_accumulation_steps=8",
      "ppo.minibatch_size/ppo.micro_batch_size = 4", 'write "auto"']),
    ({"train_batch_size": 8}, ["train_batch_size=8", "= 24"]),
    ({"gradient_clipping": 0.5}, ["gradient_clipping=0.5", "ppo.optim.max_grad_norm = 1.0"]),
    ({"fp16": {"enabled": True}}, ["fp16.enabled=true", "deepspeed.precision = bf16"]),
    ({"optimizer": {"type": "AdamW"}}, ["remove the 'optimizer' block"]),
    ({"zero_optimization": {"reduce_bucket_size": "auto"}},
     ["zero_optimization.reduce_bucket_size is \"auto\""]),
    ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}},
     ["torch_autocast.enabled=true with deepspeed.precision=bf16", "deepspeed.precision=fp32"]),
])
def test_fill_ds_config_refuses(raw, words):
    with pytest.raises(UserError) as err:
        fill_ds_config(raw, **FILL)
    for w in words:
        assert w in str(err.value)


def test_torch_autocast_block():
    """Accepted over fp32 weights, its dtype named; refused without a dtype autocast takes."""
    from lora_ppo.runtime.ds_config import autocast_dtype

    fp32 = {**FILL, "precision": "fp32"}
    filled = fill_ds_config({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, **fp32)
    assert autocast_dtype(filled) == torch.bfloat16 and not filled["bf16"]["enabled"]
    assert autocast_dtype(fill_ds_config({}, **fp32)) is None
    assert autocast_dtype({"torch_autocast": {"enabled": False, "dtype": "fp16"}}) is None
    with pytest.raises(UserError, match=r'torch_autocast.dtype="int8" is not a dtype autocast '
                                        r'computes in; write "bfloat16" or "float16"'):
        fill_ds_config({"torch_autocast": {"enabled": True, "dtype": "int8"}}, **fp32)


def test_fill_ds_config_names_the_stage_fields():
    with pytest.raises(UserError, match=r"sft.train.batch_size/sft.train.micro_batch_size = 4"):
        fill_ds_config({"gradient_accumulation_steps": 2}, **FILL,
                       fields=("sft.train.batch_size", "sft.train.micro_batch_size",
                               "sft.optim.max_grad_norm"))


def test_resolve_ds_config(tmp_path):
    assert resolve_ds_config("zero2") == DS_CONFIG_DIR / "zero2.json"
    own = tmp_path / "mine.json"
    own.write_text('{"zero_optimization": {"stage": 1}}')
    assert resolve_ds_config(str(own)) == own
    assert read_ds_config(str(own)) == ({"zero_optimization": {"stage": 1}}, str(own))
    with pytest.raises(UserError, match="zero0, zero1, zero2, zero2_offload, zero3"):
        resolve_ds_config("zero4")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        read_ds_config(str(tmp_path / "bad.json"))


def test_shipped_configs_stage_and_quiet():
    stages = {"zero0": 0, "zero1": 1, "zero2": 2, "zero2_offload": 2, "zero3": 3}
    assert CONFIG_NAMES == sorted(stages)
    for name, stage in stages.items():
        raw, _ = read_ds_config(name)
        assert zero_stage(raw) == stage
        assert raw["steps_per_print"] >= 10**6 and raw["wall_clock_breakdown"] is False
    offload, _ = read_ds_config("zero2_offload")
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offload["zero_force_ds_cpu_optimizer"] is False  # accept the client AdamW
    assert zero_stage({}) == 0


def test_resolve_precision(caplog):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(UserError, match="fp16 needs a GPU; use precision=fp32 on CPU"):
        resolve_precision("fp16", cpu)
    with caplog.at_level("WARNING", logger="lora_ppo.runtime.engine"):
        assert resolve_precision("bf16", cpu) == "bf16"
    assert "400x slower" in caplog.text
    with pytest.raises(UserError, match="precision='half'"):
        resolve_precision("half", cpu)


def test_refuse_unsupported():
    with pytest.raises(UserError, match="ZeRO-3 cannot partition a bitsandbytes"):
        refuse_unsupported(3, True, 2)
    refuse_unsupported(3, True, 1)
    refuse_unsupported(2, True, 8)
    refuse_unsupported(3, False, 8)


def test_setup_distributed_is_idempotent_single_process(dist):
    assert dist == setup_distributed()
    assert (dist.rank, dist.local_rank, dist.world_size) == (0, 0, 1)
    if not torch.cuda.is_available():
        assert dist.device == torch.device("cpu") and os.environ["DS_ACCELERATOR"] == "cpu"
        assert torch.distributed.get_backend() == "gloo"


RANK_SCRIPT = '''
import json, sys, torch
from lora_ppo.runtime.dist import setup_distributed, shutdown_distributed
from lora_ppo.runtime.ds_config import fill_ds_config, read_ds_config
from lora_ppo.config.sections import OptimConfig
from lora_ppo.runtime.engine import create_engine

info = setup_distributed()  # the launcher also passed --local_rank=N; env carries the same
raw, source = read_ds_config("zero2")
cfg = fill_ds_config(raw, micro_batch_size=2, grad_accum_steps=1, world_size=info.world_size,
                       max_grad_norm=0.0, precision="fp32", source=source)
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
engine = create_engine(model, ds_config=cfg, optim=OptimConfig(learning_rate=1e-2), total_steps=1)
g = torch.Generator().manual_seed(3)
x, y = torch.randn(4, 4, generator=g), torch.randn(4, 3, generator=g)
mb = slice(2 * info.rank, 2 * info.rank + 2)  # each rank its own half of the batch
engine.backward((engine(x[mb]) - y[mb]).pow(2).sum(-1).mean())
engine.step()
out = dict(rank=info.rank, local_rank=info.local_rank, world_size=info.world_size,
           backend=torch.distributed.get_backend(), weight=model.weight.tolist())
with open(f"{sys.argv[-1]}/rank{info.rank}.json", "w") as f:  # argv: [--local_rank=N, dir]
    json.dump(out, f)
shutdown_distributed()
'''


@pytest.mark.slow
def test_deepspeed_launcher_two_ranks_average_gradients(tmp_path):
    """The real `deepspeed` launcher, 2 CPU ranks on gloo: ZeRO-2 averages the two halves'
    gradients, so both ranks hold the weights of one AdamW step on the full-batch mean loss."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    with socket.socket() as s:  # not DeepSpeed's default 29500: other tests may hold it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = f"{repo}{os.pathsep}{env.get('PYTHONPATH', '')}"
    launcher = Path(sys.executable).parent / "deepspeed"
    proc = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(port),
                           str(script), str(tmp_path)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's CPU all-reduce segments (66 MB a rank in /dev/shm, never unlinked by
    # DeepSpeed itself) went with the run: each rank unlinked its own (runtime/dist.py)
    from lora_ppo.runtime.dist import shm_buffer

    shm_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    assert not [r for r in (0, 1) if os.path.exists(shm_buffer(r, shm_env))]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(o["rank"], o["local_rank"], o["world_size"]) for o in ranks] == [(0, 0, 2), (1, 1, 2)]
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 3)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 4, generator=g), torch.randn(4, 3, generator=g)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    (ref(x) - y).pow(2).sum(-1).mean().backward()
    opt.step()
    for out in ranks:
        if not torch.cuda.is_available():
            assert out["backend"] == "gloo"
        torch.testing.assert_close(torch.tensor(out["weight"]), ref.weight.detach(),
                                   atol=1e-6, rtol=0)


def test_cli_leaves_a_single_process_group_alone(capsys):
    """shutdown_distributed ends only multi-rank runs: in one process, the group (which
    DeepSpeed holds on to) must outlive a CLI command run in-process."""
    from lora_ppo.cli import main

    setup_distributed()
    group = torch.distributed.group.WORLD
    assert main(["estimate", "--config", "demo"]) == 0
    assert torch.distributed.is_initialized() and torch.distributed.group.WORLD is group
    assert shutdown_distributed(3) == 3 and torch.distributed.is_initialized()
