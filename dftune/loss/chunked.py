"""Memory-efficient loss: the LM head runs in chunks of supervised tokens, never over all logits.

`--loss_impl full` builds logits for every position, (B, T, V) in the model dtype plus an fp32 copy of
the supervised rows and, in backward, the softmax and its gradient of the same size. At 16K tokens and
a 152K vocabulary that is tens of GiB. Here the model runs without its LM head (`logits_to_keep` set
to an empty index), the backbone's last hidden state is captured, and `ChunkedDFTFunction` walks the
supervised positions `chunk_size` at a time. Per chunk it forms the fp32 logits once (and, for an
anchored loss, the reference model's logits for the same rows from its own hidden states and LM head)
and hands them to `dft_loss.token_terms`, the same definition `--loss_impl full` uses: the objective,
the metric sums and the gradient with respect to the chunk's logits, formed in place. That gradient is
turned into the gradients for the hidden states and the LM-head weight at once; only one chunk of
logits exists at a time, and backward just scales the stored gradients by the incoming scalar.

The numbers are those of `dft_loss.dft_loss_from_logits` (tests compare values, metrics and
gradients against it and against a float64 reference).
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from dftune.loss.core import IGNORE_INDEX, STAT_FIELDS, DFTLossOutput, LossSpec, as_spec, normaliser, shift_labels, token_terms

DEFAULT_CHUNK_SIZE = 512


class ChunkedDFTFunction(torch.autograd.Function):
    """sum_t objective_t over rows of `hidden`, objective_t as `dft_loss.token_terms` defines it.

    forward(hidden (n, H), weight (V, H), bias (V,) | None, targets (n,), spec, chunk_size, compute_grads,
            matmul_dtype, reference (ref_hidden (n, H), ref_weight (V, H), ref_bias (V,) | None) | None)
        -> (loss_sum () fp32, stats (len(STAT_FIELDS),) float64 detached)

    `compute_grads` is decided by the caller (grad mode is always off inside forward): evaluation under
    no_grad must not build a (V, H) weight gradient. `matmul_dtype` is the dtype the LM head's matmuls run
    in (bf16 under --bf16 autocast even for fp32 weights, as the model's own lm_head would). The
    reference is never differentiated.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, spec, chunk_size, compute_grads, matmul_dtype, reference):
        n_tokens = hidden.shape[0]
        # fp32 accumulation for fp32 weights (exact on CPU); low-precision weights accumulate in their
        # own dtype, as their autograd gradient would be, so no (V, H) fp32 copy is added to the peak.
        grad_hidden = torch.empty_like(hidden) if compute_grads and hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight) if compute_grads and weight.requires_grad else None
        weight_mm = weight.to(matmul_dtype)  # (V, H); a no-op unless autocast runs the head in 16 bits
        bias_mm = bias.to(matmul_dtype) if bias is not None else None
        grad_bias = torch.zeros_like(bias, dtype=torch.promote_types(bias.dtype, torch.float32)) if compute_grads and bias is not None and bias.requires_grad else None
        compute_dtype = torch.promote_types(weight.dtype, torch.float32)  # fp32 at least
        if reference is not None:
            ref_hidden, ref_weight, ref_bias = reference
            ref_weight_mm = ref_weight.to(matmul_dtype)
            ref_bias_mm = ref_bias.to(matmul_dtype) if ref_bias is not None else None
        loss_sum = torch.zeros((), dtype=compute_dtype, device=hidden.device)
        stats = torch.zeros(len(STAT_FIELDS), dtype=torch.float64, device=hidden.device)
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            hidden_chunk = hidden[start:end]  # (c, H)
            logits = hidden_chunk.to(matmul_dtype) @ weight_mm.t()  # (c, V), as the LM head computes it
            if bias_mm is not None:
                logits = logits + bias_mm
            ref_logits = None
            if reference is not None:
                ref_logits = ref_hidden[start:end].to(matmul_dtype) @ ref_weight_mm.t()  # (c, V)
                if ref_bias_mm is not None:
                    ref_logits = ref_logits + ref_bias_mm
                ref_logits = ref_logits.to(compute_dtype)
            chunk_loss, chunk_stats, grad_logits = token_terms(
                logits.to(compute_dtype), targets[start:end], spec, ref_logits, want_grad=compute_grads
            )
            loss_sum += chunk_loss
            stats += chunk_stats
            del logits, ref_logits
            if not compute_grads:
                continue
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
            grad_logits = grad_logits.to(matmul_dtype)  # (c, V)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits @ weight_mm  # (c, H)
            if grad_weight is not None:
                if grad_weight.dtype == matmul_dtype:
                    grad_weight.addmm_(grad_logits.t(), hidden_chunk.to(matmul_dtype))  # (V, H)
                else:  # fp32 weights with a 16-bit head: the chunk's product, accumulated in fp32
                    grad_weight += (grad_logits.t() @ hidden_chunk.to(matmul_dtype)).to(grad_weight.dtype)
            del grad_logits
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
        # In place: the saved gradients are not needed again (no retain_graph), and a second (V, H)
        # tensor would raise the peak.
        return (
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)) if has_hidden else None,
            grad_weight.mul_(grad_loss.to(grad_weight.dtype)) if has_weight else None,
            (grad_bias * grad_loss).to(ctx.bias_dtype) if has_bias else None,
            None, None, None, None, None, None,
        )


