"""Unit tests: the loss family on both paths against an independent float64 reference (values,
gradients and metric sums), for every loss type."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dftune.loss.chunked import dft_loss_from_hidden
from dftune.loss.core import IGNORE_INDEX, STAT_FIELDS, LossSpec, check_dft_alpha, dft_loss_from_logits, metrics_from_stats, shift_labels

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

ALPHAS = [0.0, 0.3, 0.7, 1.0]
SPECS = {
    "dft": LossSpec(),
    "dft_alpha0.3_floor0.2": LossSpec(dft_alpha=0.3, min_weight=0.2),
    "dft_floor0.5": LossSpec(min_weight=0.5),
    "sft": LossSpec(loss_type="sft", dft_alpha=0.0),
    "asft_forward": LossSpec(loss_type="asft", anchor_kl_coef=0.5),
    "asft_reverse_alpha0.6": LossSpec(loss_type="asft", dft_alpha=0.6, anchor_kl_coef=0.3, anchor_kl_direction="reverse"),
    "eaft_k5": LossSpec(loss_type="eaft", eaft_top_k=5),
    "eaft_k20_power2_alpha0.5": LossSpec(loss_type="eaft", eaft_top_k=20, eaft_power=2.0, dft_alpha=0.5),
}


def reference_terms(logits, labels, spec: LossSpec, ref_logits=None, n_items: float | None = None):
    """float64, one token at a time, written from the definitions (README "Which loss when"), autograd
    for the gradient. logits, ref_logits: (B, T, V) arrays; labels (B, T) unshifted.

    Returns (loss, dloss/dlogits (B, T, V), stats dict keyed by STAT_FIELDS).
    """
    z_all = torch.tensor(np.asarray(logits, dtype=np.float64), requires_grad=True)
    ref_all = torch.tensor(np.asarray(ref_logits, dtype=np.float64)) if ref_logits is not None else None
    labels = np.asarray(labels)
    targets = np.concatenate([labels[:, 1:], np.full((labels.shape[0], 1), IGNORE_INDEX)], axis=1)
    positions = list(zip(*np.nonzero(targets != IGNORE_INDEX)))
    n = max(len(positions) if n_items is None else n_items, 1)
    total = z_all.sum() * 0.0
    stats = dict.fromkeys(STAT_FIELDS, 0.0)
    for b, t in positions:
        z, y = z_all[b, t], int(targets[b, t])
        log_p = torch.log_softmax(z, dim=-1)
        ce = -log_p[y]
        p = float(torch.exp(-ce.detach()))
        if spec.loss_type == "eaft":
            k = min(spec.eaft_top_k, z.numel())
            top = np.sort(z.detach().numpy())[::-1][:k]
            q = np.exp(top - top.max()) / np.exp(top - top.max()).sum()
            signal = (-(q * np.log(q)).sum() / math.log(k)) ** spec.eaft_power
        else:
            signal = p
        alpha = 0.0 if spec.loss_type == "sft" else spec.dft_alpha
        weight = max(alpha * signal + 1 - alpha, spec.min_weight)
        term = weight * ce
        kl = 0.0
        if spec.anchored:
            log_q = torch.log_softmax(ref_all[b, t], dim=-1)
            if spec.anchor_kl_direction == "forward":
                kl_t = (log_q.exp() * (log_q - log_p)).sum()
            else:
                kl_t = (log_p.exp() * (log_p - log_q)).sum()
            term = term + spec.anchor_kl_coef * kl_t
            kl = float(kl_t.detach())
        total = total + term
        probs = log_p.exp().detach().numpy()
        stats["tokens"] += 1
        stats["dft_loss_sum"] += float(term.detach())
        stats["ce_sum"] += float(ce.detach())
        stats["p_sum"] += p
        stats["correct"] += float(int(np.argmax(z.detach().numpy())) == y)
        stats["entropy_sum"] += float(-(probs * log_p.detach().numpy()).sum())
        stats["low_p_count"] += float(p < 0.1)
        stats["anchor_kl_sum"] += kl
    loss = total / n
    loss.backward()
    return float(loss.detach()), z_all.grad.numpy(), stats


def reference(logits, labels, alpha: float, n_items: float | None = None):
    """The plain DFT reference (kept for the tests written against it)."""
    loss, grad, stats = reference_terms(logits, labels, LossSpec(dft_alpha=alpha), n_items=n_items)
    return loss, grad, {"tokens": int(stats["tokens"]), "ce_sum": stats["ce_sum"], "p_sum": stats["p_sum"],
                        "correct": stats["correct"], "dft_sum": stats["dft_loss_sum"]}


def assert_stats_match(actual: torch.Tensor, expected: dict, rtol=1e-5, atol=1e-6) -> None:
    np.testing.assert_allclose(actual.numpy(), [expected[name] for name in STAT_FIELDS], rtol=rtol, atol=atol)


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
    np.testing.assert_allclose(stats[1:5], [ref_stats["dft_sum"], ref_stats["ce_sum"], ref_stats["p_sum"], ref_stats["correct"]], rtol=1e-5, atol=1e-6)


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
    stats = torch.tensor([4.0, 2.0, 8.0, 3.0, 1.0, 6.0, 2.0, 0.4], dtype=torch.float64)
    metrics = metrics_from_stats(stats, prefix="eval_")
    assert metrics == {"eval_avg_p_correct": 0.75, "eval_ce_loss": 2.0, "eval_token_accuracy": 0.25, "eval_dft_loss": 0.5,
                       "eval_entropy": 1.5, "eval_low_p_share": 0.5}
    assert metrics_from_stats(stats, anchored=True)["anchor_kl"] == pytest.approx(0.1)


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

    from dftune.loss.chunked import chunked_unsupported_reason, resolve_loss_impl

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


# ---- the loss family: every variant, both paths --------------------------------------------------
def family_batch(seed: int, batch=3, length=9, hidden_size=6, vocab=13):
    """Hidden states (confident, near-uniform and ordinary rows), an LM head with bias, labels with
    ignored positions, and a reference head near the policy's (so the KL is small but not zero)."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(batch, length, hidden_size)) * rng.choice([8.0, 0.01, 1.0], size=(batch, length, 1))
    weight = rng.normal(size=(vocab, hidden_size))
    bias = rng.normal(size=(vocab,))
    ref_weight = weight + 0.3 * rng.normal(size=weight.shape)
    ref_bias = bias + 0.3 * rng.normal(size=bias.shape)
    labels = rng.integers(0, vocab, size=(batch, length))
    labels[rng.random((batch, length)) < 0.3] = IGNORE_INDEX
    return hidden, weight, bias, ref_weight, ref_bias, labels


