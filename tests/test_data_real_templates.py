"""The label contract on real tokenizers (Qwen2.5 152K, Llama-3.2 128K) and real chat templates (Qwen2.5,
Llama-3.2, Qwen3, DeepSeek-R1-Distill, Mistral-7B-Instruct-v0.1, the built-in ChatML on a base tokenizer),
for every record format: decoded supervised spans are assistant turns plus their end-of-turn token and
nothing from headers, system, user or tool turns; read = kept + skipped per file.

Fixtures: tests/fixtures/tokenizers (scripts/make_tokenizer_fixtures.py), tests/fixtures/templates (README).
"""

from __future__ import annotations

import json

import pytest

from dftune.data.encoding import ConversationTokenizer
from dftune.data.files import DataError
from dftune.data.formats import normalize_record
from dftune.data.spans import HEADER_SPLIT, SYSTEM_FOLDED, TURN_EXAMPLES, MaskingOptions
from dftune.data.tokenizer import prepare_tokenizer
from dftune.loss.core import IGNORE_INDEX

from helpers import TEMPLATES, supervised_spans

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

R1_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
# template name -> (tokenizer, template file or None for the tokenizer's own / built-in, end-of-turn token, headers)
SETUPS = {
    "qwen2.5": ("qwen2.5", None, "<|im_end|>", ["<|im_start|>", "assistant\n"]),
    "llama3.2": ("llama3.2", None, "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "qwen3": ("qwen2.5", "qwen3.jinja", "<|im_end|>", ["<|im_start|>", "assistant\n"]),
    "deepseek_r1": ("qwen2.5", "deepseek_r1_distill_qwen.jinja", "<｜end▁of▁sentence｜>", ["<｜User｜>", "<｜Assistant｜>"]),
    "mistral_v0.1": ("llama3.2", "mistral_7b_instruct_v0_1.jinja", "</s>", ["[INST]", "[/INST]"]),
    "chatml_on_base": ("llama3.2", "", "<|im_end|>", ["<|im_start|>", "assistant\n"]),
}


class Args:
    """The DataArguments fields prepare_tokenizer reads."""

    chat_template = None


_LOADED: dict = {}


def load(real_tokenizer, name: str, fresh: bool = False):
    """The tokenizer of a setup; shared between tests (they only read it) unless `fresh`."""
    if name in _LOADED and not fresh:
        return _LOADED[name]
    tokenizer_name, template, _, _ = SETUPS[name]
    tokenizer = real_tokenizer(tokenizer_name)
    if name == "qwen3":
        tokenizer.add_tokens(["<think>", "</think>"])  # as in Qwen3's vocabulary (not special)
    if name == "deepseek_r1":
        tokenizer.add_special_tokens({"bos_token": R1_SPECIALS[0], "eos_token": R1_SPECIALS[1], "additional_special_tokens": R1_SPECIALS[2:]})
    if name == "mistral_v0.1":
        tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    if template == "":
        tokenizer.chat_template = None  # a base model: no template, no ChatML tokens
    elif template:
        tokenizer.chat_template = (TEMPLATES / template).read_text()
    prepare_tokenizer(tokenizer, Args())
    if not fresh:
        _LOADED[name] = tokenizer
    return tokenizer


def spans_of(tokenizer, row) -> list[str]:
    """Decoded text of each run of consecutive supervised tokens."""
    return supervised_spans(tokenizer, row["input_ids"], row["labels"])


def examples(encoder, record) -> tuple[list[dict], str | None]:
    conversation, reason = normalize_record(record)
    assert reason is None, reason
    rows, _ = encoder._rows([conversation["messages"]], [conversation["tools"]])
    return rows, rows[0]["drop_reason"] or None


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
RECORDS = {
    "chatml": {"messages": [
        {"role": "system", "content": "SYSTEM-TEXT be brief"}, {"role": "user", "content": "USER-ONE hello"},
        {"role": "assistant", "content": "ANSWER-ONE hi there"}, {"role": "user", "content": "USER-TWO (why)?"},
        {"role": "assistant", "content": "(ANSWER-TWO) because"}]},
    "alpaca": {"instruction": "USER-ONE translate", "input": "USER-TWO chat", "output": "ANSWER-ONE cat",
               "history": [["USER-THREE hi", "ANSWER-TWO hello"]]},
    "sharegpt_tools": {"tools": json.dumps([t["function"] for t in TOOLS]), "conversations": [
        {"from": "human", "value": "USER-ONE weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "TOOL-RESULT 21 degrees"},
        {"from": "gpt", "value": "ANSWER-ONE it is 21 degrees"}]},
    "openai_tools": {"tools": TOOLS, "messages": [
        {"role": "user", "content": "USER-ONE weather in Rome?"},
        {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "TOOL-RESULT 25 degrees"},
        {"role": "assistant", "content": "ANSWER-ONE it is 25 degrees"}]},
}
# What a template cannot express is skipped with a reason naming the limit.
LIMITS = ("chat template cannot express tool calls", "chat template ignores the tools list", "chat template error: Conversation roles must alternate")


@pytest.mark.parametrize("record_name", sorted(RECORDS))
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_decoded_spans_are_assistant_turns_and_end_of_turn_only(real_tokenizer, setup, record_name):
    tokenizer = load(real_tokenizer, setup)
    _, _, end_of_turn, headers = SETUPS[setup]
    encoder = ConversationTokenizer(tokenizer, max_length=4096)
    rows, dropped = examples(encoder, RECORDS[record_name])
    if dropped:
        assert "tool" in record_name and dropped.startswith(LIMITS), dropped
        return
    spans = [span for row in rows for span in spans_of(tokenizer, row)]
    answers = [s for s in spans if "ANSWER-" in s]
    assert sorted({a.split("ANSWER-")[1][:3] for a in answers}) == (["ONE", "TWO"] if record_name in ("chatml", "alpaca") else ["ONE"])
    for span in spans:
        assert span.endswith(end_of_turn), span
        assert not any(marker in span for marker in ("USER-", "SYSTEM-", "TOOL-RESULT")), span
        assert not any(header in span for header in headers), span
    if "tools" in record_name:
        assert any("get_weather" in span and "ANSWER" not in span for span in spans)  # the tool call is trained


def test_tool_call_turns_are_trained_exactly_as_the_template_writes_them(real_tokenizer):
    drone = {"tools": TOOLS, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]}]}
    qwen = load(real_tokenizer, "qwen2.5")
    rows, _ = examples(ConversationTokenizer(qwen, 4096), drone)
    assert spans_of(qwen, rows[0]) == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>']
    assert '"name": "get_weather", "description"' in qwen.decode(rows[0]["input_ids"])  # tools= reached the template
    llama = load(real_tokenizer, "llama3.2")
    rows, _ = examples(ConversationTokenizer(llama, 4096), drone)
    assert spans_of(llama, rows[0]) == ['{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>']


