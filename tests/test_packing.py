"""Packing: best-fit decreasing, the packed rows and collator, attention isolation, and that the DFT
loss, metrics and gradients are the same packed and unpacked (fp32, CPU)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from data_utils import DataCollatorForDFT, load_conversations, tokenize_conversation
from dft_trainer import count_supervised_tokens
from dftune.data.packing import (
    DataCollatorForPacking,
    best_fit_decreasing,
    check_model_for_packing,
    check_packing_attention,
    pack_dataset,
    packing_stats,
)
from dftune.loss.chunked import dft_loss_chunked
from dftune.loss.core import IGNORE_INDEX, LossSpec, dft_loss_from_logits, metrics_from_stats
from dftune.loss.reference import ReferenceModel

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

# eager and sdpa run on CPU in seconds; flex_attention runs too but compiles for minutes on CPU,
# so it is measured by scripts/bench_train.py on GPU rather than here.
CPU_ATTENTION = ["eager", "sdpa"]


# ---- best-fit decreasing -------------------------------------------------------------------------
def test_best_fit_decreasing_known_case():
    # 6 opens bin 0, 5 opens bin 1, 4 fits bin 0 exactly, 3 and 2 fill bin 1.
    assert best_fit_decreasing([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    # Best fit, not first fit: 3 goes to the bin with 3 left (bin 1), not the one with 4 left.
    assert best_fit_decreasing([6, 7, 3], 10) == [[1, 2], [0]]
    assert best_fit_decreasing([], 10) == []


def test_best_fit_decreasing_places_every_item_once_within_capacity():
    rng = random.Random(0)
    lengths = [min(4096, max(8, int(rng.lognormvariate(6.4, 0.9)))) for _ in range(3000)]
    bins = best_fit_decreasing(lengths, 4096)
    assert sorted(index for members in bins for index in members) == list(range(len(lengths)))
    assert max(sum(lengths[index] for index in members) for members in bins) <= 4096
    assert sum(lengths) / (len(bins) * 4096) > 0.97  # long-tailed lengths pack almost perfectly


def test_best_fit_decreasing_rejects_a_conversation_longer_than_a_row():
    with pytest.raises(ValueError, match="--max_length 8"):
        best_fit_decreasing([3, 9], 8)


# ---- packed rows and collator ---------------------------------------------------------------------
def _synthetic_dataset(lengths: list[int], seed: int = 0) -> Dataset:
    """Conversations with a 3-token unsupervised header, then supervised tokens."""
    generator = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": [], "length": []}
    for length in lengths:
        ids = torch.randint(3, 600, (length,), generator=generator).tolist()
        rows["input_ids"].append(ids)
        rows["labels"].append([IGNORE_INDEX] * 3 + ids[3:])
        rows["length"].append(length)
    return Dataset.from_dict(rows)


def test_pack_dataset_keeps_every_conversation_whole():
    lengths = [9, 4, 7, 3, 12, 5, 6]
    dataset = _synthetic_dataset(lengths)
    packed = pack_dataset(dataset, max_length=16)
    seen = []
    for row in packed:
        assert row["length"] == len(row["input_ids"]) == len(row["labels"]) == sum(row["sequence_lengths"]) <= 16
        start = 0
        for length in row["sequence_lengths"]:
            ids = row["input_ids"][start : start + length]
            match = [i for i, original in enumerate(dataset["input_ids"]) if original == ids]
            assert len(match) == 1
            assert row["labels"][start : start + length] == dataset[match[0]]["labels"]
            seen.append(match[0])
            start += length
    assert sorted(seen) == list(range(len(lengths)))
    stats = packing_stats(packed, 16)
    assert stats["conversations"] == len(lengths) and stats["real_tokens"] == sum(lengths)
    assert stats["efficiency"] == pytest.approx(sum(lengths) / (stats["rows"] * 16))


def test_first_label_of_each_conversation_is_never_a_target():
    """A conversation whose first label is supervised (against the contract) gets it masked, so the
    supervised-token count of the packed rows equals the unpacked one."""
    dataset = _synthetic_dataset([5, 6, 4])
    labels = [list(row) for row in dataset["labels"]]
    labels[1] = list(dataset["input_ids"][1])  # every label supervised, the first one included
    dataset = dataset.remove_columns("labels").add_column("labels", labels)
    unpacked = DataCollatorForDFT(pad_token_id=0)(list(dataset))
    packed_rows = list(pack_dataset(dataset, max_length=15))
    assert len(packed_rows) == 1
    packed = DataCollatorForPacking(pad_token_id=0, flatten=True)(packed_rows)
    starts = torch.tensor([0] + packed_rows[0]["sequence_lengths"][:-1]).cumsum(0)
    assert (packed["labels"][0, starts] == IGNORE_INDEX).all()
    assert count_supervised_tokens([packed]) == count_supervised_tokens([unpacked]) == 2 + 5 + 1


def test_collator_positions_restart_and_padding_is_its_own_segment():
    features = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "sequence_lengths": [3, 2]},
        {"input_ids": [4, 3], "labels": [-100, 3]},
    ]
    flat = DataCollatorForPacking(pad_token_id=0, flatten=True)(features)
    assert set(flat) == {"input_ids", "labels", "position_ids"}  # never an attention_mask
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4, 3]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert flat["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, 3]]
    rows = DataCollatorForPacking(pad_token_id=0, flatten=False)(features)
    assert set(rows) == {"input_ids", "labels", "position_ids"}
    assert rows["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert rows["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 3, -100, -100, -100]]


def test_collator_rejects_lengths_that_do_not_add_up():
    with pytest.raises(ValueError, match="do not add up"):
        DataCollatorForPacking(pad_token_id=0)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "sequence_lengths": [2]}])


# ---- refusing kernels that attend across ---------------------------------------------------------
def test_unsupported_attention_is_refused_naming_both_flags():
    for name in ["sdpa", "eager", "flex_attention", "flash_attention_2"]:
        check_packing_attention(name)
    with pytest.raises(ValueError, match=r"^--packing with --attn_implementation flash_attention_3: .*--attn_implementation"):
        check_packing_attention("flash_attention_3")


def test_model_checks_refuse_remote_code_and_other_kernels(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    check_model_for_packing(model)
    model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(ValueError, match="--attn_implementation paged|sdpa"):
        check_model_for_packing(model)

    class RemoteQwen2(Qwen2ForCausalLM):  # defined outside transformers, as trust_remote_code classes are
        pass

    remote = RemoteQwen2(model.config)
    remote.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="remote code"):
        check_model_for_packing(remote)


# ---- attention isolation: packed logits == each conversation alone --------------------------------
@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return {
        name: AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=name, dtype=torch.float32).eval()
        for name in CPU_ATTENTION
    }


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("attn", CPU_ATTENTION)
def test_packed_logits_equal_each_conversation_alone(models, attn, flatten):
    model = models[attn]
    lengths = [11, 7, 5, 9, 3]
    dataset = _synthetic_dataset(lengths, seed=1)
    rows = list(pack_dataset(dataset, max_length=20))
    assert max(len(row["sequence_lengths"]) for row in rows) >= 2  # some row really holds several
    batch = DataCollatorForPacking(pad_token_id=0, flatten=flatten)(rows)
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for row_index, row in enumerate(rows):
            batch_row = 0 if flatten else row_index
            offset = sum(len(r["input_ids"]) for r in rows[:row_index]) if flatten else 0
            for length in row["sequence_lengths"]:
                ids = batch["input_ids"][batch_row, offset : offset + length].unsqueeze(0)
                alone = model(input_ids=ids, use_cache=False).logits[0]  # (length, V)
                torch.testing.assert_close(packed_logits[batch_row, offset : offset + length], alone, rtol=1e-5, atol=1e-5)
                offset += length


@pytest.mark.parametrize("attn", CPU_ATTENTION)
def test_an_attention_mask_would_let_packed_conversations_attend_across(models, attn):
    """Why the collator never emits attention_mask: with one, the packed mask is not derived."""
    rows = list(pack_dataset(_synthetic_dataset([8, 6], seed=2), max_length=14))
    batch = DataCollatorForPacking(pad_token_id=0)(rows)
    with torch.no_grad():
        leaked = models[attn](**{k: batch[k] for k in ("input_ids", "position_ids")}, attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits
        alone = models[attn](input_ids=batch["input_ids"][:, 8:], use_cache=False).logits
    assert (leaked[:, 8:] - alone).abs().max() > 1e-2


# ---- the DFT loss, metrics and gradients are unchanged by packing ---------------------------------
@pytest.fixture(scope="module")
def sample_conversations(tiny_tokenizer, sample_files):
    conversations, _ = load_conversations(sample_files)
    picked = [conversations[i] for i in range(0, len(conversations), max(1, len(conversations) // 10))][:10]
    rows = [tokenize_conversation(tiny_tokenizer, c["messages"], max_length=256) for c in picked]
    rows = [r for r in rows if not r["drop_reason"]]
    return Dataset.from_dict({key: [r[key] for r in rows] for key in ("input_ids", "labels", "length")})


def _loss_and_grads(model, batches: list[dict], loss_impl: str, dft_alpha=0.7, reference=None):
    """Sum of micro-batch losses normalised by the step's supervised tokens, its stats and gradients.
    `dft_alpha`: a float or a LossSpec; `reference`: a ReferenceModel for an anchored spec."""
    model.zero_grad(set_to_none=True)
    step_tokens = count_supervised_tokens(batches)
    total_loss, total_stats = 0.0, 0
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if loss_impl == "chunked":
            result, _ = dft_loss_chunked(model, inputs, batch["labels"], dft_alpha, step_tokens, chunk_size=64, reference=reference)
        else:
            ref_logits = reference.logits(model, inputs) if reference is not None else None
            logits = model(**inputs, use_cache=False).logits
            result = dft_loss_from_logits(logits, batch["labels"], dft_alpha, step_tokens, ref_logits=ref_logits)
        result.loss.backward()
        total_loss += result.loss.item()
        total_stats = total_stats + result.stats
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return total_loss, metrics_from_stats(total_stats, anchored=reference is not None), grads


@pytest.mark.parametrize("loss_impl", ["full", "chunked"])
@pytest.mark.parametrize("attn", CPU_ATTENTION)
def test_packed_and_unpacked_give_the_same_loss_metrics_and_gradients(models, sample_conversations, attn, loss_impl):
    model = models[attn].train()
    conversations = list(sample_conversations)
    # Unpacked: two padded micro-batches (gradient accumulation); packed: rows of 256, both collators.
    padded = DataCollatorForDFT(pad_token_id=0)
    unpacked = [padded(conversations[:5]), padded(conversations[5:])]
    rows = list(pack_dataset(sample_conversations, max_length=256))
    assert len(rows) < len(conversations)
    reference = _loss_and_grads(model, unpacked, loss_impl)
    for flatten in (True, False):
        packed = [DataCollatorForPacking(pad_token_id=0, flatten=flatten)(rows)]
        loss, metrics, grads = _loss_and_grads(model, packed, loss_impl)
        assert loss == pytest.approx(reference[0], rel=1e-5)
        for key in ("avg_p_correct", "ce_loss", "token_accuracy", "dft_loss"):
            assert metrics[key] == pytest.approx(reference[1][key], rel=1e-5), key
        assert metrics.keys() == reference[1].keys()
        assert grads.keys() == reference[2].keys()
        for name, grad in grads.items():
            scale = reference[2][name].abs().max().clamp(min=1e-12)
            assert (grad - reference[2][name]).abs().max() / scale < 1e-5, name
    model.eval()


@pytest.mark.parametrize("loss_impl", ["full", "chunked"])
def test_packing_keeps_the_asft_anchor_exact(models, sample_conversations, loss_impl):
    """The reference model gets the same position_ids as the policy, so packed rows give the unpacked KL."""
    policy = models["sdpa"].train()
    frozen = copy.deepcopy(policy).eval().requires_grad_(False)
    with torch.no_grad():  # a reference that differs from the policy, so the KL is not 0
        for param in frozen.parameters():
            param.add_(0.05 * torch.randn_like(param))
    reference = ReferenceModel(frozen)
    spec = LossSpec(loss_type="asft", anchor_kl_coef=0.5)
    conversations = list(sample_conversations)
    padded = DataCollatorForDFT(pad_token_id=0)
    unpacked = [padded(conversations[:5]), padded(conversations[5:])]
    expected = _loss_and_grads(policy, unpacked, loss_impl, spec, reference)
    assert expected[1]["anchor_kl"] > 1e-3
    rows = list(pack_dataset(sample_conversations, max_length=256))
    loss, metrics, grads = _loss_and_grads(policy, [DataCollatorForPacking(pad_token_id=0)(rows)], loss_impl, spec, reference)
    assert loss == pytest.approx(expected[0], rel=1e-5)
    assert metrics.keys() == expected[1].keys()
    for key, value in metrics.items():
        assert value == pytest.approx(expected[1][key], rel=1e-5), key
    for name, grad in grads.items():
        scale = expected[2][name].abs().max().clamp(min=1e-12)
        assert (grad - expected[2][name]).abs().max() / scale < 1e-5, name
    policy.eval()
