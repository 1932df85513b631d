"""ChatML data: many files in, one clean tokenised dataset out, every skipped record counted.

Pipeline (`build_datasets`):
  1. resolve  `--data_files` files, directories and globs -> a sorted list of data files; each is checked
              at once (exists, not empty, JSON or Parquet) so a bad path fails before any work.
  2. read     .jsonl / .json (array or JSON lines) / .jsonl.gz / .json.gz / .parquet, record by record.
  3. normalise every record (ChatML/OpenAI `messages` or ShareGPT `conversations`) to one fixed schema
              {"messages": [{"role", "content"}], "source", "line"}, or skip it with a reason.
  4. tokenise with the tokenizer's chat template and assistant-only labels (`datasets.map`, `num_proc`
              workers), drop conversations left with no supervised token, count them against their file.
  5. cache    the result on disk under a fingerprint of files, tokenizer, template, settings and this code.

Label contract (tests check it on decoded spans): `labels` equals `input_ids` with IGNORE_INDEX (-100)
everywhere except the tokens of every assistant message's content and the end-of-turn token that
closes it (`<|im_end|>` in ChatML). Role headers, system/user/tool turns and the newline after the
end-of-turn token are not supervised. It holds for any chat template, with or without
`{% generation %}` tags, because supervised spans are found on the rendered text (character
offsets) rather than by template markers.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import gzip
import hashlib
import json
import logging
import math
import os
import re
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
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
# Role names other tools write, mapped onto ours (ShareGPT's human/gpt, Gemma's model, OpenAI's developer).
ROLE_ALIASES = {
    "human": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "developer": "system",
    "function": "tool",
    "observation": "tool",
}
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
DATA_SUFFIXES = JSON_SUFFIXES + PARQUET_SUFFIXES
MAX_EXAMPLES = 3  # file:line examples kept per (file, reason)

# Skip reasons at tokenisation time (reading-time reasons come from `normalize_record`).
NO_SUPERVISED_TOKEN = "no supervised token"
TRUNCATED_TO_NOTHING = "no supervised token after truncation to --max_length"


class DataError(ValueError):
    """Bad input data: the message names the file, the line and what to do."""


# --------------------------------------------------------------------------------------------------
# 1. Resolving --data_files


def resolve_data_files(specs: list[str], flag: str = "--data_files") -> tuple[list[str], list[str]]:
    """Expands files, directories (recursively) and globs into data files, in a stable order.

    Returns (data_files, ignored) where `ignored` lists files found in directories or globs whose
    suffix is not a data format (reported, never read). A file named explicitly must have a data suffix.

    Raises:
        DataError: a path does not exist, a glob or directory yields no data file, or an explicitly
            named file has an unsupported suffix.
    """
    files: list[str] = []
    ignored: list[str] = []

    def add_directory(directory: str) -> int:
        found = 0
        for root, dirnames, filenames in os.walk(directory):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = os.path.join(root, name)
                if name.endswith(DATA_SUFFIXES):
                    files.append(path)
                    found += 1
                else:
                    ignored.append(path)
        return found

    for spec in specs:
        if glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            found = 0
            for path in matches:
                if os.path.isdir(path):
                    found += add_directory(path)
                elif path.endswith(DATA_SUFFIXES):
                    files.append(path)
                    found += 1
                else:
                    ignored.append(path)
            if not found:
                raise DataError(f"{flag} {spec}: the pattern matches no {'/'.join(DATA_SUFFIXES)} file")
        elif os.path.isdir(spec):
            if not add_directory(spec):
                raise DataError(f"{flag} {spec}: the directory holds no {'/'.join(DATA_SUFFIXES)} file")
        elif os.path.exists(spec):
            if not spec.endswith(DATA_SUFFIXES):
                raise DataError(f"{spec}: unsupported data file type; use {', '.join(DATA_SUFFIXES)} ({flag})")
            files.append(spec)
        else:
            raise DataError(f"{spec}: data file not found; check {flag}")
    unique = list(dict.fromkeys(os.path.normpath(path) for path in files))
    return unique, sorted(set(ignored) - set(unique))


def _open_text(path: str):
    opener = gzip.open if path.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8-sig")


def check_data_file(path: str) -> None:
    """Fails at once on a file that is missing, empty, or not JSON/Parquet at all (reads only its head).

    Raises:
        DataError: naming the file and what is wrong with it.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found; check --data_files")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: data file is empty; remove it from --data_files")
    if path.endswith(PARQUET_SUFFIXES):
        with open(path, "rb") as f:
            if f.read(4) != b"PAR1":
                raise DataError(f"{path}: not a Parquet file (no PAR1 header); fix it or remove it from --data_files")
        return
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read(1 << 16)
        # An incremental decoder tolerates a character cut at the 64 KiB boundary.
        head = codecs.getincrementaldecoder("utf-8-sig")().decode(raw, final=False)
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read the file ({err}); fix it or remove it from --data_files") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text, so not JSON; fix it or remove it from --data_files") from None
    stripped = head.lstrip()
    if not stripped:
        raise DataError(f"{path}: data file is empty (whitespace only); remove it from --data_files")
    if stripped.startswith("["):
        return
    lines = head.splitlines()
    complete = lines if len(raw) < (1 << 16) else lines[:-1]
    if not complete and stripped.startswith("{"):
        return  # one record longer than the head; the full read decides
    for line in complete:
        if not line.strip():
            continue
        try:
            json.loads(line)
            return
        except json.JSONDecodeError:
            continue
    if stripped.startswith("{"):
        return  # maybe one pretty-printed object; the full read decides
    raise DataError(f"{path}: not JSON (no line of its first 64 KiB parses); expected JSON lines or a JSON array")


