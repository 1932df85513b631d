"""Memory-efficient DFT loss: the LM head runs in chunks of supervised tokens, never over all logits.

`--loss_impl full` builds logits for every position, (B, T, V) in the model dtype plus an fp32 copy of
the supervised rows and, in backward, the softmax and its gradient of the same size. At 16K tokens and
a 152K vocabulary that is tens of GiB. Here the model runs without its LM head (`logits_to_keep` set
to an empty index), the backbone's last hidden state is captured, and `ChunkedDFTFunction` walks the
supervised positions `chunk_size` at a time. Per chunk, in fp32, it forms the logits once, takes
the log-sum-exp, CE_t, p_t = exp(-CE_t), the DFT weight, the metric sums and, in the same pass, the
gradients for the hidden states and the LM-head weight (the softmax is formed in place from the
chunk's logits: no second one). Only one chunk of logits exists at a time; backward just scales the
stored gradients by the incoming scalar.

The numbers are those of `dft_loss.dft_loss_from_logits` (tests compare values, metrics and
gradients against it and against a float64 reference).
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from dft_loss import IGNORE_INDEX, DFTLossOutput, normaliser, shift_labels

DEFAULT_CHUNK_SIZE = 512


class ChunkedDFTFunction(torch.autograd.Function):
    """sum_t w_t * CE_t over rows of `hidden`, with w_t = sg(alpha * p_t + 1 - alpha).

    forward(hidden (n, H), weight (V, H), bias (V,) | None, targets (n,), alpha, chunk_size)
      -> (loss_sum () fp32, stats (5,) float64 detached)
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, dft_alpha, chunk_size):
        n_tokens = hidden.shape[0]
        compute_grads = hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        # fp32 accumulation for fp32 weights (exact on CPU); low-precision weights accumulate in their
        # own dtype, as their autograd gradient would be, so no (V, H) fp32 copy is added to the peak.
        grad_hidden = torch.empty_like(hidden) if compute_grads and hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight) if compute_grads and weight.requires_grad else None
        grad_bias = torch.zeros_like(bias, dtype=torch.promote_types(bias.dtype, torch.float32)) if compute_grads and bias is not None and bias.requires_grad else None
        compute_dtype = torch.promote_types(weight.dtype, torch.float32)  # fp32 at least
        loss_sum = torch.zeros((), dtype=compute_dtype, device=hidden.device)
        stats = torch.zeros(5, dtype=torch.float64, device=hidden.device)
        stats[0] = float(n_tokens)
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            hidden_chunk = hidden[start:end]  # (c, H)
            target_chunk = targets[start:end]  # (c,)
            logits = hidden_chunk @ weight.t()  # (c, V) in the model dtype, as the LM head computes it
            if bias is not None:
                logits = logits + bias
            logits = logits.to(compute_dtype)  # (c, V) fp32
            correct = (logits.argmax(dim=-1) == target_chunk).double().sum()
            log_normaliser = torch.logsumexp(logits, dim=-1)  # (c,)
            target_logit = logits.gather(-1, target_chunk.unsqueeze(-1)).squeeze(-1)  # (c,)
            ce = log_normaliser - target_logit  # (c,)
            p = torch.exp(-ce)  # (c,)
            weight_t = dft_alpha * p + (1.0 - dft_alpha)  # (c,) stop-gradient DFT weight
            loss_sum += (weight_t * ce).sum()
            stats[1:] += torch.stack([(weight_t * ce).double().sum(), ce.double().sum(), p.double().sum(), correct])
            if not compute_grads:
                continue
            # d(w * CE)/d logits = w * (softmax - onehot); the softmax overwrites the logits in place.
            grad_logits = logits.sub_(log_normaliser.unsqueeze(-1)).exp_()  # (c, V)
            grad_logits[torch.arange(end - start, device=logits.device), target_chunk] -= 1.0
            grad_logits.mul_(weight_t.unsqueeze(-1))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
            grad_logits = grad_logits.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits @ weight  # (c, H)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), hidden_chunk.to(weight.dtype))  # (V, H)
            del logits, grad_logits
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else torch.empty(0),
            grad_weight if grad_weight is not None else torch.empty(0),
            grad_bias if grad_bias is not None else torch.empty(0),
        )
        ctx.has_grads = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(stats)
        return loss_sum, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        has_hidden, has_weight, has_bias = ctx.has_grads
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype) if has_hidden else None,
            grad_weight * grad_loss.to(grad_weight.dtype) if has_weight else None,
            (grad_bias * grad_loss).to(ctx.bias_dtype) if has_bias else None,
            None,
            None,
            None,
        )


