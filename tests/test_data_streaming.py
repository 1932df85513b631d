"""The first build streams: records are read, tokenised (in worker processes, in order) and appended to the
cache's Arrow file chunk by chunk, never more than a few chunks ahead, with the same rows and report
whatever the chunk size and number of workers."""

from __future__ import annotations

import pytest
from datasets import load_from_disk
from test_data_pipeline import write_mixed_directory

import dftune.data.build as build_module
from dftune.data.build import _build_and_save
from dftune.data.encoding import ConversationTokenizer

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one


def built(tmp_path, files, tokenizer, workers, cache: bool, max_length: int = 64) -> dict:
    cache_path = str(tmp_path / f"entry-{workers}-{build_module.CHUNK_CONVERSATIONS}") if cache else None
    return _build_and_save(cache_path, files, [], False, ConversationTokenizer(tokenizer, max_length), workers)


def contents(result: dict) -> tuple:
    train = result["train"]
    return train["input_ids"], train["labels"], train["length"], result["report"]


def test_chunks_and_workers_give_the_rows_and_report_of_one_chunk(tmp_path, tiny_tokenizer, sample_files, monkeypatch):
    write_mixed_directory(tmp_path)  # kept, skipped at reading, dropped at tokenisation, truncated: every count
    files = [str(path) for path in sorted((tmp_path / "data").rglob("*")) if path.suffix in (".jsonl", ".json", ".gz", ".parquet")]
    files += sample_files
    whole = contents(built(tmp_path, files, tiny_tokenizer, None, cache=False))
    assert len(whole[0]) > 300
    skipped = {reason for f in whole[3]["files"] for reason in f["skipped_by_reason"]}
    assert "unknown role 'narrator'" in skipped and "no supervised token after truncation to --max_length" in skipped
    monkeypatch.setattr(build_module, "CHUNK_CONVERSATIONS", 7)
    for workers in (None, 2):
        assert contents(built(tmp_path, files, tiny_tokenizer, workers, cache=False)) == whole
        cached = built(tmp_path, files, tiny_tokenizer, workers, cache=True)
        assert contents(cached) == whole
        entry = tmp_path / f"entry-{workers}-7"
        assert load_from_disk(str(entry / "train"))["input_ids"] == whole[0]  # an ordinary save_to_disk folder
        assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == []  # no staging left behind


@pytest.mark.parametrize("workers", [None, 2])
def test_reading_stays_a_few_chunks_ahead_of_writing(tmp_path, tiny_tokenizer, sample_files, monkeypatch, workers):
    """What bounds the first build's memory: chunks read but not yet written never exceed the workers' window
    (2 per worker, plus the 2 read to decide whether to start workers), however many chunks the data has."""
    monkeypatch.setattr(build_module, "CHUNK_CONVERSATIONS", 5)
    read, written, ahead = [0], [0], []
    batches, add = build_module._batches, build_module._SplitWriter.add

    def counted_batches(*args, **kwargs):
        for batch in batches(*args, **kwargs):
            read[0] += 1
            ahead.append(read[0] - written[0])
            yield batch

    def counted_add(self, table):
        written[0] += 1
        return add(self, table)

    monkeypatch.setattr(build_module, "_batches", counted_batches)
    monkeypatch.setattr(build_module._SplitWriter, "add", counted_add)
    result = built(tmp_path, sample_files, tiny_tokenizer, workers, cache=True)
    assert read[0] == written[0] == 64 and len(result["train"]) == 320  # 320 conversations in chunks of 5
    assert max(ahead) <= (2 * workers + 2 if workers else 2)
