"""`train_dft.main` with --packing and --group_by_length on the tiny model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from transformers.trainer_pt_utils import LengthGroupedSampler

import train_dft
from data_utils import DataCollatorForDFT, load_conversations
from dftune.arguments import DFTTrainingArguments, ModelArguments

pytestmark = pytest.mark.integration

CONVERSATIONS = 16


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, sample_files):
    conversations, _ = load_conversations(sample_files)
    step = len(conversations) // CONVERSATIONS
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for conversation in conversations[::step][:CONVERSATIONS]:
            f.write(json.dumps(conversation, ensure_ascii=False) + "\n")
    return str(path)


def _first_step_log(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "checkpoint-1", "trainer_state.json")) as f:
        return next(entry for entry in json.load(f)["log_history"] if "avg_p_correct" in entry)


def _run(tiny_model_dir, data, output_dir, *extra):
    return train_dft.main([
        "--model_name_or_path", tiny_model_dir, "--data_files", data, "--output_dir", str(output_dir),
        "--max_length", "128", "--per_device_train_batch_size", str(CONVERSATIONS), "--max_steps", "1",
        "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "1", "--report_to", "none",
        "--use_cpu", "--dft_alpha", "0.8", "--seed", "3", *extra,
    ])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_one_step_over_the_same_conversations_is_the_same_packed_or_not(tiny_model_dir, small_data, tmp_path, attn):
    """One optimizer step over all conversations: loss, metrics and gradient norm agree (fp32)."""
    _run(tiny_model_dir, small_data, tmp_path / "plain", "--attn_implementation", attn)
    _run(tiny_model_dir, small_data, tmp_path / "packed", "--attn_implementation", attn, "--packing")
    plain, packed = _first_step_log(tmp_path / "plain"), _first_step_log(tmp_path / "packed")
    for key in ("loss", "avg_p_correct", "ce_loss", "token_accuracy", "grad_norm"):
        assert packed[key] == pytest.approx(plain[key], rel=1e-5), key
    log = open(tmp_path / "packed" / "logs" / "train.log").read()
    assert log.count(f"packing: {CONVERSATIONS} conversations in ") == 1 and "efficiency" in log  # once, in the data report
    report = json.load(open(tmp_path / "packed" / "data_report.json"))
    packing = report["packing"]
    assert packing["conversations"] == CONVERSATIONS and packing["max_length"] == 128
    assert packing["efficiency"] == pytest.approx(packing["real_tokens"] / (packing["rows"] * 128))
    assert packing["rows"] < CONVERSATIONS and packing["real_tokens"] > 0


def test_check_packing_names_both_flags(tiny_model_dir):
    model_args = ModelArguments(model_name_or_path=tiny_model_dir, attn_implementation="sdpa")
    train_dft.check_packing(model_args)
    model_args.attn_implementation = "flash_attention_3"
    with pytest.raises(train_dft.UsageError, match="--packing with --attn_implementation flash_attention_3"):
        train_dft.check_packing(model_args)


def test_group_by_length_sets_the_sampling_strategy_and_refuses_a_conflict(tmp_path, capsys, tiny_model_dir, small_data):
    args = DFTTrainingArguments(output_dir=str(tmp_path), group_by_length=True, use_cpu=True, report_to="none")
    assert args.train_sampling_strategy == "group_by_length"
    with pytest.raises(SystemExit) as exit_info:
        train_dft.main([
            "--model_name_or_path", tiny_model_dir, "--data_files", small_data, "--output_dir", str(tmp_path),
            "--group_by_length", "--train_sampling_strategy", "sequential", "--use_cpu",
        ])
    assert exit_info.value.code == 2
    assert "--group_by_length conflicts with --train_sampling_strategy sequential" in capsys.readouterr().err


def test_group_by_length_batches_similar_lengths(tmp_path, tiny_model_dir):
    """DFTTrainer gets transformers' LengthGroupedSampler, whose batches carry less padding."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 200, (256,), generator=generator).tolist()
    dataset = Dataset.from_dict({"input_ids": [[1] * n for n in lengths], "labels": [[1] * n for n in lengths], "length": lengths})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    def padding_fraction(sampler_strategy: bool) -> float:
        args = DFTTrainingArguments(
            output_dir=str(tmp_path), group_by_length=sampler_strategy, per_device_train_batch_size=8, use_cpu=True, report_to="none"
        )
        trainer = train_dft.DFTTrainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorForDFT(pad_token_id=0))
        sampler = trainer._get_train_sampler()
        assert isinstance(sampler, LengthGroupedSampler) == sampler_strategy
        order = list(sampler)
        assert sorted(order) == list(range(len(lengths)))
        batches = [order[i : i + 8] for i in range(0, len(order), 8)]
        padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
        return 1 - sum(lengths) / padded

    assert padding_fraction(True) < 0.1 < 0.3 < padding_fraction(False)


def test_group_by_length_trains(tiny_model_dir, small_data, tmp_path):
    summary = train_dft.main([
        "--model_name_or_path", tiny_model_dir, "--data_files", small_data, "--output_dir", str(tmp_path),
        "--group_by_length", "--per_device_train_batch_size", "4", "--max_steps", "2", "--logging_steps", "1",
        "--report_to", "none", "--use_cpu", "--save_strategy", "no",
    ])
    assert summary["steps"] == 2 and summary["last_loss"] > 0
