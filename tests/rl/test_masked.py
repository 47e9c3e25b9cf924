import pytest
import torch

from lora_ppo.rl.masked import masked_mean, masked_sum, masked_var, masked_whiten

# Real entries are 1, 2 (row 0) and 4 (row 1); 3, 5, 6 are padding.
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_masked_sum_and_mean_by_hand():
    # sum = 1 + 2 + 4 = 7; mean = 7 / 3
    assert masked_sum(X, MASK).item() == 7.0
    assert masked_mean(X, MASK).item() == pytest.approx(7 / 3)
    # per row: sums [3, 4], counts [2, 1] -> means [1.5, 4]
    torch.testing.assert_close(masked_sum(X, MASK, dim=1), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(masked_mean(X, MASK, dim=1), torch.tensor([1.5, 4.0]))


def test_padding_nan_does_not_leak_into_value_or_grad():
    x = X.clone()
    x[0, 2] = float("nan")
    x[1, 1] = float("inf")
    x.requires_grad_(True)
    mean = masked_mean(x, MASK)
    mean.backward()
    assert mean.item() == pytest.approx(7 / 3)
    # d mean / d x = 1/3 on the 3 real entries, 0 on padding
    torch.testing.assert_close(x.grad, MASK / 3)


def test_masked_var_by_hand():
    # values 1, 2, 4; mean 7/3; deviations -4/3, -1/3, 5/3; squares sum 16/9 + 1/9 + 25/9 = 14/3
    # biased = 14/3 / 3 = 14/9; unbiased = 14/3 / 2 = 7/3
    assert masked_var(X, MASK, unbiased=False).item() == pytest.approx(14 / 9)
    assert masked_var(X, MASK).item() == pytest.approx(7 / 3)


def test_masked_var_unbiased_needs_two_tokens():
    with pytest.raises(ValueError, match="at least 2 real tokens"):
        masked_var(X, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_masked_whiten_by_hand():
    # (x - 7/3) / sqrt(7/3): -4/3 / 1.527525 = -0.872872, -1/3 / 1.527525 = -0.218218,
    # 5/3 / 1.527525 = 1.091089; padding comes back 0
    expected = torch.tensor([[-0.872872, -0.218218, 0.0], [1.091089, 0.0, 0.0]])
    torch.testing.assert_close(masked_whiten(X, MASK), expected, atol=1e-6, rtol=0)


def test_masked_whiten_stats_over_valid_entries():
    torch.manual_seed(0)
    x = torch.randn(4, 7) * 3 + 5
    mask = torch.ones(4, 7)
    mask[0, 5:] = 0  # right padding
    mask[2, 1] = 0  # a hole
    mask[3, 2:] = 0
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert (w[mask == 0] == 0).all()

    kept = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-5)
    assert masked_var(kept, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert (kept[mask == 0] == 0).all()


def _on_two_ranks(fn, parts):
    """fn(part, all_sum) run on two threads standing in for two ranks, with an all_sum that
    adds the two threads' tensors (an all-reduce: both wait for each other at every call)."""
    import threading

    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def rank(r):
        def all_sum(t):
            slots[r] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # neither overwrites its slot before the other has read it
            return total

        out[r] = fn(parts[r], all_sum)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_masked_whiten_over_two_ranks_uses_the_whole_batch():
    # rank 0 holds 1, 2 (and padding), rank 1 holds 4, 5. The whole batch: mean 3, squared
    # deviations 4 + 1 + 1 + 4 = 10, unbiased var 10/3, std 1.825742 -> -1.095445, -0.547723,
    # 0.547723, 1.095445. Each rank on its own would give -0.707107, 0.707107 on both.
    x0, m0 = torch.tensor([[1.0, 2.0, 99.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    x1, m1 = torch.tensor([[4.0, 5.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    w0, w1 = _on_two_ranks(lambda p, s: masked_whiten(p[0], p[1], all_sum=s), [(x0, m0), (x1, m1)])
    s = (10 / 3) ** 0.5
    torch.testing.assert_close(w0, torch.tensor([[-2 / s, -1 / s, 0.0]]))
    torch.testing.assert_close(w1, torch.tensor([[1 / s, 2 / s, 0.0]]))
    torch.testing.assert_close(masked_whiten(x0, m0), torch.tensor([[-0.707107, 0.707107, 0.0]]))
    v0, v1 = _on_two_ranks(lambda p, s: masked_var(p[0], p[1], all_sum=s), [(x0, m0), (x1, m1)])
    assert v0.item() == pytest.approx(10 / 3) and v1.item() == pytest.approx(10 / 3)
    # the identity all_sum (one rank) gives what no all_sum gives
    torch.testing.assert_close(masked_whiten(x0, m0, all_sum=lambda t: t), masked_whiten(x0, m0))
