"""The DFT loss family as pure functions, and a loss for any `transformers.Trainer` or TRL trainer.

    core.py       the definition: token_terms (every variant, value and gradient), dft_loss_from_logits
    chunked.py    the same loss over chunks of the LM head, never all logits (--loss_impl chunked)
    reference.py  the starting model that --loss_type asft anchors to
    variants.py   the table of variants (dft, sft, asft, eaft): a new one is one entry there

Use in your own trainer (the full-logits path; the same numbers as DFTTrainer's `--loss_impl full`):

    from transformers import Trainer
    from dftune.loss import make_compute_loss_func

    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator,
                      compute_loss_func=make_compute_loss_func("dft"))        # or ("eaft", eaft_top_k=20), ("sft")

TRL's SFTTrainer takes the same `compute_loss_func=`. The Trainer passes N (the step's supervised tokens over
every micro-batch and rank, `num_items_in_batch`), so the loss is normalised as the paper's DFT is, under
gradient accumulation and several processes alike (with `average_tokens_across_devices`, transformers' default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dftune.loss.core import IGNORE_INDEX, LossSpec, check_dft_alpha, dft_loss_from_logits, metrics_from_stats
from dftune.loss.variants import LOSS_VARIANTS, get_variant, resolve_variant_flags

__all__ = ["IGNORE_INDEX", "LOSS_VARIANTS", "LossSpec", "dft_loss_from_logits", "loss_spec_for", "make_compute_loss_func",
           "metrics_from_stats"]


def loss_spec_for(loss_type: str = "dft", dft_alpha: float | None = None, dft_min_weight: float = 0.0, **variant_flags: Any) -> LossSpec:
    """The LossSpec that `train_dft.py --loss_type ... --dft_alpha ... [--variant flags]` would train with.

    Raises:
        ValueError: an unknown loss type, a flag of another variant, or a value out of range (named as the flag).
    """
    variant = get_variant(loss_type)
    if variant.weight_signal is None:
        if dft_alpha not in (None, 0, 0.0):
            raise ValueError(f"--loss_type {loss_type} is --dft_alpha 0; drop --dft_alpha {dft_alpha} or use --loss_type dft.")
        dft_alpha = 0.0
    dft_alpha = 1.0 if dft_alpha is None else float(dft_alpha)
    check_dft_alpha(dft_alpha)
    if not 0.0 <= dft_min_weight < 1.0:
        raise ValueError(f"--dft_min_weight must be in [0, 1), got {dft_min_weight}.")
    unknown = sorted(set(variant_flags) - {flag.name for v in LOSS_VARIANTS.values() for flag in v.flags})
    if unknown:
        raise ValueError(f"unknown loss setting(s) {', '.join(unknown)}; the variants' flags are in dftune/loss/variants.py.")
    given = {name: value for name, value in resolve_variant_flags(loss_type, variant_flags).items() if value is not None}
    fields = LossSpec.__dataclass_fields__
    return LossSpec(
        loss_type=loss_type, dft_alpha=dft_alpha, min_weight=float(dft_min_weight),
        options=tuple((name, value) for name, value in given.items() if name not in fields),
        **{name: value for name, value in given.items() if name in fields},
    )


def make_compute_loss_func(loss_type: str = "dft", dft_alpha: float | None = None, dft_min_weight: float = 0.0,
                           **variant_flags: Any) -> Callable[..., torch.Tensor]:
    """A `compute_loss_func(outputs, labels, num_items_in_batch=None)` for `transformers.Trainer` (and TRL).

    Args:
        loss_type: a variant of dftune/loss/variants.py that needs no reference model (dft, sft, eaft, ...);
            asft anchors to the starting model, which only DFTTrainer (train_dft.py) keeps.
        dft_alpha, dft_min_weight, variant_flags: as the train_dft.py flags of the same names.

    Returns:
        The function. It reads `outputs.logits` (B, T, V), takes `labels` (B, T) unshifted with -100 on
        unsupervised positions (the model must not get the labels, or it computes its own loss first: the
        Trainer pops them when `compute_loss_func` is set), and returns sum_t w_t * CE_t / N in fp32, N being
        `num_items_in_batch` (the step's supervised tokens) or, without it, this batch's.

    Raises:
        ValueError: as `loss_spec_for`, or a variant that needs the reference model.
    """
    spec = loss_spec_for(loss_type, dft_alpha, dft_min_weight, **variant_flags)
    if LOSS_VARIANTS[loss_type].needs_reference:
        raise ValueError(f"--loss_type {loss_type} needs the reference model, which only DFTTrainer (train_dft.py) keeps; "
                         "use dftune.trainer.DFTTrainer, or a variant without an anchor.")

    def compute_loss_func(outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits  # (B, T, V)
        return dft_loss_from_logits(logits, labels, spec, num_items_in_batch=num_items_in_batch).loss

    compute_loss_func.loss_spec = spec  # what it computes, for logs
    return compute_loss_func
