"""Unit tests of sequence parallelism's pieces (the 2-process runs are in test_sequence_parallel_distributed.py):
the loss on pre-shifted sequence shards against the float64 reference of the whole sequence for every loss
type on both paths, the collators' position_ids and padding, the equal-length padding for gloo, the step's
token count and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_loss import SPECS, assert_stats_match, f32, family_batch, reference_terms

from dftune.data.collators import DataCollatorForDFT
from dftune.data.packing import DataCollatorForPacking
from dftune.loss.chunked import dft_loss_from_hidden
from dftune.loss.core import IGNORE_INDEX, dft_loss_from_logits, shift_labels
from dftune.run.sequence_parallel import _pad_rows, _pad_to, check_model_heads, check_sequence_parallel_flags, parallelism_config
from dftune.trainer import count_supervised_tokens

pytestmark = pytest.mark.unit


def shards(tensor: torch.Tensor, size: int) -> list[torch.Tensor]:
    """(B, T, ...) -> `size` pieces along T, as DeepSpeed's loader adapter cuts them."""
    return list(tensor.chunk(size, dim=1))


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("path", ["full", "chunked"])
def test_shards_with_shifted_labels_sum_to_the_whole_sequence_for_every_loss_type(name, path):
    """Each rank's loss over its shard, divided by the whole step's N, sums to the loss of the whole
    sequence; the gradients of the shards are those of the whole sequence (float64 reference)."""
    spec, size = SPECS[name], 3
    hidden, weight, bias, ref_weight, ref_bias, labels = family_batch(3, length=12)
    targets = shift_labels(torch.tensor(labels))  # shifted before sharding: a shard's last target is the next's first token
    counts = [int((piece != IGNORE_INDEX).sum()) for piece in shards(targets, size)]
    assert len(set(counts)) > 1, "shards should hold unequal numbers of supervised tokens"
    n_items = sum(counts) + 5  # the step's N also counts other micro-batches' tokens
    logits_np = hidden.astype(np.float32) @ weight.astype(np.float32).T + bias.astype(np.float32)
    ref_np = hidden.astype(np.float32) @ ref_weight.astype(np.float32).T + ref_bias.astype(np.float32)
    expected_loss, expected_grad, expected_stats = reference_terms(logits_np, labels, spec, ref_np if spec.anchored else None, n_items)
    total, stats, grads = 0.0, 0, []
    for index, shard_targets in enumerate(shards(targets, size)):
        if path == "full":
            logits = f32(logits_np[:, index * 4:(index + 1) * 4], grad=True)
            ref = torch.tensor(ref_np[:, index * 4:(index + 1) * 4])
            out = dft_loss_from_logits(logits, shard_targets, spec, n_items, labels_are_shifted=True, ref_logits=ref)
            out.loss.backward()
            grads.append(logits.grad.numpy())
        else:
            h = f32(hidden[:, index * 4:(index + 1) * 4], grad=True)
            w, b = f32(weight, grad=True), f32(bias, grad=True)
            reference_head = (f32(hidden[:, index * 4:(index + 1) * 4]), f32(ref_weight), f32(ref_bias))
            out = dft_loss_from_hidden(h, w, shard_targets, spec, n_items, b, chunk_size=2, reference=reference_head,
                                       labels_are_shifted=True)
            out.loss.backward()
            grads.append(h.grad.numpy())
        total += out.loss.item()
        stats = stats + out.stats
    np.testing.assert_allclose(total, expected_loss, rtol=1e-5)
    assert_stats_match(stats, expected_stats)
    expected = expected_grad if path == "full" else expected_grad @ weight  # chain rule through the head
    np.testing.assert_allclose(np.concatenate(grads, axis=1), expected, rtol=1e-4, atol=1e-6)


def test_an_all_masked_shard_adds_zero_and_keeps_its_graph():
    logits = torch.randn(1, 4, 7, requires_grad=True)
    targets = torch.full((1, 4), IGNORE_INDEX)
    out = dft_loss_from_logits(logits, targets, SPECS["dft"], 10, labels_are_shifted=True)
    out.loss.backward()
    assert out.loss.item() == 0.0 and logits.grad is not None and not logits.grad.any()


def test_step_token_count_reads_shift_labels_of_shards():
    shard = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "shift_labels": torch.tensor([[5, -100, 6, 7]])}
    whole = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.tensor([[5, -100, 6, 7]])}
    assert int(count_supervised_tokens([shard, shard])) == 6  # every shifted label counts
    assert int(count_supervised_tokens([whole])) == 2  # unshifted: position 0 is never a target


