"""Finding and reading data files: `--data_files` specs -> data files -> (line, record) pairs.

  resolve_data_files  files, directories (recursively) and globs -> a sorted list of data files; a folder
                      written by `datasets`' save_to_disk and a Hub dataset name (`org/name[:split]`)
                      are data sources of their own
  check_data_file     fails at once on a file that is missing, empty or not JSON/Parquet (head only)
  iter_records        .jsonl / .json (array or JSON lines) / .jsonl.gz / .json.gz / .parquet, record by record,
                      with real line numbers; a broken JSON line is yielded as a `BrokenLine` reason

What a record means is `data_formats`' business; this module only gets records out of files.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import itertools
import json
import os
import re
from collections.abc import Iterator
from typing import Any

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
DATA_SUFFIXES = JSON_SUFFIXES + PARQUET_SUFFIXES


class DataError(ValueError):
    """Bad input data: the message names the file, the line and what to do."""


# ---- Hugging Face datasets: a save_to_disk folder, or a Hub name ----------------------------------------------
SAVED_DATASET_FILES = ("dataset_info.json", "state.json")  # Dataset.save_to_disk
SAVED_DATASET_DICT_FILE = "dataset_dict.json"  # DatasetDict.save_to_disk: one folder per split
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+(?::[\w.-]+)?")  # org/name, or org/name:split


def is_saved_dataset(path: str) -> bool:
    """A folder written by `Dataset.save_to_disk` (rows in Arrow files beside state.json)."""
    return os.path.isdir(path) and all(os.path.isfile(os.path.join(path, name)) for name in SAVED_DATASET_FILES)


def is_hub_dataset(spec: str) -> bool:
    """`org/name` or `org/name:split` that is no local path: a dataset on the Hugging Face Hub."""
    return HUB_NAME.fullmatch(spec) is not None and not os.path.exists(spec) and not spec.endswith(DATA_SUFFIXES)


def _saved_dataset_split(path: str, flag: str) -> str:
    """The split folder of a `DatasetDict.save_to_disk` folder that `flag` reads: train for --data_files,
    validation (else test) for --eval_data_files."""
    with open(os.path.join(path, SAVED_DATASET_DICT_FILE), encoding="utf-8") as f:
        splits = json.load(f).get("splits", [])
    wanted = ("train",) if flag == "--data_files" else ("validation", "test")
    for split in wanted:
        if split in splits and is_saved_dataset(os.path.join(path, split)):
            return os.path.join(path, split)
    raise DataError(f"{flag} {path}: a saved DatasetDict without a {' or '.join(wanted)} split (it has {', '.join(splits) or 'none'}); "
                    f"name the split's folder, e.g. {os.path.join(path, splits[0] if splits else 'SPLIT')}")


def _hub_offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _iter_hub_dataset(spec: str) -> Iterator[tuple[int, Any, str | None]]:
    name, _, split = spec.partition(":")
    if _hub_offline():
        raise DataError(f"{spec}: not a local file or folder, and the Hugging Face Hub is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); "
                        f"where the Hub is reachable, save it with datasets.load_dataset({name!r}, split={split or 'train'!r})"
                        ".save_to_disk(DIR) and pass DIR")
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # connection errors, unknown names and splits come as several types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{spec}: cannot load it from the Hugging Face Hub ({reason}); check the name and split, "
                        "or save it with save_to_disk where the Hub is reachable and pass that folder") from None
    for row, record in enumerate(dataset, start=1):
        yield row, record, None


def _iter_saved_dataset(path: str) -> Iterator[tuple[int, Any, str | None]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(path)
    except Exception as err:
        raise DataError(f"{path}: cannot read the saved dataset ({err}); fix it or remove it from --data_files") from None
    for row, record in enumerate(dataset, start=1):  # Arrow rows, memory-mapped: row numbers stand for lines
        yield row, record, None


def source_fingerprint(path: str) -> tuple:
    """What identifies a data source's content for the cache key: a file's size and mtime, a saved dataset's
    Arrow files' sizes and mtimes, a Hub name as given (a changed Hub dataset needs --data_cache_dir none)."""
    if is_saved_dataset(path):
        parts = sorted(name for name in os.listdir(path) if name.endswith((".arrow", ".json")))
        return (os.path.abspath(path), [(name, os.stat(os.path.join(path, name)).st_size, os.stat(os.path.join(path, name)).st_mtime_ns)
                                        for name in parts])
    if is_hub_dataset(path):
        return ("hub", path)
    return (os.path.abspath(path), os.stat(path).st_size, os.stat(path).st_mtime_ns)



