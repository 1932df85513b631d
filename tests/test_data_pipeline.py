"""build_datasets over a directory of good, messy and broken files: counts, cache, splits, and the real
entry point (`train_dft.main`) writing data_report.json."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from data_utils import IGNORE_INDEX, TRUNCATED_TO_NOTHING, DataError, build_datasets, format_data_report
from dftune.arguments import DataArguments, DFTTrainingArguments

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

MAX_LENGTH = 64


def chat(question: str, answer: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], **extra}


def write_mixed_directory(root) -> dict:
    """Writes good, messy and broken files; returns the expected per-file counts, worked out by hand."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = root / "data"
    (data / "more").mkdir(parents=True)
    # good.jsonl: 4 records, all kept.
    with open(data / "good.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps(chat(f"What is {i} plus 1?", f"{i} plus 1 is {i + 1}.", id=i)) + "\n")
    # messy.json: an array whose fields differ in presence, nullness and type from the other files.
    messy = [
        chat("Hi", "Hello!", id="m-1", meta={"source": "web"}),  # string id, nested extra field
        {"messages": [{"role": "system", "content": None}, {"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
                      {"role": "assistant", "content": 4, "name": "calc", "weight": 0.5}]},  # None, parts, int content
        {"messages": [{"role": "narrator", "content": "Once"}, {"role": "assistant", "content": "upon"}]},  # unknown role
        {"messages": [{"role": "user", "content": "anyone?"}]},  # no assistant turn
        chat("Empty?", "   "),  # empty assistant content
        chat("雪是什么颜色？", "雪是白色的。", tags=["zh"]),
    ]
    (data / "messy.json").write_text(json.dumps(messy, ensure_ascii=False, indent=1))
    # more/sharegpt.jsonl.gz: 3 ShareGPT records and a broken line.
    with gzip.open(data / "more" / "sharegpt.jsonl.gz", "wt", encoding="utf-8") as f:
        for i in range(3):
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"Q{i}"}, {"from": "gpt", "value": f"A{i}"}]}) + "\n")
        f.write('{"conversations": [{"from": "human"\n')
    # table.parquet: 2 rows kept, 1 with no messages.
    pq.write_table(pa.Table.from_pylist([chat("Parquet?", "Yes, parquet."), {"messages": None, "text": "x"}, chat("Again?", "Again.")]),
                   data / "table.parquet")
    # long.jsonl: one truncated but kept, one whose answer starts after MAX_LENGTH tokens (dropped).
    with open(data / "long.jsonl", "w") as f:
        f.write(json.dumps(chat("Short question.", "A long answer " * 20)) + "\n")
        f.write(json.dumps(chat("A very long question " * 20, "Short answer.")) + "\n")
    (data / "NOTES.md").write_text("not data")  # ignored, and reported as such
    return {
        str(data / "good.jsonl"): (4, 4, {}),
        str(data / "long.jsonl"): (2, 1, {TRUNCATED_TO_NOTHING: 1}),
        str(data / "messy.json"): (6, 3, {"unknown role 'narrator'": 1, "no assistant turn": 1, "empty assistant content": 1}),
        str(data / "more" / "sharegpt.jsonl.gz"): (4, 3, {"broken JSON line": 1}),
        str(data / "table.parquet"): (3, 2, {"no messages": 1}),
    }


def element_lines(path) -> list[int]:
    """Line numbers where the elements of a JSON array written with indent=1 start."""
    return [number for number, line in enumerate(open(path).read().splitlines(), start=1) if line == " {"]


def build(tmp_path, data_files, tokenizer, seed: int = 42, **data_overrides):
    """build_datasets with real argument dataclasses, caching under tmp_path/cache."""
    data_args = DataArguments(data_files=data_files, max_length=MAX_LENGTH, data_cache_dir=str(tmp_path / "cache"))
    for name, value in data_overrides.items():
        setattr(data_args, name, value)
    training_args = DFTTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, seed=seed, report_to=[])
    return build_datasets(data_args, tokenizer, training_args)