def test_no_label_covers_a_header_character(real_tokenizer):
    # Mistral: "[/INST]" then content starting with "(": BPE merges "](" into one token across the boundary.
    tokenizer = load(real_tokenizer, "mistral_v0.1")
    encoder = ConversationTokenizer(tokenizer, 4096)
    record = {"messages": [{"role": "user", "content": "why?"}, {"role": "assistant", "content": "(because) it is"}]}
    conversation, _ = normalize_record(record)
    text, [(start, end)] = encoder.supervised_char_spans(conversation["messages"])
    whole = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    first = whole.char_to_token(start)
    assert whole.offsets[first][0] < start  # the test really has a straddling token
    rows, _ = examples(encoder, record)
    assert rows[0]["notes"] == HEADER_SPLIT
    assert spans_of(tokenizer, rows[0]) == ["(because) it is</s>"]
    assert tokenizer.decode(rows[0]["input_ids"]) == text  # same text, only cut at the header
    # Qwen: content starting with "\n" after "assistant\n" ("\n\n" is one token): the header's newline stays unsupervised.
    qwen = load(real_tokenizer, "qwen2.5")
    rows, _ = examples(ConversationTokenizer(qwen, 4096), {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\nhello"}]})
    assert spans_of(qwen, rows[0]) == ["hello<|im_end|>"]
    assert "<|im_start|>assistant\n\nhello<|im_end|>" in qwen.decode(rows[0]["input_ids"])


def test_control_token_text_in_content_is_never_a_control_token(real_tokenizer):
    tokenizer = load(real_tokenizer, "qwen2.5")
    record = {"messages": [{"role": "user", "content": "how does ChatML end a turn?"},
                           {"role": "assistant", "content": "With the text <|im_end|> after the answer."}]}
    _, dropped = examples(ConversationTokenizer(tokenizer, 4096), record)
    assert dropped == "content contains the control token text '<|im_end|>'"


@pytest.mark.parametrize("setup, expected", [
    ("qwen3", [["<think>\nSecond thought.\n</think>\n\n6<|im_end|>"], ["<think>\nFirst thought.\n</think>\n\n4<|im_end|>"]]),
    # DeepSeek-R1 renders no reasoning in the whole conversation: each turn is its own example, in order.
    ("deepseek_r1", [["First thought.\n</think>\n\n4<｜end▁of▁sentence｜>"], ["Second thought.\n</think>\n\n6<｜end▁of▁sentence｜>"]]),
])
def test_templates_that_rewrite_history_train_each_turn_as_generated(real_tokenizer, setup, expected):
    tokenizer = load(real_tokenizer, setup)
    record = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nFirst thought.\n</think>\n\n4"},
                           {"role": "user", "content": "3+3?"}, {"role": "assistant", "reasoning_content": "Second thought.", "content": "6"}]}
    rows, dropped = examples(ConversationTokenizer(tokenizer, 4096), record)
    assert dropped is None
    assert [spans_of(tokenizer, row) for row in rows] == expected
    assert [row["extra"] for row in rows] == [False, True] and all(TURN_EXAMPLES in row["notes"] for row in rows)


