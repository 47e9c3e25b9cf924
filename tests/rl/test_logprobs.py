import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lora_ppo.rl.logprobs import (
    ENTROPY_BLOCKS,
    LogitsTransform,
    logprobs_and_entropy_from_hidden,
    logprobs_from_logits,
    transform_logits,
)

REPO = Path(__file__).resolve().parents[2]


def naive_logprobs_entropy(logits, tokens, temperature=1.0):
    """The full (B, T, V) log_softmax the chunked code must reproduce."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    logprobs = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_from_logits_matches_log_softmax(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    tokens = torch.randint(11, (3, 5), generator=g)
    expected, _ = naive_logprobs_entropy(logits, tokens, temperature)
    # chunk 4 does not divide B*T = 15: the last chunk is short
    got = logprobs_from_logits(logits, tokens, temperature=temperature, chunk_size=4)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_logprobs_from_logits_grad_matches_naive():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 6, 13, generator=g) * 2).requires_grad_(True)
    tokens = torch.randint(13, (2, 6), generator=g)
    weights = torch.randn(2, 6, generator=g)
    (naive_grad,) = torch.autograd.grad(
        (naive_logprobs_entropy(logits, tokens, 0.8)[0] * weights).sum(), logits
    )
    (grad,) = torch.autograd.grad(
        (logprobs_from_logits(logits, tokens, 0.8, chunk_size=5) * weights).sum(), logits
    )
    torch.testing.assert_close(grad, naive_grad, atol=1e-6, rtol=0)


def _head_and_inputs(seed=0, B=3, T=5, H=8, V=17):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        head.bias.copy_(torch.randn(V, generator=g))
    hidden = torch.randn(B, T, H, generator=g).requires_grad_(True)
    tokens = torch.randint(V, (B, T), generator=g)
    return head, hidden, tokens, g


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hidden_version_values_and_grads_match_naive(temperature):
    head, hidden, tokens, g = _head_and_inputs()
    w_lp, w_ent = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    params = [hidden, head.weight, head.bias]

    lp_ref, ent_ref = naive_logprobs_entropy(head(hidden), tokens, temperature)
    grads_ref = torch.autograd.grad((lp_ref * w_lp + ent_ref * w_ent).sum(), params)

    lp, ent = logprobs_and_entropy_from_hidden(
        hidden, head, tokens, temperature=temperature, chunk_size=4
    )
    grads = torch.autograd.grad((lp * w_lp + ent * w_ent).sum(), params)

    torch.testing.assert_close(lp, lp_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=0)
    # The head's weight gradient sums 15 rows of randn-sized products (|grad| up to ~50): fp32
    # summation order alone moves it by ~1e-5 between the chunked and the naive computation.
    for got, ref in zip(grads, grads_ref):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("transform", [LogitsTransform(), LogitsTransform(scale=0.25),
                                       LogitsTransform(scale=2.0, softcap=3.0)])
@pytest.mark.parametrize("chunk", [4, 5, 15])
def test_frozen_head_makes_the_hidden_grad_in_the_forward(transform, chunk):
    # A frozen head (the LM head under LoRA): d log p / d hidden is made in the forward, chunk by
    # chunk; values, entropy and the hidden states' gradient equal autograd's through the
    # naive log_softmax (every transform: scale, soft-cap, temperature; chunks that do or do not
    # divide B*T, and one that holds every row, which keeps its buffer instead; a bias).
    head, hidden, tokens, g = _head_and_inputs(seed=4)
    head.requires_grad_(False)
    w_lp = torch.randn(3, 5, generator=g)
    z = transform_logits(head(hidden), 0.7, transform)
    lp_ref = z.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ent_ref = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    (grad_ref,) = torch.autograd.grad((lp_ref * w_lp).sum(), hidden)

    lp, ent = logprobs_and_entropy_from_hidden(
        hidden, head, tokens, temperature=0.7, chunk_size=chunk, entropy_grad=False,
        transform=transform, frozen_weight=head.weight)
    (grad,) = torch.autograd.grad((lp * w_lp).sum(), hidden)
    torch.testing.assert_close(lp, lp_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, ent_ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-5)
    assert not ent.requires_grad

    # the general path (the head's logits kept or made again) gives the same numbers
    lp2, _ = logprobs_and_entropy_from_hidden(
        hidden, head, tokens, temperature=0.7, chunk_size=chunk, entropy_grad=False,
        transform=transform)
    (grad2,) = torch.autograd.grad((lp2 * w_lp).sum(), hidden)
    torch.testing.assert_close(lp, lp2, atol=0, rtol=0)
    torch.testing.assert_close(grad, grad2, atol=1e-5, rtol=1e-5)


def test_frozen_head_in_bf16_matches_the_general_path():
    # bf16 head and states (DeepSpeed's bf16): the fused gradient is made from the fp32
    # softmax cast to bf16, as the general path's backward casts its fp32 gradient
    head, hidden, tokens, g = _head_and_inputs(seed=5)
    head = head.to(torch.bfloat16).requires_grad_(False)
    hidden = hidden.detach().to(torch.bfloat16).requires_grad_(True)
    w_lp = torch.randn(3, 5, generator=g)
    out = {}
    for name, weight in (("fused", head.weight), ("general", None)):
        lp, _ = logprobs_and_entropy_from_hidden(hidden, head, tokens, chunk_size=4,
                                                 entropy_grad=False, frozen_weight=weight)
        (grad,) = torch.autograd.grad((lp * w_lp).sum(), hidden)
        out[name] = lp, grad
    assert out["fused"][1].dtype == torch.bfloat16
    torch.testing.assert_close(out["fused"][0], out["general"][0], atol=0, rtol=0)
    torch.testing.assert_close(out["fused"][1].float(), out["general"][1].float(), atol=0.05,
                               rtol=0.02)


def test_hidden_version_without_entropy_and_without_grad():
    head, hidden, tokens, _ = _head_and_inputs(seed=2)
    lp_ref, _ = naive_logprobs_entropy(head(hidden), tokens)
    with torch.no_grad():
        lp, ent = logprobs_and_entropy_from_hidden(hidden, head, tokens, with_entropy=False)
    assert ent is None and not lp.requires_grad
    torch.testing.assert_close(lp, lp_ref.detach(), atol=1e-6, rtol=0)


def test_hidden_version_casts_low_precision_logits_to_float32():
    head, hidden, tokens, _ = _head_and_inputs(seed=3)
    head = head.to(torch.bfloat16)
    hidden = hidden.detach().to(torch.bfloat16)
    lp, ent = logprobs_and_entropy_from_hidden(hidden, head, tokens, chunk_size=4)
    lp_ref, ent_ref = naive_logprobs_entropy(head(hidden), tokens)  # bf16 logits, fp32 softmax
    assert lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp, lp_ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ent_ref.detach(), atol=1e-5, rtol=0)


# Peak extra resident memory of one forward + backward, measured in a fresh process.
# MALLOC_MMAP_THRESHOLD_ makes glibc serve every allocation >= 64 KiB with its own mmap and unmap
# it on free, so resident memory tracks live tensors; writing 5 to /proc/self/clear_refs resets the
# peak (VmHWM) right before the measured step.
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    import torch
    from lora_ppo.rl.logprobs import logprobs_and_entropy_from_hidden

    def status(key):
        text = open("/proc/self/status").read()
        return int(re.search(key + r":\\s+(\\d+)", text).group(1)) * 1024

    mode, N, H, V, chunk = sys.argv[1], *map(int, sys.argv[2:])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(1, N, H, requires_grad=True)
    tokens = torch.randint(V, (1, N))

    def naive(h, tok):
        logp = torch.log_softmax(head(h).float(), dim=-1)
        return logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)

    def chunked(h, tok, chunk):
        return logprobs_and_entropy_from_hidden(h, head, tok, chunk_size=chunk)

    def metric_entropy(h, tok, chunk):  # PPO's default (ent_coef=0): the entropy is a metric
        lp, ent = logprobs_and_entropy_from_hidden(h, head, tok, chunk_size=chunk,
                                                   entropy_grad=False)
        return lp, ent * 0

    def frozen(h, tok, chunk):  # a frozen head (LoRA on the decoder): the grad in the forward
        lp, ent = logprobs_and_entropy_from_hidden(h, head, tok, chunk_size=chunk,
                                                   entropy_grad=False, frozen_weight=head.weight)
        return lp, ent * 0

    if mode == "frozen":
        head.requires_grad_(False)

    def step(h, tok, chunk):
        fn = {"naive": lambda h, t, c: naive(h, t), "chunked": chunked,
              "metric_entropy": metric_entropy, "frozen": frozen}[mode]
        logprobs, entropy = fn(h, tok, chunk)
        (logprobs.sum() + entropy.sum()).backward()

    # Warm up kernels, thread pools and both chunked paths (one chunk; several, checkpointed:
    # torch.utils.checkpoint's first use costs ~74 MB once, which is not a buffer of ours).
    for rows in (40, 8):
        step(hidden[:, :40], tokens[:, :40], rows)
    head.weight.grad = hidden.grad = None
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step(hidden, tokens, chunk)
    print(json.dumps({"extra_bytes": status("VmHWM") - before}))
    """
)