def resolve_data_files(specs: list[str], flag: str = "--data_files") -> tuple[list[str], list[str]]:
    """Expands files, directories (recursively) and globs into data files, in a stable order.

    Returns (data_files, ignored) where `ignored` lists files found in directories or globs whose
    suffix is not a data format (reported, never read). A file named explicitly must have a data suffix.

    Raises:
        DataError: a path does not exist, a glob or directory yields no data file, or an explicitly
            named file has an unsupported suffix.
    """
    files: list[str] = []
    ignored: list[str] = []

    def add_directory(directory: str) -> int:
        found = 0
        for root, dirnames, filenames in os.walk(directory):
            if is_saved_dataset(root):  # a saved dataset inside: one source, not its Arrow and JSON files
                files.append(root)
                found += 1
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or name == SAVED_DATASET_DICT_FILE:  # a DatasetDict's index: its splits are read
                    continue
                path = os.path.join(root, name)
                if name.endswith(DATA_SUFFIXES):
                    files.append(path)
                    found += 1
                else:
                    ignored.append(path)
        return found

    for spec in specs:
        if is_saved_dataset(spec):
            files.append(spec)
        elif os.path.isfile(os.path.join(spec, SAVED_DATASET_DICT_FILE)):
            files.append(_saved_dataset_split(spec, flag))
        elif is_hub_dataset(spec):
            files.append(spec)
        elif glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            found = 0
            for path in matches:
                if os.path.isdir(path):
                    found += add_directory(path)
                elif path.endswith(DATA_SUFFIXES):
                    files.append(path)
                    found += 1
                else:
                    ignored.append(path)
            if not found:
                raise DataError(f"{flag} {spec}: the pattern matches no {'/'.join(DATA_SUFFIXES)} file")
        elif os.path.isdir(spec):
            if not add_directory(spec):
                raise DataError(f"{flag} {spec}: the directory holds no {'/'.join(DATA_SUFFIXES)} file")
        elif os.path.exists(spec):
            if not spec.endswith(DATA_SUFFIXES):
                raise DataError(f"{spec}: unsupported data file type; use {', '.join(DATA_SUFFIXES)} ({flag})")
            files.append(spec)
        else:
            raise DataError(f"{spec}: data file not found; check {flag}")
    unique = list(dict.fromkeys(path if is_hub_dataset(path) else os.path.normpath(path) for path in files))
    return unique, sorted(set(ignored) - set(unique))


# Bytes that are not UTF-8 are decoded as lone surrogates (errors="surrogateescape"): the record holding
# them is skipped with this reason, and the rest of the file is read.
NOT_UTF8_TEXT = "not UTF-8 text"
NOT_UTF8_CHARACTER = re.compile("[\udc80-\udcff]")


def _open_text(path: str):
    opener = gzip.open if path.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape")


def check_data_file(path: str) -> None:
    """Fails at once on a file that is missing, empty, or not JSON/Parquet at all (reads only its head).

    Raises:
        DataError: naming the file and what is wrong with it.
    """
    if is_hub_dataset(path):
        if _hub_offline():
            next(_iter_hub_dataset(path), None)  # raises the offline line now, before any model work
        return
    if is_saved_dataset(path):
        import datasets

        try:
            rows = datasets.load_from_disk(path).num_rows
        except Exception as err:
            raise DataError(f"{path}: cannot read the saved dataset ({err}); fix it or remove it from --data_files") from None
        if rows == 0:
            raise DataError(f"{path}: the saved dataset is empty; remove it from --data_files")
        return
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found; check --data_files")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: data file is empty; remove it from --data_files")
    if path.endswith(PARQUET_SUFFIXES):
        with open(path, "rb") as f:
            if f.read(4) != b"PAR1":
                raise DataError(f"{path}: not a Parquet file (no PAR1 header); fix it or remove it from --data_files")
        return
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read(1 << 16)
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read the file ({err}); fix it or remove it from --data_files") from None
    # An incremental decoder tolerates a character cut at the 64 KiB boundary. Some bytes that are not
    # UTF-8 are bad records (skipped when read); a head in which no line parses is not a text file.
    head = codecs.getincrementaldecoder("utf-8-sig")(errors="surrogateescape").decode(raw, final=False)
    if NOT_UTF8_CHARACTER.search(head) and not head.lstrip().startswith("[") and not any(map(_parses, head.splitlines())):
        raise DataError(f"{path}: not UTF-8 text, so not JSON; fix it or remove it from --data_files")
    stripped = head.lstrip()
    if not stripped:
        raise DataError(f"{path}: data file is empty (whitespace only); remove it from --data_files")
    if stripped.startswith("["):
        return
    lines = head.splitlines()
    complete = lines if len(raw) < (1 << 16) else lines[:-1]
    if not complete and stripped.startswith("{"):
        return  # one record longer than the head; the full read decides
    for line in complete:
        if not line.strip():
            continue
        try:
            json.loads(line)
            return
        except json.JSONDecodeError:
            continue
    if stripped.startswith("{"):
        return  # maybe one pretty-printed object; the full read decides
    raise DataError(f"{path}: not JSON (no line of its first 64 KiB parses); expected JSON lines or a JSON array")


