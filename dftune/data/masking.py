"""Which tokens are supervised: ConversationTokenizer renders conversations with the chat template
(data_templates) and turns them into input_ids and labels.

Label contract (tests check it on decoded spans): `labels` equals `input_ids` with IGNORE_INDEX (-100)
everywhere except what the model generates for each trained assistant turn (its content; for a turn
with tool calls or reasoning, everything after the generation prompt) through the end-of-turn token
that closes it (`<|im_end|>` in ChatML). Role headers, system/user/tool turns and the newline after the
end-of-turn token are not supervised. It holds for any chat template, with or without
`{% generation %}` tags, because supervised spans are found on the rendered text (character
offsets) rather than by template markers.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from dftune.data.files import DataError
from dftune.data.formats import template_messages, template_tools
from dftune.data.templates import ChatRenderer
from dftune.loss.core import IGNORE_INDEX

# Skip reasons at tokenisation time (reading-time reasons come from `normalize_record`).
NO_SUPERVISED_TOKEN = "no supervised token"
TRUNCATED_TO_NOTHING = "no supervised token after truncation to --max_length"
NOT_VERBATIM = "chat template does not render the assistant content verbatim"
# Notes on kept records (counted in the data report under "adjusted").
SYSTEM_FOLDED = "system prompt folded into the first user turn (the template rejects a system role)"
REASONING_INLINED = "reasoning written as <think>...</think> in the content (the template has no reasoning field)"
HEADER_SPLIT = "first answer token merged with the role header: tokenised apart as at generation"
TURN_EXAMPLES = "extra example per assistant turn (the template renders earlier turns differently)"
REASONING_DROPPED = "reasoning not trained: the generation prompt closes the think block (e.g. enable_thinking false)"

TRAIN_ON_TURNS = ("all", "last")
@dataclass(frozen=True)
class MaskingOptions:
    """How conversations are rendered and which assistant turns are trained (part of the cache key)."""

    train_on_turns: str = "all"  # "all" assistant turns, or only the "last"; a message's "loss" overrides
    chat_template_kwargs: tuple = ()  # sorted (name, value) pairs passed to the template (enable_thinking, ...)

    @classmethod
    def from_args(cls, data_args) -> MaskingOptions:
        return cls(getattr(data_args, "train_on_turns", "all") or "all", tuple(sorted(template_kwargs(data_args).items())))


def parse_template_kwargs(text: str | None) -> dict:
    """--chat_template_kwargs (JSON text) as a dict; {} when unset.

    Raises:
        ValueError: not JSON, or not a JSON object (the message names the flag).
    """
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--chat_template_kwargs is not JSON ({err.msg}); e.g. '{{\"enable_thinking\": false}}'.") from None
    if not isinstance(kwargs, dict):
        raise ValueError("--chat_template_kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'.")
    return kwargs


def template_kwargs(data_args) -> dict:
    """The --chat_template_kwargs of `data_args` (or any object with that field) as a dict."""
    kwargs = getattr(data_args, "chat_template_kwargs", None)
    return parse_template_kwargs(kwargs) if isinstance(kwargs, str) or kwargs is None else dict(kwargs)


def fold_system_prompt(messages: list[dict]) -> list[dict]:
    """The leading system prompt folded into the first user turn, as Mistral's own tooling does for templates
    that reject a system role (a new list; the messages are not changed).

    Raises:
        DataError: there is no user turn to fold it into.
    """
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    first_user = next((m for m in rest if m["role"] == "user"), None)
    if first_user is None:
        raise DataError("chat template rejects a system role and there is no user turn to fold it into")
    first_user["content"] = f"{system}\n\n{first_user['content']}"
    return rest


def _special_token_strings(tokenizer) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    specials.update(str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False))
    return sorted((s for s in specials if s), key=len, reverse=True)


# Private-use characters: never in real text, so a probe finds exactly what the template did with them.
_PROBE = "\ue000probe\ue001"


class ConversationTokenizer:
    """Tokenises conversations with assistant-only labels for any chat template.

    Finding the supervised characters of assistant turn i: the template renders the conversation up to
    turn i with the generation prompt (P) and through turn i (T); T[len(P):] is what the model generates
    for that turn. The span starts at the assistant content (or, for a turn with reasoning or tool calls,
    at the start of the generated text) and ends with the last special token the template writes for the
    turn (its end-of-turn token), never the newline after it. When the full rendering starts with T, the
    span is supervised in the full conversation; when the template renders earlier turns differently
    (Qwen3 drops old reasoning), turn i becomes an extra example of its own, T, with only turn i supervised.

    Which turns: every assistant turn (`train_on_turns="all"`) or the last one ("last"); a message's
    "loss": true/false overrides both.
    """

    def __init__(self, tokenizer, max_length: int, options: MaskingOptions | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.options = options or MaskingOptions()
        self.render = ChatRenderer(tokenizer, dict(self.options.chat_template_kwargs))
        self.specials = _special_token_strings(tokenizer)
        # One pass over the text instead of one search per special token (Llama-3 has 256 of them);
        # longest first, so "<|im_end|>" wins over a shorter token it starts with.
        self._specials_re = re.compile("|".join(map(re.escape, self.specials))) if self.specials else None
        self._abilities: dict | None = None

    def __getstate__(self):
        return {**self.__dict__, "_abilities": None}

    # -- what the template can express ---------------------------------------------------------

    def _renders(self, messages: list[dict], tools: list | None = None) -> str | None:
        try:
            return self.render(messages, tools=tools)
        except Exception:
            return None

    def _renders_prompt(self, messages: list[dict]) -> str | None:
        try:
            return self.render(messages, add_generation_prompt=True)
        except Exception:
            return None

    @property
    def abilities(self) -> dict[str, bool]:
        """Probed once: does the template accept a system turn, and render reasoning, tool calls, tools?"""
        if self._abilities is None:
            user = {"role": "user", "content": "u"}
            answer = {"role": "assistant", "content": "a"}
            with_system = self._renders([{"role": "system", "content": "s"}, user, answer])
            call = {"type": "function", "function": {"name": _PROBE, "arguments": {}}}
            tool = {"type": "function", "function": {"name": _PROBE, "description": "d", "parameters": {"type": "object", "properties": {}}}}
            self._abilities = {
                "fold_system": with_system is None and self._renders([user, answer]) is not None,
                "reasoning": _PROBE in (self._renders([user, {**answer, "reasoning_content": _PROBE}]) or ""),
                "tool_calls": _PROBE in (self._renders([user, {"role": "assistant", "content": "", "tool_calls": [call]}]) or ""),
                "tools": _PROBE in (self._renders([user, answer], tools=[tool]) or ""),
                # Qwen3 with enable_thinking false: the prompt ends `<think>\n\n</think>\n\n`.
                "prompt_closes_reasoning": "</think>" in (self._renders_prompt([user]) or ""),
            }
        return self._abilities

    def probe_rendering(self) -> str:
        """A fixed conversation rendered now: part of the cache key, so a template whose output changes
        (today's date in Llama-3.x) never reuses a stale cache."""
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
        return "\n".join(str(self._renders(m)) for m in (messages, messages[1:]))

    # -- preparing a conversation for its template ---------------------------------------------

    def _control_token_in(self, messages: list[dict], tools: str | None) -> str | None:
        texts = [tools or ""]
        for message in messages:
            texts += [message["content"], message.get("reasoning_content") or "", message.get("tool_calls") or ""]
        joined = "\n".join(texts)
        found = self._specials_re.search(joined) if self._specials_re else None
        return found.group(0) if found else None

    def _prepare(self, messages: list[dict], tools: str | None) -> tuple[list[dict], list | None, list[int], list[str]]:
        """Normalised messages -> (template messages, tools, indices of the turns to train, notes), or
        DataError naming what cannot be expressed."""
        special = self._control_token_in(messages, tools)
        if special is not None:
            # Encoded as text, it would become the real control token (e.g. an early end of turn).
            raise DataError(f"content contains the control token text {special!r}")
        abilities, notes = self.abilities, []
        rendered = template_messages(messages)
        trained = self._trained_turns(messages)
        if any("tool_calls" in m for m in rendered) and not abilities["tool_calls"]:
            raise DataError("chat template cannot express tool calls (use --chat_template chatml or one with tool support)")
        if tools and not abilities["tools"]:
            raise DataError("chat template ignores the tools list (use --chat_template chatml or one with tool support)")
        has_reasoning = any("reasoning_content" in m or "</think>" in m["content"] for m in rendered if m["role"] == "assistant")
        if has_reasoning and abilities["prompt_closes_reasoning"]:
            # The model generates every turn after an empty think block, without reasoning: trained so,
            # and the history it sees holds its earlier turns as it generated them.
            for message in rendered:
                if message["role"] == "assistant":
                    message.pop("reasoning_content", None)
                    message["content"] = message["content"].split("</think>")[-1].lstrip()
            notes.append(REASONING_DROPPED)
        if any("reasoning_content" in m for m in rendered) and not abilities["reasoning"]:
            for message in rendered:
                if "reasoning_content" in message:
                    message["content"] = f"<think>\n{message.pop('reasoning_content').strip()}\n</think>\n\n{message['content']}"
            notes.append(REASONING_INLINED)
        if rendered[0]["role"] == "system" and abilities["fold_system"]:
            rendered = fold_system_prompt(rendered)
            notes.append(SYSTEM_FOLDED)
            trained = [index - 1 for index in trained]
        return rendered, template_tools(tools), trained, notes

    def _trained_turns(self, messages: list[dict]) -> list[int]:
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        default = set(assistants) if self.options.train_on_turns == "all" else set(assistants[-1:])
        trained = []
        for i in assistants:
            loss = messages[i].get("loss")
            if loss if loss is not None else i in default:
                trained.append(i)
        return trained

    # -- spans ---------------------------------------------------------------------------------

    def _turn_end(self, segment: str, content_end: int) -> int:
        """End of the supervised part of a turn's generated text: through its last special token (the
        end-of-turn token), or the content's end when the template writes none."""
        ends = [found.end() for found in self._specials_re.finditer(segment)] if self._specials_re else []
        return ends[-1] if ends and ends[-1] >= content_end else content_end

    def _turn_span(self, messages: list[dict], index: int, tools) -> tuple[str, int, int]:
        """(text, start, end): the rendering through turn `index` and the characters to supervise in it."""
        prompt = self.render(messages[:index], add_generation_prompt=True, tools=tools)
        through = self.render(messages[: index + 1], tools=tools)
        message = messages[index]
        answer = message["content"].split("</think>")[-1].strip()
        if not through.startswith(prompt):
            return self._opened_turn_span(prompt, through, message, answer)
        segment = through[len(prompt):]
        found = segment.find(answer) if answer else 0
        if found < 0:
            raise DataError(NOT_VERBATIM)
        content_end = found + len(answer)
        generated_whole = "tool_calls" in message or "reasoning_content" in message or "</think>" in message["content"]
        start = 0 if generated_whole else found
        return through, len(prompt) + start, len(prompt) + self._turn_end(segment, content_end)

    def _opened_turn_span(self, prompt: str, through: str, message: dict, answer: str) -> tuple[str, int, int]:
        """A generation prompt the turn's own rendering does not start with: DeepSeek-R1 opens `<think>\n`
        in the prompt but renders past turns without their reasoning. When the message's text starts with
        what the prompt opened, the example is the prompt plus that text plus the template's end of turn
        (exactly what the model generates); otherwise the turn is trained as the template renders it."""
        common = len(os.path.commonprefix([prompt, through]))
        opened = prompt[common:]
        segment = through[common:]
        found = segment.find(answer) if answer else -1
        if found < 0:
            raise DataError(NOT_VERBATIM)
        end_of_turn = segment[: self._turn_end(segment, found + len(answer))][found + len(answer):]
        content = message["content"]
        if opened.strip() and content.lstrip().startswith(opened.strip()):
            generated = content.lstrip()[len(opened.strip()):]
            if opened.endswith("\n") and generated.startswith("\n"):  # the prompt already wrote that newline
                generated = generated[1:]
            text = prompt + generated.rstrip() + end_of_turn
            return text, len(prompt), len(text)
        return through, common + found, common + found + len(answer) + len(end_of_turn)

    def supervised_examples(self, messages: list[dict], tools: str | None = None) -> tuple[list[tuple[str, list]], list[str]]:
        """[(rendered text, [(start, end) character spans to supervise])] and notes for one conversation.

        The first example is the whole conversation; further ones exist only for turns the template
        renders differently once later turns follow (see the class doc).

        Raises:
            DataError: content holds control-token text, the template cannot express the conversation,
                or its assistant turns cannot be located (see the class doc).
        """
        rendered, tools_list, trained, notes = self._prepare(messages, tools)
        try:
            full = self.render(rendered, tools=tools_list)
            spans, extra = [], []
            for index in trained:
                through, start, end = self._turn_span(rendered, index, tools_list)
                if full.startswith(through[:end]):
                    spans.append((start, end))
                else:
                    extra.append((through, [(start, end)]))
        except DataError:
            raise
        except Exception as err:  # jinja's raise_exception, type errors in templates, ...
            raise DataError(f"chat template error: {str(err).splitlines()[0][:80]}") from None
        if extra:
            notes.append(TURN_EXAMPLES)
        return [(full, spans)] + extra, notes

    def supervised_char_spans(self, messages: list[dict], tools: str | None = None) -> tuple[str, list[tuple[int, int]]]:
        """(rendered text, [(start, end) character spans to supervise]) of the whole conversation."""
        return self.supervised_examples(messages, tools)[0][0]

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

    @staticmethod
    def _straddles(encoding, first: int, last: int, start: int, end: int) -> bool:
        """Does a supervised token also hold characters outside its span (e.g. a header's newline)?"""
        return encoding.token_to_chars(first)[0] < start or encoding.token_to_chars(last - 1)[1] > end

    def _encode_pieces(self, encode, text: str, spans: list) -> tuple[list[int], list[tuple[int, int]]]:
        """Tokenises the text piece by piece, cut at every span boundary, as generation does: the prompt
        is tokenised up to the header, the answer starts a new token."""
        ids, ranges, position = [], [], 0
        for start, end in spans:
            ids += encode(text[position:start]) if start > position else []
            supervised = encode(text[start:end])
            ranges.append((len(ids), len(ids) + len(supervised)))
            ids += supervised
            position = end
        ids += encode(text[position:]) if text[position:] else []
        return ids, ranges

    def _encode(self, texts: list[str], spans_per_text: list) -> list[tuple[list[int], list[tuple[int, int]], bool]]:
        """[(input_ids, [token ranges to supervise], split at a header)] per text."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # slow tokenizers have no offsets: always piecewise
            encode = lambda piece: self.tokenizer.encode(piece, add_special_tokens=False)  # noqa: E731
            return [(*self._encode_pieces(encode, text, spans), False) for text, spans in zip(texts, spans_per_text)]
        results = []
        for text, encoding, spans in zip(texts, backend.encode_batch(texts, add_special_tokens=False), spans_per_text):
            ranges = [self._token_range(encoding, start, end) for start, end in spans]
            if any(r is not None and self._straddles(encoding, *r, start, end) for r, (start, end) in zip(ranges, spans)):
                encode = lambda piece: backend.encode(piece, add_special_tokens=False).ids  # noqa: E731
                results.append((*self._encode_pieces(encode, text, spans), True))
            else:
                results.append((encoding.ids, [r for r in ranges if r is not None], False))
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
                "truncated": truncated, "drop_reason": "", "extra": False, "notes": "", "lost_examples": 0}

    def _rows(self, conversations: list[list[dict]], tools: list | None = None) -> tuple[list[dict[str, Any]], list[int]]:
        """Rows for a batch of conversations and, per row, the index of its conversation. A conversation
        gives one dropped row (with its reason) or one or more kept rows (the first not `extra`)."""
        examples, notes_of, owners = [], [], []
        failed: dict[int, str] = {}
        for index, messages in enumerate(conversations):
            try:
                found, notes = self.supervised_examples(messages, tools[index] if tools else None)
            except DataError as err:
                failed[index] = str(err)
                continue
            for text, spans in found:
                examples.append((text, spans))
                owners.append(index)
                notes_of.append(notes)
        encoded = self._encode([text for text, _ in examples], [spans for _, spans in examples])
        per_conversation: dict[int, list[dict]] = {}
        for owner, notes, (input_ids, ranges, split) in zip(owners, notes_of, encoded):
            row = self._row(input_ids, ranges)
            row["notes"] = ";".join(notes + ([HEADER_SPLIT] if split else []))
            per_conversation.setdefault(owner, []).append(row)
        rows, row_owners = [], []
        for index in range(len(conversations)):
            if index in failed:
                found = [_dropped_row(failed[index], False)]
            else:
                found = [row for row in per_conversation[index] if not row["drop_reason"]] or per_conversation[index][:1]
                if not found[0]["drop_reason"]:
                    # The record is kept, but these turns are not trained: counted on its first row for the report.
                    found[0]["lost_examples"] = sum(row["drop_reason"] == TRUNCATED_TO_NOTHING for row in per_conversation[index])
            for position, row in enumerate(found):
                row["extra"] = position > 0
                rows.append(row)
                row_owners.append(index)
        return rows, row_owners

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        """`datasets.map(batched=True)` function returning Python lists; never raises, marks bad rows
        with `drop_reason`."""
        rows, _ = self._rows(batch["messages"], batch.get("tools"))
        columns = {key: [row[key] for row in rows] for key in TOKENISED_COLUMNS}
        columns["input_ids"] = [ids.tolist() for ids in columns["input_ids"]]
        columns["labels"] = [labels.tolist() for labels in columns["labels"]]
        return columns

    def to_arrow(self, batch: dict[str, list]):
        """The same as __call__, as an Arrow table built from flat int32 buffers (what the pipeline maps:
        about 20% less CPU than Python lists). Passes "source" and "line" through when present."""
        import pyarrow as pa

        rows, owners = self._rows(batch["messages"], batch.get("tools"))
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
            "extra": pa.array([row["extra"] for row in rows], type=pa.bool_()),
            "notes": pa.array([row["notes"] for row in rows], type=pa.string()),
            "lost_examples": pa.array([row["lost_examples"] for row in rows], type=pa.int32()),
        }
        for name in ("source", "line"):
            if name in batch:
                columns[name] = pa.array([batch[name][i] for i in owners], type=pa.int32() if name == "source" else pa.int64())
        return pa.table(columns)

    def tokenize(self, messages: list[dict], tools: str | None = None) -> dict[str, Any]:
        """One conversation: {"input_ids", "labels", "length", "supervised", "truncated", "drop_reason", ...}
        of its first example (the whole conversation)."""
        return {key: values[0] for key, values in self({"messages": [messages], "tools": [tools]}).items()}


# lost_examples: examples (turns) of a kept record dropped for truncation, on the record's first row.
TOKENISED_COLUMNS = ("input_ids", "labels", "length", "supervised", "truncated", "drop_reason", "extra", "notes", "lost_examples")


def _dropped_row(reason: str, truncated: bool) -> dict[str, Any]:
    empty = np.zeros(0, dtype=np.int32)
    return {"input_ids": empty, "labels": empty, "length": 0, "supervised": 0, "truncated": truncated, "drop_reason": reason,
            "extra": False, "notes": "", "lost_examples": 0}


def supervised_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Renders a conversation and returns (text, character spans to supervise); see ConversationTokenizer."""
    return ConversationTokenizer(tokenizer, max_length=1).supervised_char_spans(messages)


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int, options: MaskingOptions | None = None) -> dict[str, Any]:
    """Tokenises one conversation with assistant-only labels.

    Returns {"input_ids", "labels", "length", "supervised", "truncated", "drop_reason", ...}; `drop_reason`
    is "" for a kept conversation, else why it must be dropped (the caller counts it).
    """
    return ConversationTokenizer(tokenizer, max_length, options).tokenize(messages)


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