def test_reasoning_turns_under_a_generation_prompt_that_closes_the_think_block(real_tokenizer):
    """Qwen3 with enable_thinking false: the generation prompt ends `<think>\n\n</think>\n\n`, so a turn with
    reasoning is generated without it. Before the fix a tool-call turn with reasoning (no content) dropped the
    whole record as "not verbatim" (31 of LLaMA-Factory's 50 reason_tool_use records), and an answer turn
    was trained after reasoning the model never sees at generation."""
    from dftune.data.spans import REASONING_DROPPED

    tokenizer = load(real_tokenizer, "qwen3", fresh=True)
    record = {"tools": TOOLS, "messages": [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "reasoning_content": "Call the tool.", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "TOOL-RESULT 3 degrees"},
        {"role": "assistant", "content": "<think>\nReport it.\n</think>\n\nIt is 3 degrees."}]}
    encoder = ConversationTokenizer(tokenizer, 4096, MaskingOptions(chat_template_kwargs=(("enable_thinking", False),)))
    rows, dropped = examples(encoder, record)
    assert dropped is None
    spans = [span for row in rows for span in spans_of(tokenizer, row)]
    assert sorted(spans) == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>', "It is 3 degrees.<|im_end|>"]
    for row in rows:  # each example is what generation sees: the empty think block, no reasoning
        assert "Call the tool" not in tokenizer.decode(row["input_ids"]) and REASONING_DROPPED in row["notes"]
        assert "<|im_start|>assistant\n<think>\n\n</think>\n\n" in tokenizer.decode(row["input_ids"])
    # With thinking on (the default) the reasoning is trained, as before.
    rows, dropped = examples(ConversationTokenizer(tokenizer, 4096), record)
    assert dropped is None and any("Report it." in span for row in rows for span in spans_of(tokenizer, row))
    assert not any(REASONING_DROPPED in row["notes"] for row in rows)