def _parses(line: str) -> bool:
    if NOT_UTF8_CHARACTER.search(line) or not line.strip():
        return False
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


class BrokenLine(str):
    """The skip reason of a line that is not JSON; the parser's message is kept for --strict_data only,
    so the report groups all broken lines under one reason."""

    def __new__(cls, detail: str):
        reason = super().__new__(cls, "broken JSON line")
        reason.detail = detail
        return reason


def _iter_json_array(path: str, text: str) -> Iterator[tuple[int, Any, str | None]]:
    """Yields (line, element, None) for each element of a JSON array, with its real line number."""
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"\s*")
    index = whitespace.match(text, 0).end() + 1  # past '['
    line, counted_to = 1, 0
    while True:
        index = whitespace.match(text, index).end()
        if text.startswith("]", index):
            return
        line += text.count("\n", counted_to, index)
        counted_to = index
        start = index
        try:
            element, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as err:
            # Inside an array there is no way to resynchronise: the rest of the file is unreadable.
            raise DataError(
                f"{path}:{err.lineno}: broken JSON inside the array ({err.msg}); the rest of the file cannot be "
                "read, fix it or remove it from --data_files"
            ) from None
        yield (line, None, NOT_UTF8_TEXT) if NOT_UTF8_CHARACTER.search(text, start, index) else (line, element, None)
        index = whitespace.match(text, index).end()
        if text.startswith(",", index):
            index += 1
        elif not text.startswith("]", index):
            at_line = text.count("\n", 0, index) + 1
            raise DataError(f"{path}:{at_line}: broken JSON inside the array (expected ',' or ']'); fix the file")


def iter_records(path: str) -> Iterator[tuple[int, Any, str | None]]:
    """Yields (line_number, record_or_None, error_or_None) for every record of one data file.

    JSON arrays and JSON lines are told apart by content, not suffix (a .json file may hold either).
    Parquet rows are numbered from 1 like lines.

    Raises:
        DataError: the file cannot be read at all, or a JSON array is broken part-way.
    """
    if is_saved_dataset(path):
        yield from _iter_saved_dataset(path)
        return
    if is_hub_dataset(path):
        yield from _iter_hub_dataset(path)
        return
    if path.endswith(PARQUET_SUFFIXES):
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read the Parquet file ({err}); fix it or remove it from --data_files") from None
        row = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                row += 1
                yield row, record, None
        return
    try:
        with _open_text(path) as f:
            yield from _iter_text_records(path, f)
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError; a truncated .gz fails part-way
        raise DataError(f"{path}: cannot read the file ({err}); fix it or remove it from --data_files") from None


def _iter_text_records(path: str, f) -> Iterator[tuple[int, Any, str | None]]:
    """JSON lines are read a line at a time, so memory stays flat in the size of the file; a JSON array
    or one pretty-printed record is read whole (json has no incremental parser)."""
    line_number, first = 0, ""
    for first in f:  # past the blank lines before the first record
        line_number += 1
        if first.strip():
            break
    if not first.strip():
        return
    if first.lstrip().startswith("["):
        yield from _iter_json_array(path, "\n" * (line_number - 1) + first + f.read())
        return
    if not _parses(first) and not NOT_UTF8_CHARACTER.search(first):
        # Not JSON lines from the first line on: maybe one pretty-printed record.
        rest = f.read()
        try:
            record = json.loads(first + rest)
        except json.JSONDecodeError:
            lines = io.StringIO(rest)  # JSON lines after all, broken from the first line on
        else:
            yield line_number, record, None
            return
    else:
        lines = f
    for line in itertools.chain([first], lines):
        if line.strip():
            yield _parse_line(line_number, line)
        line_number += 1


def _parse_line(line_number: int, line: str) -> tuple[int, Any, str | None]:
    if NOT_UTF8_CHARACTER.search(line):
        return line_number, None, NOT_UTF8_TEXT
    line = line.rstrip("\r\n")  # a parser's column and line count stay those of the line itself
    try:
        return line_number, json.loads(line), None
    except json.JSONDecodeError as err:
        return line_number, None, BrokenLine(f"{err.msg} at column {err.colno}")

