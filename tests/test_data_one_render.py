"""One render per conversation: spans cut out of the full rendering equal the per-turn renders (the reference,
`supervised_examples_by_rendering`) on all test data and every real template, with a render count that does
not grow with the turns; templates without that layout keep the per-turn renders."""

from __future__ import annotations

import json
import random

import pytest
from test_data_masking import CONVERSATIONS
from test_data_masking import TEMPLATES as TOY_TEMPLATES
from test_data_masking import _tokenizer as toy_tokenizer
from test_data_real_templates import RECORDS, SETUPS, TOOLS, load
from transformers import AutoTokenizer

from dftune.data.encoding import ConversationTokenizer
from dftune.data.files import DataError, iter_records
from dftune.data.formats import normalize_record
from dftune.data.spans import TURN_EXAMPLES, MaskingOptions
from dftune.data.templates import CHATML_TEMPLATE

from helpers import SAMPLE_FILES, TINY_MODEL

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

REAL_SETUPS = ("qwen2.5", "llama3.2", "chatml_on_base", "qwen3", "deepseek_r1", "mistral_v0.1")


def conversation(turns: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    messages = [{"role": "system", "content": "Be brief."}]
    for turn in range(turns):
        messages += [{"role": "user", "content": f"Question {turn}: {rng.random():.6f}?"},
                     {"role": "assistant", "content": f"  Answer {turn} is {rng.random():.6f}.\n"}]
    return messages


def counting(encoder: ConversationTokenizer) -> list[int]:
    """Counts the renders of `encoder` from now on (after its one-off probes)."""
    encoder.abilities, encoder.layout  # noqa: B018 - probed once per process, not per conversation
    calls, render = [0], encoder.render

    def counted(*args, **kwargs):
        calls[0] += 1
        return render(*args, **kwargs)

    encoder.render = counted
    return calls


def test_a_ten_turn_conversation_is_rendered_once():
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_MODEL))
    tokenizer.chat_template = CHATML_TEMPLATE
    encoder = ConversationTokenizer(tokenizer, 4096)
    calls = counting(encoder)
    messages = conversation(10)
    fast = encoder.supervised_examples(messages)
    assert calls[0] == 1
    calls[0] = 0
    reference = encoder.supervised_examples_by_rendering(messages)
    assert calls[0] == 1 + 2 * 10  # the full conversation, then each turn's prompt and turn
    assert fast == reference and len(fast[0][0][1]) == 10


def with_reasoning(messages: list[dict]) -> list[dict]:
    """`messages` with a reasoning field on every answer (templates without one get it inlined as <think>)."""
    return [{**m, "reasoning_content": f"Think about {m['content'].split()[1]}."} if m["role"] == "assistant" else m for m in messages]


@pytest.mark.parametrize("options", [MaskingOptions(), MaskingOptions(chat_template_kwargs=(("enable_thinking", False),))],
                         ids=["default", "enable_thinking false"])
@pytest.mark.parametrize("kind", ["plain", "reasoning"])
@pytest.mark.parametrize("setup", REAL_SETUPS)
def test_renders_per_conversation_do_not_grow_with_the_turns_on_every_real_template(real_tokenizer, setup, kind, options):
    """Qwen3 (the last turn gets a think block), DeepSeek-R1 (the prompt opens one) and Mistral v0.1 (no
    generation prompt) included: one render per conversation at 1, 4 and 10 turns, the reference's result."""
    encoder = ConversationTokenizer(load(real_tokenizer, setup), 4096, options)
    calls = counting(encoder)
    counts, extra = [], 0
    for turns in (1, 4, 10):
        calls[0] = 0
        messages = conversation(turns) if kind == "plain" else with_reasoning(conversation(turns))
        found = encoder.supervised_examples(messages)
        assert calls[0] == 1
        assert found == encoder.supervised_examples_by_rendering(messages)
        counts.append(calls[0] - (1 + 2 * turns))  # less the reference's own renders
        extra += len(found[0]) - 1
    assert counts == [1, 1, 1]
    # Turns trained as examples of their own, cut out of the one rendering too: Qwen3's earlier turns (only
    # the last has a think block), and every DeepSeek-R1 turn with reasoning (dropped from its rendering).
    expected = {"qwen3": 0 + 3 + 9, "deepseek_r1": 1 + 4 + 10 if kind == "reasoning" else 0}.get(setup, 0)
    assert extra == expected