# --------------------------------------------------------------------------------------------------
# 2. Reading records


class BrokenLine(str):
    """The skip reason of a line that is not JSON; the parser's message is kept for --strict_data only,
    so the report groups all broken lines under one reason."""

    def __new__(cls, detail: str):
        reason = super().__new__(cls, "broken JSON line")
        reason.detail = detail
        return reason


def _iter_json_array(path: str, text: str) -> Iterator[tuple[int, Any, str | None]]:
    """Yields (line, element, None) for each element of a JSON array, with its real line number."""
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"\s*")
    index = whitespace.match(text, 0).end() + 1  # past '['
    line, counted_to = 1, 0
    while True:
        index = whitespace.match(text, index).end()
        if text.startswith("]", index):
            return
        line += text.count("\n", counted_to, index)
        counted_to = index
        try:
            element, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as err:
            # Inside an array there is no way to resynchronise: the rest of the file is unreadable.
            raise DataError(
                f"{path}:{err.lineno}: broken JSON inside the array ({err.msg}); the rest of the file cannot be "
                "read, fix it or remove it from --data_files"
            ) from None
        yield line, element, None
        index = whitespace.match(text, index).end()
        if text.startswith(",", index):
            index += 1
        elif not text.startswith("]", index):
            at_line = text.count("\n", 0, index) + 1
            raise DataError(f"{path}:{at_line}: broken JSON inside the array (expected ',' or ']'); fix the file")


def iter_records(path: str) -> Iterator[tuple[int, Any, str | None]]:
    """Yields (line_number, record_or_None, error_or_None) for every record of one data file.

    JSON arrays and JSON lines are told apart by content, not suffix (a .json file may hold either).
    Parquet rows are numbered from 1 like lines.

    Raises:
        DataError: the file cannot be read at all, or a JSON array is broken part-way.
    """
    if path.endswith(PARQUET_SUFFIXES):
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read the Parquet file ({err}); fix it or remove it from --data_files") from None
        row = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                row += 1
                yield row, record, None
        return
    try:
        with _open_text(path) as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the file as UTF-8 text ({err}); fix it or remove it from --data_files") from None
    if text.lstrip().startswith("["):
        yield from _iter_json_array(path, text)
        return
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    try:
        json.loads(first)
    except json.JSONDecodeError:
        # Not JSON lines from the first line on: maybe one pretty-printed record.
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            pass
        else:
            yield 1, record, None
            return
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield line_number, json.loads(line), None
        except json.JSONDecodeError as err:
            yield line_number, None, BrokenLine(f"{err.msg} at column {err.colno}")


# --------------------------------------------------------------------------------------------------
# 3. Normalising records to one schema