def dft_loss_from_hidden(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    dft_alpha: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    lm_head_bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> DFTLossOutput:
    """Chunked DFT loss from the backbone's last hidden states (pure function).

    Args:
        hidden_states: (B, T, H) final hidden states (after the final norm), any float dtype.
        lm_head_weight: (V, H) output projection (tied or not).
        labels: (B, T) unshifted labels with IGNORE_INDEX.
        dft_alpha, num_items_in_batch: as in `dft_loss.dft_loss_from_logits`.
        lm_head_bias: (V,) or None.
        chunk_size: supervised tokens per chunk; peak extra memory ~ chunk_size x V x 6 bytes.
    """
    if chunk_size < 1:
        raise ValueError(f"--loss_chunk_size must be >= 1, got {chunk_size}.")
    targets = shift_labels(labels)  # (B, T)
    mask = targets != IGNORE_INDEX
    selected_hidden = hidden_states[mask]  # (n, H)
    selected_targets = targets[mask]  # (n,)
    loss_sum, stats = ChunkedDFTFunction.apply(
        selected_hidden, lm_head_weight, lm_head_bias, selected_targets, float(dft_alpha), int(chunk_size)
    )
    n = normaliser(num_items_in_batch, selected_targets.numel(), hidden_states.device)
    loss = loss_sum / n.to(loss_sum.dtype)
    if selected_targets.numel() == 0:
        # Keep the graph connected to the backbone so an all-masked micro-batch still runs backward.
        loss = loss + hidden_states.sum() * 0.0
    return DFTLossOutput(loss=loss, stats=stats)


# ---- model plumbing -------------------------------------------------------------------------------
UNSUPPORTED_CONFIG_FIELDS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def chunked_unsupported_reason(model) -> str | None:
    """Why `--loss_impl chunked` cannot reproduce this model's logits exactly, or None if it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    for name in UNSUPPORTED_CONFIG_FIELDS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"model type {model_type!r} scales or soft-caps its logits ({name}={value})"
    if model.get_output_embeddings() is None:
        return f"model type {model_type!r} has no output embedding (LM head) to chunk"
    forward_params = inspect.signature(model.forward).parameters
    if "logits_to_keep" not in forward_params and not any(p.kind == p.VAR_KEYWORD for p in forward_params.values()):
        return f"model type {model_type!r} does not accept logits_to_keep"
    head = model.get_output_embeddings()
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        return f"model type {model_type!r} has an LM head the chunked loss cannot read ({type(head).__name__})"
    if len(getattr(head, "lora_A", {})) > 0:
        return "the LM head carries a LoRA adapter, which the chunked loss would ignore; drop lm_head from --lora_target_modules"
    return None


def _gathered(weight: torch.Tensor):
    """DeepSpeed ZeRO-3 keeps parameters partitioned; gather the LM head for this micro-batch."""
    if hasattr(weight, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([weight], modifier_rank=None)
    return contextlib.nullcontext()


def dft_loss_chunked(model, inputs: dict, labels: torch.Tensor, dft_alpha: float, num_items_in_batch, chunk_size: int):
    """Runs `model` (possibly DDP/DeepSpeed/peft-wrapped) without its LM head and returns
    (DFTLossOutput, model outputs). The wrapper's own forward is called, so DDP and ZeRO hooks run.
    """
    unwrapped = model
    while hasattr(unwrapped, "module"):  # DDP / DeepSpeed engine
        unwrapped = unwrapped.module
    backbone = unwrapped.get_decoder()
    head = unwrapped.get_output_embeddings()
    captured: dict[str, torch.Tensor] = {}

    def keep_last_hidden_state(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = backbone.register_forward_hook(keep_last_hidden_state)
    try:
        no_positions = torch.empty(0, dtype=torch.long, device=labels.device)
        outputs = model(**inputs, use_cache=False, logits_to_keep=no_positions)
    finally:
        handle.remove()
    hidden = captured["hidden"]  # (B, T, H)
    weight = head.weight
    bias = getattr(head, "bias", None)
    with _gathered(weight):
        result = dft_loss_from_hidden(hidden, weight, labels, dft_alpha, num_items_in_batch, bias, chunk_size)
    return result, outputs


def resolve_loss_impl(requested: str, model) -> str:
    """'auto' -> 'chunked' on GPU or with a vocabulary of 32K+ tokens, when the model allows it.

    Raises:
        ValueError: 'chunked' was asked for a model it cannot handle exactly.
    """
    reason = chunked_unsupported_reason(model)
    if requested == "chunked":
        if reason:
            raise ValueError(f"--loss_impl chunked: {reason}; use --loss_impl full.")
        return "chunked"
    if requested == "full":
        return "full"
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", 0) or 0
    large = vocab_size >= 32_000 or torch.cuda.is_available()
    return "chunked" if large and reason is None else "full"
