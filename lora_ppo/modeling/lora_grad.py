"""A trainable LoRA linear's forward and backward in fewer, faster passes.

Two changes to how peft's LoRA `Linear` computes x W^T + s (x A^T) B^T, both the same sums (the
same results up to float round-off), both for the trainable adapters only.

**The B weight gradient in the orientation BLAS runs fast.**
A LoRA B is a `Linear(r, out)` on the rank-r output `a` of A. Autograd's `mm` backward writes its
weight gradient as grad^T @ a, a (out, N) x (N, r) product whose first operand is a transposed view
of the (N, out) gradient. MKL runs that shape about 9x slower than the same product taken the
other way round, (a^T @ grad)^T, (r, N) x (N, out): on one core of this project's CPU,
N = 282, out = 2048, r = 8, 1.69 ms against 0.19 ms. Over a PPO update with LoRA on every linear
of a 70M model that was 1.2 s of 12 s, for 2% of its FLOPs.

`lora_b_grads_in_fast_order` gives the trainable adapters' B modules a forward whose backward
takes the fast order. Same sums, so the same gradients up to float round-off. It leaves alone a
weight ZeRO-3 partitions (DeepSpeed gathers and releases it around the module's own forward and
backward) and a B with a bias (peft's `lora_bias`). Under torch autocast (a DeepSpeed config's
`torch_autocast` block) the plain linear runs: autocast casts x and W to its dtype inside
`F.linear` and autograd's own backward differentiates through the casts, where this Function
would multiply the bf16 output gradient by the fp32 weight it saved ("expected m1 and m2 to have
the same dtype"). The fast order is a CPU-BLAS matter; autocast is a GPU one.

**One autograd node per linear** (`fuse_lora_linears`). peft's forward (peft 0.21
tuners/lora/layer.py `Linear.forward`) is `result + lora_B(lora_A(dropout(x))) * scaling`: the
scaling and the sum are two more passes over the (N, out) output in the forward, and in the
backward one more over the (N, out) gradient and one over the (N, in) input gradient (the sum of
the base's and the adapter's). Here the adapter's product is added into the base's output by
one `addmm_` with alpha = s, and the backward forms s (grad @ B) once, (N, r), adding it into
the input gradient the same way. The rank-r products are taken with the r rows first: MKL runs
(N, K) x (K, r) slowly, as it does the B gradient above (on one core, N = 1338, K = 256, r = 8:
x A^T 168 us as `F.linear`, (A x^T)^T 99 us; grad @ B 389 us, (B^T grad^T)^T 100 us). It serves
only where that is all peft's forward does: one active adapter, plain LoRA or rsLoRA (no variant
such as DoRA, no `lora_bias`, no dropout), an `nn.Linear` base with a frozen weight in the
adapter's dtype, no ZeRO-3 partitioning (DeepSpeed gathers weights in the submodules' own hooks),
no autocast, no adapter merged or disabled, no mixed-adapter batch; anything else runs peft's own
forward.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _RankInputLinear(torch.autograd.Function):
    """x @ W^T for x (..., r), W (out, r); the weight gradient as (x^T @ grad)^T."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            g = grad.reshape(-1, grad.shape[-1])
            # contiguous, as autograd's own: DeepSpeed flattens gradients with view(-1)
            grad_w = (x.reshape(-1, x.shape[-1]).t() @ g).t().contiguous()
        return grad_x, grad_w


def _forward(self: nn.Linear, x: Tensor) -> Tensor:
    w = self.weight
    if (not (torch.is_grad_enabled() and w.requires_grad) or hasattr(w, "ds_id")
            or torch.is_autocast_enabled(x.device.type)):
        # no weight gradient, ZeRO-3 owns the weight, or autocast (module doc): plain linear
        return F.linear(x, w)
    return _RankInputLinear.apply(x, w)


