"""Where every assistant turn's two renderings lie in one rendering of the whole conversation.

Finding a turn's supervised characters needs, for every assistant turn i, the rendering of the conversation
before it with the generation prompt (P_i) and the rendering through it (T_i) (spans.py). Rendering them
costs 2 renders per turn of ever longer prefixes. A template's `TurnLayout`, probed once on placeholder
conversations, says how to cut P_i and T_i out of the one full rendering instead:

- P_i is the full rendering up to the header that opens turn i, plus the generation prompt (which starts
  with that header; DeepSeek-R1's adds `<think>\\n`);
- T_i is the full rendering through turn i, except for templates that render the last turn differently
  from the same turn in history (Qwen3 gives only the last turn its think block): T_i then has that turn
  as the template renders it last, the reasoning written between the two probed strings after the header.

Turns are found by their header (an assistant header holds a special token, so no message text can contain
it) or, for a template whose assistant header is empty (Mistral v0.1), by their footer and verbatim content.
The layout lists the probe conversations (`FEATURES`) on which the cuts equal the renders exactly; a
conversation with a feature outside that list, or whose rendering does not have the probed shape, is
rendered turn by turn (the reference; tests compare the two on all test data and every real template).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# (messages, add_generation_prompt, tools) -> text: a chat template's rendering (templates.ChatRenderer).
Render = Callable[..., str]


def _text(k: int) -> str:
    """A placeholder text: inner spaces (a template that rewrites earlier turns by their words shows it),
    survives trimming and `tojson`, never collides with what a template writes."""
    return f"Zq{k} probe text"


def _user(k: int) -> dict:
    return {"role": "user", "content": _text(k)}


def _answer(k: int, **fields) -> dict:
    return {"role": "assistant", "content": _text(k), **fields}


_EDGES = {"newline": "\n", "space": " "}


def probe_conversations() -> dict[str, tuple[list[dict], list | None]]:
    """Probe conversations by feature (`features` says which ones a conversation needs): (messages, tools)."""
    call = {"type": "function", "function": {"name": "probe_tool", "arguments": {"x": 1}}}
    tool = {"type": "function", "function": {"name": "probe_tool", "description": "d", "parameters": {"type": "object", "properties": {}}}}
    plain = [_user(0), _answer(1), _user(2), _answer(3)]
    probes = {
        "plain": (plain, None),
        "system": ([{"role": "system", "content": _text(9)}, *plain], None),
        "tools": (plain, [tool]),
        "tool": ([_user(0), _answer(1), {"role": "tool", "content": _text(2)}, _answer(3), _user(4), _answer(5)], None),
        "tool_calls": ([_user(0), _answer(1, content="", tool_calls=[call]), {"role": "tool", "content": _text(2)},
                        _answer(3, tool_calls=[call]), _user(4), _answer(5)], None),
        "reasoning": ([_user(0), _answer(1, reasoning_content=_text(5)), _user(2), _answer(3, reasoning_content=_text(6))], None),
        # Reasoning on a turn that calls a tool, then the turn after the tool, then a new question: Qwen3
        # shows that reasoning while the question is the last one and drops it once a newer one follows.
        "reasoning with tool calls": ([_user(0), _answer(1, reasoning_content=_text(5), tool_calls=[call]),
                                       {"role": "tool", "content": _text(2)}, _answer(3, reasoning_content=_text(6)),
                                       _user(4), _answer(7)], None),
        "think": ([_user(0), _answer(1, content=f"<think>\n{_text(5)}\n</think>\n\n{_text(1)}"), _user(2),
                   _answer(3, content=f"<think>\n{_text(6)}\n</think>\n\n{_text(3)}")], None),
    }
    # Whitespace at the edges of an answer or its reasoning: templates trim it, some only on the last turn.
    for kind, char in _EDGES.items():
        probes[f"content leading {kind}"] = ([_user(0), _answer(1, content=char + _text(1)), _user(2), _answer(3, content=char + _text(3))], None)
        probes[f"content trailing {kind}"] = ([_user(0), _answer(1, content=_text(1) + char), _user(2), _answer(3, content=_text(3) + char)], None)
        probes[f"reasoning edges {kind}"] = ([_user(0), _answer(1, reasoning_content=char + _text(5) + char), _user(2),
                                              _answer(3, reasoning_content=char + _text(6) + char)], None)
    return probes


def _edge_kind(char: str) -> str | None:
    return None if not char.isspace() else "newline" if char in "\r\n" else "space"


def features(messages: list[dict], tools: list | None) -> set[str]:
    """The probe conversations (`probe_conversations`) whose cuts must have equalled the renders before this
    conversation's turns are cut out of its full rendering."""
    found = {"plain", "tools"} if tools else {"plain"}
    for message in messages:
        role, content, reasoning = message["role"], message["content"], message.get("reasoning_content")
        found.add(role if role in ("system", "tool") else "plain" if role in ("user", "assistant") else f"role {role}")
        if "tool_calls" in message:
            found.add("tool_calls")
        if reasoning is not None:
            found.add("reasoning")
        if "</think>" in content:
            found.add("think")
        if role != "assistant":
            continue
        for where, char in (("leading", content[:1]), ("trailing", content[-1:])):
            if _edge_kind(char):
                found.add(f"content {where} {_edge_kind(char)}")
        for char in (reasoning or "")[:1] + (reasoning or "")[-1:]:
            if _edge_kind(char):
                found.add(f"reasoning edges {_edge_kind(char)}")
    if "reasoning" in found and "tool_calls" in found:
        found.add("reasoning with tool calls")
    return found


