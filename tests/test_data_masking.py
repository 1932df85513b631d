"""Unit tests of the label contract for several chat templates, checked on decoded supervised spans.

Contract: every assistant message's content and the end-of-turn token that closes it are supervised;
headers, other roles and the newline after the end-of-turn token are not.
"""

from __future__ import annotations

import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from data_utils import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    NO_SUPERVISED_TOKEN,
    TRUNCATED_TO_NOTHING,
    ChatRenderer,
    ConversationTokenizer,
    format_supervision,
    tokenize_batch,
    tokenize_conversation,
)

from helpers import supervised_spans

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

CHATML_GENERATION_TAGS = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    + CHATML_TEMPLATE
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Layout depends on the content (a note before long answers): the one-render path cannot match it and
# the prefix-rendering fallback must take over, with the same result.
CONTENT_DEPENDENT = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' and message['content'] | length > 12 %}{{ '(long)\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "2 plus 2 is 4."}],
    "multi_turn_echo": [  # the user says what the assistant says: spans must be found in assistant turns only
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": "OK"},
        {"role": "assistant", "content": "OK"},
        {"role": "user", "content": "Say yes then OK"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "OK"},
        {"role": "assistant", "content": "OK, that is a longer answer."},
    ],
    "chinese": [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "日本的首都是哪里？"},
        {"role": "assistant", "content": "日本的首都是东京。"},
        {"role": "user", "content": "雪是什么颜色？"},
        {"role": "assistant", "content": "雪是白色的，很美。"},
    ],
    "tool_and_whitespace": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Calling the weather tool."},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "It is 21 degrees.\n\n  Enjoy   the sun!"},
        {"role": "user", "content": "Thanks"},  # a trailing user turn is not supervised
    ],
}


