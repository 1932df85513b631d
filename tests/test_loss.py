"""Unit tests: both DFT loss paths against an independent float64 NumPy reference (values and gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dft_loss import IGNORE_INDEX, check_dft_alpha, dft_loss_from_logits, metrics_from_stats, shift_labels
from dft_loss_chunked import dft_loss_from_hidden

ALPHAS = [0.0, 0.3, 0.7, 1.0]


def reference(logits: np.ndarray, labels: np.ndarray, alpha: float, n_items: float | None = None):
    """float64 NumPy DFT loss and its analytic gradient wrt the logits (no autograd involved).

    logits (B, T, V), labels (B, T) unshifted. Returns (loss, dloss/dlogits (B, T, V), stats dict).
    """
    logits = logits.astype(np.float64)
    targets = np.concatenate([labels[:, 1:], np.full((labels.shape[0], 1), IGNORE_INDEX)], axis=1)
    grad = np.zeros_like(logits)
    mask = targets != IGNORE_INDEX
    n = mask.sum() if n_items is None else n_items
    n = max(n, 1)
    total, ce_sum, p_sum, correct = 0.0, 0.0, 0.0, 0
    for b, t in zip(*np.nonzero(mask)):
        z = logits[b, t]
        shifted = z - z.max()
        log_sum = np.log(np.exp(shifted).sum())
        ce = -(shifted[targets[b, t]] - log_sum)
        p = np.exp(-ce)
        w = alpha * p + 1 - alpha
        total += w * ce
        ce_sum += ce
        p_sum += p
        correct += int(np.argmax(z) == targets[b, t])
        softmax = np.exp(shifted - log_sum)
        onehot = np.zeros_like(z)
        onehot[targets[b, t]] = 1.0
        grad[b, t] = w * (softmax - onehot) / n
    stats = {"tokens": int(mask.sum()), "ce_sum": ce_sum, "p_sum": p_sum, "correct": correct, "dft_sum": total}
    return total / n, grad, stats


def random_batch(seed: int, batch=3, length=7, vocab=11, ignore_fraction=0.3):
    """Logits with very confident rows (scaled x40), near-uniform rows (x0.01) and ordinary ones."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, length, vocab))
    scale = rng.choice([40.0, 0.01, 1.0], size=(batch, length, 1))
    logits = logits * scale
    labels = rng.integers(0, vocab, size=(batch, length))
    labels[rng.random((batch, length)) < ignore_fraction] = IGNORE_INDEX
    # Make some confident rows confidently right (p ~ 1) so both extremes of p are covered.
    for b in range(batch):
        for t in range(length - 1):
            if scale[b, t, 0] == 40.0 and labels[b, t + 1] != IGNORE_INDEX and rng.random() < 0.5:
                logits[b, t, labels[b, t + 1]] = np.abs(logits[b, t]).max() + 5.0
    return logits, labels


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_loss_matches_float64_reference(alpha, seed):
    logits_np, labels_np = random_batch(seed)
    logits = torch.tensor(logits_np, dtype=torch.float32, requires_grad=True)
    out = dft_loss_from_logits(logits, torch.tensor(labels_np), alpha)
    out.loss.backward()
    ref_loss, ref_grad, ref_stats = reference(logits_np.astype(np.float32), labels_np, alpha)
    assert out.loss.dtype == torch.float32
    np.testing.assert_allclose(out.loss.item(), ref_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(logits.grad.numpy(), ref_grad, rtol=1e-4, atol=1e-6)
    stats = out.stats.tolist()
    assert stats[0] == ref_stats["tokens"]
    np.testing.assert_allclose(stats[1:], [ref_stats["dft_sum"], ref_stats["ce_sum"], ref_stats["p_sum"], ref_stats["correct"]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_float64_inputs_match_reference_tightly(alpha):
    logits_np, labels_np = random_batch(5)
    logits = torch.tensor(logits_np, dtype=torch.float64, requires_grad=True)
    out = dft_loss_from_logits(logits, torch.tensor(labels_np), alpha)
    out.loss.backward()
    ref_loss, ref_grad, _ = reference(logits_np.astype(np.float32), labels_np, alpha)
    # The loss math is fp32 by design, so compare at fp32 precision even for float64 logits.
    np.testing.assert_allclose(out.loss.item(), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(logits.grad.numpy(), ref_grad, rtol=1e-4, atol=1e-6)


def test_alpha_zero_is_plain_cross_entropy_exactly():
    logits_np, labels_np = random_batch(3)
    logits = torch.tensor(logits_np, dtype=torch.float32)
    labels = torch.tensor(labels_np)
    out = dft_loss_from_logits(logits, labels, 0.0)
    targets = shift_labels(labels)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.equal(out.loss, expected) or abs(out.loss.item() - expected.item()) <= 1e-7 * abs(expected.item())


def test_bf16_logits_are_upcast_and_close_to_fp32():
    logits_np, labels_np = random_batch(4)
    labels = torch.tensor(labels_np)
    bf16 = torch.tensor(logits_np, dtype=torch.bfloat16)
    out_bf16 = dft_loss_from_logits(bf16, labels, 1.0)
    out_fp32 = dft_loss_from_logits(bf16.float(), labels, 1.0)
    assert out_bf16.loss.dtype == torch.float32
    assert out_bf16.loss.item() == pytest.approx(out_fp32.loss.item(), rel=1e-6)


@pytest.mark.parametrize("path", ["full", "chunked"])
def test_all_masked_micro_batch_adds_exact_zero_and_keeps_graph(path):
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[:, 0] = 3  # position 0 is never a target after the shift: still nothing supervised
    if path == "full":
        out = dft_loss_from_logits(hidden @ weight.t(), labels, 1.0, num_items_in_batch=17)
    else:
        out = dft_loss_from_hidden(hidden, weight, labels, 1.0, num_items_in_batch=17)
    assert out.loss.item() == 0.0
    assert out.loss.requires_grad
    out.loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0 and not torch.isnan(hidden.grad).any()
    assert torch.count_nonzero(weight.grad) == 0 and not torch.isnan(weight.grad).any()
    assert out.stats[0].item() == 0
    assert metrics_from_stats(out.stats) == {}


def test_whole_step_without_tokens_is_zero_not_nan():
    logits = torch.randn(1, 4, 6, requires_grad=True)
    labels = torch.full((1, 4), IGNORE_INDEX)
    out = dft_loss_from_logits(logits, labels, 0.5, num_items_in_batch=0)
    assert out.loss.item() == 0.0


def test_num_items_in_batch_sets_the_normaliser():
    logits_np, labels_np = random_batch(6)
    logits = torch.tensor(logits_np, dtype=torch.float32)
    labels = torch.tensor(labels_np)
    local = dft_loss_from_logits(logits, labels, 0.7)
    tokens = int(local.stats[0].item())
    scaled = dft_loss_from_logits(logits, labels, 0.7, num_items_in_batch=torch.tensor(4 * tokens))
    assert scaled.loss.item() == pytest.approx(local.loss.item() / 4, rel=1e-6)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunked_matches_reference_and_full(alpha, chunk_size):
    rng = np.random.default_rng(11)
    batch, length, hidden_size, vocab = 3, 8, 6, 13
    hidden_np = rng.normal(size=(batch, length, hidden_size)) * rng.choice([8.0, 0.01, 1.0], size=(batch, length, 1))
    weight_np = rng.normal(size=(vocab, hidden_size))
    bias_np = rng.normal(size=(vocab,))
    labels_np = rng.integers(0, vocab, size=(batch, length))
    labels_np[rng.random((batch, length)) < 0.3] = IGNORE_INDEX
    labels = torch.tensor(labels_np)

    def leaves():
        return (
            torch.tensor(hidden_np, dtype=torch.float32, requires_grad=True),
            torch.tensor(weight_np, dtype=torch.float32, requires_grad=True),
            torch.tensor(bias_np, dtype=torch.float32, requires_grad=True),
        )

    h_c, w_c, b_c = leaves()
    chunked = dft_loss_from_hidden(h_c, w_c, labels, alpha, num_items_in_batch=40, lm_head_bias=b_c, chunk_size=chunk_size)
    chunked.loss.backward()
    h_f, w_f, b_f = leaves()
    full = dft_loss_from_logits(h_f @ w_f.t() + b_f, labels, alpha, num_items_in_batch=40)
    full.loss.backward()

    logits_np = (hidden_np.astype(np.float32) @ weight_np.astype(np.float32).T + bias_np.astype(np.float32))
    ref_loss, ref_grad_logits, _ = reference(logits_np, labels_np, alpha, n_items=40)
    np.testing.assert_allclose(chunked.loss.item(), ref_loss, rtol=1e-5)
    # Chain rule through the linear head, in float64.
    ref_grad_hidden = ref_grad_logits @ weight_np
    ref_grad_weight = np.einsum("btv,bth->vh", ref_grad_logits, hidden_np)
    ref_grad_bias = ref_grad_logits.sum(axis=(0, 1))
    np.testing.assert_allclose(h_c.grad.numpy(), ref_grad_hidden, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(w_c.grad.numpy(), ref_grad_weight, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b_c.grad.numpy(), ref_grad_bias, rtol=1e-4, atol=1e-6)
    # And the two paths agree with each other at fp32 precision: loss, metrics, gradients.
    assert chunked.loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
    np.testing.assert_allclose(chunked.stats.numpy(), full.stats.numpy(), rtol=1e-5)
    for a, b in [(h_c, h_f), (w_c, w_f), (b_c, b_f)]:
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_chunked_loss_scales_with_upstream_gradient():
    hidden = torch.randn(2, 6, 4, requires_grad=True)
    weight = torch.randn(7, 4)
    labels = torch.randint(0, 7, (2, 6))
    out = dft_loss_from_hidden(hidden, weight, labels, 1.0)
    (3.0 * out.loss).backward()
    grad3 = hidden.grad.clone()
    hidden.grad = None
    dft_loss_from_hidden(hidden, weight, labels, 1.0).loss.backward()
    torch.testing.assert_close(grad3, 3.0 * hidden.grad)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_dft_alpha_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match="--dft_alpha"):
        check_dft_alpha(bad)


def test_metrics_are_ratios_of_sums():
    stats = torch.tensor([4.0, 2.0, 8.0, 3.0, 1.0], dtype=torch.float64)
    metrics = metrics_from_stats(stats, prefix="eval_")
    assert metrics == {"eval_avg_p_correct": 0.75, "eval_ce_loss": 2.0, "eval_token_accuracy": 0.25, "eval_dft_loss": 0.5}


def test_chunked_under_no_grad_builds_no_gradient_and_keeps_the_value():
    hidden = torch.randn(2, 6, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    labels = torch.randint(0, 9, (2, 6))
    with torch.no_grad():
        evaluated = dft_loss_from_hidden(hidden, weight, labels, 0.7)
    trained = dft_loss_from_hidden(hidden, weight, labels, 0.7)
    assert not evaluated.loss.requires_grad
    assert evaluated.loss.item() == pytest.approx(trained.loss.item(), rel=1e-7)


def test_chunked_16bit_head_matches_the_autocast_lm_head():
    """fp32 weights under --bf16 autocast: the model's lm_head computes bf16 logits; so must the chunks."""
    hidden = torch.randn(2, 16, 8)
    weight = torch.randn(50, 8) * 0.3
    labels = torch.randint(0, 50, (2, 16))
    labels[:, :3] = IGNORE_INDEX
    h_full, w_full = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = (h_full.bfloat16() @ w_full.bfloat16().t())  # what autocast's lm_head produces
    full = dft_loss_from_logits(logits, labels, 1.0)
    full.loss.backward()
    h_c, w_c = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    chunked = dft_loss_from_hidden(h_c, w_c, labels, 1.0, chunk_size=5, matmul_dtype=torch.bfloat16)
    chunked.loss.backward()
    assert chunked.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)
    assert w_c.grad.dtype == torch.float32 and h_c.grad.dtype == torch.float32
    torch.testing.assert_close(h_c.grad, h_full.grad, rtol=2e-2, atol=1e-3)  # bf16 products, summed differently
    torch.testing.assert_close(w_c.grad, w_full.grad, rtol=2e-2, atol=1e-3)


def test_chunked_is_refused_where_it_cannot_be_exact(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from dft_loss_chunked import chunked_unsupported_reason, resolve_loss_impl

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert chunked_unsupported_reason(model) is None
    assert resolve_loss_impl("auto", model) == "full"  # small vocabulary, no GPU
    with pytest.raises(ValueError, match="DataParallel"):
        resolve_loss_impl("chunked", model, n_gpu=2)
    with pytest.raises(ValueError, match="--fp16"):
        resolve_loss_impl("chunked", model, fp16=True)
    model.config.final_logit_softcapping = 30.0
    assert "soft-caps" in chunked_unsupported_reason(model)
    with pytest.raises(ValueError, match="--loss_impl chunked: model type 'qwen2' scales or soft-caps"):
        resolve_loss_impl("chunked", model)
