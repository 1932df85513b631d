"""Unit tests: every supported record format becomes the same normalised conversation, and what is not
SFT data is skipped with a reason that names it (data_formats.normalize_record)."""

from __future__ import annotations

import json

import pytest

from dftune.data.formats import FormatOptions, normalize_record, template_messages

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one


def msg(role: str, content: str, **fields) -> dict:
    return {"role": role, "content": content, "reasoning_content": None, "tool_calls": None, "name": None, "loss": None, **fields}


def call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def test_alpaca_with_input_system_and_history():
    record = {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be terse.",
              "history": [["hi", "hello"], ["2+2?", "4"]]}
    conversation, reason = normalize_record(record)
    assert reason is None
    assert conversation["messages"] == [msg("system", "Be terse."), msg("user", "hi"), msg("assistant", "hello"),
                                        msg("user", "2+2?"), msg("assistant", "4"), msg("user", "Translate\nchat"),
                                        msg("assistant", "cat")]
    assert normalize_record({"instruction": "hi", "input": "", "output": "hello"})[0]["messages"] == [msg("user", "hi"), msg("assistant", "hello")]


def test_trl_prompt_completion_strings_and_conversational():
    assert normalize_record({"prompt": "2+2?", "completion": "4"})[0]["messages"] == [msg("user", "2+2?"), msg("assistant", "4")]
    record = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}],
              "completion": [{"role": "assistant", "content": "4"}]}
    messages = normalize_record(record)[0]["messages"]
    assert messages == [msg("user", "hi"), msg("assistant", "hello", loss=False), msg("user", "2+2?"), msg("assistant", "4")]


def test_sharegpt_function_call_observation_system_and_tools():
    tools = [{"name": "search", "description": "d", "parameters": {"type": "object", "properties": {}}}]
    record = {"system": "Use tools.", "tools": json.dumps(tools), "conversations": [
        {"from": "human", "value": "find cats"},
        {"from": "function_call", "value": json.dumps({"name": "search", "arguments": {"q": "cats"}})},
        {"from": "observation", "value": "[\"cat\"]"},
        {"from": "gpt", "value": "Found a cat."},
    ]}
    conversation, reason = normalize_record(record)
    assert reason is None
    assert conversation["messages"] == [
        msg("system", "Use tools."), msg("user", "find cats"),
        msg("assistant", "", tool_calls=json.dumps([call("search", {"q": "cats"})])),
        msg("tool", "[\"cat\"]"), msg("assistant", "Found a cat."),
    ]
    assert json.loads(conversation["tools"]) == [{"type": "function", "function": tools[0]}]


def test_openai_tool_calls_tool_messages_reasoning_and_loss_flag():
    record = {"tools": [{"type": "function", "function": {"name": "add"}}], "messages": [
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": "1+2?", "loss": False},
        {"role": "assistant", "content": None, "reasoning_content": "use add",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1, \"b\": 2}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
        {"role": "assistant", "content": "3", "loss": False},
    ]}
    conversation, reason = normalize_record(record)
    assert reason is None
    messages = conversation["messages"]
    assert messages[2]["reasoning_content"] == "use add" and messages[2]["content"] == ""
    assert json.loads(messages[2]["tool_calls"]) == [{**call("add", {"a": 1, "b": 2}), "id": "c1"}]
    assert messages[1]["loss"] is False and messages[4]["loss"] is False
    rendered = template_messages(messages)
    assert "tool_calls" not in rendered[1] and rendered[2]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}


def test_openai_per_message_weight_selects_the_trained_assistant_turns():
    """OpenAI's chat fine-tuning format: `"weight": 0` on an assistant message means "do not train on it". Before the
    fix the field was ignored and the turn was trained."""
    record = {"messages": [
        {"role": "system", "content": "sys", "weight": 1},  # only assistant messages carry a weight: ignored here
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "one", "weight": 0},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "two", "weight": 1},
    ]}
    messages = normalize_record(record)[0]["messages"]
    assert [m["loss"] for m in messages] == [None, None, False, None, None]  # 1 is OpenAI's default: --train_on_turns decides
    record["messages"][2]["weight"] = 0.5  # not OpenAI's: an extra field, ignored
    assert normalize_record(record)[0]["messages"][2]["loss"] is None


def test_llamafactory_v1_content_parts_with_reasoning_and_tool_call():
    record = {"messages": [
        {"role": "user", "content": [{"type": "text", "value": "hi"}], "loss_weight": 0.0},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "think"}, {"type": "text", "value": "ok"},
                                          {"type": "tool_call", "value": json.dumps({"name": "f", "arguments": {}})}], "loss_weight": 1.0},
    ]}
    messages = normalize_record(record)[0]["messages"]
    assert messages[0] == msg("user", "hi", loss=False)
    assert messages[1]["content"] == "ok" and messages[1]["reasoning_content"] == "think" and messages[1]["loss"] is True
    assert json.loads(messages[1]["tool_calls"]) == [call("f", {})]


@pytest.mark.parametrize("record, reason", [
    ({"messages": [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "Kane"}], "images": ["1.jpg"]},
     "multimodal record (images): text-only training cannot use it"),
    ({"messages": [{"role": "user", "content": "<audio>What?"}, {"role": "assistant", "content": "glass"}], "audios": ["1.mp3"]},
     "multimodal record (audio): text-only training cannot use it"),
    ({"messages": [{"role": "user", "content": "<video>Why?"}, {"role": "assistant", "content": "cute"}]},
     "multimodal record (videos): text-only training cannot use it"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "value": "1.jpg"}, {"type": "text", "value": "Who?"}]},
                   {"role": "assistant", "content": "Kane"}]}, "multimodal record (images): text-only training cannot use it"),
    ({"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}},
     "preference record (chosen/rejected): not SFT data; skipped (--dpo_chosen_as_sft trains the chosen answer)"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "bad answer"}], "label": False},
     "KTO record labelled false (undesirable answer): not SFT data"),
    ({"messages": [{"role": "user", "content": "x", "loss": True}, {"role": "assistant", "content": "y"}]},
     '"loss": true on a user message (only assistant turns are trained)'),
    ({"text": "pre-training text"}, "plain text record (pre-training data): no conversation to supervise"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "loss_weight": 0.5}]}, "loss_weight other than 0 or 1"),
])
def test_not_sft_records_are_skipped_with_a_reason_naming_why(record, reason):
    assert normalize_record(record) == (None, reason)


def test_kto_desirable_records_are_kept_and_dpo_chosen_trains_with_the_flag():
    kept = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "good"}], "label": True}
    assert normalize_record(kept)[1] is None
    dpo = {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "good"},
           "rejected": {"from": "gpt", "value": "bad"}}
    conversation, reason = normalize_record(dpo, FormatOptions(dpo_chosen_as_sft=True))
    assert reason is None and conversation["messages"] == [msg("user", "hi"), msg("assistant", "good")]
