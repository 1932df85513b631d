"""Tokenizer and model setup for real tokenizers: chat template, control tokens, pad token, embeddings.

  prepare_tokenizer  before the data is tokenised: installs `--chat_template` (or the built-in ChatML
                     template when the tokenizer has none), adds the control tokens that template writes
                     and the tokenizer lacks (as special tokens, so `<|im_end|>` is one token the model
                     can learn to emit), and picks a pad token when there is none (stock Llama-3, Mistral).
  prepare_model      after the model is loaded: resizes the embeddings to the tokenizer (tied or not),
                     sets `config.pad_token_id`, and adds the template's end-of-turn token to the
                     generation stop ids (a base model's eos is often not the token its template ends
                     turns with: Llama-3.2 base `<|end_of_text|>` vs `<|eot_id|>`, Qwen2.5 base
                     `<|endoftext|>` vs `<|im_end|>`), so the saved model stops where training taught it.

The pad token only fills batches: labels are masked by length, not by token id, so an EOS that closes an
assistant turn stays supervised when pad == eos.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from dftune.data.spans import template_kwargs
from dftune.data.templates import BUILTIN_CONTROL_TOKENS, ChatRenderer, ensure_chat_template

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
    end_of_turn_id: int | None = None  # id of the token the chat template ends an assistant turn with, if any


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


# Text that can only be a control token: `<|im_end|>`, `<|eot_id|>`, `<|user|>`, DeepSeek's `<｜User｜>`.
CONTROL_TOKEN = re.compile(r"<\|[^<>|\s]+\|>|<｜[^<>｜]+｜>")
PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]


def _special_tokens(tokenizer) -> set[str]:
    special = set(tokenizer.all_special_tokens)
    special.update(str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False))
    return special


def template_control_tokens(tokenizer, kwargs: dict | None = None) -> list[str]:
    """Control tokens (`<|...|>` text) the chat template writes for a system, user and assistant turn and the
    generation prompt, in order of appearance; [] when it renders none (or cannot render the probe)."""
    render = ChatRenderer(tokenizer, kwargs)
    texts = []
    for messages in (PROBE, PROBE[1:]):  # a template that rejects a system role (Mistral v0.1)
        try:
            texts = [render(messages), render(messages[:-1], add_generation_prompt=True)]
            break
        except Exception:
            continue
    return list(dict.fromkeys(found for text in texts for found in CONTROL_TOKEN.findall(text)))


def template_end_of_turn(tokenizer, kwargs: dict | None = None) -> int | None:
    """Id of the control token the chat template writes right after an assistant answer (its end of turn:
    `<|im_end|>`, `<|eot_id|>`, `</s>`, ...), found by rendering a probe conversation; None when the template
    writes no control token there or cannot render the probe."""
    answer = "Probe answer 7."
    try:
        text = ChatRenderer(tokenizer, kwargs)([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}])
    except Exception:  # a template that needs more than a user and an assistant turn: no stop token to add
        return None
    found = text.rfind(answer)
    if found < 0:
        return None
    special = set(tokenizer.convert_tokens_to_ids(sorted(_special_tokens(tokenizer))))
    after = tokenizer(text[found + len(answer):], add_special_tokens=False)["input_ids"]
    return next((i for i in after if i in special), None)


def prepare_tokenizer(tokenizer, data_args) -> TokenizerSetup:
    """Template, missing control tokens and pad token, before any data is tokenised (see the module doc).

    Raises:
        DataError: `--chat_template` is neither a file nor a built-in name.
        ValueError: the tokenizer has no pad and no EOS token.
    """
    chat_template = getattr(data_args, "chat_template", None)
    setup = TokenizerSetup(builtin_template=ensure_chat_template(tokenizer, chat_template))
    kwargs = template_kwargs(data_args)
    # Any template, also a file or the tokenizer's own: control tokens it writes as plain text would be
    # several ordinary tokens, and its end of turn would never be learnt as one token the model can stop on.
    controls = BUILTIN_CONTROL_TOKENS[setup.builtin_template] if setup.builtin_template else template_control_tokens(tokenizer, kwargs)
    missing = [token for token in controls if token not in _special_tokens(tokenizer)]
    if missing:
        before = len(tokenizer)
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        setup.added_tokens = missing
        setup.new_token_ids = [i for i in tokenizer.convert_tokens_to_ids(missing) if i >= before]
        name = setup.builtin_template or (f"--chat_template {chat_template}" if chat_template else "tokenizer's")
        logger.warning("the %s template writes %s, which the tokenizer lacks as special tokens: added (%d new embedding rows)",
                       name, " ".join(missing), len(setup.new_token_ids))
    setup.end_of_turn_id = template_end_of_turn(tokenizer, kwargs)
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
            logger.info("generation stops at %s (id %d), the chat template's end of turn, as well as the eos ids %s: "
                        "added to generation_config.eos_token_id (saved with the model)",
                        tokenizer.convert_ids_to_tokens(setup.end_of_turn_id), setup.end_of_turn_id, stops)