def dft_loss_from_hidden(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec | float,
    num_items_in_batch: torch.Tensor | int | None = None,
    lm_head_bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    matmul_dtype: torch.dtype | None = None,
    reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    labels_are_shifted: bool = False,
) -> DFTLossOutput:
    """Chunked loss from the backbone's last hidden states (pure function).

    Args:
        hidden_states: (B, T, H) final hidden states (after the final norm), any float dtype.
        lm_head_weight: (V, H) output projection (tied or not).
        labels: (B, T) labels with IGNORE_INDEX; unshifted (HF convention) unless `labels_are_shifted`.
        spec, num_items_in_batch, labels_are_shifted: as in `dft_loss_from_logits` (loss/core.py).
        lm_head_bias: (V,) or None.
        chunk_size: supervised tokens per chunk; peak extra memory ~ chunk_size x V x 6 bytes (x 3 with
            an anchor: the reference's logits and its softmax).
        matmul_dtype: dtype of the LM-head matmuls (default: the weight's); the loss math is fp32 or wider.
        reference: (ref_hidden_states (B, T, H), ref_lm_head_weight (V, H), ref_lm_head_bias) of the
            anchor's reference model for the same positions; needed when spec.anchored.

    Raises:
        ValueError: chunk_size < 1, or an anchored spec without `reference`.
    """
    spec = as_spec(spec)
    if chunk_size < 1:
        raise ValueError(f"--loss_chunk_size must be >= 1, got {chunk_size}.")
    if spec.anchored and reference is None:
        raise ValueError("--loss_type asft needs the reference model's hidden states")
    targets = labels if labels_are_shifted else shift_labels(labels)  # (B, T)
    mask = targets != IGNORE_INDEX
    selected_hidden = hidden_states[mask]  # (n, H)
    selected_targets = targets[mask]  # (n,)
    selected_reference = None
    if spec.anchored:
        ref_hidden, ref_weight, ref_bias = reference
        selected_reference = (ref_hidden[mask].detach(), ref_weight.detach(), ref_bias.detach() if ref_bias is not None else None)
    compute_grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (selected_hidden, lm_head_weight, lm_head_bias)
    )
    loss_sum, stats = ChunkedDFTFunction.apply(
        selected_hidden, lm_head_weight, lm_head_bias, selected_targets, spec, int(chunk_size),
        compute_grads, matmul_dtype or lm_head_weight.dtype, selected_reference,
    )
    n = normaliser(num_items_in_batch, selected_targets.numel(), hidden_states.device)
    loss = loss_sum / n.to(loss_sum.dtype)
    if selected_targets.numel() == 0:
        # Keep the graph connected to the backbone so an all-masked micro-batch still runs backward.
        loss = loss + hidden_states.sum() * 0.0
    return DFTLossOutput(loss=loss, stats=stats)


# ---- model plumbing -------------------------------------------------------------------------------
# Config fields of models whose logits are not plain `hidden @ W^T + b` (soft-capping, scaling).
UNSUPPORTED_CONFIG_FIELDS = (
    "final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling", "logits_soft_cap",
    "lm_head_multiplier", "output_multiplier", "softcap",
)