def _peak_extra_bytes(mode, N, H, V, chunk):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, mode, str(N), str(H), str(V), str(chunk)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "clear_refs" in proc.stderr and proc.returncode != 0:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])["extra_bytes"]


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_chunked_scoring_memory_stays_far_below_full_logits():
    # B*T = 2048 tokens, V = 32000: one float32 (B*T, V) tensor is 2048 * 32000 * 4 B = 262 MB.
    N, H, V = 2048, 16, 32000
    full_logits_bytes = N * V * 4
    naive = _peak_extra_bytes("naive", N, H, V, 0)
    # chunk 16: one (16, V) float32 chunk is 2 MB; a few of them plus the (V, H) weight grad
    chunked = _peak_extra_bytes("chunked", N, H, V, 16)
    # The naive version holds logits, log_softmax, its exp and their grads: several x 262 MB.
    # This shows the measurement sees full-size logits, so the bound below can fail.
    assert naive > full_logits_bytes, (naive, full_logits_bytes)
    assert chunked < full_logits_bytes / 8, (chunked, full_logits_bytes / 8)


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("chunk", [2048, 512])
def test_scoring_without_entropy_grad_holds_one_logits_buffer(chunk):
    # The update's path when ent_coef=0: the logits are reduced and, in backward, turned into
    # their own gradient in place. One chunk of all 2048 rows (kept for the backward) or four
    # of 512 (made again in backward): one (chunk, V) float32 buffer at the peak, plus the
    # entropy metric's temporary (an eighth of it, rl/logprobs.py::_entropy_of), the head's
    # weight gradient (V, H) and the hidden states' (N, H); autograd's log_softmax + gather
    # (entropy_grad=True) holds about five buffers.
    N, H, V = 2048, 16, 32000
    buffer = chunk * V * 4
    ours = buffer * (1 + 1 / ENTROPY_BLOCKS) + (V * H + 2 * N * H) * 4
    one_buffer = _peak_extra_bytes("metric_entropy", N, H, V, chunk)
    autograd = _peak_extra_bytes("chunked", N, H, V, chunk)
    assert autograd > 3 * buffer, (autograd, buffer)  # the measurement sees the temporaries
    # What the process holds beyond our buffers (allocator pages, thread stacks) is bounded by
    # a 4 MiB slack, not by a share of the buffer that a library release can cross.
    assert one_buffer < ours + 4 * 2**20, (one_buffer, ours)


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_frozen_head_holds_one_chunk_in_the_forward_only():
    # A frozen head's chunk lives in the forward only (its gradient to the hidden states is made
    # there): 2048 rows in chunks of 512 peak at one 512-row buffer and the entropy metric's
    # temporary, plus the (N, H) gradients, whatever the number of chunks; no (V, H) weight grad.
    N, H, V, chunk = 2048, 16, 32000, 512
    buffer = chunk * V * 4
    ours = buffer * (1 + 1 / ENTROPY_BLOCKS) + 3 * N * H * 4
    frozen = _peak_extra_bytes("frozen", N, H, V, chunk)
    whole = _peak_extra_bytes("frozen", N, H, V, N)  # one chunk of every row: 4x the buffer
    assert whole > 3 * buffer, (whole, buffer)  # the measurement sees the buffer
    assert frozen < ours + 4 * 2**20, (frozen, ours)
