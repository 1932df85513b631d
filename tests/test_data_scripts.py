"""dft-inspect and scripts/bench_data.py run end to end on the tiny tokenizer."""

from __future__ import annotations

import json

import pytest

import dftune.cli.inspect_data as inspect_cli

from helpers import load_script

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one


def test_inspect_data_marks_supervised_tokens_and_counts(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "chat.jsonl"
    records = [
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "user", "content": "日本的首都是哪里？"}, {"role": "assistant", "content": "东京。"},
                      {"role": "user", "content": "And France?"}, {"role": "assistant", "content": "Paris."}]},
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    inspect_data = inspect_cli
    assert inspect_data.main(["--model_name_or_path", tiny_model_dir, "--data_files", str(path), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert f"conversation 0 ({path}:2), 4 messages" in out
    assert "assistant\n[[东京。<|im_end|>]]\n<|im_start|>user\nAnd France?<|im_end|>" in out
    assert "[[Paris.<|im_end|>]]" in out
    assert f"{path}: read 2, kept 1, skipped 1: 1 no assistant turn (e.g. {path}:1)" in out
    assert inspect_data.main(["--model_name_or_path", tiny_model_dir, "--data_files", str(path), "--color", "always"]) == 0
    assert f"{inspect_data.GREEN}Paris.<|im_end|>{inspect_data.RESET}" in capsys.readouterr().out
    assert inspect_data.main(["--model_name_or_path", tiny_model_dir, "--data_files", str(path), "--index", "5"]) == 2
    assert "--index 5: there are 1 valid conversations" in capsys.readouterr().err


def test_inspect_data_kept_counts_are_the_ones_training_gets(tmp_path, tiny_model_dir, capsys):
    from types import SimpleNamespace

    from data_utils import build_datasets

    path = tmp_path / "chat.jsonl"
    records = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        # Dropped only at tokenisation (control-token text in the content): reading alone would keep it.
        {"messages": [{"role": "user", "content": "end?"}, {"role": "assistant", "content": "write <|im_end|>"}]},
        {"instruction": "2+2?", "input": "", "output": "4"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    inspect_data = inspect_cli
    assert inspect_data.main(["--model_name_or_path", tiny_model_dir, "--data_files", str(path), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert f"{path}: read 3, kept 2, skipped 1: 1 content contains the control token text '<|im_end|>' (e.g. {path}:2)" in out
    from transformers import AutoTokenizer

    args = SimpleNamespace(data_files=[str(path)], eval_data_files=None, max_length=512, preprocessing_num_workers=None,
                           validation_split_percentage=0, strict_data=False, data_cache_dir="none")
    _, _, report = build_datasets(args, AutoTokenizer.from_pretrained(tiny_model_dir), None)
    assert (report["files"][0]["read"], report["files"][0]["kept"]) == (3, 2)


def test_bench_data_reports_conversations_per_second(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # the script sets it; restored after the test
    bench = load_script("bench_data")
    result = bench.main(["--tokenizer", tiny_model_dir, "--num_conversations", "40", "--workers", "1", "--profile"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["tokenise_map"][0]["workers"] == 1 and printed["tokenise_map"][0]["conversations_per_s"] > 0
    assert 300 < printed["tokenise_map"][0]["mean_tokens"] < 700  # "about 500 tokens"
    assert result["build_datasets"][0]["conversations_per_s"] > 0
    assert set(result["profile_ms_per_conversation"]) == {"render", "render_and_find_spans", "tokenizer", "labels_and_truncation"}
    assert result["tokenise_map"][0]["renders_per_conversation"] == 1.0  # 3-turn conversations, one render each


@pytest.mark.integration
def test_bench_data_sizes_report_time_and_peak_memory_of_first_and_cached_builds(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    bench = load_script("bench_data")
    result = bench.main(["--tokenizer", tiny_model_dir, "--sizes", "60", "--workers", "1", "--scratch_dir", str(tmp_path)])
    [entry] = result["scaling"]
    assert entry["conversations"] == 60 and result["turns"] == 2
    for run in ("first_build", "cached"):  # each measured in a child process of its own (the child checks reuse)
        assert entry[run]["conversations_per_s"] > 0 and 100 < entry[run]["peak_rss_mib"] < 4096
    assert list(tmp_path.iterdir()) == []  # data files and caches removed