@dataclass
class TurnLayout:
    """How a template's rendering of a conversation holds the renderings of its turns (see the module doc)."""

    header: str  # what opens an assistant turn in a rendering, before its content ("" for Mistral v0.1)
    generation_prompt: str  # what add_generation_prompt appends: the header, maybe more (`<think>\n`)
    footer: str  # what closes an assistant turn: its end-of-turn token and what follows it
    # (before, after) the reasoning that the template writes after the header of the last turn only, or
    # None when the last turn renders as in history.
    last_turn_reasoning: tuple[str, str] | None = None
    openings: dict = field(default_factory=dict)  # role -> what a message after an assistant turn starts with
    features: set = field(default_factory=set)  # probe conversations on which the cuts equal the renders

    def bounds(self, full: str, messages: list[dict], check_openings: bool = True) -> list[tuple[int, int, int]] | None:
        """[(message index, start, end)] of every assistant turn in `full` (header through footer), or None
        when `full` does not have the layout's shape."""
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        anchor = self.header or self.footer
        if full.count(anchor) != len(assistants):  # every anchor is an assistant turn's, in order
            return None
        bounds, cursor = [], 0
        for index in assistants:
            if self.header:
                start = full.find(self.header, cursor)
                end = full.find(self.footer, start + len(self.header)) if start >= 0 else -1
            else:  # no header: the turn is its verbatim content, just before its footer
                end = full.find(self.footer, cursor)
                start = end - len(messages[index]["content"])
                if end < 0 or start < cursor or full[start:end] != messages[index]["content"]:
                    return None
            if end < 0:
                return None
            end += len(self.footer)
            if index + 1 == len(messages):
                if end != len(full):
                    return None
            elif check_openings:  # the next message starts where this turn ends
                follows = self.openings.get(messages[index + 1]["role"])
                if follows is None or not full.startswith(follows, end):
                    return None
            bounds.append((index, start, end))
            cursor = end
        return bounds

    def turn_renderings(self, full: str, messages: list[dict]) -> dict[int, tuple[int, str, str]] | None:
        """{message index i: (start, prompt, turn)} for every assistant turn, cut out of `full` (the rendering
        of `messages`): P_i = full[:start] + prompt and T_i = full[:start] + turn (kept apart: joining them for
        every turn would copy the rendering once per turn); None when `full` does not have the layout's shape."""
        bounds = self.bounds(full, messages)
        if bounds is None:
            return None
        renderings = {}
        for index, start, end in bounds:
            turn = full[start:end]
            if self.last_turn_reasoning is not None:
                before, after = self.last_turn_reasoning
                opened = self.header + before + (messages[index].get("reasoning_content") or "") + after
                if not turn.startswith(opened):  # rendered as in history: give it the last turn's form
                    turn = opened + turn[len(self.header):]
            renderings[index] = (start, self.generation_prompt, turn)
        return renderings


