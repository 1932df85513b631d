"""The whole pipeline, cached: many files in, one clean tokenised dataset out, every skipped record counted.

Pipeline (`build_datasets`):
  1. resolve  `--data_files` files, directories and globs -> a sorted list of data files; each is checked
              at once (exists, not empty, JSON or Parquet) so a bad path fails before any work (files.py).
  2. read     record by record (files.iter_records), streaming: no step holds the whole data set.
  3. normalise every record to one fixed schema {"messages": [...], "tools", "source", "line"},
              or skip it with a reason (formats.normalize_record).
  4. tokenise chunks of CHUNK_CONVERSATIONS with the tokenizer's chat template and assistant-only labels
              (spans.py, encoding.py; `num_proc` worker processes, results in order), drop conversations left
              with no supervised token, count them against their file.
  5. cache    each tokenised chunk appended to an Arrow file as it comes (memory flat in the number of
              conversations), under a fingerprint of files, tokenizer, template, settings and the code;
              the splits are memory-mapped from those files.
  6. report   per file and reason, with file:line examples (report.py).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import functools
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import uuid
from collections import Counter
from collections.abc import Iterator

import numpy as np

from dftune.data.encoding import ConversationTokenizer
from dftune.data.files import BrokenLine, DataError, check_data_file, iter_records, resolve_data_files, source_fingerprint
from dftune.data.formats import FormatOptions, normalize_record
from dftune.data.report import FileReport, _token_summary, _totals
from dftune.data.spans import MaskingOptions
from dftune.data.templates import BUILTIN_TEMPLATES, _template_of, ensure_chat_template

logger = logging.getLogger("dft.data")

def iter_file_records(path: str, source: int, strict: bool, report: FileReport,
                      formats: FormatOptions | None = None) -> Iterator[dict]:
    """Reads and normalises one file record by record: yields rows {"messages", "tools", "source", "line"}
    and counts every record (read, kept, skipped by reason) in `report` as it goes.

    Raises:
        DataError: the file holds no JSON record at all; with `strict`, the first invalid record.
    """
    json_seen = False
    for line_number, record, error in iter_records(path):
        report.read += 1
        if error is None:
            json_seen = True
            conversation, error = normalize_record(record, formats)
        where = f"{path}:{line_number}"
        if error is not None:
            if strict:
                detail = f" ({error.detail})" if isinstance(error, BrokenLine) else ""
                raise DataError(f"{where}: {error}{detail}; fix the record or drop --strict_data to skip such records")
            report.skip(error, where)
            continue
        report.kept += 1
        yield {**conversation, "source": source, "line": line_number}
    if not json_seen:
        raise DataError(f"{path}: no JSON record could be read; is this a JSON/JSONL file?")


def read_file_records(path: str, source: int, strict: bool, split: str = "train",
                      formats: FormatOptions | None = None) -> tuple[list[dict], FileReport]:
    """Reads and normalises one file: rows {"messages", "tools", "source", "line"} plus its FileReport.

    Raises:
        DataError: the file holds no JSON record at all; with `strict`, the first invalid record.
    """
    report = FileReport(path=path, split=split)
    return list(iter_file_records(path, source, strict, report, formats)), report


def load_conversations(paths: list[str], strict: bool = False, formats: FormatOptions | None = None) -> tuple[list[dict], list[FileReport]]:
    """Reads ChatML/ShareGPT records from data files (or directories/globs) into normalised rows.

    Returns ([{"messages", "tools", "source", "line"}], [FileReport per file]); `source` indexes the reports.

    Raises:
        DataError: a path or file is bad (see `resolve_data_files`, `check_data_file`); with `strict`,
            the first invalid record.
    """
    files, _ = resolve_data_files(paths)
    for path in files:
        check_data_file(path)
    conversations: list[dict] = []
    reports: list[FileReport] = []
    for source, path in enumerate(files):
        rows, report = read_file_records(path, source, strict, formats=formats)
        conversations.extend(rows)
        reports.append(report)
    return conversations, reports


PIPELINE_MODULES = ("files.py", "formats.py", "templates.py", "spans.py", "encoding.py", "build.py", "report.py")


def _pipeline_code_hash() -> str:
    """Changing any pipeline module (reading, formats, masking, building) invalidates every cached dataset."""
    digest = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in PIPELINE_MODULES:
        with open(os.path.join(here, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(_template_of(tokenizer).encode())
    return digest.hexdigest()


def data_fingerprint(train_files: list[str], eval_files: list[str], tokenizer, max_length: int, strict: bool,
                     encoder: ConversationTokenizer | None = None, formats: FormatOptions | None = None) -> str:
    """Key of a cached tokenised dataset: the files (path, size, mtime), tokenizer, template, settings, code,
    and a probe conversation rendered now (a template that writes today's date renders differently tomorrow)."""
    encoder = encoder or ConversationTokenizer(tokenizer, max_length)
    state = {
        "masking": repr(encoder.options),
        "formats": repr(formats or FormatOptions()),
        "rendering": encoder.probe_rendering(),
        "code": _pipeline_code_hash(),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "strict": strict,
        "files": {
            split: [source_fingerprint(p) for p in files]
            for split, files in (("train", train_files), ("eval", eval_files))
        },
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:24]


def default_cache_dir() -> str:
    from datasets import config

    return os.path.join(str(config.HF_DATASETS_CACHE), "dft_trainer")


CHUNK_CONVERSATIONS = 1000  # conversations per tokenising task: a fraction of a second of work, a few MB of rows
TOKENISED_FEATURES = ("input_ids", "labels", "length")  # the columns a split keeps
# A cache entry: report.json and one Dataset.save_to_disk folder per split (train/, eval/), written in place.
SPLIT_FILE = "data-00000-of-00001.arrow"


RELEASE_EVERY_BATCHES = 16  # record batches read (or validated) between two releases of a mapped file's pages
_MADV_DONTNEED = 4


@functools.cache
def _madvise():
    """libc's madvise(addr, length, advice), looked up once."""
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def _release_mapped_pages(path: str) -> None:
    """Drops this process's resident pages of every memory mapping of `path` (Linux madvise MADV_DONTNEED;
    nothing elsewhere). The mappings stay valid: the file is read-only mapped, its pages are clean, and the
    next access maps them again from the page cache. Reading an Arrow stream file's record batches touches
    each batch's header, and the kernel maps up to 64 KiB around each touch (fault-around): without this,
    opening or validating a file of 1,000 batches keeps ~64 MiB of it resident, growing with the data."""
    if not sys.platform.startswith("linux"):
        return
    try:
        st = os.stat(path)
        device, inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}", str(st.st_ino)
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            ranges = [line.split(None, 1)[0] for line in f if line.split()[3:5] == [device, inode]]
        madvise = _madvise()
        for span in ranges:
            start, end = (int(bound, 16) for bound in span.split("-"))
            madvise(start, end - start, _MADV_DONTNEED)
    except (OSError, AttributeError, ValueError):  # memory use only: never a reason to fail
        return