class _LoraLinear(torch.autograd.Function):
    """x W^T + b + s (x A^T) B^T for a frozen W (and b), A (r, in) and B (out, r). The rank-r
    products are taken r rows first, (r, K) x (K, N) (module doc)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias, a: Tensor, b: Tensor, s: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        u_t = a @ x2.t()  # (r, N) = (x A^T)^T
        y = F.linear(x, weight, bias)
        y.view(-1, y.shape[-1]).addmm_(u_t.t(), b.t(), alpha=s)
        ctx.save_for_backward(x, weight, a, b, u_t)
        ctx.s = s
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, a, b, u_t = ctx.saved_tensors
        need_x, _, _, need_a, need_b, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        # dL/du transposed, (r, N) = s B^T g^T
        g_u_t = (b.t() @ g.t()).mul_(ctx.s) if need_x or need_a else None
        grad_x = grad_a = grad_b = None
        if need_x:
            grad_x = (g @ weight).addmm_(g_u_t.t(), a).view(x.shape)
        if need_a:
            grad_a = g_u_t @ x.reshape(-1, x.shape[-1])  # (r, N) x (N, in)
        if need_b:  # (r, N) x (N, out), transposed; contiguous for DeepSpeed's flattening
            grad_b = (u_t @ g).t().mul_(ctx.s).contiguous()
        return grad_x, None, None, grad_a, grad_b, None


def _fusable(layer: nn.Module, x: Tensor, adapters: frozenset) -> Optional[str]:
    """The adapter whose LoRA linear `_LoraLinear` computes exactly as peft's forward would, or
    None where peft's own forward must run (module doc)."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [n for n in layer.active_adapters if n in layer.lora_A]
    if len(active) != 1 or active[0] not in adapters or active[0] in layer.lora_variant:
        return None
    name = active[0]
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    dropout = layer.lora_dropout[name]
    if (type(base) is not nn.Linear or getattr(layer, "fan_in_fan_out", False)
            or type(lora_a) is not nn.Linear or lora_a.bias is not None
            or type(lora_b) is not nn.Linear or lora_b.bias is not None
            or not (isinstance(dropout, nn.Identity)
                    or (isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not dropout.training)))
            or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)
            or not x.dtype == base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype
            or torch.is_autocast_enabled(x.device.type)):
        return None
    for m in (base, lora_a, lora_b):
        if hasattr(m.weight, "ds_id") or m._forward_hooks or m._forward_pre_hooks:
            return None
    return name


def _fused_forward(self: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    name = None if args or kwargs else _fusable(self, x, self._fused_adapters)
    if name is None:
        return self._peft_forward(x, *args, **kwargs)
    base = self.base_layer
    return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[name].weight,
                             self.lora_B[name].weight, float(self.scaling[name]))


def fuse_lora_linears(model: nn.Module, adapters: Iterable[str]) -> int:
    """Give peft's LoRA `Linear` layers of `model` holding any of `adapters` the one-node forward
    (module doc) while one of those is active; returns how many layers it changed."""
    from peft.tuners.lora import Linear as LoraLinear

    names = frozenset(adapters)
    changed = 0
    for module in model.modules():
        if type(module) is LoraLinear and names & set(module.lora_A):
            if "_peft_forward" not in module.__dict__:
                module._peft_forward = module.forward
                module.forward = types.MethodType(_fused_forward, module)
            module._fused_adapters = names
            changed += 1
    return changed


def fast_lora_training(model: nn.Module, adapters: Iterable[str]) -> None:
    """Both changes (module doc) for the trainable `adapters` of `model`: the one-node linear
    where it serves, the fast B gradient where peft's own forward runs."""
    adapters = tuple(adapters)
    lora_b_grads_in_fast_order(model, adapters)
    fuse_lora_linears(model, adapters)


def lora_b_grads_in_fast_order(model: nn.Module, adapters: Iterable[str]) -> int:
    """Give the LoRA B modules of `adapters` in `model` the fast weight-gradient order; returns
    how many modules it changed."""
    names = set(adapters)
    changed = 0
    for module in model.modules():
        lora_b = getattr(module, "lora_B", None)
        if not isinstance(lora_b, nn.ModuleDict):
            continue
        for name, b in lora_b.items():
            if name in names and type(b) is nn.Linear and b.bias is None:
                b.forward = types.MethodType(_forward, b)
                changed += 1
    return changed