def probe_layout(render: Render, has_special: Callable[[str], bool]) -> TurnLayout | None:
    """The template's `TurnLayout`, or None when its turns cannot be cut out of one rendering (then every
    conversation is rendered turn by turn). Header or footer must hold a special token, so that no message
    text can contain them (control-token text in a message is refused before rendering)."""
    probes = probe_conversations()
    plain, _ = probes["plain"]
    content = plain[1]["content"]
    try:
        before = render(plain[:1])
        prompt = render(plain[:1], add_generation_prompt=True)
        through = render(plain[:2])
        full = render(plain)
    except Exception:
        return None
    if not (prompt.startswith(before) and through.startswith(before) and full.startswith(before)):
        return None
    at = full.find(content, len(before))
    if at < 0 or content not in through[len(before):]:
        return None
    header, generation_prompt = full[len(before):at], prompt[len(before):]
    footer = through[through.rindex(content) + len(content):]
    if not (generation_prompt.startswith(header) and has_special(footer) and (has_special(header) or not header)):
        return None
    layout = TurnLayout(header, generation_prompt, footer)
    last_turn = through[len(before):]
    if last_turn != header + content + footer:
        layout.last_turn_reasoning = _last_turn_reasoning(render, probes, before, layout, last_turn)
        if layout.last_turn_reasoning is None:
            return None
    _probe_openings(render, probes, layout)
    for feature, (messages, tools) in probes.items():
        if _cuts_equal_renders(render, messages, tools, layout):
            layout.features.add(feature)
    return layout if "plain" in layout.features else None


def _last_turn_reasoning(render: Render, probes: dict, before: str, layout: TurnLayout, last_turn: str) -> tuple[str, str] | None:
    """(before, after) the reasoning in the last turn's own form, which adds them after the header: split
    around the reasoning of the reasoning probe, or all before it for a template that renders no reasoning."""
    content = probes["plain"][0][1]["content"]
    if not (last_turn.startswith(layout.header) and last_turn.endswith(content + layout.footer)):
        return None
    added = last_turn[len(layout.header): len(last_turn) - len(content + layout.footer)]
    messages, _ = probes["reasoning"]
    reasoning = messages[1]["reasoning_content"]
    try:
        turn = render(messages[:2])[len(before):]
    except Exception:
        return added, ""
    found = turn.find(reasoning)
    if found < 0:
        return added, ""
    split = (turn[len(layout.header):found], turn[found + len(reasoning): len(turn) - len(messages[1]["content"] + layout.footer)])
    return split if "".join(split) == added else (added, "")


def _probe_openings(render: Render, probes: dict, layout: TurnLayout) -> None:
    """What a message after an assistant turn starts with (its header), by role, as the probes render it."""
    for messages, tools in probes.values():
        try:
            full = render(messages, tools=tools)
        except Exception:
            continue
        for index, _, end in layout.bounds(full, messages, check_openings=False) or []:
            following = messages[index + 1] if index + 1 < len(messages) else None
            if following is not None and following["role"] != "assistant" and following["content"] in full[end:]:
                layout.openings.setdefault(following["role"], full[end:full.index(following["content"], end)])


def _cuts_equal_renders(render: Render, messages: list[dict], tools: list | None, layout: TurnLayout) -> bool:
    """Are P_i and T_i of every assistant turn of a probe conversation the layout's cuts?"""
    try:
        full = render(messages, tools=tools)
        renderings = layout.turn_renderings(full, messages)
        if renderings is None:
            return False
        return all(render(messages[:index], add_generation_prompt=True, tools=tools) == full[:start] + prompt
                   and render(messages[: index + 1], tools=tools) == full[:start] + turn
                   for index, (start, prompt, turn) in renderings.items())
    except Exception:
        return False
