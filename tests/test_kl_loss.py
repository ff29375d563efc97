"""The fused, chunked forward-KL loss equals the naive kl_div loss in value and gradient."""

import pytest
import torch

from nemo_plugins.distill.kl_loss import KLOptions, fused_kl_loss, naive_kl_loss
from nemo_plugins.errors import ConfigError


def problem(tokens=37, hidden=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g, dtype=torch.float64).float()
    w = torch.randn(vocab, hidden, generator=g) * 0.5
    teacher = torch.randn(tokens, vocab, generator=g) * 2
    mask = (torch.rand(tokens, generator=g) > 0.2).float()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    return h, w, teacher, mask, labels


@pytest.mark.parametrize(
    "options",
    [KLOptions(chunk_tokens=8), KLOptions(chunk_tokens=1000), KLOptions(temperature=2.0, chunk_tokens=5),
     KLOptions(ce_weight=0.25, chunk_tokens=7), KLOptions(ce_weight=0.5, temperature=1.5, chunk_tokens=7),
     KLOptions(reverse=True, chunk_tokens=6)],
    ids=["chunked", "one-chunk", "temperature", "ce-mix", "ce-mix-temperature", "reverse"],
)
def test_fused_equals_naive_in_value_and_gradient(options):
    h, w, teacher, mask, labels = problem()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    fused = fused_kl_loss(h1, w1, teacher, mask, labels, options)
    naive = naive_kl_loss(h2 @ w2.T, teacher, mask, labels, options)
    (fused * 3.0).backward()
    (naive * 3.0).backward()
    assert abs(fused.item() - naive.item()) <= 1e-5
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_sum_reduction_is_the_naive_sum_over_targets_in_value_and_gradient():
    """What the training step hands megatron: sum over unmasked tokens (naive mean x target count), whatever the
    chunking; the sums of two token ranges add up to the sum of both."""
    h, w, teacher, mask, labels = problem()
    options = KLOptions(ce_weight=0.25, chunk_tokens=7)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    fused = fused_kl_loss(h1, w1, teacher, mask, labels, options, reduction="sum")
    naive = naive_kl_loss(h2 @ w2.T, teacher, mask, labels, options) * mask.sum()
    fused.backward()
    naive.backward()
    assert fused.item() == pytest.approx(naive.item(), rel=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)
    halves = [fused_kl_loss(h[rows], w, teacher[rows], mask[rows], labels[rows], options, reduction="sum")
              for rows in (slice(0, 20), slice(20, None))]
    assert sum(halves).item() == pytest.approx(fused.item(), rel=1e-6)


def test_masked_tokens_do_not_contribute():
    h, w, teacher, mask, labels = problem()
    mask[:10] = 0
    changed = teacher.clone()
    changed[:10] += 5.0
    unchanged = fused_kl_loss(h, w, teacher, mask).item()
    assert unchanged == pytest.approx(fused_kl_loss(h, w, changed, mask).item(), abs=1e-7)


def test_identical_distributions_give_zero():
    h, w, _, mask, _ = problem()
    assert fused_kl_loss(h, w, h @ w.T, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_vocab_mismatch_is_named():
    h, w, teacher, mask, _ = problem()
    with pytest.raises(ConfigError, match="same vocabulary"):
        fused_kl_loss(h, w, teacher[:, :-1], mask)


def test_fused_teacher_equals_dense_teacher_logits():
    from nemo_plugins.distill.kl_loss import DenseTeacher, FusedTeacher

    h, w, _, mask, _ = problem()
    g = torch.Generator().manual_seed(3)
    teacher_hidden = torch.randn(h.shape[0], 24, generator=g)
    teacher_weight = torch.randn(w.shape[0], 24, generator=g) * 0.5
    losses, grads = [], []
    for teacher in (DenseTeacher(teacher_hidden @ teacher_weight.T), FusedTeacher(teacher_hidden, teacher_weight)):
        student = h.clone().requires_grad_()
        loss = fused_kl_loss(student, w, teacher, mask, options=KLOptions(chunk_tokens=6))
        loss.backward()
        losses.append(loss.item())
        grads.append(student.grad)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_cpu_chunks_stay_under_the_allocator_block_limit_and_still_equal_the_naive_loss():
    from nemo_plugins.distill.kl_loss import CPU_BLOCK_BYTES, chunk_rows

    assert chunk_rows(256, 49152, torch.device("cpu")) == 128
    assert chunk_rows(256, 49152, torch.device("cuda")) == 256, "GPUs keep the configured chunk"
    assert chunk_rows(8, 50, torch.device("cpu")) == 8
    vocab = CPU_BLOCK_BYTES // (4 * 7)  # 7 rows per chunk on the CPU although 1,000 are asked for
    h, w, _, mask, labels = problem(tokens=23, vocab=50)
    w = torch.randn(vocab, h.shape[1], generator=torch.Generator().manual_seed(1)) * 0.5
    teacher = torch.randn(23, vocab, generator=torch.Generator().manual_seed(2))
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    fused = fused_kl_loss(h1, w1, teacher, mask, None, KLOptions(chunk_tokens=1000))
    naive = naive_kl_loss(h2 @ w2.T, teacher, mask)
    fused.backward()
    naive.backward()
    assert abs(fused.item() - naive.item()) <= 1e-4 * abs(naive.item())
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-5)
