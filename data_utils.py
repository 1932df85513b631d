"""The data entry point the trainer imports: the pipeline (build_datasets), the batch collator and the
report helpers. Each concern lives in its own module, re-exported here so callers import one name:

  data_files    finding and reading data files (resolve_data_files, check_data_file, iter_records)
  data_formats  records -> normalised messages (normalize_record: ChatML/OpenAI, ShareGPT, ...)
  data_templates  chat templates: built-in ChatML, --chat_template, rendering (ChatRenderer)
  data_masking  which tokens are supervised (ConversationTokenizer)
  data_build    build_datasets: read, normalise, tokenise, cache, report
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from data_build import (  # noqa: F401  (re-exported)
    MAX_EXAMPLES,
    FileReport,
    build_datasets,
    data_fingerprint,
    default_cache_dir,
    format_data_report,
    load_conversations,
    read_file_records,
    split_for_validation,
    write_data_report,
)
from data_files import (  # noqa: F401
    DATA_SUFFIXES,
    JSON_SUFFIXES,
    PARQUET_SUFFIXES,
    BrokenLine,
    DataError,
    check_data_file,
    iter_records,
    resolve_data_files,
)
from data_formats import ROLE_ALIASES, VALID_ROLES, normalize_record, validate_messages  # noqa: F401
from data_masking import (  # noqa: F401
    NO_SUPERVISED_TOKEN,
    TOKENISED_COLUMNS,
    TRUNCATED_TO_NOTHING,
    ConversationTokenizer,
    format_supervision,
    supervised_char_spans,
    supervision_runs,
    tokenize_batch,
    tokenize_conversation,
)
from data_templates import CHATML_TEMPLATE, ChatRenderer, ensure_chat_template  # noqa: F401
from dft_loss import IGNORE_INDEX


@dataclass
class DataCollatorForDFT:
    """Pads a list of {"input_ids", "labels"} rows (right padding) into a batch.

    Output: input_ids (B, T), attention_mask (B, T), labels (B, T) with IGNORE_INDEX on padding.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if not isinstance(self.pad_token_id, int) or isinstance(self.pad_token_id, bool):
            # torch.full would fail on the first batch with "fill_value ... not NoneType".
            raise ValueError(f"pad_token_id must be a token id, got {self.pad_token_id!r}: give the tokenizer a pad token "
                             "(train_dft does it with tokenizer_setup.prepare_tokenizer)")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(features)
        input_ids = torch.full((batch_size, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.as_tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
