"""The DFT loss family as pure functions (no Trainer, no distributed state in here).

Per supervised token t (a label that is not IGNORE_INDEX after the causal shift), with z_t the fp32
logits, log p = log_softmax(z_t) and y_t the target:

    CE_t  = -log p(y_t)                                   p_t = exp(-CE_t)  (detached)
    g_t   = the variant's weight signal (detached):  p_t for dft/asft, (H_topK / ln K) ^ power for eaft
    w_t   = max(alpha * g_t + (1 - alpha), min_weight)    (detached; alpha = 0 is plain cross-entropy)
    KL_t  = forward KL(p_ref || p_theta) or reverse KL(p_theta || p_ref), full vocabulary (asft only)
    loss  = sum_t (w_t * CE_t + lambda * KL_t) / N

`N` is the number of supervised tokens of the whole optimizer step (every micro-batch of gradient
accumulation, every data-parallel rank); the caller passes it as `num_items_in_batch`. `w_t` is a
stop-gradient, which is what makes DFT differ from a loss of `-p_t log p_t`.

`token_terms` below is the one place that defines a variant: both `--loss_impl full` (this module,
over the supervised rows of the model's logits) and `--loss_impl chunked` (loss/chunked.py, over
chunks of rows formed from hidden states) call it with a block of fp32 logits and get back the
per-token objective, the metric sums and the gradient with respect to those logits, computed in place
(no second softmax, no autograd graph over vocabulary-sized tensors). A new variant (its weight signal
and its flags) is one entry in variants.py's LOSS_VARIANTS; a new anchor is a value and its gradient
in `_anchor_kl`.

Besides the loss each function returns detached sums (never averages) in STAT_FIELDS order that the
trainer accumulates over a logging window and all ranks before it divides once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dftune.loss.variants import KL_DIRECTIONS, LOSS_VARIANTS, loss_types

IGNORE_INDEX = -100
LOSS_TYPES = loss_types()  # the table's names (variants.py)
__all__ = ["IGNORE_INDEX", "KL_DIRECTIONS", "LOSS_TYPES", "STAT_FIELDS", "DFTLossOutput", "LossSpec", "dft_loss_from_logits",
           "metrics_from_stats", "shift_labels", "token_terms"]
LOW_P_THRESHOLD = 0.1  # tokens the DFT weight nearly ignores (p < 0.1 means w < 0.1)

# Order of the entries of a stats vector; the trainer sums these vectors across steps and ranks.
STAT_FIELDS = ("tokens", "dft_loss_sum", "ce_sum", "p_sum", "correct", "entropy_sum", "low_p_count", "anchor_kl_sum")


@dataclass(frozen=True)
class LossSpec:
    """What the loss of one step is. `dft_alpha` is the value in force (after its warm-up)."""

    loss_type: str = "dft"
    dft_alpha: float = 1.0
    min_weight: float = 0.0
    anchor_kl_coef: float = 0.0
    anchor_kl_direction: str = "forward"
    eaft_top_k: int = 20
    eaft_power: float = 1.0
    # Flags of variants added to variants.py after these fields, as (name, value) pairs: see `param`.
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def anchored(self) -> bool:
        """True when the loss needs the reference model's logits."""
        return LOSS_VARIANTS[self.loss_type].needs_reference and self.anchor_kl_coef > 0

    def param(self, name: str) -> Any:
        """A variant flag's value: a field of this spec, else one of `options`."""
        if name in self.__dataclass_fields__:
            return getattr(self, name)
        for key, value in self.options:
            if key == name:
                return value
        raise KeyError(f"LossSpec has no {name!r} (fields, or options {[key for key, _ in self.options]})")


def as_spec(spec: LossSpec | float) -> LossSpec:
    """A bare float is a dft_alpha (the DFT loss as before the family existed)."""
    return spec if isinstance(spec, LossSpec) else LossSpec(dft_alpha=float(spec))


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


