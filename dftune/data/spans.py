"""Which characters are supervised: SpanFinder renders a conversation with the chat template (templates.py)
and finds, on the rendered text, the character spans of every trained assistant turn; encoding.py turns
them into input_ids and labels.

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

from dftune.data.files import DataError
from dftune.data.formats import template_messages, template_tools
from dftune.data.templates import ChatRenderer
from dftune.data.turn_layout import TurnLayout, features, probe_layout

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


class SpanFinder:
    """Finds the supervised character spans of a conversation rendered with any chat template.

    Finding the supervised characters of assistant turn i: the template renders the conversation up to
    turn i with the generation prompt (P) and through turn i (T); T[len(P):] is what the model generates
    for that turn. The span starts at the assistant content (or, for a turn with reasoning or tool calls,
    at the start of the generated text) and ends with the last special token the template writes for the
    turn (its end-of-turn token), never the newline after it. When the full rendering starts with T, the
    span is supervised in the full conversation; when the template renders earlier turns differently
    (Qwen3 drops old reasoning), turn i becomes an extra example of its own, T, with only turn i supervised.

    Rendering P and T for every turn costs 1 + 2 x turns renders of ever longer prefixes (quadratic in the
    turns). The template's `layout` (turn_layout.py, probed once) cuts P and T out of the one full rendering
    instead, for ChatML, Qwen2.5, Llama-3.x, Qwen3, DeepSeek-R1 and Mistral v0.1: one render per
    conversation. A conversation the probes did not cover, or whose rendering does not have the probed
    shape, takes the per-turn renders (`supervised_examples_by_rendering`, the reference), as do all
    conversations of a template without a layout.

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
        self._layout: TurnLayout | bool | None = None  # False: probed, no layout

    def __getstate__(self):
        return {**self.__dict__, "_abilities": None, "_layout": None}

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

    def _segment_span(self, segment: str, message: dict) -> tuple[int, int]:
        """(start, end) of the supervised characters in `segment`, the text the model generates for the
        turn `message` (after the generation prompt, through the end of the turn).

        Raises:
            DataError: the message's answer is not in the segment (NOT_VERBATIM).
        """
        answer = message["content"].split("</think>")[-1].strip()
        found = segment.find(answer) if answer else 0
        if found < 0:
            raise DataError(NOT_VERBATIM)
        generated_whole = "tool_calls" in message or "reasoning_content" in message or "</think>" in message["content"]
        return (0 if generated_whole else found), self._turn_end(segment, found + len(answer))

    def _turn_span(self, prompt: str, through: str, message: dict) -> tuple[str, int, int]:
        """(text, start, end): the rendering through the turn `message` and the characters to supervise in
        it, from the prompt before the turn (P) and the conversation through it (T)."""
        if not through.startswith(prompt):
            return self._opened_turn_span(prompt, through, message, message["content"].split("</think>")[-1].strip())
        start, end = self._segment_span(through[len(prompt):], message)
        return through, len(prompt) + start, len(prompt) + end

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

    # -- one render per conversation -------------------------------------------------------------

    def _has_special(self, text: str) -> bool:
        return bool(self._specials_re and self._specials_re.search(text))

    @property
    def layout(self) -> TurnLayout | None:
        """Probed once: how P and T of every turn are cut out of the full rendering (turn_layout.py), or None."""
        if self._layout is None:
            self._layout = probe_layout(self.render, self._has_special) or False
        return self._layout or None

    def _turn_renderings(self, full: str, messages: list[dict], tools) -> dict[int, tuple[int, str, str]] | None:
        """{message index: (start, prompt, turn)} of every assistant turn, cut out of `full`
        (`TurnLayout.turn_renderings`); None when the layout does not cover this conversation (the caller
        then renders every turn: the result is the same)."""
        layout = self.layout
        if layout is None or not features(messages, tools) <= layout.features:
            return None
        first_user = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
        if first_user is None or messages[first_user]["role"] != "user":  # a prompt without a user turn: templates differ
            return None
        return layout.turn_renderings(full, messages)

    # -- examples --------------------------------------------------------------------------------

    def supervised_examples(self, messages: list[dict], tools: str | None = None) -> tuple[list[tuple[str, list]], list[str]]:
        """[(rendered text, [(start, end) character spans to supervise])] and notes for one conversation.

        The first example is the whole conversation; further ones exist only for turns the template
        renders differently once later turns follow (see the class doc). One render when the template's
        layout allows it, else 1 + 2 x trained turns (the same result).

        Raises:
            DataError: content holds control-token text, the template cannot express the conversation,
                or its assistant turns cannot be located (see the class doc).
        """
        return self._examples(messages, tools, one_rendering=True)

    def supervised_examples_by_rendering(self, messages: list[dict], tools: str | None = None) -> tuple[list[tuple[str, list]], list[str]]:
        """`supervised_examples` with every trained turn located by rendering its prompt and its turn: the
        reference the one-render path must equal (tests compare them)."""
        return self._examples(messages, tools, one_rendering=False)

    def _examples(self, messages: list[dict], tools: str | None, one_rendering: bool) -> tuple[list[tuple[str, list]], list[str]]:
        rendered, tools_list, trained, notes = self._prepare(messages, tools)
        try:
            full = self.render(rendered, tools=tools_list)
            cuts = self._turn_renderings(full, rendered, tools_list) if one_rendering and trained else None
            spans, extra = [], []
            for index in trained:
                # P = full[:head] + prompt and T = full[:head] + through; spans are found on the parts after head.
                if cuts is None:
                    head = 0
                    prompt = self.render(rendered[:index], add_generation_prompt=True, tools=tools_list)
                    through = self.render(rendered[: index + 1], tools=tools_list)
                else:
                    head, prompt, through = cuts[index]
                text, start, end = self._turn_span(prompt, through, rendered[index])
                if full.startswith(text[:end], head):  # the turn is trained where the full rendering has it
                    spans.append((head + start, head + end))
                else:
                    extra.append((full[:head] + text, [(head + start, head + end)]))
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