def _content_text(content: Any) -> str | None:
    """A message's content as text: strings as they are, numbers printed, text parts joined; None if not text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (int, float)) and not isinstance(content, bool):
        return str(content)
    if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": ...}, ...]
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                return None
        return "".join(texts)
    return None


def normalize_record(record: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    """Turns one ChatML (`messages`) or ShareGPT (`conversations`) record into [{"role", "content"}].

    Returns (messages, None) or (None, reason). Extra top-level and message fields are dropped, numbers
    become text and None becomes "", so records from any file share one Arrow schema.
    """
    if not isinstance(record, dict):
        return None, "record is not a JSON object"
    if record.get("messages") is not None:
        raw_messages, role_key, content_key = record["messages"], "role", "content"
    elif record.get("conversations") is not None:  # ShareGPT
        raw_messages, role_key, content_key = record["conversations"], "from", "value"
    else:
        return None, "no messages"
    if not isinstance(raw_messages, list) or not raw_messages:
        return None, "no messages"
    messages = []
    for message in raw_messages:
        if not isinstance(message, dict):
            return None, "message is not an object"
        role = message.get(role_key, message.get("role"))
        content = message.get(content_key, message.get("content"))
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in VALID_ROLES:
            return None, f"unknown role {str(role)[:30]!r}"
        text = _content_text(content)
        if text is None:
            return None, "non-text content"
        if role == "assistant" and not text.strip():
            return None, "empty assistant content"
        messages.append({"role": role, "content": text})
    if not any(message["role"] == "assistant" for message in messages):
        return None, "no assistant turn"
    return messages, None


def validate_messages(messages: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    """`normalize_record` for a bare messages list."""
    return normalize_record({"messages": messages})


@dataclass
class FileReport:
    """What happened to the records of one input file. read == kept + sum(skipped.values())."""

    path: str
    split: str = "train"
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few "file:line"

    def skip(self, reason: str, where: str, max_examples: int = MAX_EXAMPLES) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < max_examples:
            shown.append(where)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "split": self.split,
            "read": self.read,
            "kept": self.kept,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(self.skipped.most_common()),
            "examples": {reason: self.examples[reason] for reason, _ in self.skipped.most_common()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "FileReport":
        return cls(data["path"], data["split"], data["read"], data["kept"], Counter(data["skipped_by_reason"]), dict(data["examples"]))


def read_file_records(path: str, source: int, strict: bool, split: str = "train") -> tuple[list[dict], FileReport]:
    """Reads and normalises one file: rows {"messages", "source", "line"} plus its FileReport.

    Raises:
        DataError: the file holds no JSON record at all; with `strict`, the first invalid record.
    """
    report = FileReport(path=path, split=split)
    rows: list[dict] = []
    json_seen = False
    for line_number, record, error in iter_records(path):
        report.read += 1
        if error is None:
            json_seen = True
            messages, error = normalize_record(record)
        where = f"{path}:{line_number}"
        if error is not None:
            if strict:
                detail = f" ({error.detail})" if isinstance(error, BrokenLine) else ""
                raise DataError(f"{where}: {error}{detail}; fix the record or drop --strict_data to skip such records")
            report.skip(error, where)
            continue
        report.kept += 1
        rows.append({"messages": messages, "source": source, "line": line_number})
    if not json_seen:
        raise DataError(f"{path}: no JSON record could be read; is this a JSON/JSONL file?")
    return rows, report


def load_conversations(paths: list[str], strict: bool = False) -> tuple[list[dict], list[FileReport]]:
    """Reads ChatML/ShareGPT records from data files (or directories/globs) into normalised rows.

    Returns ([{"messages", "source", "line"}], [FileReport per file]); `source` indexes the reports.

    Raises:
        DataError: a path or file is bad (see `resolve_data_files`, `check_data_file`); with `strict`,
            the first invalid record.
    """
    files, _ = resolve_data_files(paths)
    for path in files:
        check_data_file(path)
    conversations: list[dict] = []
    reports: list[FileReport] = []
    for source, path in enumerate(files):
        rows, report = read_file_records(path, source, strict)
        conversations.extend(rows)
        reports.append(report)
    return conversations, reports


# --------------------------------------------------------------------------------------------------
# 4. Rendering and masking


def ensure_chat_template(tokenizer) -> bool:
    """Gives a tokenizer without a chat template the built-in ChatML one (with a warning).

    Returns True when the built-in template was installed.
    """
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("The tokenizer has no chat_template; using the built-in ChatML template.")
        tokenizer.chat_template = CHATML_TEMPLATE
        return True
    return False


def _template_of(tokenizer) -> str:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: training uses the default one
        template = template.get("default") or next(iter(template.values()))
    if not template:
        raise DataError("the tokenizer has no chat template; call ensure_chat_template first")
    return template


def _special_token_strings(tokenizer) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    specials.update(str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False))
    return sorted((s for s in specials if s), key=len, reverse=True)


class ChatRenderer:
    """Renders conversations with a tokenizer's chat template, like `apply_chat_template(tokenize=False)`.

    It compiles the template once and calls it directly (about 2x faster than apply_chat_template,
    which re-validates its arguments on every call). The compiled template is not pickled: each
    `datasets.map` worker compiles its own.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template = _template_of(tokenizer)
        self._compiled = None

    def __getstate__(self):
        return {**self.__dict__, "_compiled": None}

    def _compile(self):
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(self.template)
            special_tokens = json.loads(json.dumps(self.tokenizer.special_tokens_map, default=str))
            self._compiled = lambda messages, add_generation_prompt: compiled.render(
                messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **special_tokens
            )
        except ImportError:  # a transformers without the helper: the public API, slower
            self._compiled = lambda messages, add_generation_prompt: self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=self.template
            )

    def __call__(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        if self._compiled is None:
            self._compile()
        return self._compiled(messages, add_generation_prompt)


# Placeholders from Unicode's private-use area: survive `trim` and never occur in real text.
_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")


class ConversationTokenizer:
    """Tokenises conversations with assistant-only labels for any chat template.

    Finding the supervised characters: the template is rendered once with every message's content
    replaced by a placeholder (the "skeleton", cached per sequence of roles), which tells what the
    template writes around each message. The real rendering is then walked literal by literal, each
    content matched as written or trimmed. Templates that change content in other ways (or whose
    layout depends on it) fall back to rendering the prefix before and through each assistant turn,
    which costs O(turns) renders per conversation instead of one.

    An assistant span is its content plus everything up to and including the first special token the
    template writes after it (the end-of-turn token), nothing after that.
    """

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.render = ChatRenderer(tokenizer)
        self.specials = _special_token_strings(tokenizer)
        self._skeletons: dict[tuple[str, ...], list] = {}

    def __getstate__(self):
        return {**self.__dict__, "_skeletons": {}}

    # -- spans ---------------------------------------------------------------------------------

    def _end_of_turn(self, literal: str) -> int:
        """Characters of `literal` (what follows an assistant content) that close the turn: up to and
        including its first special token, or 0 when it has none."""
        best = None
        for special in self.specials:
            position = literal.find(special)
            if position >= 0 and (best is None or position < best[0]):
                best = (position, len(special))
        return best[0] + best[1] if best else 0

    def _skeleton(self, roles: tuple[str, ...]) -> list | None:
        """[literal0, index1, literal1, index2, ...] of the template for these roles; None if unusable."""
        if roles not in self._skeletons:
            if len(self._skeletons) >= 10_000:  # bounded: role sequences repeat, but never hold unbounded memory
                self._skeletons.clear()
            placeholders = [{"role": role, "content": _PLACEHOLDER.format(i)} for i, role in enumerate(roles)]
            try:
                rendered = self.render(placeholders)
            except Exception:  # a template that inspects content may reject placeholders: use the fallback
                self._skeletons[roles] = None
                return None
            parts = _PLACEHOLDER_RE.split(rendered)
            layout: list = [parts[0]]
            for index_text, literal in zip(parts[1::2], parts[2::2]):
                layout += [int(index_text), literal]
            indices = layout[1::2]
            assistants = [i for i, role in enumerate(roles) if role == "assistant"]
            usable = all(indices.count(i) == 1 for i in assistants) and "\ue001" not in "".join(layout[0::2])
            self._skeletons[roles] = layout if usable else None
        return self._skeletons[roles]

    def _spans_from_skeleton(self, full: str, messages: list[dict], layout: list) -> list[tuple[int, int]] | None:
        if not full.startswith(layout[0]):
            return None
        position, spans = len(layout[0]), []
        for index, literal in zip(layout[1::2], layout[2::2]):
            content = messages[index]["content"]
            for candidate in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())):
                end = position + len(candidate)
                if full.startswith(candidate, position) and full.startswith(literal, end):
                    break
            else:
                return None
            if messages[index]["role"] == "assistant":
                spans.append((position, end + self._end_of_turn(literal)))
            position = end + len(literal)
        return spans if position == len(full) else None

    def _spans_from_prefixes(self, full: str, messages: list[dict]) -> list[tuple[int, int]]:
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.render(messages[:index], add_generation_prompt=True)
            through = self.render(messages[: index + 1])
            if not full.startswith(prefix) or not full.startswith(through):
                raise DataError("chat template renders earlier turns differently; cannot locate assistant spans")
            content = message["content"].strip()  # templates often trim content
            start = full.find(content, len(prefix), len(through))
            if start < 0:
                raise DataError("chat template does not render the assistant content verbatim")
            end = start + len(content)
            spans.append((start, end + self._end_of_turn(full[end:])))
        return spans

    def supervised_char_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """(rendered text, [(start, end) character spans to supervise]).

        Raises:
            DataError: the template cannot be matched against the conversation (see class doc).
        """
        try:
            full = self.render(messages)
        except Exception as err:  # jinja's raise_exception, type errors in templates, ...
            raise DataError(f"chat template error: {str(err).splitlines()[0][:80]}") from None
        layout = self._skeleton(tuple(message["role"] for message in messages))
        spans = self._spans_from_skeleton(full, messages, layout) if layout else None
        if spans is None:
            spans = self._spans_from_prefixes(full, messages)
        return full, spans

    # -- tokens --------------------------------------------------------------------------------

    @staticmethod
    def _token_range(encoding, start: int, end: int) -> tuple[int, int] | None:
        """[first, last + 1) tokens holding the characters start..end-1 of the text, or None.

        Asks the Rust encoding (`char_to_token`) instead of walking every offset in Python. Characters
        that map to no token (whitespace some tokenizers trim off offsets) are stepped over; the bytes
        of a character split over several tokens (Chinese in a byte-level BPE) are all taken.
        """
        first = next((t for t in map(encoding.char_to_token, range(start, end)) if t is not None), None)
        if first is None:
            return None
        last = next(t for t in map(encoding.char_to_token, range(end - 1, start - 1, -1)) if t is not None) + 1
        while last < len(encoding) and encoding.token_to_chars(last)[0] < end:
            last += 1
        return first, last

    def _encode(self, texts: list[str], spans_per_text: list) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """[(input_ids, [token ranges to supervise])] per text."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            results = []
            for encoding, spans in zip(backend.encode_batch(texts, add_special_tokens=False), spans_per_text):
                ranges = [self._token_range(encoding, start, end) for start, end in spans]
                results.append((encoding.ids, [r for r in ranges if r is not None]))
            return results
        # Slow tokenizers have no offsets: tokenise the text piece by piece at span boundaries.
        results = []
        for text, spans in zip(texts, spans_per_text):
            ids, ranges, position = [], [], 0
            for start, end in spans:
                ids += self.tokenizer.encode(text[position:start], add_special_tokens=False) if start > position else []
                supervised = self.tokenizer.encode(text[start:end], add_special_tokens=False)
                ranges.append((len(ids), len(ids) + len(supervised)))
                ids += supervised
                position = end
            ids += self.tokenizer.encode(text[position:], add_special_tokens=False) if text[position:] else []
            results.append((ids, ranges))
        return results

    def _row(self, input_ids: list[int], ranges: list[tuple[int, int]]) -> dict[str, Any]:
        """One row: labels from the supervised token ranges, truncated to max_length; int32 arrays."""
        truncated = len(input_ids) > self.max_length
        ids = np.asarray(input_ids[: self.max_length], dtype=np.int32)  # (T,)
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)  # (T,)
        supervised = 0
        for first, last in ranges:
            last = min(last, len(ids))
            if first < last:
                labels[first:last] = ids[first:last]
                supervised += last - max(first, 1)  # position 0 is never a target after the causal shift
        if supervised <= 0:
            return _dropped_row(TRUNCATED_TO_NOTHING if truncated else NO_SUPERVISED_TOKEN, truncated)
        return {"input_ids": ids, "labels": labels, "length": len(ids), "supervised": supervised,
                "truncated": truncated, "drop_reason": ""}

    def _rows(self, conversations: list[list[dict]]) -> list[dict[str, Any]]:
        rows: list[dict | None] = []
        texts, spans_per_text, positions = [], [], []
        for messages in conversations:
            try:
                text, spans = self.supervised_char_spans(messages)
            except DataError as err:
                rows.append(_dropped_row(str(err), False))
                continue
            positions.append(len(rows))
            rows.append(None)
            texts.append(text)
            spans_per_text.append(spans)
        for position, (input_ids, ranges) in zip(positions, self._encode(texts, spans_per_text)):
            rows[position] = self._row(input_ids, ranges)
        return rows

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        """`datasets.map(batched=True)` function returning Python lists; never raises, marks bad rows
        with `drop_reason`."""
        rows = self._rows(batch["messages"])
        columns = {key: [row[key] for row in rows] for key in TOKENISED_COLUMNS}
        columns["input_ids"] = [ids.tolist() for ids in columns["input_ids"]]
        columns["labels"] = [labels.tolist() for labels in columns["labels"]]
        return columns

    def to_arrow(self, batch: dict[str, list]):
        """The same as __call__, as an Arrow table built from flat int32 buffers (what the pipeline maps:
        about 20% less CPU than Python lists). Passes "source" and "line" through when present."""
        import pyarrow as pa

        rows = self._rows(batch["messages"])
        lengths = np.fromiter((len(row["input_ids"]) for row in rows), dtype=np.int32, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        empty = np.zeros(0, dtype=np.int32)
        columns = {
            "input_ids": pa.ListArray.from_arrays(offsets, np.concatenate([row["input_ids"] for row in rows] or [empty])),
            "labels": pa.ListArray.from_arrays(offsets, np.concatenate([row["labels"] for row in rows] or [empty])),
            "length": pa.array(lengths),
            "supervised": pa.array([row["supervised"] for row in rows], type=pa.int32()),
            "truncated": pa.array([row["truncated"] for row in rows], type=pa.bool_()),
            "drop_reason": pa.array([row["drop_reason"] for row in rows], type=pa.string()),
        }
        for name in ("source", "line"):
            if name in batch:
                columns[name] = pa.array(batch[name], type=pa.int32() if name == "source" else pa.int64())
        return pa.table(columns)

    def tokenize(self, messages: list[dict]) -> dict[str, Any]:
        """One conversation: {"input_ids", "labels", "length", "supervised", "truncated", "drop_reason"}."""
        return {key: values[0] for key, values in self({"messages": [messages]}).items()}


TOKENISED_COLUMNS = ("input_ids", "labels", "length", "supervised", "truncated", "drop_reason")


def _dropped_row(reason: str, truncated: bool) -> dict[str, Any]:
    empty = np.zeros(0, dtype=np.int32)
    return {"input_ids": empty, "labels": empty, "length": 0, "supervised": 0, "truncated": truncated, "drop_reason": reason}


def supervised_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Renders a conversation and returns (text, character spans to supervise); see ConversationTokenizer."""
    return ConversationTokenizer(tokenizer, max_length=1).supervised_char_spans(messages)


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> dict[str, Any]:
    """Tokenises one conversation with assistant-only labels.

    Returns {"input_ids", "labels", "length", "supervised", "truncated", "drop_reason"}; `drop_reason` is
    "" for a kept conversation, else why it must be dropped (the caller counts it).
    """
    return ConversationTokenizer(tokenizer, max_length).tokenize(messages)