def test_examples_of_a_kept_record_lost_to_truncation_are_counted(real_tokenizer, tmp_path):
    """Qwen3 trains turn 1 as an extra example and turn 2 in the whole conversation. When a long second question
    pushes turn 2 past --max_length, turn 2 is lost while the record stays kept (turn 1 is trained): before the fix
    the report showed the record kept, no extra example and nothing lost."""
    from dftune.data.build import _build_and_save
    from dftune.data.report import format_data_report

    tokenizer = load(real_tokenizer, "qwen3")
    record = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "reasoning_content": "First thought.", "content": "4"},
                           {"role": "user", "content": "and now " * 60 + "3+3?"}, {"role": "assistant", "reasoning_content": "Second.", "content": "6"}]}
    path = tmp_path / "long.jsonl"
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path.write_text(json.dumps(record) + "\n" + json.dumps(short) + "\n")
    report = _build_and_save(None, [str(path)], [], False, ConversationTokenizer(tokenizer, 48), None)["report"]
    [file] = report["files"]
    assert file["read"] == 2 == file["kept"] and file["skipped"] == 0
    assert file["examples_lost_to_truncation"] == 1
    assert "1 example(s) of kept records lost to truncation to --max_length" in format_data_report(report)


def test_mistral_folds_the_system_prompt_into_the_first_user_turn(real_tokenizer):
    tokenizer = load(real_tokenizer, "mistral_v0.1")
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows, dropped = examples(ConversationTokenizer(tokenizer, 4096), record)
    assert dropped is None and SYSTEM_FOLDED in rows[0]["notes"]
    assert tokenizer.decode(rows[0]["input_ids"]).startswith("<s>[INST] Be brief.\n\nhi [/INST]")
    assert spans_of(tokenizer, rows[0]) == ["hello</s>"]


def test_loss_flag_and_train_on_turns(real_tokenizer):
    tokenizer = load(real_tokenizer, "llama3.2")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "one"},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "two"}]
    def trained(record_messages, turns="all"):
        rows, _ = examples(ConversationTokenizer(tokenizer, 4096, MaskingOptions(train_on_turns=turns)), {"messages": record_messages})
        return spans_of(tokenizer, rows[0])
    assert trained(messages) == ["one<|eot_id|>", "two<|eot_id|>"]
    assert trained(messages, "last") == ["two<|eot_id|>"]
    assert trained([*messages[:1], {**messages[1], "loss": False}, *messages[2:]]) == ["two<|eot_id|>"]
    assert trained([*messages[:1], {**messages[1], "loss": True}, *messages[2:]], "last") == ["one<|eot_id|>", "two<|eot_id|>"]