def _mapped_table(path: str):
    """The Arrow stream file `path` memory-mapped as a pyarrow Table, as datasets' MemoryMappedTable.from_file
    reads it (one chunk per record batch), with the pages its reading maps released every
    RELEASE_EVERY_BATCHES batches: resident memory flat in the file's size."""
    import pyarrow as pa

    reader = pa.ipc.open_stream(pa.memory_map(path))
    batches = []
    for batch in reader:
        batches.append(batch)
        if len(batches) % RELEASE_EVERY_BATCHES == 0:
            _release_mapped_pages(path)
    _release_mapped_pages(path)
    return pa.Table.from_batches(batches, schema=reader.schema)


def _mapped_dataset(path: str, **dataset_fields):
    """Dataset.from_file(path) (memory-mapped), read with _mapped_table; `dataset_fields` (info, split,
    fingerprint) go to the Dataset."""
    from datasets import Dataset
    from datasets.table import MemoryMappedTable

    return Dataset(arrow_table=MemoryMappedTable(_mapped_table(path), path), **dataset_fields)


def _validate_mapped(dataset) -> None:
    """dataset.data.validate() (the Arrow structure: offsets and lengths agree), record batch by record batch,
    releasing the pages it maps (it reads each list column's first and last offsets) as it goes."""
    table = dataset.data.table
    paths = [entry["filename"] for entry in dataset.cache_files]
    for index, batch in enumerate(table.to_batches(), 1):
        batch.validate()
        if index % RELEASE_EVERY_BATCHES == 0:
            for path in paths:
                _release_mapped_pages(path)
    for path in paths:
        _release_mapped_pages(path)


