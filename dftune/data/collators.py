"""Batch collators: right-padded rows for the DFT loss (DataCollatorForDFT); packed rows live in data/packing.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dftune.loss.core import IGNORE_INDEX


@dataclass
class DataCollatorForDFT:
    """Pads a list of {"input_ids", "labels"} rows (right padding) into a batch.

    Output: input_ids (B, T), attention_mask (B, T), labels (B, T) with IGNORE_INDEX on padding, and with
    `with_position_ids` position_ids (B, T) = 0..T-1 per row: sequence parallelism shards every tensor along T
    and needs each token's global position (padding sits at the end, after every real token).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    with_position_ids: bool = False

    def __post_init__(self):
        if not isinstance(self.pad_token_id, int) or isinstance(self.pad_token_id, bool):
            # torch.full would fail on the first batch with "fill_value ... not NoneType".
            raise ValueError(f"pad_token_id must be a token id, got {self.pad_token_id!r}: give the tokenizer a pad token "
                             "(train_dft does it with dftune.data.tokenizer.prepare_tokenizer)")

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
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.with_position_ids:
            batch["position_ids"] = torch.arange(longest, dtype=torch.long).expand(batch_size, longest).contiguous()
        return batch
