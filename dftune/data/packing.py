"""Padding-free packing: several tokenised conversations per row, attention kept inside each one.

Real SFT conversations are short and uneven, so batch size 1 at a long --max_length leaves the GPU
idle on short rows and larger padded batches spend it on padding. `--packing` groups whole
conversations (never split) into rows of at most max_length tokens by best-fit decreasing and
records each conversation's length in `sequence_lengths`; `DataCollatorForPacking` then builds
`position_ids` that restart at 0 for every conversation and no `attention_mask`.

Why attention stays inside a conversation (transformers 5, `masking_utils`): with
`attention_mask=None`, no cache (`use_cache=False`, which training sets) and `position_ids` given,
`create_causal_mask` calls `find_packed_sequence_indices` (a new sequence starts wherever
position_ids do not increase by 1) and ANDs a block-diagonal mask into the causal one for
sdpa, eager and flex_attention. flash_attention_2 instead derives cu_seqlens from position_ids and
runs its varlen kernel, but only for a batch of one row, so with it the collator flattens the
batch into a single (1, total) row. Any `attention_mask` in the batch disables the detection and
would let conversations attend to each other, so the collator never emits one; padding (rows mode)
is its own segment at the end of a row, with position_ids restarting at 0 and labels -100.
tests/test_packing.py proves it: logits of a packed row equal those of each conversation alone.

Loss. Labels are unshifted; position i predicts token i+1. The last token of a conversation would
predict the first token of the next one, so that first label is forced to IGNORE_INDEX (it already
is under the masking contract: a conversation starts with a role header). Hence the supervised-token
count `labels[..., 1:] != -100` of a packed row equals the sum over its conversations unpacked, and
the DFT loss and metrics, normalised by that count, are unchanged by packing.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch

from dftune.loss.core import IGNORE_INDEX

# Attention implementations that keep packed conversations apart given position_ids (see above).
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2")
# Those whose packed path needs one (1, total) row rather than a padded batch of rows.
FLATTEN_ATTENTION = ("flash_attention_2",)


# ---- checks ---------------------------------------------------------------------------------------
def check_packing_attention(attn_implementation: str) -> None:
    """Raises ValueError unless `attn_implementation` keeps packed conversations apart."""
    if attn_implementation not in PACKING_ATTENTION:
        raise ValueError(
            f"--packing with --attn_implementation {attn_implementation}: this kernel would let packed conversations "
            f"attend to each other; use --attn_implementation {' or '.join(PACKING_ATTENTION)}, or drop --packing."
        )


def check_model_for_packing(model) -> None:
    """Checks a loaded model: its attention kernel, and that its forward is transformers' own.

    Raises:
        ValueError: the kernel actually in use is not in PACKING_ATTENTION, or the model class comes
            from remote code, whose masking we cannot vouch for.
    """
    attn_implementation = getattr(model.config, "_attn_implementation", None)
    check_packing_attention(str(attn_implementation))
    module = type(model).__module__
    if not module.startswith("transformers."):
        raise ValueError(
            f"--packing: model class {type(model).__name__} comes from remote code ({module}), which may not build the "
            "packed attention mask from position_ids; drop --packing (--group_by_length reduces padding instead)."
        )


# ---- packing --------------------------------------------------------------------------------------
def best_fit_decreasing(lengths: list[int], max_length: int) -> list[list[int]]:
    """Groups item indices into bins of total length <= max_length, best-fit decreasing.

    Items are placed longest first, each into the open bin it fills most tightly (a new bin when none
    fits). Deterministic: ties go to the earlier item and the earlier bin.

    Raises:
        ValueError: an item is longer than max_length or not positive.
    """
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])  # stable: ties in input order
    for index in order[:1] + order[-1:]:  # the longest and the shortest
        if not 0 < lengths[index] <= max_length:
            raise ValueError(f"cannot pack a conversation of {lengths[index]} tokens into rows of --max_length {max_length}")
    shortest = lengths[order[-1]] if order else 0
    bins: list[list[int]] = []
    open_bins: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    for item in order:
        length = lengths[item]
        position = bisect.bisect_left(open_bins, (length, -1))  # the tightest bin that still fits
        if position == len(open_bins):
            capacity, bin_id = max_length, len(bins)
            bins.append([])
        else:
            capacity, bin_id = open_bins.pop(position)
        bins[bin_id].append(item)
        remaining = capacity - length
        if remaining >= shortest:  # a bin no remaining item fits in is closed for good
            bisect.insort(open_bins, (remaining, bin_id))
    return bins


def _pack_rows(batch: dict[str, list], source) -> dict[str, list]:
    """`datasets.map(batched=True)` function: turns lists of member indices into packed rows."""
    rows: dict[str, list] = {"input_ids": [], "labels": [], "sequence_lengths": [], "length": []}
    for members in batch["members"]:
        conversations = source[members]  # columns for these rows only, so memory stays bounded
        input_ids: list[int] = []
        labels: list[int] = []
        sequence_lengths: list[int] = []
        for ids, conversation_labels in zip(conversations["input_ids"], conversations["labels"]):
            input_ids.extend(ids)
            # The first token of a conversation is never a target (see the module docstring).
            labels.append(IGNORE_INDEX)
            labels.extend(conversation_labels[1:])
            sequence_lengths.append(len(ids))
        rows["input_ids"].append(input_ids)
        rows["labels"].append(labels)
        rows["sequence_lengths"].append(sequence_lengths)
        rows["length"].append(len(input_ids))
    return rows


def pack_dataset(dataset, max_length: int, num_proc: int | None = None):
    """Packs a tokenised dataset (`input_ids`, `labels`; `length` used when present) into rows.

    Returns a `datasets.Dataset` with `input_ids`, `labels` (first label of every conversation set
    to IGNORE_INDEX), `sequence_lengths` (each conversation's length, in row order) and `length`.

    Raises:
        ValueError: a conversation is longer than max_length.
    """
    from datasets import Dataset

    if "length" in dataset.column_names:
        lengths = list(dataset["length"])
    else:
        lengths = [len(ids) for ids in dataset["input_ids"]]
    bins = best_fit_decreasing(lengths, max_length)
    source = dataset.select_columns(["input_ids", "labels"])
    members = Dataset.from_dict({"members": bins})
    return members.map(
        _pack_rows,
        batched=True,
        batch_size=256,
        num_proc=num_proc,
        fn_kwargs={"source": source},
        remove_columns=["members"],
        desc=f"Packing {len(lengths)} conversations into rows of {max_length} tokens",
    )


def packing_stats(packed_dataset, max_length: int) -> dict[str, Any]:
    """What packing achieved: efficiency = real tokens / (rows x max_length)."""
    row_lengths = list(packed_dataset["length"])
    conversations = sum(len(lengths) for lengths in packed_dataset["sequence_lengths"])
    real_tokens = sum(row_lengths)
    rows = len(row_lengths)
    return {
        "conversations": conversations,
        "rows": rows,
        "real_tokens": real_tokens,
        "max_length": max_length,
        "efficiency": real_tokens / (rows * max_length) if rows else 0.0,
    }


# ---- collation ------------------------------------------------------------------------------------
def _positions(sequence_lengths: list[int]) -> torch.Tensor:
    """(sum(lengths),) positions restarting at 0 for every sequence."""
    return torch.cat([torch.arange(length, dtype=torch.long) for length in sequence_lengths])


@dataclass
class DataCollatorForPacking:
    """Collates packed rows ({"input_ids", "labels", "sequence_lengths"}) without an attention mask.

    flatten=True: every row of the batch concatenated into one, input_ids/labels/position_ids (1, total),
    no padding at all (needed by flash_attention_2's varlen path).
    flatten=False: rows right-padded to the longest, (B, T); the padding of a row is a segment of its
    own (position_ids restart at 0, labels IGNORE_INDEX), so no real token attends to it.
    A row without `sequence_lengths` is one conversation.
    pad_to_multiple_of: the length (flattened or padded) is rounded up with one more padding segment
    (sequence parallelism shards it into equal parts).
    """

    pad_token_id: int
    flatten: bool = True
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if not isinstance(self.pad_token_id, int) or isinstance(self.pad_token_id, bool):
            # torch.full would fail on the first batch with "fill_value ... not NoneType".
            raise ValueError(f"pad_token_id must be a token id, got {self.pad_token_id!r}: give the tokenizer a pad token "
                             "(train_dft does it with tokenizer_setup.prepare_tokenizer)")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_rows, label_rows, position_rows = [], [], []
        for feature in features:
            input_ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)  # (L,)
            labels = torch.as_tensor(feature["labels"], dtype=torch.long).clone()  # (L,)
            sequence_lengths = list(feature.get("sequence_lengths") or [len(input_ids)])
            if sum(sequence_lengths) != len(input_ids):
                raise ValueError(f"sequence_lengths {sequence_lengths} do not add up to the row's {len(input_ids)} tokens")
            starts = torch.tensor([0] + sequence_lengths[:-1]).cumsum(0)
            labels[starts] = IGNORE_INDEX  # no conversation's first token is predicted from another's last
            input_rows.append(input_ids)
            label_rows.append(labels)
            position_rows.append(_positions(sequence_lengths))
        if self.flatten:
            short = -sum(len(row) for row in input_rows) % (self.pad_to_multiple_of or 1)
            if short:  # a padding segment of its own, as in rows mode
                input_rows.append(torch.full((short,), self.pad_token_id, dtype=torch.long))
                label_rows.append(torch.full((short,), IGNORE_INDEX, dtype=torch.long))
                position_rows.append(torch.arange(short))
            return {
                "input_ids": torch.cat(input_rows).unsqueeze(0),  # (1, total)
                "labels": torch.cat(label_rows).unsqueeze(0),  # (1, total)
                "position_ids": torch.cat(position_rows).unsqueeze(0),  # (1, total)
            }
        longest = max(len(row) for row in input_rows)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(input_rows)
        input_ids = torch.full((batch_size, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((batch_size, longest), dtype=torch.long)
        for row, (ids, row_labels, positions) in enumerate(zip(input_rows, label_rows, position_rows)):
            length = len(ids)
            input_ids[row, :length] = ids
            labels[row, :length] = row_labels
            position_ids[row, :length] = positions
            position_ids[row, length:] = torch.arange(longest - length)  # padding: a segment of its own
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


# ---- wiring (called from train_dft.run) ----------------------------------------------------------
def apply_packing(train_dataset, eval_dataset, max_length: int, attn_implementation: str, pad_token_id: int,
                  num_proc: int | None = None, pad_to_multiple_of: int | None = None):
    """Packs the training (and evaluation) conversations and picks the collator.

    Returns (train_dataset, eval_dataset, collator, stats) where stats are `packing_stats` of the
    training rows.
    """
    check_packing_attention(attn_implementation)
    train_dataset = pack_dataset(train_dataset, max_length, num_proc)
    if eval_dataset is not None:
        eval_dataset = pack_dataset(eval_dataset, max_length, num_proc)
    stats = packing_stats(train_dataset, max_length)  # reported once, in the data report's "packing:" line
    collator = DataCollatorForPacking(
        pad_token_id=pad_token_id, flatten=attn_implementation in FLATTEN_ATTENTION, pad_to_multiple_of=pad_to_multiple_of
    )
    return train_dataset, eval_dataset, collator, stats