def token_weight(spec: LossSpec, p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """w_t (detached), (c,). `logits` (c, V) fp32, not yet modified in place."""
    signal_of = LOSS_VARIANTS[spec.loss_type].weight_signal
    if signal_of is None:  # plain cross-entropy: every weight 1 (but for the floor)
        return torch.ones_like(p).clamp(min=float(spec.min_weight))
    signal = signal_of(p, logits, spec)
    alpha = float(spec.dft_alpha)
    return (alpha * signal + (1.0 - alpha)).clamp(min=float(spec.min_weight))


def _anchor_kl(spec: LossSpec, log_p, probs, log_q, want_grad: bool):
    """KL_t (c,) and, when asked, d KL_t / d z_t (c, V). log_p, probs: the policy's; log_q: the reference's.

    forward  KL(q || p) = sum q (log q - log p);        gradient  p - q
    reverse  KL(p || q) = sum p (log p - log q);        gradient  p * (log p - log q - KL)
    Written as differences of dot products (no (c, V) temporary); with identical logits log_p and
    log_q are bitwise equal, so KL_t is exactly 0 (step 0). Overwrites log_q, and log_p for the
    reverse gradient (both are dead after this call).
    """
    if spec.anchor_kl_direction == "forward":
        q = log_q.exp()  # (c, V)
        kl = torch.linalg.vecdot(q, log_q) - torch.linalg.vecdot(q, log_p)  # (c,)
        return kl, (q.neg_().add_(probs) if want_grad else None)
    kl = torch.linalg.vecdot(probs, log_p) - torch.linalg.vecdot(probs, log_q)
    if not want_grad:
        return kl, None
    return kl, log_p.sub_(log_q).sub_(kl.unsqueeze(-1)).mul_(probs)


def token_terms(
    logits: torch.Tensor, targets: torch.Tensor, spec: LossSpec, ref_logits: torch.Tensor | None = None,
    want_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The loss terms of a block of supervised tokens: the single definition of every variant.

    Args:
        logits: (c, V) fp32 or wider; overwritten (it becomes the gradient) when `want_grad`.
        targets: (c,) int64, all supervised.
        spec: the loss (its dft_alpha is the value in force).
        ref_logits: (c, V) the reference model's logits for the same rows (needed when spec.anchored);
            overwritten.
        want_grad: also return d(sum_t objective_t)/d logits.

    Returns:
        (objective_sum () in the logits' dtype, stats (len(STAT_FIELDS),) float64, grad (c, V) or None).
    """
    rows = torch.arange(targets.numel(), device=logits.device)
    log_normaliser = torch.logsumexp(logits, dim=-1)  # (c,)
    ce = log_normaliser - logits[rows, targets]  # (c,) = -log p_t
    p = torch.exp(-ce)  # (c,)
    correct = (logits.argmax(dim=-1) == targets).double().sum()
    weight = token_weight(spec, p, logits)  # (c,) detached
    log_p = logits.sub_(log_normaliser.unsqueeze(-1))  # (c, V) in place: the logits are not needed again
    probs = log_p.exp()  # (c, V)
    entropy = -torch.linalg.vecdot(probs, log_p)  # (c,)
    objective = weight * ce  # (c,)
    kl_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
    anchor_grad = None
    if spec.anchored:
        if ref_logits is None:
            raise ValueError("--loss_type asft needs the reference model's logits")
        log_q = ref_logits.to(logits.dtype).sub_(torch.logsumexp(ref_logits, dim=-1, keepdim=True).to(logits.dtype))
        kl, anchor_grad = _anchor_kl(spec, log_p, probs, log_q, want_grad)
        objective = objective + spec.anchor_kl_coef * kl
        kl_sum = kl.double().sum()
    stats = torch.stack([
        torch.tensor(float(targets.numel()), dtype=torch.float64, device=logits.device),
        objective.double().sum(), ce.double().sum(), p.double().sum(), correct, entropy.double().sum(),
        (p < LOW_P_THRESHOLD).double().sum(), kl_sum,
    ])
    grad = None
    if want_grad:
        # d(w * CE)/dz = w * (softmax - onehot); the softmax tensor becomes the gradient in place.
        grad = probs.mul_(weight.unsqueeze(-1))
        grad[rows, targets] -= weight
        if anchor_grad is not None:
            grad.add_(anchor_grad, alpha=spec.anchor_kl_coef)
    return objective.sum(), stats, grad


class _LogitsLoss(torch.autograd.Function):
    """sum_t objective_t over rows of `logits` (n, V); the gradient comes from `token_terms`.

    forward(logits (n, V) any float dtype, ref_logits (n, V) | None, targets (n,), spec, want_grad)
        -> (loss_sum () fp32+, stats (len(STAT_FIELDS),) float64 detached). Grad mode is off inside
    forward, so the caller decides `want_grad` (evaluation under no_grad builds no (n, V) gradient).
    """

    @staticmethod
    def forward(ctx, logits, ref_logits, targets, spec, want_grad):
        # The caller passes fresh gathers (logits[mask]) that nothing else holds, so the fp32 work may
        # happen in place on them: no second (n, V) copy for fp32 models.
        compute = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least, float64 stays float64
        logits32 = logits.to(compute)  # (n, V)
        ref32 = ref_logits.to(compute) if ref_logits is not None else None
        loss_sum, stats, grad = token_terms(logits32, targets, spec, ref32, want_grad)
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(stats)
        return loss_sum, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_loss.to(grad.dtype)).to(ctx.logits_dtype), None, None, None, None


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
    spec: LossSpec | float,
    num_items_in_batch: torch.Tensor | int | None = None,
    labels_are_shifted: bool = False,
    ref_logits: torch.Tensor | None = None,
) -> DFTLossOutput:
    """The loss from full logits (the `--loss_impl full` path).

    Only the supervised rows of `logits` are upcast and normalised, so the fp32 work scales with the
    number of supervised tokens, not with B x T.

    Args:
        logits: (B, T, V) model output, any float dtype.
        labels: (B, T) int64 with IGNORE_INDEX on unsupervised positions; unshifted (HF convention)
            unless `labels_are_shifted`.
        spec: a LossSpec, or a float dft_alpha in [0, 1] (plain DFT).
        num_items_in_batch: supervised tokens of the whole optimizer step (all micro-batches and
            ranks); None normalises by this micro-batch's own count.
        labels_are_shifted: True when labels[b, t] already is the target of logits[b, t].
        ref_logits: (B, T, V) the reference model's logits (asft), same positions.

    Returns:
        DFTLossOutput. With no supervised token the loss is an exact 0 that still depends on
        `logits`, so backward runs (and every rank joins the same collectives) without NaN.

    Raises:
        ValueError: an anchored spec without `ref_logits`.
    """
    spec = as_spec(spec)
    targets = labels if labels_are_shifted else shift_labels(labels)  # (B, T)
    mask = targets != IGNORE_INDEX  # (B, T)
    selected_targets = targets[mask]  # (n,)
    selected_ref = ref_logits[mask] if spec.anchored and ref_logits is not None else None
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    loss_sum, stats = _LogitsLoss.apply(logits[mask], selected_ref, selected_targets, spec, want_grad)
    n = normaliser(num_items_in_batch, selected_targets.numel(), logits.device)
    loss = loss_sum / n.to(loss_sum.dtype)
    if selected_targets.numel() == 0:
        # Keep the autograd graph connected to the model even for an all-masked micro-batch.
        loss = loss + logits.sum() * 0.0
    return DFTLossOutput(loss=loss, stats=stats)


def metrics_from_stats(stats: torch.Tensor | list[float], prefix: str = "", anchored: bool = False) -> dict[str, float]:
    """Turns summed stats (STAT_FIELDS order) into the logged metrics. Empty counts give no metrics."""
    values = dict(zip(STAT_FIELDS, [float(v) for v in stats]))
    tokens = values["tokens"]
    if tokens <= 0:
        return {}
    metrics = {
        f"{prefix}avg_p_correct": values["p_sum"] / tokens,
        f"{prefix}ce_loss": values["ce_sum"] / tokens,
        f"{prefix}token_accuracy": values["correct"] / tokens,
        f"{prefix}dft_loss": values["dft_loss_sum"] / tokens,
        f"{prefix}entropy": values["entropy_sum"] / tokens,
        f"{prefix}low_p_share": values["low_p_count"] / tokens,
    }
    if anchored:
        metrics[f"{prefix}anchor_kl"] = values["anchor_kl_sum"] / tokens
    return metrics