def f32(array, grad=False):
    return torch.tensor(np.asarray(array, dtype=np.float32), requires_grad=grad)


@pytest.mark.parametrize("name", list(SPECS))
def test_full_path_matches_float64_reference_for_every_loss_type(name):
    spec = SPECS[name]
    hidden, weight, bias, ref_weight, ref_bias, labels = family_batch(1)
    logits_np = (hidden @ weight.T + bias).astype(np.float32)
    ref_np = (hidden @ ref_weight.T + ref_bias).astype(np.float32)
    logits, ref_logits = f32(logits_np, grad=True), f32(ref_np)
    out = dft_loss_from_logits(logits, torch.tensor(labels), spec, num_items_in_batch=31, ref_logits=ref_logits)
    out.loss.backward()
    ref_loss, ref_grad, ref_stats = reference_terms(logits_np, labels, spec, ref_np if spec.anchored else None, n_items=31)
    assert out.loss.dtype == torch.float32
    np.testing.assert_allclose(out.loss.item(), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(logits.grad.numpy(), ref_grad, rtol=1e-4, atol=1e-6)
    assert_stats_match(out.stats, ref_stats)
    if spec.anchored:
        assert ref_stats["anchor_kl_sum"] > 1e-3  # the case tests something


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])  # 4 does not divide the supervised-token count
def test_chunked_path_matches_reference_and_full_for_every_loss_type(name, chunk_size):
    spec = SPECS[name]
    hidden, weight, bias, ref_weight, ref_bias, labels = family_batch(2)
    assert (shift_labels(torch.tensor(labels)) != IGNORE_INDEX).sum() % 4 != 0
    h, w, b = f32(hidden, True), f32(weight, True), f32(bias, True)
    reference_head = (f32(hidden), f32(ref_weight), f32(ref_bias))
    out = dft_loss_from_hidden(h, w, torch.tensor(labels), spec, 40, b, chunk_size=chunk_size, reference=reference_head)
    out.loss.backward()
    logits_np = hidden.astype(np.float32) @ weight.astype(np.float32).T + bias.astype(np.float32)
    ref_np = hidden.astype(np.float32) @ ref_weight.astype(np.float32).T + ref_bias.astype(np.float32)
    ref_loss, grad_logits, ref_stats = reference_terms(logits_np, labels, spec, ref_np, n_items=40)
    np.testing.assert_allclose(out.loss.item(), ref_loss, rtol=1e-5)
    assert_stats_match(out.stats, ref_stats)
    # Chain rule through the linear head, in float64.
    np.testing.assert_allclose(h.grad.numpy(), grad_logits @ weight, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(w.grad.numpy(), np.einsum("btv,bth->vh", grad_logits, hidden), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b.grad.numpy(), grad_logits.sum(axis=(0, 1)), rtol=1e-4, atol=1e-6)
    # And the full path on the same head agrees at fp32 precision.
    h2, w2, b2 = f32(hidden, True), f32(weight, True), f32(bias, True)
    full = dft_loss_from_logits(h2 @ w2.t() + b2, torch.tensor(labels), spec, 40, ref_logits=torch.tensor(ref_np))
    full.loss.backward()
    assert out.loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
    np.testing.assert_allclose(out.stats.numpy(), full.stats.numpy(), rtol=1e-5, atol=1e-6)
    for mine, theirs in [(h, h2), (w, w2), (b, b2)]:
        np.testing.assert_allclose(mine.grad.numpy(), theirs.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["dft", "asft_forward", "asft_reverse_alpha0.6", "eaft_k5"])
def test_tied_embeddings_gradient_reaches_both_uses(name):
    """Tied head: the LM-head weight is also the input embedding; its gradient sums both uses."""
    spec = SPECS[name]
    rng = np.random.default_rng(3)
    vocab, hidden_size = 11, 5
    embedding_np = rng.normal(size=(vocab, hidden_size))
    ids = torch.tensor(rng.integers(0, vocab, size=(2, 7)))
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    ref_embedding = torch.tensor(embedding_np + 0.2 * rng.normal(size=embedding_np.shape))

    def backbone(embedding):  # a nonlinear stand-in for the decoder
        return torch.tanh(embedding[ids] * 1.5)  # (B, T, H)

    embedding = torch.tensor(embedding_np, dtype=torch.float32, requires_grad=True)
    ref_hidden = backbone(ref_embedding.float())
    chunked = dft_loss_from_hidden(backbone(embedding), embedding, labels, spec, chunk_size=3,
                                   reference=(ref_hidden, ref_embedding.float(), None))
    chunked.loss.backward()
    expected = torch.tensor(embedding_np, requires_grad=True)  # float64 autograd reference
    hidden64 = backbone(expected)
    logits64 = hidden64 @ expected.t()
    ref_logits64 = backbone(ref_embedding) @ ref_embedding.t()
    targets = shift_labels(labels)
    mask = targets != IGNORE_INDEX
    log_p = torch.log_softmax(logits64[mask], -1)
    ce = -log_p.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    p = ce.detach().neg().exp()
    if spec.loss_type == "eaft":
        top = logits64[mask].detach().topk(spec.eaft_top_k, -1).values.log_softmax(-1)
        weight = -(top.exp() * top).sum(-1) / math.log(spec.eaft_top_k)
    else:
        weight = spec.dft_alpha * p + 1 - spec.dft_alpha
    objective = weight * ce
    if spec.anchored:
        log_q = torch.log_softmax(ref_logits64[mask], -1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1) if spec.anchor_kl_direction == "forward" else (log_p.exp() * (log_p - log_q)).sum(-1)
        objective = objective + spec.anchor_kl_coef * kl
    (objective.sum() / mask.sum()).backward()
    np.testing.assert_allclose(chunked.loss.item(), (objective.sum() / mask.sum()).item(), rtol=1e-5)
    np.testing.assert_allclose(embedding.grad.numpy(), expected.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["asft_forward", "asft_reverse_alpha0.6", "eaft_k5", "dft_floor0.5"])
@pytest.mark.parametrize("path", ["full", "chunked"])
def test_all_masked_micro_batch_is_exact_zero_for_every_variant(name, path):
    spec = SPECS[name]
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    if path == "full":
        out = dft_loss_from_logits(hidden @ weight.t(), labels, spec, 17, ref_logits=torch.randn(2, 5, 9))
    else:
        out = dft_loss_from_hidden(hidden, weight, labels, spec, 17, reference=(torch.randn(2, 5, 4), torch.randn(9, 4), None))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0
    assert out.stats.abs().sum().item() == 0.0


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("path", ["full", "chunked"])
def test_anchor_is_exactly_zero_when_the_reference_equals_the_policy(direction, path):
    """Step 0: the reference is the starting model, so the anchored loss is bitwise the DFT loss."""
    hidden, weight, bias, _, _, labels = family_batch(4)
    asft = LossSpec(loss_type="asft", anchor_kl_coef=0.7, anchor_kl_direction=direction)
    results = {}
    for spec in (LossSpec(), asft):
        h, w = f32(hidden, True), f32(weight, True)
        if path == "full":
            out = dft_loss_from_logits(h @ w.t(), torch.tensor(labels), spec, ref_logits=(f32(hidden) @ f32(weight).t()))
        else:
            out = dft_loss_from_hidden(h, w, torch.tensor(labels), spec, chunk_size=5, reference=(f32(hidden), f32(weight), None))
        out.loss.backward()
        results[spec.loss_type] = (out, h.grad, w.grad)
    (dft_out, dft_h, dft_w), (asft_out, asft_h, asft_w) = results["dft"], results["asft"]
    assert asft_out.stats[STAT_FIELDS.index("anchor_kl_sum")].item() == 0.0
    assert torch.equal(asft_out.loss, dft_out.loss)
    torch.testing.assert_close(asft_h, dft_h, rtol=0, atol=1e-7)  # the KL gradient p - q is exactly 0 too
    torch.testing.assert_close(asft_w, dft_w, rtol=0, atol=1e-7)


def test_eaft_weight_is_one_for_a_flat_top_k_and_small_for_a_peaked_one():
    logits = torch.full((2, 3, 30), -50.0)
    logits[0, 0, :20] = 2.0  # top 20 exactly flat: H = ln 20, w = 1
    logits[0, 1, 5] = 30.0  # peaked: w ~ 0
    labels = torch.tensor([[0, 1, 2]])
    labels = torch.cat([labels, labels])
    out = dft_loss_from_logits(logits[:1], labels[:1], LossSpec(loss_type="eaft"))
    ce = torch.nn.functional.cross_entropy(logits[0, :2], labels[0, 1:], reduction="none")
    # w_0 = 1, w_1 ~ 0: the loss is the first token's CE over 2 tokens
    assert out.loss.item() == pytest.approx(ce[0].item() / 2, rel=1e-5)


def test_auto_picks_full_for_remote_code_under_lora(tiny_model_dir):
    """Issue 11, item 8: peft's own classes hid a remote-code model, so auto chose the chunked loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dftune.loss.chunked import resolve_loss_impl

    class RemoteCodeForCausalLM(Qwen2ForCausalLM):  # what trust_remote_code loads: a class outside transformers
        pass

    RemoteCodeForCausalLM.__module__ = "transformers_modules.acme.modeling_acme"
    config = Qwen2Config(vocab_size=32_000, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    assert resolve_loss_impl("auto", Qwen2ForCausalLM(config)) == "chunked"  # large vocabulary, transformers' class
    remote = RemoteCodeForCausalLM(config)
    assert resolve_loss_impl("auto", remote) == "full"
    wrapped = get_peft_model(remote, LoraConfig(r=2, target_modules=["q_proj"]))
    assert resolve_loss_impl("auto", wrapped) == "full"
    native = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"]))
    assert resolve_loss_impl("auto", native) == "chunked"