def all_test_conversations() -> list[tuple[str, list[dict], str | None]]:
    """(where, messages, tools) of every conversation the data tests use: the sample files, the real-template
    records, the toy-template conversations, and multi-turn ones with tools, tool calls and reasoning."""
    found = []
    for path in SAMPLE_FILES:
        for line, record, error in iter_records(path):
            normalised, _ = normalize_record(record) if error is None else (None, error)
            if normalised:
                found.append((f"{path}:{line}", normalised["messages"], normalised["tools"]))
    extra = {f"RECORDS[{name}]": record for name, record in RECORDS.items()}
    extra.update({f"CONVERSATIONS[{name}]": {"messages": messages} for name, messages in CONVERSATIONS.items()})
    extra["tools and reasoning, 4 turns"] = {"tools": TOOLS, "messages": [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "reasoning_content": "Call the tool.", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "TOOL-RESULT 3 degrees"}, {"role": "tool", "content": "TOOL-RESULT 4 degrees"},
        {"role": "assistant", "content": "<think>\nReport it.\n</think>\n\nIt is 3 degrees."},
        {"role": "user", "content": "and Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "25"}, {"role": "assistant", "content": "25 degrees."}]}
    extra["reasoning in every turn"] = {"messages": [
        {"role": "system", "content": "Think first."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "reasoning_content": "Add them.", "content": "4"}, {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "<think>\nAdd again.\n</think>\n\n6"}, {"role": "user", "content": "thanks"},
        {"role": "assistant", "reasoning_content": "Be polite.", "content": "You are welcome."}]}
    extra["system mid-conversation, two user turns"] = {"messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "a2"}, {"role": "assistant", "content": "one"},
        {"role": "system", "content": "mid"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "  two  "}]}
    extra["starts with the assistant"] = {"messages": [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "b"},
                                                       {"role": "assistant", "content": "two"}]}
    extra["two assistant turns in a row"] = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "one"},
                                                          {"role": "assistant", "content": "two"}]}
    for name, record in extra.items():
        normalised, _ = normalize_record(record)
        found.append((name, normalised["messages"], normalised["tools"]))
    found += [(f"synthetic {turns} turns", conversation(turns, seed=turns), None) for turns in range(1, 11)]
    return found


def examples_or_error(encoder, messages, tools, by_rendering: bool):
    try:
        return (encoder.supervised_examples_by_rendering if by_rendering else encoder.supervised_examples)(messages, tools)
    except DataError as err:
        return f"DataError: {err}"


def assert_same_as_per_turn_renders(encoder: ConversationTokenizer) -> dict[str, int]:
    """Every test conversation: the one-render result equals the reference; returns how many conversations
    had extra examples, how many of those were cut out of one rendering, and how many were dropped, so the
    caller knows the comparison covered those cases."""
    seen = {"extra": 0, "extra in one render": 0, "dropped": 0}
    calls = counting(encoder)
    for where, messages, tools in all_test_conversations():
        calls[0] = 0
        fast = examples_or_error(encoder, messages, tools, by_rendering=False)
        one_render = calls[0] == 1
        reference = examples_or_error(encoder, messages, tools, by_rendering=True)
        assert fast == reference, where
        seen["dropped"] += isinstance(reference, str)
        extra = not isinstance(reference, str) and TURN_EXAMPLES in reference[1]
        seen["extra"] += extra
        seen["extra in one render"] += extra and one_render
    return seen


@pytest.mark.parametrize("options", [MaskingOptions(), MaskingOptions(train_on_turns="last"),
                                     MaskingOptions(chat_template_kwargs=(("enable_thinking", False),))],
                         ids=["all turns", "last turn", "enable_thinking false"])
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_one_render_spans_equal_the_per_turn_renders_on_all_test_data(real_tokenizer, setup, options):
    seen = assert_same_as_per_turn_renders(ConversationTokenizer(load(real_tokenizer, setup), 4096, options))
    if setup in ("qwen3", "deepseek_r1") and options.train_on_turns == "all":
        assert seen["extra in one render"] > 0  # the comparison covered turns trained as examples of their own
    if setup == "mistral_v0.1":
        assert seen["dropped"] > 0  # ... and records the template cannot express


@pytest.mark.parametrize("template", sorted(TOY_TEMPLATES))
def test_one_render_spans_equal_the_per_turn_renders_on_toy_templates(template):
    source, llama_tokens, _ = TOY_TEMPLATES[template]
    assert_same_as_per_turn_renders(ConversationTokenizer(toy_tokenizer(source, llama_tokens), 4096))


def test_a_template_that_abridges_earlier_turns_is_rendered_turn_by_turn():
    """Earlier answers cut to their first word: no prefix of the rendering is a turn's rendering, so the probes
    must refuse the layout and every turn but the last must become an extra example, as the reference says."""
    abridged = CHATML_TEMPLATE.replace("{%- else %}{{ message['content'] }}{%- endif %}",
                                       "{%- elif loop.last %}{{ message['content'] }}{%- else %}{{ message['content'].split(' ')[0] }}{%- endif %}")
    assert abridged != CHATML_TEMPLATE
    encoder = ConversationTokenizer(toy_tokenizer(abridged), 4096)
    assert encoder.layout is None
    messages = conversation(3)
    found, notes = encoder.supervised_examples(messages)
    assert (found, notes) == encoder.supervised_examples_by_rendering(messages)
    assert len(found) == 3 and TURN_EXAMPLES in notes


def test_a_conversation_outside_the_probed_layout_falls_back_to_the_per_turn_renders():
    """A role the probes never put after an assistant turn (a system message mid-conversation): the cut is not
    trusted, the turns are rendered, and the result is the reference's."""
    tokenizer = toy_tokenizer(CHATML_TEMPLATE)
    encoder = ConversationTokenizer(tokenizer, 4096)
    calls = counting(encoder)
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "one"}, {"role": "system", "content": "mid"},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "two"}]
    found = encoder.supervised_examples(messages)
    assert calls[0] == 1 + 2 * 2 and "system" not in encoder.layout.openings
    assert [found[0][0][0][start:end] for start, end in found[0][0][1]] == ["one<|im_end|>", "two<|im_end|>"]
    assert json.dumps(found) == json.dumps(encoder.supervised_examples_by_rendering(messages))