def chunked_unsupported_reason(model) -> str | None:
    """Why `--loss_impl chunked` cannot reproduce this model's logits exactly, or None if it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in {id(config): config, id(text_config): text_config}.values():
        for name in UNSUPPORTED_CONFIG_FIELDS:
            value = getattr(cfg, name, None)
            if value not in (None, 1, 1.0, 0, 0.0):
                return f"model type {model_type!r} scales or soft-caps its logits ({name}={value})"
    if model.get_output_embeddings() is None:
        return f"model type {model_type!r} has no output embedding (LM head) to chunk"
    forward_params = inspect.signature(model.forward).parameters
    if "logits_to_keep" not in forward_params and not any(p.kind == p.VAR_KEYWORD for p in forward_params.values()):
        return f"model type {model_type!r} does not accept logits_to_keep"
    head = model.get_output_embeddings()
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        return f"model type {model_type!r} has an LM head the chunked loss cannot read ({type(head).__name__})"
    if hasattr(head, "token_adapter"):  # peft trainable_token_indices: new rows live outside head.weight
        return "the LM head has trainable new-token rows (LoRA with added tokens), which the chunked loss would ignore"
    if len(getattr(head, "lora_A", {})) > 0:
        return "the LM head carries a LoRA adapter, which the chunked loss would ignore; drop lm_head from --lora_target_modules"
    return None


def _gathered(*params: torch.Tensor | None):
    """DeepSpeed ZeRO-3 keeps parameters partitioned; gather the LM head (weight and bias) for this micro-batch."""
    partitioned = list({id(p): p for p in params if p is not None and hasattr(p, "ds_id")}.values())
    if partitioned:
        import deepspeed

        return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    return contextlib.nullcontext()


def unwrap(model):
    """The module under DDP / DeepSpeed engine wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def forward_without_head(model, inputs: dict):
    """Calls `model` (the wrapper's own forward, so DDP and ZeRO hooks run) with no logits and returns
    (outputs, last hidden state (B, T, H), LM head module)."""
    unwrapped = unwrap(model)
    captured: dict[str, torch.Tensor] = {}

    def keep_last_hidden_state(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = unwrapped.get_decoder().register_forward_hook(keep_last_hidden_state)
    try:
        no_positions = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
        outputs = model(**inputs, use_cache=False, logits_to_keep=no_positions)
    finally:
        handle.remove()
    return outputs, captured["hidden"], unwrapped.get_output_embeddings()


def dft_loss_chunked(
    model, inputs: dict, labels: torch.Tensor, spec: LossSpec | float, num_items_in_batch, chunk_size: int,
    matmul_dtype: torch.dtype | None = None, reference=None, labels_are_shifted: bool = False,
):
    """Runs `model` (possibly DDP/DeepSpeed/peft-wrapped) without its LM head and returns
    (DFTLossOutput, model outputs). The wrapper's own forward is called, so DDP and ZeRO hooks run.
    `matmul_dtype`: the autocast dtype under --bf16/--fp16 (autocast wraps only the model's forward).
    `reference`: a `dft_reference.ReferenceModel` (anchored specs); it runs first, without its head too.
    `labels_are_shifted`: labels[b, t] is the target of position t (a sequence-parallel shard's shift_labels).
    """
    spec = as_spec(spec)
    ref_hidden = ref_head = None
    if spec.anchored:
        ref_hidden, ref_head = reference.hidden_and_head(unwrap(model), inputs)  # (B, T, H), no graph
    outputs, hidden, head = forward_without_head(model, inputs)
    weight, bias = head.weight, getattr(head, "bias", None)
    ref_weight, ref_bias = (ref_head.weight, getattr(ref_head, "bias", None)) if ref_head is not None else (None, None)
    with _gathered(weight, bias, ref_weight, ref_bias):
        ref = (ref_hidden, ref_weight, ref_bias) if ref_head is not None else None
        result = dft_loss_from_hidden(
            hidden, weight, labels, spec, num_items_in_batch, bias, chunk_size, matmul_dtype, reference=ref,
            labels_are_shifted=labels_are_shifted,
        )
    return result, outputs


def resolve_loss_impl(requested: str, model, n_gpu: int = 1, fp16: bool = False) -> str:
    """'auto' -> 'chunked' on GPU or with a vocabulary of 32K+ tokens, when the model allows it: a
    transformers model (remote code may transform its logits in ways no config field says), not under
    nn.DataParallel (n_gpu > 1: replicas would each run the hidden-state hook), not with --fp16 (its
    gradients are formed in forward, before fp16 loss scaling could protect them).

    Raises:
        ValueError: 'chunked' was asked for a model or setting it cannot handle exactly.
    """
    reason = chunked_unsupported_reason(model)
    if reason is None and n_gpu > 1:
        reason = "nn.DataParallel (several GPUs in one process) is not supported; launch with torchrun or deepspeed"
    if reason is None and fp16:
        reason = "--fp16 loss scaling cannot protect gradients formed in forward; use --bf16"
    if requested == "chunked":
        if reason:
            raise ValueError(f"--loss_impl chunked: {reason}; use --loss_impl full.")
        return "chunked"
    if requested == "full":
        return "full"
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", 0) or 0
    large = vocab_size >= 32_000 or torch.cuda.is_available()
    # Under peft the class to judge is the wrapped model's, not peft's own (a remote-code model wrapped in
    # a PeftModel must still count as remote code).
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    native = type(inner).__module__.startswith("transformers.")
    return "chunked" if large and reason is None and native else "full"
