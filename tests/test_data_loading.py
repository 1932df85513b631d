"""Unit tests of reading and normalising data files: formats, paths, skip reasons, strict mode."""

from __future__ import annotations

import gzip
import json

import pytest

from data_utils import (
    DataError,
    build_datasets,
    check_data_file,
    iter_records,
    load_conversations,
    normalize_record,
    read_file_records,
    resolve_data_files,
)

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
def msg(role: str, content: str, **fields) -> dict:
    """A message in the normalised schema (every field present, None when the record has none)."""
    return {"role": role, "content": content, "reasoning_content": None, "tool_calls": None, "name": None, "loss": None, **fields}


NORMALISED = [msg("user", "hi"), msg("assistant", "hello")]


def write_jsonl(path, records, raw_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


# -- paths ---------------------------------------------------------------------------------------


def test_resolve_expands_directories_and_globs_in_order_and_lists_ignored_files(tmp_path):
    (tmp_path / "b").mkdir()
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    nested = write_jsonl(tmp_path / "b" / "c.json", [GOOD])
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / ".hidden.jsonl").write_text("{}")
    files, ignored = resolve_data_files([str(tmp_path)])
    assert files == [a, nested]
    assert ignored == [str(tmp_path / "README.md")]
    files, _ = resolve_data_files([str(tmp_path / "**" / "*.json"), a, a])
    assert files == [nested, a]  # the glob first, duplicates once


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing.jsonl", "{dir}/missing.jsonl: data file not found; check --data_files"),
        ("*.nothing", "--data_files {dir}/*.nothing: the pattern matches no"),
        ("notes.txt", "{dir}/notes.txt: unsupported data file type"),
        ("empty_dir", "--data_files {dir}/empty_dir: the directory holds no"),
    ],
)
def test_resolve_names_the_bad_path(tmp_path, spec, message):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError) as err:
        resolve_data_files([str(tmp_path / spec)])
    assert str(err.value).startswith(message.format(dir=tmp_path))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", b"", "data file is empty"),
        ("blank.json", b"\n  \n", "empty (whitespace only)"),
        ("text.jsonl", b"just some notes\nnot json at all\n", "not JSON"),
        ("binary.json", b"\xff\xfe\x00garbage\x81", "not UTF-8 text"),
        ("bad.jsonl.gz", b"this is not gzip", "cannot read the file"),
        ("bad.parquet", b"{\"messages\": []}", "not a Parquet file"),
    ],
)
def test_unreadable_files_fail_at_once_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        check_data_file(str(path))
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


# -- formats -------------------------------------------------------------------------------------


def test_json_array_records_carry_their_real_line_numbers(tmp_path):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([GOOD, {"bad": 1}, GOOD], indent=1))
    lines = path.read_text().splitlines()
    starts = [i for i, line in enumerate(lines, start=1) if line == " {"]
    assert [line for line, _, _ in iter_records(str(path))] == starts


def test_json_lines_under_a_json_name_and_gzip_and_a_pretty_single_object(tmp_path):
    jsonl_named_json = write_jsonl(tmp_path / "lines.json", [GOOD, GOOD])
    assert [record for _, record, _ in iter_records(jsonl_named_json)] == [GOOD, GOOD]
    gz = tmp_path / "lines.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n")
    assert [line for line, _, _ in iter_records(str(gz))] == [1, 3]
    array_gz = tmp_path / "array.json.gz"
    with gzip.open(array_gz, "wt", encoding="utf-8") as f:
        json.dump([GOOD], f)
    assert [record for _, record, _ in iter_records(str(array_gz))] == [GOOD]
    pretty = tmp_path / "one.json"
    pretty.write_text(json.dumps(GOOD, indent=2))
    check_data_file(str(pretty))
    assert list(iter_records(str(pretty))) == [(1, GOOD, None)]


