"""Tokenizer and model setup for real tokenizers: chat template, control tokens, pad token, embeddings.

  prepare_tokenizer  before the data is tokenised: installs `--chat_template` (or the built-in ChatML
                     template when the tokenizer has none), adds the control tokens that template writes
                     and the tokenizer lacks (as special tokens, so `<|im_end|>` is one token the model
                     can learn to emit), and picks a pad token when there is none (stock Llama-3, Mistral).
  prepare_model      after the model is loaded: resizes the embeddings to the tokenizer (tied or not),
                     sets `config.pad_token_id`, and adds the end-of-turn token to the generation stop ids.

The pad token only fills batches: labels are masked by length, not by token id, so an EOS that closes an
assistant turn stays supervised when pad == eos.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from data_templates import BUILTIN_CONTROL_TOKENS, ensure_chat_template

logger = logging.getLogger("dft.tokenizer")

# Tokens that exist to pad (or are reserved and never trained), in order of preference.
PAD_NAMES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|padding|>")
RESERVED_PREFIX = "<|reserved_special_token_"


@dataclass
class TokenizerSetup:
    """What prepare_tokenizer changed (prepare_model and LoRA need it)."""

    builtin_template: str | None = None  # name of the built-in template installed, if any
    added_tokens: list[str] = field(default_factory=list)  # control tokens added as new vocabulary entries
    new_token_ids: list[int] = field(default_factory=list)  # their ids: embedding rows that start untrained
    end_of_turn_id: int | None = None  # id of the template's end-of-turn token, when the project chose the template


def choose_pad_token(tokenizer) -> str | None:
    """A pad token for a tokenizer without one: a dedicated pad or reserved special token when the
    vocabulary has one (never trained, so padding cannot collide with real text), else EOS.

    Returns the token chosen, or None when the tokenizer already has a pad token.
    """
    if tokenizer.pad_token is not None:
        return None
    vocab = tokenizer.get_vocab()
    special = {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    candidates = [name for name in PAD_NAMES if name in vocab]
    candidates += sorted((name for name in special if name.startswith(RESERVED_PREFIX)), key=lambda name: vocab[name], reverse=True)
    choice = candidates[0] if candidates else tokenizer.eos_token
    if choice is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; give it one (tokenizer.pad_token) and retry")
    why = "an unused reserved token" if candidates else "EOS (the vocabulary has no reserved token; padding is masked by length, so EOS stays supervised)"
    logger.info("pad token: %s (id %d), %s; the tokenizer has none", choice, vocab[choice], why)
    tokenizer.pad_token = choice
    return choice


def prepare_tokenizer(tokenizer, data_args) -> TokenizerSetup:
    """Template, missing control tokens and pad token, before any data is tokenised (see the module doc).

    Raises:
        DataError: `--chat_template` is neither a file nor a built-in name.
        ValueError: the tokenizer has no pad and no EOS token.
    """
    setup = TokenizerSetup(builtin_template=ensure_chat_template(tokenizer, getattr(data_args, "chat_template", None)))
    if setup.builtin_template:
        controls = BUILTIN_CONTROL_TOKENS[setup.builtin_template]
        special = set(tokenizer.all_special_tokens)
        special.update(str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False))
        missing = [token for token in controls if token not in special]
        if missing:
            before = len(tokenizer)
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
            setup.added_tokens = missing
            setup.new_token_ids = [i for i in tokenizer.convert_tokens_to_ids(missing) if i >= before]
            logger.warning("the %s template writes %s, which the tokenizer lacks as special tokens: added (%d new embedding rows)",
                           setup.builtin_template, " ".join(missing), len(setup.new_token_ids))
        setup.end_of_turn_id = tokenizer.convert_tokens_to_ids(controls[-1])
    choose_pad_token(tokenizer)
    return setup


def prepare_model(model, tokenizer, setup: TokenizerSetup) -> None:
    """Embeddings sized to the tokenizer, pad id in the config, the end-of-turn token a stop token."""
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # under ZeRO-3 the local shape is empty
    if len(tokenizer) > rows:
        # mean_resizing: new rows start at the mean of the old ones (a sane first logit), tied heads follow.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        logger.info("embeddings resized from %d to %d rows for the added tokens", rows, len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if setup.end_of_turn_id is not None and generation is not None:
        stops = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
        stops = [i for i in stops if i is not None]
        if setup.end_of_turn_id not in stops:
            generation.eos_token_id = stops + [setup.end_of_turn_id]
