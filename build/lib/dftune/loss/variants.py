"""The loss variants, one entry each: the table that `--loss_type`, its help text, each variant's own flags
(their defaults, checks and refusal under another variant), `loss_spec()` and the resume settings come from.

Every variant is one weight signal in the same loss (core.py, both `--loss_impl` paths):

    w_t = max(alpha * g_t + (1 - alpha), min_weight)   (detached)      loss = sum_t (w_t * CE_t [+ lambda * KL_t]) / N

Adding a variant is one `LossVariant` entry below plus its test (tests/test_loss_variants.py adds a toy
one the same way): a name, a help line, its weight signal g_t and the flags only it takes. Its flags become
`--flags` of train_dft.py (dftune/arguments.py builds them from this table), are refused under another
`--loss_type`, are saved with each checkpoint's settings, and reach the signal through
`spec.param(name)`. A variant whose signal is None is plain cross-entropy (every weight 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from dftune.loss.core import LossSpec

KL_DIRECTIONS = ("forward", "reverse")


@dataclass(frozen=True)
class VariantFlag:
    """A flag only one variant takes: `--name`, None unless given, then `default` under that variant."""

    name: str  # the flag without --; also the LossSpec field (or option) of that name
    type: type
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None  # what is wrong with a value, or None
    choices: tuple | None = None


@dataclass(frozen=True)
class LossVariant:
    """One `--loss_type`."""

    name: str
    help: str
    # g_t (c,) from p_t (c,), the block's fp32 logits (c, V) (read only) and the spec; detached.
    # None: no weighting at all (plain cross-entropy, `--dft_alpha` is 0).
    weight_signal: Callable[[torch.Tensor, torch.Tensor, LossSpec], torch.Tensor] | None
    flags: tuple[VariantFlag, ...] = ()
    # Runs the reference model (the starting weights) beside the policy: its logits reach core.token_terms,
    # which adds the anchor KL of `anchor_kl_coef` / `anchor_kl_direction`.
    needs_reference: bool = False


# ---- weight signals g_t ---------------------------------------------------------------------------------------
def probability_signal(p: torch.Tensor, logits: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """DFT: the probability of the target token. (c,) -> (c,)"""
    return p


def topk_entropy_signal(p: torch.Tensor, logits: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """EAFT: entropy of the top-K distribution renormalised, over its maximum ln K, to a power. (c,)"""
    import torch

    k = min(int(spec.param("eaft_top_k")), logits.shape[-1])
    top = logits.topk(k, dim=-1).values  # (c, k)
    log_q = top - torch.logsumexp(top, dim=-1, keepdim=True)  # (c, k)
    entropy = -(log_q.exp() * log_q).sum(dim=-1)  # (c,)
    return (entropy / math.log(k)).clamp(0.0, 1.0).pow(spec.param("eaft_power")) if k > 1 else torch.ones_like(p)


def _positive(value) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


# ---- the table ------------------------------------------------------------------------------------------------
LOSS_VARIANTS: dict[str, LossVariant] = {variant.name: variant for variant in (
    LossVariant("dft", "w = sg(p) * CE (the paper)", probability_signal),
    LossVariant("sft", "plain cross-entropy (same as --dft_alpha 0)", None),
    LossVariant(
        "asft", "DFT plus a KL anchor to the starting model (--anchor_kl_coef, --anchor_kl_direction)", probability_signal,
        flags=(
            VariantFlag("anchor_kl_coef", float, 0.1,
                        "lambda of --loss_type asft: loss = sum(w * CE + lambda * KL) / N. Default 0.1 (the ASFT code's).",
                        check=lambda v: None if v > 0 else f"must be > 0 with --loss_type asft, got {v} (0 is --loss_type dft)"),
            VariantFlag("anchor_kl_direction", str, "forward",
                        "asft's KL, full vocabulary: forward = KL(p_ref || p_theta) (the ASFT reference code, default), "
                        "reverse = KL(p_theta || p_ref).", choices=KL_DIRECTIONS),
        ),
        needs_reference=True,
    ),
    LossVariant(
        "eaft", "w = sg(H_topK / ln K) ^ --eaft_power, the entropy of the top --eaft_top_k predictions", topk_entropy_signal,
        flags=(
            VariantFlag("eaft_top_k", int, 20, "K of --loss_type eaft: entropy over the top K predictions, renormalised (default 20).",
                        check=lambda v: None if v >= 2 else f"must be >= 2 (the entropy of one prediction is 0), got {v}"),
            VariantFlag("eaft_power", float, 1.0, "Exponent of --loss_type eaft's weight (H / ln K) ^ power (default 1).",
                        check=_positive),
        ),
    ),
)}


# ---- what the rest of the code derives from it -------------------------------------------------------------------
def loss_types() -> tuple[str, ...]:
    return tuple(LOSS_VARIANTS)


def variant_flags() -> list[tuple[LossVariant, VariantFlag]]:
    """Every variant's own flags, in table order."""
    return [(variant, flag) for variant in LOSS_VARIANTS.values() for flag in variant.flags]


def loss_type_help() -> str:
    """--loss_type's help: one clause per variant."""
    return "; ".join(f"{variant.name}: {variant.help}" for variant in LOSS_VARIANTS.values()) + "."


def get_variant(loss_type: str) -> LossVariant:
    """Raises ValueError naming --loss_type and the choices."""
    if loss_type not in LOSS_VARIANTS:
        raise ValueError(f"--loss_type must be one of {', '.join(LOSS_VARIANTS)}, got {loss_type!r}.")
    return LOSS_VARIANTS[loss_type]


def resolve_variant_flags(loss_type: str, values: dict[str, Any]) -> dict[str, Any]:
    """The variant flags' values under `loss_type`: its own filled with their defaults and checked, the other
    variants' left None. `values`: flag name -> value given (None when not given).

    Raises:
        ValueError: another variant's flag was given, or a value fails its check (the message names the flag).
    """
    resolved = {}
    for variant, flag in variant_flags():
        value = values.get(flag.name)
        if variant.name != loss_type:
            if value is not None:
                raise ValueError(f"--{flag.name} is used by --loss_type {variant.name} only (got --loss_type {loss_type}).")
            resolved[flag.name] = None
            continue
        value = flag.default if value is None else flag.type(value)
        if flag.choices is not None and value not in flag.choices:
            raise ValueError(f"--{flag.name} must be one of {', '.join(map(str, flag.choices))}, got {value!r}.")
        problem = flag.check(value) if flag.check is not None else None
        if problem:
            raise ValueError(f"--{flag.name} {problem}.")
        resolved[flag.name] = value
    return resolved