def test_json_lines_are_read_a_line_at_a_time_with_crlf_separators_inside_strings_and_broken_lines(tmp_path):
    # U+2028 and a form feed are legal raw inside a JSON string; a line is ended by \n or \r\n only.
    inner = {"messages": [{"role": "user", "content": "a\u2028b\x0cc"}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(("\r\n" + json.dumps(inner, ensure_ascii=False) + "\r\n{\"messages\": \r\n" + json.dumps(GOOD) + "\r\n").encode())
    records = list(iter_records(str(path)))
    assert [(line, record) for line, record, _ in records] == [(2, inner), (3, None), (4, GOOD)]
    assert records[1][2] == "broken JSON line" and records[1][2].detail == "Expecting value at column 14"
    # Memory stays flat: the file object is iterated, never read whole (a 1M-line file is not held).
    class NoWholeRead:
        def __init__(self, lines):
            self.lines = iter(lines)

        def __iter__(self):
            return self.lines

        def read(self):
            raise AssertionError("a JSON-lines file was read whole")

    from dftune.data.files import _iter_text_records

    many = NoWholeRead([json.dumps(GOOD) + "\n"] * 1000)
    assert sum(1 for _ in _iter_text_records("many.jsonl", many)) == 1000


def test_pretty_records_and_arrays_after_blank_lines_keep_their_line_numbers(tmp_path):
    pretty = tmp_path / "pretty.json"
    pretty.write_text("\n\n" + json.dumps(GOOD, indent=2))
    assert list(iter_records(str(pretty))) == [(3, GOOD, None)]
    array = tmp_path / "array.json"
    array.write_text("\n\n[\n" + json.dumps(GOOD) + ",\n" + json.dumps(GOOD) + "]")
    assert [line for line, _, _ in iter_records(str(array))] == [4, 5]
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    assert list(iter_records(str(blank))) == []


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"messages": [{"role": "user", "content": "only a question"}]}]), path)
    check_data_file(str(path))
    rows, report = read_file_records(str(path), source=0, strict=False)
    assert [row["messages"] for row in rows] == [NORMALISED]
    assert [row["tools"] for row in rows] == [""]
    assert (report.read, report.kept, dict(report.skipped)) == (2, 1, {"no assistant turn": 1})
    assert report.examples == {"no assistant turn": [f"{path}:2"]}


def test_broken_json_array_fails_with_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"messages": []},\n {"messages": [}\n]\n')
    with pytest.raises(DataError, match=rf"^{path}:3: broken JSON inside the array"):
        list(iter_records(str(path)))


# -- normalisation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record, reason",
    [
        (["not", "an", "object"], "record is not a JSON object"),
        ({"text": "no messages key"}, "plain text record (pre-training data): no conversation to supervise"),
        ({"id": 1}, "no messages"),
        ({"messages": []}, "no messages"),
        ({"messages": "hello"}, "no messages"),
        ({"messages": ["hello"]}, "message is not an object"),
        ({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role 'narrator'"),
        ({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role 'None'"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                       {"role": "assistant", "content": "y"}]}, "multimodal record (images): text-only training cannot use it"),
        ({"messages": [{"role": "user", "content": {"text": "x"}}, {"role": "assistant", "content": "y"}]}, "non-text content"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}, "empty assistant content"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [{}]}]},
         "tool call without a function name"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}, "empty assistant content"),
    ],
)
def test_invalid_records_give_their_reason(record, reason):
    assert normalize_record(record) == (None, reason)


def test_normalisation_to_one_schema():
    # Extra top-level and message fields dropped, content parts joined, numbers become text.
    record = {
        "id": 7,
        "messages": [
            {"role": "system", "content": None, "name": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "6*7?"}]},
            {"role": "assistant", "content": 42, "weight": 1},
        ],
    }
    assert normalize_record(record) == (
        {"messages": [msg("system", "", name="sys"), msg("user", "What is 6*7?"), msg("assistant", "42")], "tools": ""},
        None,
    )


def test_sharegpt_records_become_messages():
    record = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    assert normalize_record(record) == ({"messages": [msg("system", "Be brief.")] + NORMALISED, "tools": ""}, None)


# -- counting and strict mode --------------------------------------------------------------------


def test_every_record_is_kept_or_skipped_with_file_line_examples(tmp_path):
    no_assistant = {"messages": [{"role": "user", "content": "x"}]}
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, no_assistant, GOOD, no_assistant, no_assistant, no_assistant],
                       raw_lines=['{"messages": [', "", "42"])
    rows, report = read_file_records(path, source=3, strict=False)
    assert [row["line"] for row in rows] == [1, 3] and {row["source"] for row in rows} == {3}
    assert report.read == 8 == report.kept + sum(report.skipped.values())  # the blank line is not a record
    assert report.skipped == {"no assistant turn": 4, "broken JSON line": 1, "record is not a JSON object": 1}
    assert report.examples["no assistant turn"] == [f"{path}:2", f"{path}:4", f"{path}:5"]  # the first three
    assert report.to_dict()["skipped"] == 6


