"""ChatML data: read many files, normalise every record to one schema, tokenise with assistant-only labels.

Label contract (tests check it on decoded spans): `labels` equals `input_ids` with IGNORE_INDEX (-100)
everywhere except the tokens of every assistant message's content and the end-of-turn token that
closes it (`<|im_end|>` in ChatML). Role headers, system/user/tool turns and the newline after the
end-of-turn token are not supervised. It holds for any chat template, with or without
`{% generation %}` tags, because supervised spans are found on the rendered text (character
offsets) rather than by template markers.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from dft_loss import IGNORE_INDEX

logger = logging.getLogger(__name__)

# The ChatML template used when a tokenizer has none (Qwen-style, without the default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

VALID_ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Bad input data: the message names the file, the line and what to do."""


@dataclass
class FileReport:
    """What happened to the records of one input file. read == kept + sum(skipped.values())."""

    path: str
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few "file:line"

    def skip(self, reason: str, where: str, max_examples: int = 3) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < max_examples:
            shown.append(where)


def validate_messages(messages: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    """Normalises one record's messages to [{"role": str, "content": str}].

    Returns (messages, None) or (None, reason). Extra message fields are dropped here, so files whose
    messages carry different extras still share one Arrow schema.
    """
    if not isinstance(messages, list) or not messages:
        return None, "no messages"
    normalised = []
    for message in messages:
        if not isinstance(message, dict):
            return None, "message is not an object"
        role = message.get("role")
        if role not in VALID_ROLES:
            return None, f"unknown role {role!r}"
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: join the text parts
            if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
                return None, "non-text content"
            content = "".join(str(part.get("text", "")) for part in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            return None, "non-text content"
        if role == "assistant" and not content.strip():
            return None, "empty assistant content"
        normalised.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in normalised):
        return None, "no assistant turn"
    return normalised, None


def _iter_json_records(path: str):
    """Yields (line_number, record_or_None, error_or_None) from a .json array or JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); fix the file or remove it from --data_files") from None
        # Line numbers of array elements are not kept by json; report the element index (1-based).
        for index, record in enumerate(records, start=1):
            yield index, record, None
        return
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield line_number, json.loads(line), None
        except json.JSONDecodeError as err:
            yield line_number, None, f"broken JSON line ({err.msg})"


def load_conversations(paths: list[str], strict: bool = False) -> tuple[list[dict], list[FileReport]]:
    """Reads ChatML records from JSON/JSONL files into [{"messages": [...]}] plus a report per file.

    Raises:
        DataError: a file does not exist, is empty or holds no JSON at all; with `strict`, the first
            invalid record.
    """
    conversations: list[dict] = []
    reports: list[FileReport] = []
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{path}: data file not found; check --data_files")
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: data file is empty; remove it from --data_files")
        report = FileReport(path=path)
        valid_json_seen = False
        for line_number, record, error in _iter_json_records(path):
            report.read += 1
            where = f"{path}:{line_number}"
            if error is None:
                valid_json_seen = True
                if not isinstance(record, dict):
                    error = "record is not a JSON object"
                else:
                    messages, error = validate_messages(record.get("messages"))
            if error is not None:
                if strict:
                    raise DataError(f"{where}: {error} (field 'messages'); fix the record or drop --strict_data to skip it")
                report.skip(error, where)
                continue
            report.kept += 1
            conversations.append({"messages": messages})
        if not valid_json_seen:
            raise DataError(f"{path}: no JSON record could be read; is this a JSON/JSONL file?")
        reports.append(report)
    return conversations, reports


def ensure_chat_template(tokenizer) -> None:
    """Gives a tokenizer without a chat template the built-in ChatML one (with a warning)."""
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("The tokenizer has no chat_template; using the built-in ChatML template.")
        tokenizer.chat_template = CHATML_TEMPLATE


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _special_token_strings(tokenizer) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    specials.update(str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False))
    return sorted((s for s in specials if s), key=len, reverse=True)


def supervised_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Renders a conversation and finds the characters to supervise.

    For each assistant message: its content as rendered, plus everything up to and including the first
    special token after it (the end-of-turn token), but not what follows it (ChatML's newline).

    Raises:
        DataError: the template does not render the conversation as a sequence of growing prefixes,
            or does not render the assistant content verbatim.
    """
    full = _render(tokenizer, messages)
    specials = _special_token_strings(tokenizer)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:index], add_generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1])
        if not full.startswith(prefix) or not full.startswith(through):
            raise DataError("the chat template does not render earlier turns identically; cannot locate assistant spans")
        content = message["content"].strip()  # templates often trim content
        start = full.find(content, len(prefix), len(through))
        if start < 0:
            raise DataError("the chat template does not render the assistant content verbatim")
        end = start + len(content)
        tail = through[end:]
        hits = [(tail.find(s), s) for s in specials if tail.find(s) >= 0]
        if hits:
            position, token = min(hits)
            end += position + len(token)
        else:
            end += len(tail.rstrip())
        spans.append((start, end))
    return full, spans


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> dict[str, Any]:
    """Tokenises one conversation with assistant-only labels.

    Returns {"input_ids", "labels", "length", "truncated", "drop_reason"}; `drop_reason` is "" for a
    kept conversation, else why it must be dropped (the caller counts it).
    """
    try:
        text, spans = supervised_char_spans(tokenizer, messages)
    except DataError as err:
        return {"input_ids": [], "labels": [], "length": 0, "truncated": False, "drop_reason": str(err)}
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for token_index, (char_start, char_end) in enumerate(encoding["offset_mapping"]):
        while span_index < len(spans) and spans[span_index][1] <= char_start:
            span_index += 1
        if span_index < len(spans) and char_end > spans[span_index][0] and char_end > char_start:
            labels[token_index] = input_ids[token_index]
    truncated = len(input_ids) > max_length
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    # Position 0 is never a prediction target after the causal shift.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        reason = "no supervised token after truncation to --max_length" if truncated else "no supervised token"
        return {"input_ids": [], "labels": [], "length": 0, "truncated": truncated, "drop_reason": reason}
    return {"input_ids": input_ids, "labels": labels, "length": len(input_ids), "truncated": truncated, "drop_reason": ""}


