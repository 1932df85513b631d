"""The DFT loss as pure functions (no Trainer, no distributed state in here).

Per supervised token t (a label that is not IGNORE_INDEX after the causal shift):

    CE_t = logsumexp(z_t) - z_t[y_t]            (fp32)
    p_t  = exp(-CE_t)                           (detached: the probability of the correct token)
    w_t  = dft_alpha * p_t + (1 - dft_alpha)    (detached weight)
    loss = sum_t w_t * CE_t / N

`N` is the number of supervised tokens of the whole optimizer step (every micro-batch of gradient
accumulation, every data-parallel rank); the caller passes it as `num_items_in_batch`. The gradient
is `sum_t w_t * dCE_t / N` because `w_t` is a stop-gradient, which is what makes DFT differ from a
loss of `-p_t log p_t`. `dft_alpha = 0` is plain cross-entropy, `dft_alpha = 1` the paper's DFT.

p_t comes from the cross-entropy already computed, so no second softmax over the vocabulary is built.

Besides the loss each function returns `TokenStats`: detached sums (never averages) that the trainer
accumulates over a logging window and all ranks before it divides once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

# Order of the entries of a stats vector; the trainer sums these vectors across steps and ranks.
STAT_FIELDS = ("tokens", "dft_loss_sum", "ce_sum", "p_sum", "correct")


@dataclass
class DFTLossOutput:
    """The differentiable loss of one micro-batch and the detached sums behind the metrics."""

    loss: torch.Tensor  # () fp32 (float64 for float64 inputs), divided by the step's supervised-token count
    stats: torch.Tensor  # (len(STAT_FIELDS),) float64, detached sums over this micro-batch


def check_dft_alpha(dft_alpha: float) -> None:
    """Raises ValueError unless 0 <= dft_alpha <= 1."""
    if not 0.0 <= float(dft_alpha) <= 1.0:
        raise ValueError(f"--dft_alpha must be in [0, 1] (0 = plain SFT, 1 = DFT), got {dft_alpha}.")


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Causal shift: position i predicts token i+1. (B, T) -> (B, T), last column IGNORE_INDEX."""
    ignore_tail = labels.new_full((*labels.shape[:-1], 1), IGNORE_INDEX)
    return torch.cat([labels[..., 1:], ignore_tail], dim=-1)


def dft_token_terms(
    logits: torch.Tensor, targets: torch.Tensor, dft_alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DFT terms of already-selected supervised tokens.

    Args:
        logits: (n, V) any float dtype; upcast to at least fp32 here.
        targets: (n,) int64 token ids, all supervised.
        dft_alpha: weight mix in [0, 1].

    Returns:
        (weighted_ce, ce, p, correct), each (n,): `weighted_ce` carries the gradient; `ce`, `p`
        (probability of the target) and `correct` (argmax equals target, as float) are detached.
    """
    # fp32 at least (bf16/fp16 logits are upcast); float64 inputs stay float64 (used by exactness tests).
    logits32 = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (n, V)
    log_normaliser = torch.logsumexp(logits32, dim=-1)  # (n,)
    target_logit = logits32.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (n,)
    ce = log_normaliser - target_logit  # (n,) = -log p_t
    p = torch.exp(-ce.detach())  # (n,) stop-gradient
    weight = dft_alpha * p + (1.0 - dft_alpha)
    weighted_ce = weight * ce
    # Ties count as correct only when the target is the first maximum, as torch.argmax decides.
    correct = (logits32.detach().argmax(dim=-1) == targets).float()
    return weighted_ce, ce.detach(), p, correct


def token_stats(weighted_ce: torch.Tensor, ce: torch.Tensor, p: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Detached float64 sums in STAT_FIELDS order. Inputs are (n,)."""
    return torch.stack(
        [
            torch.tensor(float(ce.numel()), dtype=torch.float64, device=ce.device),
            weighted_ce.detach().double().sum(),
            ce.double().sum(),
            p.double().sum(),
            correct.double().sum(),
        ]
    )


def normaliser(num_items_in_batch: torch.Tensor | int | None, local_tokens: int, device: torch.device) -> torch.Tensor:
    """The N to divide by: the step's token count when known, else this micro-batch's; never below 1.

    A step with no supervised token at all then yields loss 0 (not 0/0 = NaN).
    """
    if num_items_in_batch is None:
        num_items_in_batch = local_tokens
    n = torch.as_tensor(num_items_in_batch, device=device, dtype=torch.float64).reshape(())
    return n.clamp(min=1.0)


def dft_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    dft_alpha: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    labels_are_shifted: bool = False,
) -> DFTLossOutput:
    """DFT loss from full logits (the `--loss_impl full` path).

    Only the supervised rows of `logits` are upcast and normalised, so the fp32 work scales with the
    number of supervised tokens, not with B x T.

    Args:
        logits: (B, T, V) model output, any float dtype.
        labels: (B, T) int64 with IGNORE_INDEX on unsupervised positions; unshifted (HF convention)
            unless `labels_are_shifted`.
        dft_alpha: in [0, 1].
        num_items_in_batch: supervised tokens of the whole optimizer step (all micro-batches and
            ranks); None normalises by this micro-batch's own count.
        labels_are_shifted: True when labels[b, t] already is the target of logits[b, t].

    Returns:
        DFTLossOutput. With no supervised token the loss is an exact 0 that still depends on
        `logits`, so backward runs (and every rank joins the same collectives) without NaN.
    """
    targets = labels if labels_are_shifted else shift_labels(labels)  # (B, T)
    mask = targets != IGNORE_INDEX  # (B, T)
    selected_logits = logits[mask]  # (n, V)
    selected_targets = targets[mask]  # (n,)
    weighted_ce, ce, p, correct = dft_token_terms(selected_logits, selected_targets, dft_alpha)
    n = normaliser(num_items_in_batch, selected_targets.numel(), logits.device)
    loss = weighted_ce.sum() / n.to(weighted_ce.dtype)
    if selected_targets.numel() == 0:
        # Keep the autograd graph connected to the model even for an all-masked micro-batch.
        loss = loss + logits.sum() * 0.0
    return DFTLossOutput(loss=loss, stats=token_stats(weighted_ce, ce, p, correct))


def metrics_from_stats(stats: torch.Tensor | list[float], prefix: str = "") -> dict[str, float]:
    """Turns summed stats (STAT_FIELDS order) into the logged metrics. Empty counts give no metrics."""
    values = dict(zip(STAT_FIELDS, [float(v) for v in stats]))
    tokens = values["tokens"]
    if tokens <= 0:
        return {}
    return {
        f"{prefix}avg_p_correct": values["p_sum"] / tokens,
        f"{prefix}ce_loss": values["ce_sum"] / tokens,
        f"{prefix}token_accuracy": values["correct"] / tokens,
        f"{prefix}dft_loss": values["dft_loss_sum"] / tokens,
    }
