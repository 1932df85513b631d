"""LoRA fine-tuning through peft: the `--use_lora` flags, wrapping the model, and the merged save.

    python train_dft.py ... --use_lora --lora_r 8 --lora_alpha 16 [--merge_lora_on_save]

Only the adapters train; the base weights stay bitwise as loaded. Trainer saves a `PeftModel` as an
adapter (`adapter_model.safetensors` + `adapter_config.json`) in every checkpoint and in the output
directory, and resumes from such a checkpoint. `--merge_lora_on_save` also writes `<dir>/merged/`, a
full model (W + scale * B @ A) in safetensors that `AutoModelForCausalLM.from_pretrained` loads with
no peft. The merged weights are computed into a copy, one module at a time: the training model is
never merged in place (merge then unmerge is not bitwise exact), and under ZeRO-3 each module's
partitioned parameters are gathered only while that module is copied.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dftune.loss.chunked import chunked_unsupported_reason

ALL_LINEAR = "all-linear"
MERGED_SUBDIR = "merged"

logger = logging.getLogger("dft.lora")


class LoraConfigError(ValueError):
    """A --lora_* flag the user must fix; train_dft reports it as one line with exit code 2."""


@dataclass
class LoraArguments:
    """Parameter-efficient fine-tuning with LoRA adapters (peft)."""

    use_lora: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters (peft) instead of all weights; the base weights stay frozen."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r of each adapter (B @ A with A: r x in, B: out x r)."})
    lora_alpha: int = field(
        default=16, metadata={"help": "LoRA scaling numerator: the adapter's update is (lora_alpha / lora_r) * B @ A."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter's input, in [0, 1)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: [ALL_LINEAR],
        metadata={
            "help": "Module names that get an adapter, space- or comma-separated (e.g. q_proj v_proj). "
            "Default all-linear: every linear layer of the attention and MLP blocks (every nn.Linear but the LM head). "
            "Adding lm_head needs --loss_impl full."
        },
    )
    merge_lora_on_save: bool = field(
        default=False,
        metadata={
            "help": "Also write a merged full model (base + adapter, safetensors, loads with AutoModelForCausalLM "
            "and no peft) to <dir>/merged/ at every checkpoint and at the end. Needs --use_lora."
        },
    )

    def __post_init__(self):
        # Accept "q_proj,v_proj" as well as "q_proj v_proj".
        self.lora_target_modules = [name for entry in self.lora_target_modules or [] for name in entry.split(",") if name]
        if not self.lora_target_modules:
            raise ValueError("--lora_target_modules is empty; give module names or all-linear.")
        if ALL_LINEAR in self.lora_target_modules and len(self.lora_target_modules) > 1:
            raise ValueError(
                "--lora_target_modules all-linear cannot be combined with other names; "
                "list every module instead (e.g. q_proj k_proj v_proj o_proj gate_proj up_proj down_proj lm_head)."
            )
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be >= 1, got {self.lora_r}.")
        if self.lora_alpha <= 0:
            raise ValueError(f"--lora_alpha must be > 0, got {self.lora_alpha}.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.merge_lora_on_save and not self.use_lora:
            raise ValueError("--merge_lora_on_save needs --use_lora.")

    def peft_target_modules(self) -> str | list[str]:
        """peft takes the "all-linear" shorthand only as a plain string."""
        return ALL_LINEAR if self.lora_target_modules == [ALL_LINEAR] else list(self.lora_target_modules)


def _trainable_token_indices(model, token_ids: list[int]) -> dict[str, list[int]]:
    """{module name: ids} for the input embedding and, when not tied to it, the LM head."""
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    indices = {names[id(embeddings)]: list(token_ids)}
    if head is not None and head.weight is not embeddings.weight:
        indices[names[id(head)]] = list(token_ids)
    return indices


def apply_lora(model, lora_args: LoraArguments, training_args, new_token_ids: list[int] | None = None):
    """Wraps `model` in a peft `PeftModel` with LoRA adapters (or returns it untouched without --use_lora).

    Logs the trainable parameter count. With gradient checkpointing, makes the embedding output require
    grad: the frozen embeddings would otherwise cut the graph at the input of a (reentrant) checkpointed
    layer, and the adapters inside it would get no gradient. Token ids in `new_token_ids` (control tokens
    added to the vocabulary) get trainable embedding and LM-head rows (peft's trainable_token_indices),
    saved with the adapter: a frozen random row could never learn to end a turn.

    Raises:
        LoraConfigError: a target module that does not exist, or an adapter on the LM head with
            --loss_impl chunked (the chunked loss reads the head's weight and would ignore the adapter).
    """
    if not lora_args.use_lora:
        return model
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=lora_args.peft_target_modules(),
        trainable_token_indices=_trainable_token_indices(model, new_token_ids) if new_token_ids else None,
    )
    if training_args.gradient_checkpointing:
        # transformers 5 also does this when it turns checkpointing on for text models; done here so it
        # holds for any model and version.
        model.enable_input_require_grads()
    try:
        model = get_peft_model(model, config)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model ..."
        raise LoraConfigError(f"--lora_target_modules {' '.join(lora_args.lora_target_modules)}: {str(err).splitlines()[0]}") from None
    head = model.get_output_embeddings()
    if training_args.loss_impl == "chunked" and (isinstance(head, BaseTunerLayer) or hasattr(head, "token_adapter")):
        raise LoraConfigError(f"--loss_impl chunked: {chunked_unsupported_reason(model)}, or use --loss_impl full.")
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        "LoRA r=%d alpha=%d dropout=%s on %s: trainable parameters: %d of %d (%.4f%%)",
        lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout,
        " ".join(sorted({name.rsplit(".", 1)[-1] for name in model.peft_config["default"].target_modules})),
        trainable, total, 100.0 * trainable / total,
    )
    return model


def _gathered(params: list[torch.nn.Parameter]):
    """Under DeepSpeed ZeRO-3 every rank gathers the full parameters for the block (a collective)."""
    if any(hasattr(param, "ds_id") for param in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def merged_state_dict(peft_model, on_this_rank: bool = True) -> dict[str, torch.Tensor]:
    """The base model's state dict with every LoRA layer merged (W + scale * B @ A), as CPU tensors.

    Collective under ZeRO-3: call it on every rank; only ranks with `on_this_rank` build the dict.
    Embedding and LM-head rows of tokens added in training (peft trainable_token_indices) are written into
    those weights. Keys are the base model's own (no `base_model.model.` prefix, no `base_layer`), so the dict loads
    into `AutoModelForCausalLM`. A weight shared by two modules (tied embeddings) keeps one storage
    unless one side carries an adapter.
    """
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    state: dict[str, torch.Tensor] = {}
    copies: dict[int, torch.Tensor] = {}  # id(parameter) -> CPU copy, so tied weights stay shared
    lora_prefixes: list[str] = []

    def copy(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in copies:
            copies[id(tensor)] = tensor.detach().to("cpu", copy=True)
        return copies[id(tensor)]

    for name, module in base.named_modules():
        if any(name.startswith(prefix) for prefix in lora_prefixes):
            continue  # base_layer / lora_A / lora_B of a LoRA layer already merged
        prefix = f"{name}." if name else ""
        if isinstance(module, LoraLayer):
            lora_prefixes.append(prefix)
            layer = module.get_base_layer()
            with _gathered(list(module.parameters())):
                if on_this_rank:
                    weight = layer.weight.detach()
                    for adapter in module.active_adapters:
                        if adapter in module.lora_A:
                            weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
                    state[prefix + "weight"] = weight.to("cpu", copy=True)
                    if getattr(layer, "bias", None) is not None:
                        state[prefix + "bias"] = copy(layer.bias)
            continue
        token_adapter = getattr(module, "token_adapter", None)
        if token_adapter is not None:  # trainable_token_indices: the new tokens' rows replace the base rows
            lora_prefixes.append(prefix)
            layer = token_adapter.get_base_layer()
            with _gathered(list(module.parameters())):
                if on_this_rank:
                    weight = token_adapter.get_merged_weights(token_adapter.active_adapters)
                    state[prefix + "weight"] = weight.detach().to("cpu", copy=True)
                    if getattr(layer, "bias", None) is not None:
                        state[prefix + "bias"] = copy(layer.bias)
            continue
        direct = dict(module.named_parameters(recurse=False))
        buffers = {
            key: buf for key, buf in module.named_buffers(recurse=False) if key not in module._non_persistent_buffers_set
        }
        if not direct and not buffers:
            continue
        with _gathered(list(direct.values())):
            if on_this_rank:
                for key, tensor in {**direct, **buffers}.items():
                    state[prefix + key] = copy(tensor)
    return state


def save_merged_model(peft_model, save_dir: str, tokenizer=None, on_this_rank: bool = True) -> str:
    """Writes the merged full model (and the tokenizer) to `save_dir/merged`; returns that path.

    Collective under ZeRO-3 (call on every rank); only `on_this_rank` writes. If the LM head carries an
    adapter and its weight is tied to the input embeddings, the merged head differs from the embeddings,
    so the merged model is saved untied.
    """
    from peft.tuners.lora import LoraLayer

    merged_dir = os.path.join(save_dir, MERGED_SUBDIR)
    state = merged_state_dict(peft_model, on_this_rank)
    if not on_this_rank:
        return merged_dir
    base = peft_model.get_base_model()
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    untie = (
        isinstance(head, LoraLayer)
        and embeddings is not None
        and head.get_base_layer().weight is embeddings.weight
        and getattr(base.config, "tie_word_embeddings", False)
    )
    if untie:
        base.config.tie_word_embeddings = False
    try:
        base.save_pretrained(merged_dir, state_dict=state, safe_serialization=True)
    finally:
        if untie:
            base.config.tie_word_embeddings = True
    if tokenizer is not None:
        tokenizer.save_pretrained(merged_dir)
    logger.info("merged LoRA model saved to %s", merged_dir)
    return merged_dir


def save_generation_config(peft_model, save_dir: str) -> None:
    """Writes the base model's generation config (its stop ids include the template's end-of-turn token, see
    tokenizer_setup) next to the adapter: peft saves none, and the base model's own may not stop at the end
    of a turn. Load it with `GenerationConfig.from_pretrained(save_dir)`."""
    config = getattr(peft_model.get_base_model(), "generation_config", None)
    if config is not None:
        config.save_pretrained(save_dir)


class AdapterGenerationConfigCallback(TrainerCallback):
    """After each checkpoint save, writes the generation config next to the checkpoint's adapter (rank 0)."""

    def on_save(self, args, state, control, model=None, **kwargs):
        if args.should_save and hasattr(model, "get_base_model"):
            save_generation_config(model, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))


class MergeLoraOnSaveCallback(TrainerCallback):
    """After each checkpoint save, writes the merged model into `checkpoint-N/merged/` (on every rank,
    as ZeRO-3 gathers are collective; rank 0 writes)."""

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        checkpoint_dir = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        save_merged_model(model, checkpoint_dir, processing_class, on_this_rank=args.should_save)


def lora_callbacks(lora_args: LoraArguments) -> list[TrainerCallback]:
    if not lora_args.use_lora:
        return []
    return [AdapterGenerationConfigCallback()] + ([MergeLoraOnSaveCallback()] if lora_args.merge_lora_on_save else [])