def test_strict_data_fails_on_the_first_invalid_record_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, {"messages": [{"role": "bot", "content": "x"}]}, {"messages": []}])
    with pytest.raises(DataError) as err:
        load_conversations([path], strict=True)
    assert str(err.value).startswith(f"{path}:2: unknown role 'bot'; ")
    broken = write_jsonl(tmp_path / "b.jsonl", [GOOD], raw_lines=['{"messages": [}'])
    with pytest.raises(DataError) as err:
        load_conversations([broken], strict=True)
    assert str(err.value).startswith(f"{broken}:2: broken JSON line (Expecting value at column 15); ")


def test_a_file_without_any_json_record_fails(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"messages": [\n{"messages": [\n')
    check_data_file(str(path))  # looks like JSON at a glance ...
    with pytest.raises(DataError, match=rf"^{path}: no JSON record could be read"):
        load_conversations([str(path)])  # ... but no line of it is


# ---- Hugging Face datasets ---------------------------------------------------------------------------------
def _messages(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_a_save_to_disk_folder_is_read_as_data_through_the_same_report(tmp_path, tiny_tokenizer):
    """A Dataset / DatasetDict folder from save_to_disk is one data source (not its Arrow and JSON files), its
    rows counted and skipped as a file's lines are, and the cache key follows its content."""
    from datasets import Dataset, DatasetDict

    from dftune.arguments import DataArguments, DFTTrainingArguments
    from dftune.data.files import source_fingerprint

    rows = [{"messages": _messages(f"What is {i} plus 1?", f"{i + 1}.")} for i in range(5)] + [{"messages": []}]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_list(rows[:3]), "test": Dataset.from_list(rows[3:5])}).save_to_disk(str(tmp_path / "dict"))
    files, ignored = resolve_data_files([str(tmp_path / "saved"), str(tmp_path / "dict")])
    assert files == [str(tmp_path / "saved"), str(tmp_path / "dict" / "train")] and ignored == []
    assert resolve_data_files([str(tmp_path / "dict")], "--eval_data_files")[0] == [str(tmp_path / "dict" / "test")]
    assert resolve_data_files([str(tmp_path)])[0] == [str(tmp_path / "dict" / "test"), str(tmp_path / "dict" / "train"), str(tmp_path / "saved")]
    assert [line for line, _, _ in iter_records(str(tmp_path / "saved"))] == [1, 2, 3, 4, 5, 6]

    data_args = DataArguments(data_files=[str(tmp_path / "saved")], data_cache_dir=str(tmp_path / "cache"))
    training_args = DFTTrainingArguments(output_dir=str(tmp_path / "out"), report_to=[])
    train, _, report = build_datasets(data_args, tiny_tokenizer, training_args)
    (file_report,) = report["files"]
    assert len(train) == 5 and (file_report["read"], file_report["kept"], file_report["skipped"]) == (6, 5, 1)
    assert file_report["examples"]["no messages"] == [f"{tmp_path / 'saved'}:6"]
    before = source_fingerprint(str(tmp_path / "saved"))
    Dataset.from_list(rows[:2]).save_to_disk(str(tmp_path / "saved2"))
    assert source_fingerprint(str(tmp_path / "saved2")) != before


def test_a_hub_dataset_name_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    files, _ = resolve_data_files(["HuggingFaceH4/no_robots:train_sft"])
    assert files == ["HuggingFaceH4/no_robots:train_sft"]
    with pytest.raises(DataError, match=r"^HuggingFaceH4/no_robots:train_sft: not a local file or folder, and the Hugging Face Hub is off "
                                         r".*load_dataset\('HuggingFaceH4/no_robots', split='train_sft'\)\.save_to_disk\(DIR\)"):
        check_data_file(files[0])
    with pytest.raises(DataError, match="data file not found"):  # a missing file with a suffix stays a missing file
        resolve_data_files(["org/missing.jsonl"])


def test_a_saved_dataset_dict_without_the_split_names_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"dev": Dataset.from_list([{"messages": _messages("a", "b")}])}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"--data_files .*/d: a saved DatasetDict without a train split \(it has dev\); name the split's folder"):
        resolve_data_files([str(tmp_path / "d")])
