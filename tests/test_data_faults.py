"""Faults in data a long run meets: a damaged tokenised-data cache, a result with nothing left to train
on (never cached), and lines that are not UTF-8 in an otherwise good file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from data_utils import DataError, build_datasets, check_data_file, iter_records
from dftune.arguments import DataArguments, DFTTrainingArguments

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, records: int = 6) -> str:
    path.write_text("".join(json.dumps(chat(f"What is {i} plus 1?", f"{i} plus 1 is {i + 1}.")) + "\n" for i in range(records)))
    return str(path)


def build(tmp_path, data_files, tokenizer, max_length: int = 64, strict: bool = False):
    data_args = DataArguments(data_files=data_files, max_length=max_length, data_cache_dir=str(tmp_path / "cache"),
                              strict_data=strict)
    training_args = DFTTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    return build_datasets(data_args, tokenizer, training_args)


def cache_entries(tmp_path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache").iterdir() if p.is_dir())


# ---- the tokenised-data cache ---------------------------------------------------------------------------
def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:92])  # a copy killed half-way


@pytest.mark.parametrize("damage", ["arrow file cut short", "split missing", "report cut short"])
def test_a_damaged_cache_entry_is_reported_and_rebuilt(tmp_path, tiny_tokenizer, caplog, damage):
    data = write_jsonl(tmp_path / "a.jsonl")
    first, _, report = build(tmp_path, [data], tiny_tokenizer)
    expected = (list(first["input_ids"]), list(first["labels"]))  # copied: `first` maps the files damaged below
    (entry,) = cache_entries(tmp_path)
    if damage == "arrow file cut short":
        cut_short(next((entry / "train").glob("*.arrow")))
    elif damage == "split missing":
        for path in (entry / "train").iterdir():
            path.unlink()
    else:
        cut_short(entry / "report.json")
    with caplog.at_level(logging.WARNING, logger="dft.data"):
        again, _, report = build(tmp_path, [data], tiny_tokenizer)
    assert f"the tokenised data cached in {entry} is damaged" in caplog.text and "tokenising again" in caplog.text
    assert report["cache"]["reused"] is False
    assert (list(again["input_ids"]), list(again["labels"])) == expected
    _, _, report = build(tmp_path, [data], tiny_tokenizer)  # the rebuilt entry is whole and reused
    assert report["cache"]["reused"] is True


def test_nothing_left_after_tokenisation_is_not_cached(tmp_path, tiny_tokenizer):
    """Every record dropped at tokenisation (no supervised token within --max_length): the same clear
    error on the second run too, not an IndexError from an empty cached dataset."""
    data = str(tmp_path / "long.jsonl")
    Path(data).write_text("".join(json.dumps(chat("A very long question " * 20, "Short.")) + "\n" for _ in range(3)))
    for _ in range(2):
        with pytest.raises(DataError, match="no usable conversation left"):
            build(tmp_path, [data], tiny_tokenizer, max_length=16)
    assert cache_entries(tmp_path) == []


# ---- lines that are not UTF-8 ---------------------------------------------------------------------------
def file_with_a_bad_line(tmp_path) -> tuple[str, int]:
    good = [json.dumps(chat(f"Question {i}?", f"Answer {i}.")).encode() for i in range(5)]
    bad = b'{"messages": [{"role": "user", "content": "caf\xe9?"}, {"role": "assistant", "content": "oui"}]}'  # Latin-1
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(good[:2] + [bad] + good[2:]) + b"\n")
    return str(path), 3


def test_a_line_that_is_not_utf8_is_skipped_and_counted(tmp_path, tiny_tokenizer):
    path, bad_line = file_with_a_bad_line(tmp_path)
    check_data_file(path)  # the file is not refused for one line
    train, _, report = build(tmp_path, [path], tiny_tokenizer)
    (file_report,) = report["files"]
    assert (file_report["read"], file_report["kept"]) == (6, 5) and len(train) == 5
    assert file_report["skipped_by_reason"] == {"not UTF-8 text": 1}
    assert f"{path}:{bad_line}" in json.dumps(file_report)


def test_strict_data_stops_on_a_line_that_is_not_utf8(tmp_path, tiny_tokenizer):
    path, bad_line = file_with_a_bad_line(tmp_path)
    with pytest.raises(DataError, match=f"^{path}:{bad_line}: not UTF-8 text; fix the record or drop --strict_data"):
        build(tmp_path, [path], tiny_tokenizer, strict=True)


def test_an_array_element_that_is_not_utf8_is_skipped(tmp_path):
    path = tmp_path / "array.json"
    good = json.dumps(chat("Q?", "A.")).encode()
    path.write_bytes(b"[\n" + good + b",\n" + good.replace(b"A.", b"\xff\xfe") + b",\n" + good + b"\n]\n")
    check_data_file(str(path))
    assert [(line, error) for line, _, error in iter_records(str(path))] == [(2, None), (3, "not UTF-8 text"), (4, None)]


def test_a_file_that_is_binary_throughout_is_still_refused(tmp_path):
    path = tmp_path / "weights.jsonl"
    path.write_bytes(bytes(range(128, 256)) * 600)
    with pytest.raises(DataError, match="weights.jsonl: not UTF-8 text, so not JSON"):
        check_data_file(str(path))