def _load_split(directory: str):
    """datasets.load_from_disk of a split folder this module wrote (state.json, dataset_info.json, one Arrow
    file), the file read with _mapped_table; load_from_disk itself when datasets would read it into memory."""
    from datasets import DatasetInfo, load_from_disk
    from datasets.splits import Split
    from datasets.utils.info_utils import is_small_dataset

    with open(os.path.join(directory, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    files = [os.path.join(directory, entry["filename"]) for entry in state["_data_files"]]
    if len(files) != 1 or is_small_dataset(os.path.getsize(files[0])):
        return load_from_disk(directory)
    with open(os.path.join(directory, "dataset_info.json"), encoding="utf-8") as f:
        info = DatasetInfo.from_dict(json.load(f))
    split = Split(state["_split"]) if state["_split"] is not None else None
    dataset = _mapped_dataset(files[0], info=info, split=split, fingerprint=state["_fingerprint"])
    return dataset.with_format(type=state["_format_type"], format_kwargs=state["_format_kwargs"], columns=state["_format_columns"],
                               output_all_columns=state["_output_all_columns"])


def _batches(files: list[str], split: str, first_source: int, strict: bool, reports: list[FileReport],
             formats: FormatOptions | None) -> Iterator[dict[str, list]]:
    """The split's rows in chunks of CHUNK_CONVERSATIONS, as columns; appends each file's FileReport to
    `reports` when the file is opened (its counts fill in as it is read)."""
    batch: dict[str, list] = {"messages": [], "tools": [], "source": [], "line": []}
    for offset, path in enumerate(files):
        report = FileReport(path=path, split=split)
        reports.append(report)
        for row in iter_file_records(path, first_source + offset, strict, report, formats):
            for name, column in batch.items():
                column.append(row[name])
            if len(batch["messages"]) == CHUNK_CONVERSATIONS:
                yield batch
                batch = {name: [] for name in batch}
    if batch["messages"]:
        yield batch


_WORKER_ENCODER: ConversationTokenizer | None = None


def _start_worker(encoder: ConversationTokenizer) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _tokenise_in_worker(batch: dict[str, list]):
    return _WORKER_ENCODER.to_arrow(batch)


def _tokenised(batches: Iterator[dict[str, list]], encoder: ConversationTokenizer, num_proc: int | None):
    """encoder.to_arrow of every batch, in order. With num_proc > 1 (and more than one batch) in that many
    worker processes, with at most 2 x num_proc batches in flight, so memory does not grow with the data."""
    head = [batch for batch in (next(batches, None), next(batches, None)) if batch is not None]
    if not num_proc or num_proc <= 1 or len(head) < 2:  # one chunk is not worth starting processes for
        yield from map(encoder.to_arrow, itertools.chain(head, batches))
        return
    # Not fork: a process that has started threads (the tokenizer's pool, torch, a tracker, logging) can fork
    # while one of them holds a lock, and the worker then waits on it forever (it did, in the test suite).
    # forkserver forks each worker from a fresh single-threaded server; the encoder is pickled once per worker.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    with context.Pool(num_proc, initializer=_start_worker, initargs=(encoder,)) as pool:
        pending: collections.deque = collections.deque()
        for batch in itertools.chain(head, batches):
            pending.append(pool.apply_async(_tokenise_in_worker, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _SplitWriter:
    """Counts one split's tokenised rows into the reports and appends the kept ones to an Arrow file."""

    def __init__(self, path: str, reports: list[FileReport]):
        from datasets import Features, List, Value
        from datasets.arrow_writer import ArrowWriter

        self.path, self.reports = path, reports
        features = Features({"input_ids": List(Value("int32")), "labels": List(Value("int32")), "length": Value("int32")})
        self.writer = ArrowWriter(features=features, path=path)
        self.lengths: list[np.ndarray] = []
        self.supervised_tokens = self.truncated = self.tokenised = 0

    def add(self, table) -> None:
        columns = table.select(["drop_reason", "source", "line", "extra", "notes", "lost_examples"]).to_pydict()
        kept = np.zeros(len(table), dtype=bool)
        for index, reason in enumerate(columns["drop_reason"]):
            report = self.reports[columns["source"][index]]
            if reason:
                report.kept -= 1
                report.skip(reason, f"{report.path}:{columns['line'][index]}")
                continue
            kept[index] = True
            report.examples_lost_to_truncation += columns["lost_examples"][index]
            if columns["extra"][index]:  # a further example of a record already counted as kept
                report.extra_examples += 1
            elif columns["notes"][index]:
                report.adjusted.update(columns["notes"][index].split(";"))
        self.truncated += int(np.count_nonzero(table["truncated"].to_numpy()))
        self.supervised_tokens += int(table["supervised"].to_numpy()[kept].sum(dtype=np.int64))
        self.lengths.append(table["length"].to_numpy()[kept])
        self.tokenised += len(table)
        self.writer.write_table(table.filter(kept).select(list(TOKENISED_FEATURES)))

    def close(self) -> tuple:
        """(dataset, empty when every row was dropped, or None when no file had a row; stats). The file's
        folder becomes what Dataset.save_to_disk writes (state.json and dataset_info.json beside it), so
        datasets.load_from_disk reads it."""
        self.writer.finalize()
        dataset = _mapped_dataset(self.path)  # memory-mapped: only the batches' headers are read
        directory = os.path.dirname(self.path)
        state = {"_data_files": [{"filename": os.path.basename(self.path)}], "_fingerprint": dataset._fingerprint, "_format_columns": None,
                 "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
        with open(os.path.join(directory, "state.json"), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, sort_keys=True)
        dataset.info.write_to_directory(directory)
        # int32 as written (4 bytes a conversation, the one list that grows with N); sums in int64
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int32)
        self.lengths = []
        stats = {"tokens": int(lengths.sum(dtype=np.int64)), "supervised_tokens": self.supervised_tokens, "truncated": self.truncated, "lengths": lengths}
        return (dataset if self.tokenised else None), stats


def _tokenise_files(files: list[str], split: str, first_source: int, strict: bool, encoder: ConversationTokenizer,
                    num_proc: int | None, reports: list[FileReport], formats: FormatOptions | None, directory: str):
    """Reads, normalises and tokenises one split, chunk by chunk, into the save_to_disk folder `directory`/SPLIT; updates
    `reports`; returns (dataset memory-mapped from that file or None, stats)."""
    os.makedirs(os.path.join(directory, split))
    writer = _SplitWriter(os.path.join(directory, split, SPLIT_FILE), reports)
    for table in _tokenised(_batches(files, split, first_source, strict, reports, formats), encoder, num_proc):
        writer.add(table)
    return writer.close()


def _scratch_directory() -> str:
    """A folder for tokenised rows that are not cached, removed when this process exits."""
    root = default_cache_dir()
    os.makedirs(root, exist_ok=True)
    directory = os.path.join(root, f"scratch-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(directory)
    atexit.register(shutil.rmtree, directory, True)
    return directory


def _build_and_save(cache_path: str | None, train_files, eval_files, strict, encoder, num_proc, formats=None) -> dict:
    """Builds the tokenised splits and their report, written chunk by chunk under a staging folder renamed
    to `cache_path` when whole (atomic); without a cache path under a scratch folder removed at exit. A
    result the run refuses (nothing to train or evaluate on) is not cached."""
    from datasets import Dataset

    staging = f"{cache_path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}" if cache_path is not None else _scratch_directory()
    os.makedirs(staging, exist_ok=True)
    reports: list[FileReport] = []
    try:
        train, train_stats = _tokenise_files(train_files, "train", 0, strict, encoder, num_proc, reports, formats, staging)
        evaluation, eval_stats = (None, None)
        if eval_files:
            evaluation, eval_stats = _tokenise_files(eval_files, "eval", len(train_files), strict, encoder, num_proc, reports, formats, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report = {
        "files": [r.to_dict() for r in reports],
        "tokens": _token_summary([s for s in (train_stats, eval_stats) if s], reports, encoder.max_length),
    }
    built = {"train": train, "eval": evaluation, "report": report}
    usable = train is not None and len(train) > 0 and (not eval_files or (evaluation is not None and len(evaluation) > 0))
    if cache_path is None:
        return built
    if not usable:  # never cache a result the run refuses: the next run must say why again
        built.update({split: Dataset.from_file(os.path.join(staging, split, SPLIT_FILE), in_memory=True) if built[split] is not None else None
                      for split in ("train", "eval")})
        shutil.rmtree(staging, ignore_errors=True)
        return built
    with open(os.path.join(staging, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False)
    try:
        os.rename(staging, cache_path)  # atomic: a reader never sees half an entry
    except OSError:  # another node's main process got there first; its entry is identical
        atexit.register(shutil.rmtree, staging, True)  # our splits map its files until we exit
    return _load_cached(cache_path)


def _load_cached(cache_path: str) -> dict:
    """The splits of a cache entry (memory-mapped) and its report."""
    with open(os.path.join(cache_path, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    splits = {split: _load_split(os.path.join(cache_path, split)) if os.path.isdir(os.path.join(cache_path, split)) else None
              for split in ("train", "eval")}
    return {**splits, "report": report}


def _load_cached_or_remove(cache_path: str) -> dict | None:
    """The cached entry; None when it cannot be read whole (a copy cut short, a full disk, a file lost):
    then it is reported in one warning and removed, to be built again."""
    try:
        built = _load_cached(cache_path)
        for split in ("train", "eval"):
            if built[split] is not None:
                _validate_mapped(built[split])  # the Arrow structure: offsets and lengths agree
        rows = sum(len(built[split]) for split in ("train", "eval") if built[split] is not None)
        if rows != built["report"]["tokens"]["conversations"]:
            raise ValueError(f"{rows} conversations, {built['report']['tokens']['conversations']} when written")
        return built
    except Exception as err:  # json, pyarrow and datasets each raise their own types for damaged files
        reason = (str(err).strip().splitlines() or [""])[0]
        logger.warning("the tokenised data cached in %s is damaged (%s: %s); tokenising again", cache_path, type(err).__name__, reason)
        shutil.rmtree(cache_path, ignore_errors=True)
        return None


def build_datasets(data_args, tokenizer, training_args):
    """Loads, validates, tokenises (or reuses the cached result) and splits the training data.

    Returns (train_dataset, eval_dataset_or_None, report) where `report` is the JSON-ready data report
    (per-file read/kept/skipped by reason with examples, token counts, length percentiles, cache,
    split sizes); `format_data_report` turns it into the table rank 0 logs.

    Raises:
        DataError: a path or file is bad; with --strict_data, the first invalid record; no
            conversation is left to train on; the validation split would be empty.
    """
    builtin = ensure_chat_template(tokenizer, getattr(data_args, "chat_template", None))
    builtin = builtin or next((name for name, text in BUILTIN_TEMPLATES.items() if tokenizer.chat_template == text), None)
    formats = FormatOptions(dpo_chosen_as_sft=getattr(data_args, "dpo_chosen_as_sft", False))
    encoder = ConversationTokenizer(tokenizer, data_args.max_length, MaskingOptions.from_args(data_args))
    train_files, ignored = resolve_data_files(data_args.data_files, "--data_files")
    eval_files, eval_ignored = resolve_data_files(data_args.eval_data_files, "--eval_data_files") if data_args.eval_data_files else ([], [])
    for path in train_files + eval_files:  # on every rank, so a bad file stops all of them at once
        check_data_file(path)
    cache_root = getattr(data_args, "data_cache_dir", None)
    cache_path = None
    if cache_root != "none":
        cache_root = cache_root or default_cache_dir()
        os.makedirs(cache_root, exist_ok=True)
        fingerprint = data_fingerprint(train_files, eval_files, tokenizer, data_args.max_length, data_args.strict_data, encoder, formats)
        cache_path = os.path.join(cache_root, fingerprint)
    first = training_args.main_process_first(desc="data preprocessing") if training_args is not None else contextlib.nullcontext()
    with first:
        built = _load_cached_or_remove(cache_path) if cache_path is not None and os.path.isdir(cache_path) else None
        reused = built is not None
        if reused:
            logger.info("reusing the tokenised data cached in %s", cache_path)
        else:
            built = _build_and_save(cache_path, train_files, eval_files, data_args.strict_data, encoder,
                                    data_args.preprocessing_num_workers, formats)
    report, train_dataset, eval_dataset = built["report"], built["train"], built["eval"]
    report["ignored_files"] = ignored + eval_ignored
    report["chat_template"] = (f"built-in {builtin}" if builtin else getattr(data_args, "chat_template", None) or "tokenizer's own")
    report["masking"] = {"train_on_turns": encoder.options.train_on_turns, "chat_template_kwargs": dict(encoder.options.chat_template_kwargs)}
    report["cache"] = {"path": cache_path, "reused": reused}
    if train_dataset is None or len(train_dataset) == 0:
        skipped = Counter()
        for file_report in report["files"]:
            skipped.update(file_report["skipped_by_reason"])
        raise DataError(f"{', '.join(train_files)}: no usable conversation left (skipped: {dict(skipped)}); check the data "
                        "with dft-inspect")
    if eval_files and (eval_dataset is None or len(eval_dataset) == 0):
        raise DataError(f"{', '.join(eval_files)}: no usable evaluation conversation left (see the report); "
                        "check --eval_data_files")
    eval_source = "--eval_data_files" if eval_files else None
    if eval_dataset is None and data_args.validation_split_percentage > 0:
        if len(train_dataset) < 2:
            raise DataError(f"--validation_split_percentage {data_args.validation_split_percentage}: only "
                            f"{len(train_dataset)} conversation, nothing left to hold out; set it to 0")
        seed = training_args.seed if training_args is not None else 42
        train_dataset, eval_dataset = split_for_validation(train_dataset, data_args.validation_split_percentage, seed)
        eval_source = f"--validation_split_percentage {data_args.validation_split_percentage}"
    report["splits"] = {"train": len(train_dataset), "eval": len(eval_dataset) if eval_dataset is not None else 0, "eval_from": eval_source}
    report["totals"] = _totals(report["files"])
    return train_dataset, eval_dataset, report


def split_for_validation(dataset, percentage: float, seed: int):
    """(train, eval): a random `percentage` of the rows (rounded up) held out, the same ones for the same seed.

    The row indices live in memory (datasets' train_test_split would write index files into the cache entry).
    """
    held_out = math.ceil(len(dataset) * percentage / 100)
    order = np.random.default_rng(seed).permutation(len(dataset))
    return (dataset.select(np.sort(order[held_out:]), keep_in_memory=True),
            dataset.select(np.sort(order[:held_out]), keep_in_memory=True))