def test_mixed_directory_every_record_accounted_for(tmp_path, tiny_tokenizer):
    expected = write_mixed_directory(tmp_path)
    train, evaluation, report = build(tmp_path, [str(tmp_path / "data")], tiny_tokenizer)
    assert evaluation is None
    by_path = {f["path"]: f for f in report["files"]}
    assert sorted(by_path) == sorted(expected)
    for path, (read, kept, skipped) in expected.items():
        file_report = by_path[path]
        assert (file_report["read"], file_report["kept"], file_report["skipped_by_reason"]) == (read, kept, skipped), path
        assert file_report["read"] == file_report["kept"] + file_report["skipped"]
    assert by_path[str(tmp_path / "data" / "long.jsonl")]["examples"] == {TRUNCATED_TO_NOTHING: [f"{tmp_path}/data/long.jsonl:2"]}
    messy = tmp_path / "data" / "messy.json"
    assert by_path[str(messy)]["examples"]["no assistant turn"] == [f"{messy}:{element_lines(messy)[3]}"]
    assert report["totals"] == {
        "read": 19, "kept": 13, "skipped": 6,
        "skipped_by_reason": report["totals"]["skipped_by_reason"],
    }
    assert sum(report["totals"]["skipped_by_reason"].values()) == 6
    assert report["ignored_files"] == [str(tmp_path / "data" / "NOTES.md")]
    assert len(train) == 13 == report["splits"]["train"]
    tokens = report["tokens"]
    lengths = sorted(train["length"])
    assert tokens["conversations"] == 13 and tokens["total_tokens"] == sum(lengths)
    assert tokens["supervised_tokens"] == sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in train["labels"])
    assert tokens["length_max"] == lengths[-1] == MAX_LENGTH and tokens["length_p50"] == lengths[6]
    assert (tokens["truncated"], tokens["dropped_after_truncation"]) == (2, 1)
    table = format_data_report(report)
    assert "messy.json" in table and "1 x unknown role 'narrator'" in table and "total" in table


def test_cache_is_reused_and_invalidated_by_files_tokenizer_template_and_settings(tmp_path, tiny_tokenizer):
    import copy

    write_mixed_directory(tmp_path)
    files = [str(tmp_path / "data")]
    first = build(tmp_path, files, tiny_tokenizer)
    assert first[2]["cache"]["reused"] is False
    again = build(tmp_path, files, tiny_tokenizer)
    assert again[2]["cache"] == {"path": first[2]["cache"]["path"], "reused": True}
    assert again[0]["input_ids"] == first[0]["input_ids"] and again[2]["files"] == first[2]["files"]

    def reused(tokenizer=tiny_tokenizer, **overrides) -> bool:
        return build(tmp_path, files, tokenizer, **overrides)[2]["cache"]["reused"]

    assert reused(max_length=MAX_LENGTH + 1) is False
    other_template = copy.deepcopy(tiny_tokenizer)
    other_template.chat_template = tiny_tokenizer.chat_template.replace("<|im_end|>", "<|endoftext|>")
    assert reused(tokenizer=other_template) is False
    other_vocabulary = copy.deepcopy(tiny_tokenizer)
    other_vocabulary.add_tokens(["<|new|>"], special_tokens=True)
    assert reused(tokenizer=other_vocabulary) is False
    with open(tmp_path / "data" / "good.jsonl", "a") as f:
        f.write(json.dumps(chat("New?", "New.")) + "\n")
    train, _, report = build(tmp_path, files, tiny_tokenizer)
    assert report["cache"]["reused"] is False and len(train) == len(first[0]) + 1
    assert reused() is True


def test_strict_data_is_fatal_even_when_a_lenient_run_was_cached(tmp_path, tiny_tokenizer):
    write_mixed_directory(tmp_path)
    files = [str(tmp_path / "data" / "messy.json")]
    build(tmp_path, files, tiny_tokenizer)
    with pytest.raises(DataError, match=rf"^{files[0]}:{element_lines(files[0])[2]}: unknown role 'narrator'; "):
        build(tmp_path, files, tiny_tokenizer, strict_data=True)


def test_two_workers_give_the_same_dataset_as_one(tmp_path, tiny_tokenizer, sample_files):
    one = build(tmp_path, sample_files, tiny_tokenizer)
    two = build(tmp_path, sample_files, tiny_tokenizer, preprocessing_num_workers=2, data_cache_dir="none")
    assert two[2]["cache"] == {"path": None, "reused": False}
    assert one[0]["input_ids"] == two[0]["input_ids"] and one[0]["labels"] == two[0]["labels"]
    assert one[2]["tokens"] == two[2]["tokens"]