def tokenize_batch(batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
    """`datasets.map(batched=True)` function: never raises, marks bad rows with `drop_reason`."""
    columns: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "truncated": [], "drop_reason": []}
    for messages in batch["messages"]:
        row = tokenize_conversation(tokenizer, messages, max_length)
        for key in columns:
            columns[key].append(row[key])
    return columns


@dataclass
class DataCollatorForDFT:
    """Pads a list of {"input_ids", "labels"} rows (right padding) into a batch.

    Output: input_ids (B, T), attention_mask (B, T), labels (B, T) with IGNORE_INDEX on padding.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(features)
        input_ids = torch.full((batch_size, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.as_tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def format_supervision(tokenizer, input_ids: list[int], labels: list[int], markers: tuple[str, str] = ("[[", "]]")) -> str:
    """Decodes a tokenised conversation with supervised spans wrapped in `markers` (for humans)."""
    pieces, inside = [], False
    for token_id, label in zip(input_ids, labels):
        supervised = label != IGNORE_INDEX
        if supervised != inside:
            pieces.append(markers[0] if supervised else markers[1])
            inside = supervised
        pieces.append(tokenizer.decode([token_id]))
    if inside:
        pieces.append(markers[1])
    return "".join(pieces)


def build_datasets(data_args, tokenizer, training_args):
    """Loads, validates and tokenises the training (and evaluation) conversations.

    Returns (train_dataset, eval_dataset_or_None, summary) where summary holds per-file reports and
    the conversations dropped at tokenisation by reason.

    Raises:
        DataError: a file is missing, empty or not JSON; with --strict_data, the first invalid record;
            no conversation is left to train on.
    """
    from datasets import Dataset

    ensure_chat_template(tokenizer)
    conversations, reports = load_conversations(data_args.data_files, strict=data_args.strict_data)
    eval_conversations = None
    if data_args.eval_data_files:
        eval_conversations, eval_reports = load_conversations(data_args.eval_data_files, strict=data_args.strict_data)
        reports += eval_reports
    dropped: Counter = Counter()

    def tokenise(rows: list[dict], split: str):
        if not rows:
            return None
        dataset = Dataset.from_list(rows)
        with training_args.main_process_first(desc=f"tokenising {split}"):
            dataset = dataset.map(
                tokenize_batch,
                batched=True,
                num_proc=data_args.preprocessing_num_workers,
                fn_kwargs={"tokenizer": tokenizer, "max_length": data_args.max_length},
                remove_columns=dataset.column_names,
                desc=f"Tokenising {split} conversations",
            )
        dropped.update(reason for reason in dataset["drop_reason"] if reason)
        dataset = dataset.filter(lambda reason: reason == "", input_columns="drop_reason")
        return dataset.remove_columns(["drop_reason", "truncated"])

    train_dataset = tokenise(conversations, "train")
    eval_dataset = tokenise(eval_conversations, "eval") if eval_conversations else None
    if train_dataset is None or len(train_dataset) == 0:
        files = ", ".join(data_args.data_files)
        raise DataError(f"{files}: no usable conversation left (skipped: {dict(dropped) or 'see report'}); check the data")
    if eval_dataset is None and data_args.validation_split_percentage > 0:
        split = train_dataset.train_test_split(test_size=data_args.validation_split_percentage / 100, seed=training_args.seed)
        train_dataset, eval_dataset = split["train"], split["test"]
    summary = {"files": reports, "dropped_at_tokenisation": dict(dropped)}
    return train_dataset, eval_dataset, summary