def _tokenizer(template: str, llama_tokens: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(_tiny_dir())
    if llama_tokens:
        tokenizer.add_special_tokens(
            {"bos_token": "<|begin_of_text|>", "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
        )
    tokenizer.chat_template = template
    return tokenizer


def _tiny_dir() -> str:
    from helpers import TINY_MODEL

    return str(TINY_MODEL)




TEMPLATES = {
    "chatml": (CHATML_TEMPLATE, False, lambda content: content + "<|im_end|>"),
    "chatml_generation_tags": (CHATML_GENERATION_TAGS, False, lambda content: content + "<|im_end|>"),
    "default_system_prompt": (DEFAULT_SYSTEM, False, lambda content: content + "<|im_end|>"),
    "llama3_headers": (LLAMA3, True, lambda content: content.strip() + "<|eot_id|>"),
    "content_dependent_layout": (CONTENT_DEPENDENT, False, lambda content: content + "<|im_end|>"),
}


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_supervised_spans_are_assistant_content_and_end_of_turn(template, conversation):
    source, llama_tokens, expected_span = TEMPLATES[template]
    tokenizer = _tokenizer(source, llama_tokens)
    messages = CONVERSATIONS[conversation]
    row = tokenize_conversation(tokenizer, messages, max_length=4096)
    assert row["drop_reason"] == ""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(row["input_ids"]) == rendered  # nothing lost or added by tokenising
    expected = [expected_span(m["content"]) for m in messages if m["role"] == "assistant"]
    # "(long)\n" is written by the template before the content: outside the supervised span.
    assert supervised_spans(tokenizer, row["input_ids"], row["labels"]) == expected
    assert row["supervised"] == sum(label != IGNORE_INDEX for label in row["labels"][1:])
    assert row["length"] == len(row["input_ids"]) == len(row["labels"])


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_renderer_matches_apply_chat_template(template):
    source, llama_tokens, _ = TEMPLATES[template]
    tokenizer = _tokenizer(source, llama_tokens)
    render = ChatRenderer(tokenizer)
    for messages in CONVERSATIONS.values():
        assert render(messages) == tokenizer.apply_chat_template(messages, tokenize=False)
        assert render(messages, add_generation_prompt=True) == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


def test_content_dependent_template_supervises_only_the_content():
    encoder = ConversationTokenizer(_tokenizer(CONTENT_DEPENDENT), max_length=4096)
    messages = CONVERSATIONS["multi_turn_echo"]
    text, spans = encoder.supervised_char_spans(messages)
    assert [text[s:e] for s, e in spans] == ["OK<|im_end|>", "yes<|im_end|>", "OK, that is a longer answer.<|im_end|>"]


def test_trimmed_offsets_keep_whitespace_tokens_inside_the_answer():
    # Tokenizers whose post-processor trims offsets give whitespace-only tokens empty ranges.
    trimmed = _tokenizer(CHATML_TEMPLATE)
    trimmed.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    messages = CONVERSATIONS["tool_and_whitespace"]
    encoding = trimmed.backend_tokenizer.encode("a\n\n  b", add_special_tokens=False)
    assert any(start == end for start, end in encoding.offsets)  # the test really has trimmed offsets
    row = tokenize_conversation(trimmed, messages, max_length=4096)
    reference = tokenize_conversation(_tokenizer(CHATML_TEMPLATE), messages, max_length=4096)
    assert row["labels"] == reference["labels"]
    assert supervised_spans(trimmed, row["input_ids"], row["labels"])[-1] == "It is 21 degrees.\n\n  Enjoy   the sun!<|im_end|>"


def test_tokenizer_without_offsets_tokenises_piecewise_with_same_spans():
    class NoBackend:
        """A tokenizer with no Rust backend (like a slow tokenizer): only encode/decode and templates."""

        def __init__(self, tokenizer):
            self._tokenizer = tokenizer

        def __getattr__(self, name):
            if name == "backend_tokenizer":
                raise AttributeError(name)
            return getattr(self._tokenizer, name)

    tokenizer = _tokenizer(CHATML_TEMPLATE)
    for messages in CONVERSATIONS.values():
        row = tokenize_conversation(NoBackend(tokenizer), messages, max_length=4096)
        expected = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert supervised_spans(tokenizer, row["input_ids"], row["labels"]) == expected


def test_truncation_keeps_the_beginning_and_drops_conversations_left_unsupervised():
    tokenizer = _tokenizer(CHATML_TEMPLATE)
    messages = CONVERSATIONS["multi_turn_echo"]
    full = tokenize_conversation(tokenizer, messages, max_length=4096)
    cut = full["length"] - 5  # inside the last answer
    row = tokenize_conversation(tokenizer, messages, max_length=cut)
    assert row["truncated"] and row["drop_reason"] == ""
    assert row["input_ids"] == full["input_ids"][:cut] and row["labels"] == full["labels"][:cut]
    first_supervised = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    dropped = tokenize_conversation(tokenizer, messages, max_length=first_supervised)
    assert dropped["truncated"] and dropped["drop_reason"] == TRUNCATED_TO_NOTHING and dropped["input_ids"] == []
    exact = tokenize_conversation(tokenizer, messages, max_length=full["length"])
    assert not exact["truncated"] and exact["labels"] == full["labels"]


def test_batch_marks_bad_rows_instead_of_raising():
    tokenizer = _tokenizer(
        "{% for message in messages %}{% if message['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
        "{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    )
    batch = {"messages": [CONVERSATIONS["single"], CONVERSATIONS["tool_and_whitespace"]]}
    rows = tokenize_batch(batch, tokenizer, max_length=4096)
    assert rows["drop_reason"][0] == ""
    assert rows["drop_reason"][1].startswith("chat template error: no tools here")
    # A template with no special token after the answer: the content alone is supervised.
    assert supervised_spans(tokenizer, rows["input_ids"][0], rows["labels"][0]) == ["2 plus 2 is 4."]


def test_template_that_hides_the_answer_drops_it_with_a_reason():
    tokenizer = _tokenizer("{% for message in messages %}{{ message['role'] + ': ' + message['content'] | upper + '\n' }}{% endfor %}")
    row = tokenize_conversation(tokenizer, CONVERSATIONS["single"], max_length=4096)
    assert row["drop_reason"] == "chat template does not render the assistant content verbatim"
    tokenizer.chat_template = "{% for message in messages %}{% if message['role'] != 'assistant' %}{{ message['content'] }}{% endif %}{% endfor %}"
    row = tokenize_conversation(tokenizer, CONVERSATIONS["single"], max_length=4096)
    assert row["drop_reason"] in ("chat template does not render the assistant content verbatim", NO_SUPERVISED_TOKEN)


def test_format_supervision_marks_whole_runs_and_keeps_chinese_intact():
    tokenizer = _tokenizer(CHATML_TEMPLATE)
    row = tokenize_conversation(tokenizer, CONVERSATIONS["chinese"], max_length=4096)
    shown = format_supervision(tokenizer, row["input_ids"], row["labels"])
    assert "[[日本的首都是东京。<|im_end|>]]\n<|im_start|>user" in shown
    assert "\ufffd" not in shown


def test_arrow_output_equals_python_lists_and_passes_source_and_line_through():
    encoder = ConversationTokenizer(_tokenizer(CHATML_TEMPLATE), max_length=40)
    conversations = list(CONVERSATIONS.values()) + [[{"role": "user", "content": "x " * 50}, {"role": "assistant", "content": "y"}]]
    batch = {"messages": conversations, "source": [0, 0, 1, 1, 2], "line": [1, 2, 3, 4, 5]}
    table = encoder.to_arrow(batch).to_pydict()
    lists = encoder(batch)
    assert {key: table[key] for key in lists} == lists
    assert lists["drop_reason"][-1] == TRUNCATED_TO_NOTHING and lists["input_ids"][-1] == []
    assert table["source"] == batch["source"] and table["line"] == batch["line"]