def test_validation_split_is_deterministic_and_eval_files_override_it(tmp_path, tiny_tokenizer, sample_files):
    def split(seed, **overrides):
        return build(tmp_path, sample_files, tiny_tokenizer, seed=seed, validation_split_percentage=10, **overrides)

    train_a, eval_a, report = split(1)
    train_b, eval_b, _ = split(1)
    _, eval_c, _ = split(2)
    assert len(eval_a) == 32 and len(train_a) == 288 and report["splits"]["eval_from"] == "--validation_split_percentage 10"
    assert eval_a["input_ids"] == eval_b["input_ids"] and train_a["input_ids"] == train_b["input_ids"]
    assert eval_a["input_ids"] != eval_c["input_ids"]
    cached = os.path.join(report["cache"]["path"], "train")
    assert sorted(os.listdir(cached)) == ["data-00000-of-00001.arrow", "dataset_info.json", "state.json"]  # no split files
    train, evaluation, report = split(1, eval_data_files=[sample_files[1]])
    assert len(train) == 320 and len(evaluation) == 120
    assert report["splits"] == {"train": 320, "eval": 120, "eval_from": "--eval_data_files"}
    assert [f["split"] for f in report["files"]] == ["train", "train", "eval"]


def test_nothing_left_to_train_on_is_an_error(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match="no usable conversation left .*'no assistant turn': 1"):
        build(tmp_path, [str(path)], tiny_tokenizer)


# -- the real entry point ------------------------------------------------------------------------

TRAIN_FLAGS = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none",
               "--save_strategy", "no", "--logging_steps", "1", "--max_length", str(MAX_LENGTH)]


@pytest.mark.integration
def test_train_dft_writes_the_data_report_for_a_mixed_directory(tmp_path, tiny_model_dir):
    import train_dft

    expected = write_mixed_directory(tmp_path)
    out = tmp_path / "out"
    train_dft.main(["--model_name_or_path", tiny_model_dir, "--data_files", str(tmp_path / "data"), "--output_dir", str(out),
                    "--data_cache_dir", str(tmp_path / "cache"), *TRAIN_FLAGS])
    report = json.loads((out / "data_report.json").read_text())
    assert {f["path"]: (f["read"], f["kept"], f["skipped_by_reason"]) for f in report["files"]} == expected
    assert report["totals"]["read"] == report["totals"]["kept"] + report["totals"]["skipped"] == 19
    assert report["splits"]["train"] == 13 and report["chat_template"] == "tokenizer's own"
    assert "data report" in (out / "logs" / "train.log").read_text()


@pytest.mark.integration
@pytest.mark.parametrize("bad", ["missing.jsonl", "empty.jsonl", "notes.json"])
def test_bad_file_exits_2_naming_it_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch, capsys, bad):
    import train_dft

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "notes.json").write_text("These are my notes, not JSON.\n")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(chat("Hi", "Hello")) + "\n")

    def load_model_must_not_run(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(train_dft, "load_model", load_model_must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        train_dft.main(["--model_name_or_path", tiny_model_dir, "--data_files", str(good), str(tmp_path / bad),
                        "--output_dir", str(tmp_path / "out"), "--data_cache_dir", str(tmp_path / "cache"), *TRAIN_FLAGS])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"error: {tmp_path / bad}: ")
    assert not os.path.exists(tmp_path / "out" / "data_report.json")


@pytest.mark.integration
def test_chat_template_file_with_a_syntax_error_exits_2_naming_file_and_line(tmp_path, tiny_model_dir, capsys):
    """Before the fix every record was skipped ("chat template error: unexpected '}'", and tool records as "chat
    template cannot express tool calls") and the run stopped with "no usable conversation left"."""
    import train_dft

    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(chat("Hi", "Hello")) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        train_dft.main(["--model_name_or_path", tiny_model_dir, "--data_files", str(good), "--chat_template", str(template),
                        "--output_dir", str(tmp_path / "out"), "--data_cache_dir", "none", *TRAIN_FLAGS])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message == f"error: --chat_template {template}:2: template syntax error: unexpected '}}'"
