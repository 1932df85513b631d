"""Loading the tokenizer and the model the way every entry point does (training, evaluation, inspection)."""

from __future__ import annotations

import os
import re

from transformers import AutoModelForCausalLM, AutoTokenizer

from dftune.arguments import DFTTrainingArguments, ModelArguments, resolve_torch_dtype
from dftune.data.tokenizer import prepare_model
from dftune.errors import UsageError

MODEL_FILES = ("config.json", "adapter_config.json")  # a model folder, or a LoRA output (its base named inside)


def load_tokenizer(model_args: ModelArguments):
    """The tokenizer of --model_name_or_path; a missing or wrong folder is a UsageError naming the flag."""
    path = model_args.model_name_or_path
    hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) is not None and not path.startswith(".")
    local = os.path.expanduser(path)
    if not hub_id and not os.path.isdir(local):
        raise UsageError(f"--model_name_or_path {path}: no such model directory")
    if os.path.isdir(local) and not any(os.path.isfile(os.path.join(local, name)) for name in MODEL_FILES):
        # Else transformers fails on the tokenizer with "Couldn't instantiate the backend tokenizer".
        raise UsageError(f"--model_name_or_path {path}: not a model directory (no {' or '.join(MODEL_FILES)}); "
                         "give a model's folder, a run's output folder or one of its checkpoint-N folders")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    except OSError as err:
        raise UsageError(f"--model_name_or_path {path}: cannot load a tokenizer ({str(err).splitlines()[0]})") from None


def load_model(model_args: ModelArguments, training_args: DFTTrainingArguments, tokenizer, setup):
    """The causal LM for training, set up for the tokenizer (`setup` from dftune.data.tokenizer.prepare_tokenizer)."""
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        dtype=resolve_torch_dtype(model_args, training_args),
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=model_args.trust_remote_code,
    )
    prepare_model(model, tokenizer, setup)  # embeddings for added control tokens, pad id, stop id
    model.config.use_cache = False  # no KV cache in training; gradient checkpointing warns otherwise
    return model