def test_base_tokenizer_gets_chatml_control_tokens_as_special_tokens(real_tokenizer):
    tokenizer = real_tokenizer("llama3.2")
    tokenizer.chat_template = None
    before = len(tokenizer)
    setup = prepare_tokenizer(tokenizer, Args())
    assert setup.builtin_template == "chatml" and setup.added_tokens == ["<|im_start|>", "<|im_end|>"]
    assert setup.new_token_ids == [before, before + 1] and len(tokenizer) == before + 2
    rows, _ = examples(ConversationTokenizer(tokenizer, 4096), {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    supervised = [t for t, label in zip(rows[0]["input_ids"], rows[0]["labels"]) if label != IGNORE_INDEX]
    assert supervised[-1] == setup.end_of_turn_id == tokenizer.convert_tokens_to_ids("<|im_end|>")  # one token, learnt


def test_template_file_whose_control_tokens_the_tokenizer_lacks_gets_them_added(real_tokenizer):
    """`--chat_template qwen2_5_instruct.jinja` on a base Llama-3.2 (no ChatML tokens): before the fix `<|im_end|>`
    was written as text (5 tokens), not supervised at all, and no stop id: the model could never learn to stop."""
    class FileArgs(Args):
        chat_template = str(TEMPLATES / "qwen2_5_instruct.jinja")

    tokenizer = real_tokenizer("llama3.2")
    tokenizer.chat_template = None
    before = len(tokenizer)
    setup = prepare_tokenizer(tokenizer, FileArgs())
    assert setup.added_tokens == ["<|im_start|>", "<|im_end|>"] and setup.new_token_ids == [before, before + 1]
    assert {"<|im_start|>", "<|im_end|>"} <= set(tokenizer.all_special_tokens)
    rows, _ = examples(ConversationTokenizer(tokenizer, 4096), {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    assert spans_of(tokenizer, rows[0]) == ["hello<|im_end|>"]
    supervised = [t for t, label in zip(rows[0]["input_ids"], rows[0]["labels"]) if label != IGNORE_INDEX]
    assert supervised[-1] == setup.end_of_turn_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # A template whose control tokens the tokenizer has adds nothing.
    llama = real_tokenizer("llama3.2")
    assert prepare_tokenizer(llama, Args()).added_tokens == [] and len(llama) == before


def test_pad_token_is_a_reserved_token_when_the_vocabulary_has_one(real_tokenizer):
    tokenizer = real_tokenizer("llama3.2")
    assert tokenizer.pad_token is None
    prepare_tokenizer(tokenizer, Args())
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_read_equals_kept_plus_skipped_per_file_and_cache_key_follows_the_rendering(real_tokenizer, tmp_path):
    from dftune.data.build import _build_and_save, data_fingerprint

    tokenizer = load(real_tokenizer, "mistral_v0.1", fresh=True)
    path = tmp_path / "mixed.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for record in [*RECORDS.values(), {"text": "pre-training"}, {"prompt": "p", "completion": "c"}]:
            f.write(json.dumps(record) + "\n")
    encoder = ConversationTokenizer(tokenizer, 4096)
    report = _build_and_save(None, [str(path)], [], False, encoder, None)["report"]
    [file] = report["files"]
    assert file["read"] == 6 == file["kept"] + file["skipped"] and file["kept"] == 3
    # A template that writes the current time (as Llama-3.x writes today's date) renders differently on
    # every call: the cache key must change with it.
    tokenizer.chat_template = "{{ strftime_now('%Y-%m-%d %H:%M:%S.%f') }}" + tokenizer.chat_template
    keys = {data_fingerprint([str(path)], [], tokenizer, 64, False, ConversationTokenizer(tokenizer, 64)) for _ in range(2)}
    assert len(keys) == 2
    options = [MaskingOptions(), MaskingOptions(train_on_turns="last"), MaskingOptions(chat_template_kwargs=(("enable_thinking", False),))]
    tokenizer.chat_template = (TEMPLATES / "qwen3.jinja").read_text()
    keys = {data_fingerprint([str(path)], [], tokenizer, 64, False, ConversationTokenizer(tokenizer, 64, o)) for o in options}
    assert len(keys) == 3


def test_chat_template_option_takes_a_file_or_a_builtin_name(real_tokenizer, tmp_path):
    from dftune.data.templates import CHATML_TEMPLATE, ensure_chat_template

    tokenizer = real_tokenizer("qwen2.5")
    assert ensure_chat_template(tokenizer, "chatml") == "chatml" and tokenizer.chat_template == CHATML_TEMPLATE
    assert ensure_chat_template(tokenizer, str(TEMPLATES / "qwen3.jinja")) is None and "enable_thinking" in tokenizer.chat_template
    with pytest.raises(DataError, match="--chat_template nope: not a file and not a built-in template"):
        ensure_chat_template(tokenizer, "nope")
    encoder = ConversationTokenizer(tokenizer, 4096, MaskingOptions(chat_template_kwargs=(("enable_thinking", False),)))
    assert encoder.render([{"role": "user", "content": "hi"}], add_generation_prompt=True).endswith("<think>\n\n</think>\n\n")
