"""Chat template rendering and which tokens are supervised.

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
import re
from typing import Any

import numpy as np

from data_files import DataError
from dft_loss import IGNORE_INDEX

logger = logging.getLogger(__name__)

# The ChatML template used when a tokenizer has none (Qwen-style, without the default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Skip reasons at tokenisation time (reading-time reasons come from `normalize_record`).
NO_SUPERVISED_TOKEN = "no supervised token"
TRUNCATED_TO_NOTHING = "no supervised token after truncation to --max_length"


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