def test_collators_give_global_positions_and_pad_to_a_multiple():
    features = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5, 6, 7, 8], "labels": [-100, -100, 6, 7, 8]}]
    batch = DataCollatorForDFT(pad_token_id=0, pad_to_multiple_of=4, with_position_ids=True)(features)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["position_ids"].tolist() == [list(range(8))] * 2
    assert batch["labels"][0].tolist() == [-100, 2, 3] + [-100] * 5
    assert "position_ids" not in DataCollatorForDFT(pad_token_id=0)(features)
    packed = [{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "sequence_lengths": [3, 2]}]
    flat = DataCollatorForPacking(pad_token_id=0, flatten=True, pad_to_multiple_of=4)(packed)
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]  # the padding is a segment of its own
    assert flat["labels"][0, 5:].tolist() == [-100] * 3
    rows = DataCollatorForPacking(pad_token_id=0, flatten=False, pad_to_multiple_of=4)(packed + packed[:1])
    assert rows["input_ids"].shape == (2, 8)


def test_equal_length_padding_keeps_every_real_token_and_counts_positions_on():
    assert _pad_to("position_ids", torch.tensor([[0, 1, 2]]), 5).tolist() == [[0, 1, 2, 3, 4]]
    assert _pad_to("labels", torch.tensor([[7, 8, 9]]), 5).tolist() == [[7, 8, 9, -100, -100]]
    assert _pad_to("attention_mask", torch.tensor([[1, 1, 1]]), 4).tolist() == [[1, 1, 1, 0]]
    assert _pad_to("input_ids", torch.tensor([[7, 8, 9]]), 3).tolist() == [[7, 8, 9]]
    # An epoch's last, smaller batch gets rows without a supervised token (Ulysses' batch size is fixed).
    assert _pad_rows("labels", torch.tensor([[7, 8]]), 3).tolist() == [[7, 8], [-100, -100], [-100, -100]]
    assert _pad_rows("position_ids", torch.tensor([[0, 1]]), 2).tolist() == [[0, 1], [0, 1]]
    assert _pad_rows("attention_mask", torch.tensor([[1, 1]]), 2).tolist() == [[1, 1], [0, 0]]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"deepspeed": None}, r"--sequence_parallel_size 2 runs DeepSpeed's Ulysses: add --deepspeed ds_config/zero3.json"),
    ({"world_size": 3}, r"needs a multiple of 2 processes, got 3"),
    ({"attn_implementation": "eager"}, r"--attn_implementation eager: Ulysses needs sdpa"),
    ({"packing": True}, r"--packing and --attn_implementation sdpa: .* use --attn_implementation flash_attention_2"),
])
def test_flags_that_cannot_run_are_refused_in_one_line(kwargs, message):
    given = {"size": 2, "attn_implementation": "sdpa", "packing": False, "deepspeed": "ds_config/zero3.json", "world_size": 2}
    with pytest.raises(ValueError, match=message) as raised:
        check_sequence_parallel_flags(**{**given, **kwargs})
    assert "\n" not in str(raised.value)
    check_sequence_parallel_flags(**given)  # and the same without the conflict runs
    check_sequence_parallel_flags(**{**given, "size": 1, "deepspeed": None, "attn_implementation": "eager"})


def test_heads_must_split_over_the_ranks(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)  # 4 heads, 2 key/value heads
    check_model_heads(config, 2)
    check_model_heads(config, 4)  # 4 is a multiple of 2 KV heads: they are replicated
    with pytest.raises(ValueError, match=r"--sequence_parallel_size 3: the model's 4 attention heads \(2 key/value heads\)"):
        check_model_heads(config, 3)


def test_parallelism_config_turns_ulysses_off_in_evaluation():
    assert parallelism_config(1, "sdpa") is None
    config = parallelism_config(2, "sdpa")
    assert (config.sp_size, config.sp_backend, config.sp_handler.sp_disable_in_eval) == (2, "deepspeed", True)


def test_train_dft_refuses_sequence_parallelism_without_deepspeed_in_one_line(tiny_model_dir, sample_files, tmp_path, capsys):
    import train_dft

    with pytest.raises(SystemExit) as exited:
        train_dft.main(["--model_name_or_path", tiny_model_dir, "--data_files", *sample_files, "--output_dir", str(tmp_path / "out"),
                        "--sequence_parallel_size", "2", "--max_steps", "1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --sequence_parallel_size 2 runs DeepSpeed's Ulysses: add --deepspeed ds_config/zero3.json "
                   "(or zero2.json), or DS_CONFIG=... with scripts/train.sh.")
