"""The bundled tiny model and tokenizer: built offline, ids stable across a reload, ChatML labels."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_utils import format_supervision, tokenize_conversation

from helpers import ROOT, load_script, supervised_spans

pytestmark = pytest.mark.integration  # the file's tier; a test marked integration or distributed belongs to that one

TEXTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n",
    "法国的首都是哪里？ 巴黎。 mixed 中文 and English, numbers 12345 and symbols ~!@#$%^&*()\n\n\ttabs",
    "  leading spaces, trailing newline\r\n and unicode café naïve ü",
]


@pytest.fixture(scope="module")
def fresh_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(out), "--pretrain_steps", "5"],
        check=True, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    return out


def test_make_tiny_model_builds_a_loadable_qwen2_with_chatml(fresh_build):
    tokenizer = AutoTokenizer.from_pretrained(fresh_build)
    model = AutoModelForCausalLM.from_pretrained(fresh_build)
    assert model.config.model_type == "qwen2"
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    special_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    assert len(set(special_ids)) == 3
    for token, token_id in zip(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), special_ids):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert "<|im_start|>" in tokenizer.chat_template
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_ids_identical_before_and_after_reload(fresh_build, tmp_path):
    make_tiny_model = load_script("make_tiny_model")

    corpus = [m["content"] for c in make_tiny_model.read_corpus(str(ROOT / "data" / "sample")) for m in c]
    built = make_tiny_model.build_tokenizer(corpus, 1024)
    built.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    shipped = AutoTokenizer.from_pretrained(fresh_build)
    for text in TEXTS:
        ids = built(text, add_special_tokens=False)["input_ids"]
        assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
        assert shipped(text, add_special_tokens=False)["input_ids"] == ids
        assert reloaded.decode(ids) == text.replace("\r\n", "\r\n")


def test_builds_are_deterministic(fresh_build, tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(tmp_path), "--pretrain_steps", "5"],
        check=True, cwd=ROOT, capture_output=True, timeout=600,
    )
    a = AutoModelForCausalLM.from_pretrained(fresh_build).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (fresh_build / "tokenizer.json").read_text() == (tmp_path / "tokenizer.json").read_text()


def test_chatml_label_contract_on_decoded_spans(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "2 plus 3 is 5."},
        {"role": "user", "content": "日本的首都是哪里？"},
        {"role": "assistant", "content": "日本的首都是东京。"},
    ]
    row = tokenize_conversation(tiny_tokenizer, messages, 512)
    assert row["drop_reason"] == ""
    spans = supervised_spans(tiny_tokenizer, row["input_ids"], row["labels"])
    assert spans == ["2 plus 3 is 5.<|im_end|>", "日本的首都是东京。<|im_end|>"]
    marked = format_supervision(tiny_tokenizer, row["input_ids"], row["labels"])
    assert "<|im_start|>assistant\n[[2 plus 3 is 5.<|im_end|>]]\n" in marked


def test_truncation_keeps_the_beginning_and_drops_unsupervised(tiny_tokenizer):
    messages = [{"role": "user", "content": "Count from 1 to 5. " * 20}, {"role": "assistant", "content": "1, 2, 3, 4, 5."}]
    full = tokenize_conversation(tiny_tokenizer, messages, 10_000)
    cut = tokenize_conversation(tiny_tokenizer, messages, 12)
    assert cut["drop_reason"].startswith("no supervised token after truncation")
    assert full["input_ids"][:12] == tiny_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"][:12]
