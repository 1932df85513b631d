"""The data entry point: the pipeline (build_datasets), the batch collator and the report helpers,
re-exported from the package so a reader (and a test) imports one name. Each concern is its own module:

  dftune/data/files.py       finding and reading data files (resolve_data_files, check_data_file, iter_records)
  dftune/data/formats.py     records -> normalised messages (normalize_record: ChatML/OpenAI, ShareGPT, ...)
  dftune/data/templates.py   chat templates: built-in ChatML, --chat_template, rendering (ChatRenderer)
  dftune/data/spans.py       which characters are supervised (SpanFinder, on the rendered text)
  dftune/data/encoding.py    which tokens are supervised (ConversationTokenizer: input_ids and labels)
  dftune/data/build.py       build_datasets: read, normalise, tokenise, cache
  dftune/data/report.py      the data report: every record counted, per file and reason
  dftune/data/collators.py   DataCollatorForDFT (padding); dftune/data/packing.py the packed rows
"""

from __future__ import annotations

from dftune.data.build import build_datasets, data_fingerprint, default_cache_dir, load_conversations, read_file_records, split_for_validation
from dftune.data.collators import (
    DataCollatorForDFT,
)
from dftune.data.encoding import (
    TOKENISED_COLUMNS,
    ConversationTokenizer,
    format_supervision,
    supervised_char_spans,
    supervision_runs,
    tokenize_batch,
    tokenize_conversation,
)
from dftune.data.files import (
    DATA_SUFFIXES,
    JSON_SUFFIXES,
    PARQUET_SUFFIXES,
    BrokenLine,
    DataError,
    check_data_file,
    iter_records,
    resolve_data_files,
)
from dftune.data.formats import (
    ROLE_ALIASES,
    VALID_ROLES,
    normalize_record,
    validate_messages,
)
from dftune.data.report import MAX_EXAMPLES, FileReport, format_data_report, write_data_report
from dftune.data.spans import NO_SUPERVISED_TOKEN, TRUNCATED_TO_NOTHING
from dftune.data.templates import (
    CHATML_TEMPLATE,
    ChatRenderer,
    ensure_chat_template,
)
from dftune.loss.core import (
    IGNORE_INDEX,
)

__all__ = [
    "MAX_EXAMPLES",
    "FileReport",
    "build_datasets",
    "data_fingerprint",
    "default_cache_dir",
    "format_data_report",
    "load_conversations",
    "read_file_records",
    "split_for_validation",
    "write_data_report",
    "DataCollatorForDFT",
    "DATA_SUFFIXES",
    "JSON_SUFFIXES",
    "PARQUET_SUFFIXES",
    "BrokenLine",
    "DataError",
    "check_data_file",
    "iter_records",
    "resolve_data_files",
    "ROLE_ALIASES",
    "VALID_ROLES",
    "normalize_record",
    "validate_messages",
    "NO_SUPERVISED_TOKEN",
    "TOKENISED_COLUMNS",
    "TRUNCATED_TO_NOTHING",
    "ConversationTokenizer",
    "format_supervision",
    "supervised_char_spans",
    "supervision_runs",
    "tokenize_batch",
    "tokenize_conversation",
    "CHATML_TEMPLATE",
    "ChatRenderer",
    "ensure_chat_template",
    "IGNORE_INDEX",
]