def tokenize_batch(batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
    """`datasets.map(batched=True)` function over a "messages" column; never raises."""
    return ConversationTokenizer(tokenizer, max_length)(batch)


# --------------------------------------------------------------------------------------------------
# Batching and display


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


def supervision_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """[(decoded text, supervised)] for each run of tokens with the same supervision.

    Decoding whole runs (not token by token) keeps characters split over byte tokens (Chinese) intact.
    """
    runs: list[tuple[str, bool]] = []
    start = 0
    for index in range(1, len(input_ids) + 1):
        if index == len(input_ids) or (labels[index] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            runs.append((tokenizer.decode(input_ids[start:index]), labels[start] != IGNORE_INDEX))
            start = index
    return runs


def format_supervision(tokenizer, input_ids: list[int], labels: list[int], markers: tuple[str, str] = ("[[", "]]")) -> str:
    """Decodes a tokenised conversation with supervised spans wrapped in `markers` (for humans)."""
    return "".join(markers[0] + text + markers[1] if supervised else text for text, supervised in supervision_runs(tokenizer, input_ids, labels))


# --------------------------------------------------------------------------------------------------
# 5. The whole pipeline, cached

def _features():
    from datasets import Features, List, Value

    return Features(
        {
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "source": Value("int32"),
            "line": Value("int64"),
        }
    )


def _pipeline_code_hash() -> str:
    """Changing this file (masking, normalisation, ...) invalidates every cached dataset."""
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(_template_of(tokenizer).encode())
    return digest.hexdigest()


def data_fingerprint(train_files: list[str], eval_files: list[str], tokenizer, max_length: int, strict: bool) -> str:
    """Key of a cached tokenised dataset: the files (path, size, mtime), tokenizer, template, settings, code."""
    state = {
        "code": _pipeline_code_hash(),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "strict": strict,
        "files": {
            split: [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files]
            for split, files in (("train", train_files), ("eval", eval_files))
        },
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:24]


def default_cache_dir() -> str:
    from datasets import config

    return os.path.join(str(config.HF_DATASETS_CACHE), "dft_trainer")


def _percentile(lengths: np.ndarray, q: float) -> int:
    return int(np.percentile(lengths, q, method="nearest")) if len(lengths) else 0


def _tokenise_files(files: list[str], split: str, first_source: int, strict: bool, encoder: ConversationTokenizer,
                    num_proc: int | None, reports: list[FileReport]):
    """Reads, normalises, merges and tokenises one split; updates `reports`; returns (dataset, stats)."""
    from datasets import Dataset, concatenate_datasets

    per_file = []
    for offset, path in enumerate(files):
        rows, report = read_file_records(path, first_source + offset, strict, split)
        reports.append(report)
        if rows:  # one fixed schema per file, so the merge below never meets a type conflict
            per_file.append(Dataset.from_list(rows, features=_features()))
    stats = {"tokens": 0, "supervised_tokens": 0, "truncated": 0, "lengths": np.zeros(0, dtype=np.int64)}
    if not per_file:
        return None, stats
    merged = concatenate_datasets(per_file)
    workers = num_proc if num_proc and num_proc > 1 and len(merged) >= 2 * num_proc else None
    tokenised = merged.map(
        encoder.to_arrow,
        batched=True,
        batch_size=500,
        num_proc=workers,
        remove_columns=merged.column_names,
        new_fingerprint=f"dft-tokenise-{uuid.uuid4().hex}",  # our own cache decides reuse, not datasets'
        desc=f"Tokenising {split} conversations",
    )
    table = tokenised.select_columns(["drop_reason", "source", "line", "truncated", "length", "supervised"]).to_dict()
    drop_reasons = table["drop_reason"]
    kept_indices = []
    for index, reason in enumerate(drop_reasons):
        report = reports[table["source"][index]]
        if reason:
            report.kept -= 1
            report.skip(reason, f"{report.path}:{table['line'][index]}")
        else:
            kept_indices.append(index)
    lengths = np.asarray(table["length"], dtype=np.int64)[kept_indices]
    stats = {
        "tokens": int(lengths.sum()),
        "supervised_tokens": int(np.asarray(table["supervised"], dtype=np.int64)[kept_indices].sum()),
        "truncated": int(sum(table["truncated"])),
        "lengths": lengths,
    }
    dataset = tokenised.select(kept_indices).select_columns(["input_ids", "labels", "length"])
    return dataset, stats


def _token_summary(stats: list[dict], reports: list[FileReport], max_length: int) -> dict:
    lengths = np.concatenate([s["lengths"] for s in stats]) if stats else np.zeros(0, dtype=np.int64)
    return {
        "conversations": int(len(lengths)),
        "total_tokens": sum(s["tokens"] for s in stats),
        "supervised_tokens": sum(s["supervised_tokens"] for s in stats),
        "length_p50": _percentile(lengths, 50),
        "length_p90": _percentile(lengths, 90),
        "length_p99": _percentile(lengths, 99),
        "length_max": int(lengths.max()) if len(lengths) else 0,
        "max_length": max_length,
        "truncated": sum(s["truncated"] for s in stats),
        "dropped_after_truncation": sum(r.skipped[TRUNCATED_TO_NOTHING] for r in reports),
    }


def _build_and_save(cache_path: str | None, train_files, eval_files, strict, encoder, num_proc) -> dict:
    """Builds the tokenised splits and their report; saves them atomically under `cache_path`."""
    reports: list[FileReport] = []
    train, train_stats = _tokenise_files(train_files, "train", 0, strict, encoder, num_proc, reports)
    evaluation, eval_stats = (None, None)
    if eval_files:
        evaluation, eval_stats = _tokenise_files(eval_files, "eval", len(train_files), strict, encoder, num_proc, reports)
    report = {
        "files": [r.to_dict() for r in reports],
        "tokens": _token_summary([s for s in (train_stats, eval_stats) if s], reports, encoder.max_length),
    }
    built = {"train": train, "eval": evaluation, "report": report}
    if cache_path is None:
        return built
    staging = f"{cache_path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(staging)
    for split in ("train", "eval"):
        if built[split] is not None:
            built[split].save_to_disk(os.path.join(staging, split))
    with open(os.path.join(staging, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False)
    try:
        os.rename(staging, cache_path)  # atomic: a reader never sees half an entry
    except OSError:  # another node's main process got there first; its entry is identical
        shutil.rmtree(staging, ignore_errors=True)
    return _load_cached(cache_path)


def _load_cached(cache_path: str) -> dict:
    from datasets import load_from_disk

    with open(os.path.join(cache_path, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    splits = {split: load_from_disk(os.path.join(cache_path, split)) if os.path.isdir(os.path.join(cache_path, split)) else None
              for split in ("train", "eval")}
    return {**splits, "report": report}


def build_datasets(data_args, tokenizer, training_args):
    """Loads, validates, tokenises (or reuses the cached result) and splits the training data.

    Returns (train_dataset, eval_dataset_or_None, report) where `report` is the JSON-ready data report
    (per-file read/kept/skipped by reason with examples, token counts, length percentiles, cache,
    split sizes); `format_data_report` turns it into the table rank 0 logs.

    Raises:
        DataError: a path or file is bad; with --strict_data, the first invalid record; no
            conversation is left to train on; the validation split would be empty.
    """
    using_builtin = ensure_chat_template(tokenizer)
    train_files, ignored = resolve_data_files(data_args.data_files, "--data_files")
    eval_files, eval_ignored = resolve_data_files(data_args.eval_data_files, "--eval_data_files") if data_args.eval_data_files else ([], [])
    for path in train_files + eval_files:  # on every rank, so a bad file stops all of them at once
        check_data_file(path)
    cache_root = getattr(data_args, "data_cache_dir", None)
    cache_path = None
    if cache_root != "none":
        cache_root = cache_root or default_cache_dir()
        os.makedirs(cache_root, exist_ok=True)
        fingerprint = data_fingerprint(train_files, eval_files, tokenizer, data_args.max_length, data_args.strict_data)
        cache_path = os.path.join(cache_root, fingerprint)
    encoder = ConversationTokenizer(tokenizer, data_args.max_length)
    first = training_args.main_process_first(desc="data preprocessing") if training_args is not None else contextlib.nullcontext()
    with first:
        reused = cache_path is not None and os.path.isfile(os.path.join(cache_path, "report.json"))
        if reused:
            logger.info("reusing the tokenised data cached in %s", cache_path)
            built = _load_cached(cache_path)
        else:
            built = _build_and_save(cache_path, train_files, eval_files, data_args.strict_data, encoder,
                                    data_args.preprocessing_num_workers)
    report, train_dataset, eval_dataset = built["report"], built["train"], built["eval"]
    report["ignored_files"] = ignored + eval_ignored
    report["chat_template"] = "built-in ChatML (the tokenizer has none)" if using_builtin else "tokenizer's own"
    report["cache"] = {"path": cache_path, "reused": reused}
    if train_dataset is None or len(train_dataset) == 0:
        skipped = Counter()
        for file_report in report["files"]:
            skipped.update(file_report["skipped_by_reason"])
        raise DataError(f"{', '.join(train_files)}: no usable conversation left (skipped: {dict(skipped)}); check the data "
                        "with scripts/inspect_data.py")
    if eval_files and (eval_dataset is None or len(eval_dataset) == 0):
        raise DataError(f"{', '.join(eval_files)}: no usable evaluation conversation left (see the report); "
                        "check --eval_data_files")
    eval_source = "--eval_data_files" if eval_files else None
    if eval_dataset is None and data_args.validation_split_percentage > 0:
        if len(train_dataset) < 2:
            raise DataError(f"--validation_split_percentage {data_args.validation_split_percentage}: only "
                            f"{len(train_dataset)} conversation, nothing left to hold out; set it to 0")
        seed = training_args.seed if training_args is not None else 42
        train_dataset, eval_dataset = split_for_validation(train_dataset, data_args.validation_split_percentage, seed)
        eval_source = f"--validation_split_percentage {data_args.validation_split_percentage}"
    report["splits"] = {"train": len(train_dataset), "eval": len(eval_dataset) if eval_dataset is not None else 0, "eval_from": eval_source}
    report["totals"] = _totals(report["files"])
    return train_dataset, eval_dataset, report


def split_for_validation(dataset, percentage: float, seed: int):
    """(train, eval): a random `percentage` of the rows (rounded up) held out, the same ones for the same seed.

    The row indices live in memory (datasets' train_test_split would write index files into the cache entry).
    """
    held_out = math.ceil(len(dataset) * percentage / 100)
    order = np.random.default_rng(seed).permutation(len(dataset))
    return (dataset.select(np.sort(order[held_out:]), keep_in_memory=True),
            dataset.select(np.sort(order[:held_out]), keep_in_memory=True))


def _totals(files: list[dict]) -> dict:
    by_reason: Counter = Counter()
    for file_report in files:
        by_reason.update(file_report["skipped_by_reason"])
    return {
        "read": sum(f["read"] for f in files),
        "kept": sum(f["kept"] for f in files),
        "skipped": sum(f["skipped"] for f in files),
        "skipped_by_reason": dict(by_reason.most_common()),
    }


def format_data_report(report: dict) -> str:
    """The data report as a table for the log (what a person reads before spending GPU hours)."""
    files = report["files"]
    width = max([len("total")] + [len(f["path"]) for f in files])
    lines = [f"{'file':<{width}}  split      read      kept   skipped"]
    for f in files:
        lines.append(f"{f['path']:<{width}}  {f['split']:<5} {f['read']:>9,} {f['kept']:>9,} {f['skipped']:>9,}")
        for reason, count in f["skipped_by_reason"].items():
            examples = ", ".join(f["examples"].get(reason, []))
            lines.append(f"    {count:>7,} x {reason}  (e.g. {examples})")
    totals = report.get("totals") or _totals(files)
    lines.append(f"{'total':<{width}}        {totals['read']:>9,} {totals['kept']:>9,} {totals['skipped']:>9,}")
    tokens = report["tokens"]
    lines.append(
        f"tokens: {tokens['total_tokens']:,} total, {tokens['supervised_tokens']:,} supervised over "
        f"{tokens['conversations']:,} conversations; length p50 {tokens['length_p50']}, p90 {tokens['length_p90']}, "
        f"p99 {tokens['length_p99']}, max {tokens['length_max']}"
    )
    lines.append(
        f"truncated to --max_length {tokens['max_length']}: {tokens['truncated']:,} "
        f"(dropped for it, no supervised token left: {tokens['dropped_after_truncation']:,})"
    )
    if "splits" in report:
        splits = report["splits"]
        lines.append(f"train {splits['train']:,} / eval {splits['eval']:,} conversations"
                     + (f" (eval from {splits['eval_from']})" if splits["eval_from"] else ""))
    if report.get("ignored_files"):
        lines.append(f"ignored (not a data file): {', '.join(report['ignored_files'])}")
    if "packing" in report:
        packing = report["packing"]
        lines.append(
            f"packing: {packing['conversations']:,} conversations in {packing['rows']:,} rows of at most "
            f"{packing['max_length']:,} tokens, efficiency {packing['efficiency']:.1%} (real tokens / rows x max_length)"
        )
    if "cache" in report and report["cache"]["path"]:
        lines.append(f"cache: {'reused' if report['cache']['reused'] else 'written'} {report['cache']['path']}")
    return "\n".join(lines)


def write_data_report(report: dict, output_dir: str) -> str:
    """Writes `output_dir/data_report.json`; returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "data_report.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    return path
