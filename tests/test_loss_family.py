"""Integration tests of the loss family (--loss_type and friends) on the bundled tiny model: flags,
the logged numbers, gradient-accumulation invariance of the anchored loss, the LoRA reference."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import train_dft
from data_utils import DataCollatorForDFT, tokenize_conversation
from dft_trainer import DFTTrainer
from dftune.arguments import DFTTrainingArguments
from dftune.loss.chunked import dft_loss_chunked
from dftune.loss.core import LossSpec, dft_loss_from_logits
from dftune.loss.reference import ReferenceModel

pytestmark = pytest.mark.integration


def run_main(tmp_path, tiny_model_dir, sample_files, name, *extra):
    out = tmp_path / name
    train_dft.main([
        "--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True",
        "--max_length", "256", *extra,
    ])
    state = json.loads((out / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "loss" in e and "ce_loss" in e], [e for e in state["log_history"] if "eval_loss" in e]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--loss_type", "sft", "--dft_alpha", "0.5"], "--loss_type sft is --dft_alpha 0"),
        (["--loss_type", "sft", "--dft_min_weight", "0.1"], "--dft_min_weight"),
        (["--anchor_kl_coef", "0.1"], "--anchor_kl_coef is used by --loss_type asft only"),
        (["--loss_type", "eaft", "--anchor_kl_direction", "reverse"], "--anchor_kl_direction is used by --loss_type asft"),
        (["--loss_type", "asft", "--eaft_top_k", "5"], "--eaft_top_k is used by --loss_type eaft only"),
        (["--loss_type", "asft", "--anchor_kl_coef", "0"], "--anchor_kl_coef must be > 0"),
        (["--loss_type", "eaft", "--eaft_top_k", "1"], "--eaft_top_k must be >= 2"),
        (["--loss_type", "eaft", "--eaft_power", "0"], "--eaft_power must be > 0"),
        (["--dft_min_weight", "1.5"], "--dft_min_weight must be in [0, 1)"),
        (["--dft_alpha_warmup_ratio", "1"], "--dft_alpha_warmup_ratio must be in [0, 1)"),
        (["--dft_alpha", "0", "--dft_alpha_warmup_ratio", "0.5"], "--dft_alpha_warmup_ratio has no effect with --dft_alpha 0"),
        (["--dft_alpha", "0", "--dft_min_weight", "0.1"], "--dft_min_weight has no effect with --dft_alpha 0"),
    ],
)
def test_conflicting_loss_flags_exit_2_with_one_line(tmp_path, tiny_model_dir, sample_files, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        train_dft.main(["--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir", str(tmp_path), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("error:"), err


def test_unknown_loss_type_exits_2_naming_the_flag(tmp_path, tiny_model_dir, sample_files, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's choices check (usage, then the error line)
        train_dft.main(["--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir", str(tmp_path), "--loss_type", "ce"])
    assert exit_info.value.code == 2
    assert "argument --loss_type/--loss-type: invalid choice: 'ce'" in capsys.readouterr().err.strip().splitlines()[-1]


def test_defaults_follow_the_loss_type():
    asft = DFTTrainingArguments(output_dir="/tmp/x", loss_type="asft", report_to=[])
    assert (asft.dft_alpha, asft.anchor_kl_coef, asft.anchor_kl_direction) == (1.0, 0.1, "forward")
    assert asft.loss_spec().anchored
    eaft = DFTTrainingArguments(output_dir="/tmp/x", loss_type="eaft", report_to=[])
    assert (eaft.eaft_top_k, eaft.eaft_power, eaft.anchor_kl_coef) == (20, 1.0, None)
    sft = DFTTrainingArguments(output_dir="/tmp/x", loss_type="sft", report_to=[])
    assert sft.dft_alpha == 0.0 and not sft.loss_spec().anchored


def test_logged_loss_is_token_weighted_over_the_logging_window(tmp_path, tiny_model_dir, sample_files):
    """SFT: loss == ce_loss exactly even when one log line covers 3 steps of different token counts."""
    logs, _ = run_main(tmp_path, tiny_model_dir, sample_files, "sft", "--loss_type", "sft", "--max_steps", "3", "--logging_steps", "3")
    assert len(logs) == 1
    assert logs[0]["loss"] == pytest.approx(logs[0]["ce_loss"], rel=1e-9)


def test_asft_and_eaft_run_end_to_end_and_log_their_metrics(tmp_path, tiny_model_dir, sample_files):
    logs, evals = run_main(
        tmp_path, tiny_model_dir, sample_files, "asft", "--loss_type", "asft", "--max_steps", "3", "--logging_steps", "1",
        "--learning_rate", "2e-3", "--validation_split_percentage", "10", "--eval_strategy", "steps", "--eval_steps", "3",
    )
    assert logs[0]["anchor_kl"] == 0.0  # step 1 runs on the starting weights: policy == reference
    assert logs[1]["anchor_kl"] > 0 and logs[2]["anchor_kl"] > 0
    for entry in logs:
        assert 0 < entry["entropy"] and 0 <= entry["low_p_share"] <= 1
    assert {"eval_anchor_kl", "eval_entropy", "eval_low_p_share"} <= evals[0].keys()
    logs, _ = run_main(tmp_path, tiny_model_dir, sample_files, "eaft", "--loss_type", "eaft", "--max_steps", "2", "--logging_steps", "1", "--loss_impl", "chunked")
    assert "anchor_kl" not in logs[0] and logs[0]["loss"] < logs[0]["ce_loss"]


def test_dft_alpha_warmup_logs_the_value_in_force(tmp_path, tiny_model_dir, sample_files):
    logs, _ = run_main(tmp_path, tiny_model_dir, sample_files, "warm", "--max_steps", "4", "--logging_steps", "1", "--dft_alpha_warmup_ratio", "0.5")
    assert [entry["dft_alpha"] for entry in logs] == [0.0, 0.5, 1.0, 1.0]
    assert logs[0]["loss"] == pytest.approx(logs[0]["ce_loss"], rel=1e-9)  # alpha 0: plain cross-entropy


def test_evaluation_during_the_alpha_warmup_scores_the_full_alpha(tmp_path, tiny_model_dir, sample_files):
    # Learning rate 0: the model never changes, so eval_loss at step 0 (alpha in force 0) and at step 2 (1) must agree;
    # before, step 0 reported cross-entropy and a best-model choice by eval_loss compared two objectives.
    _, evals = run_main(tmp_path, tiny_model_dir, sample_files, "warm_eval", "--max_steps", "2", "--learning_rate", "0",
                        "--dft_alpha_warmup_ratio", "0.5", "--eval_data_files", sample_files[1], "--eval_strategy", "steps",
                        "--eval_steps", "2", "--eval_on_start", "True")
    assert [entry["step"] for entry in evals] == [0, 2]
    assert evals[0]["eval_loss"] == pytest.approx(evals[1]["eval_loss"], rel=1e-9)
    assert evals[0]["eval_loss"] < 0.5 * evals[0]["eval_ce_loss"]  # the DFT loss, not cross-entropy


def _rows(tokenizer, sample_files, count=4):
    with open(sample_files[0], encoding="utf-8") as f:
        records = [json.loads(line) for line in f][:count * 3:3]
    return [{k: v for k, v in tokenize_conversation(tokenizer, r["messages"], 256).items() if k in ("input_ids", "labels")} for r in records]


def _two_sgd_steps(tmp_path, model_dir, rows, tokenizer, batch_size, accumulation, loss_impl="full"):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager")
    args = DFTTrainingArguments(
        output_dir=str(tmp_path / f"b{batch_size}ga{accumulation}{loss_impl}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=2, learning_rate=0.5, optim="sgd", weight_decay=0.0,
        max_grad_norm=0.0, lr_scheduler_type="constant", report_to=[], save_strategy="no", loss_type="asft",
        anchor_kl_coef=2.0, loss_impl=loss_impl, loss_chunk_size=5, disable_tqdm=True, logging_steps=1,
        num_train_epochs=2,
    )
    trainer = DFTTrainer(model=model, args=args, train_dataset=rows * 2, data_collator=DataCollatorForDFT(tokenizer.pad_token_id))
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, [e for e in trainer.state.log_history if "loss" in e and "ce_loss" in e]


def test_asft_gradient_accumulation_and_loss_impl_invariance(tmp_path, tiny_model_dir, tiny_tokenizer, sample_files):
    """Two steps (the second with a non-zero anchor): batch 4 == 1 x GA 4 == 2 x GA 2, full == chunked."""
    rows = _rows(tiny_tokenizer, sample_files)
    expected, expected_logs = _two_sgd_steps(tmp_path, tiny_model_dir, rows, tiny_tokenizer, 4, 1)
    assert expected_logs[0]["anchor_kl"] == 0.0 and expected_logs[1]["anchor_kl"] > 1e-4
    for batch_size, accumulation, impl in [(1, 4, "full"), (2, 2, "chunked")]:
        weights, logs = _two_sgd_steps(tmp_path, tiny_model_dir, rows, tiny_tokenizer, batch_size, accumulation, impl)
        # float64 weights, but Qwen2's RMSNorm rounds through fp32, so batch shapes differ at ~1e-8.
        for name, value in expected.items():
            error = (weights[name] - value).abs().max() / value.abs().max()
            assert error < 1e-6, f"{name}: b{batch_size} x GA{accumulation} {impl} differs by {error:.3g}"
        for got, want in zip(logs, expected_logs):
            for key in ("loss", "ce_loss", "anchor_kl", "entropy", "low_p_share"):
                assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-12), key


@pytest.mark.parametrize("loss_impl", ["full", "chunked"])
def test_lora_reference_equals_a_frozen_copy(tiny_model_dir, tiny_tokenizer, sample_files, loss_impl):
    """Adapters disabled compute exactly what a frozen copy of the base weights computes."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    frozen = ReferenceModel.for_model(base)
    assert frozen.frozen is not None
    policy = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():  # trained adapters: the policy differs from its base
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    adapters_off = ReferenceModel.for_model(policy)
    assert adapters_off.frozen is None
    batch = DataCollatorForDFT(tiny_tokenizer.pad_token_id)(_rows(tiny_tokenizer, sample_files, 2))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    spec = LossSpec(loss_type="asft", anchor_kl_coef=1.0)
    results = []
    for reference in (frozen, adapters_off):
        if loss_impl == "full":
            ref_logits = reference.logits(policy, inputs)
            result = dft_loss_from_logits(policy(**inputs).logits, batch["labels"], spec, ref_logits=ref_logits)
        else:
            result, _ = dft_loss_chunked(policy, inputs, batch["labels"], spec, None, chunk_size=16, reference=reference)
        results.append(result)
    assert results[0].stats[-1].item() > 1e-4  # a real KL
    assert torch.equal(results[0].stats, results[1].stats) and torch.equal(results[0].loss, results[1].loss)
