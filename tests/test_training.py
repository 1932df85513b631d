"""Integration tests: train_dft.main and DFTTrainer on the bundled tiny model (CPU, seconds)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import train_dft
from data_utils import DataCollatorForDFT, tokenize_conversation
from dft_trainer import DFTTrainer
from dftune.arguments import DFTTrainingArguments
from dftune.loss.core import IGNORE_INDEX, shift_labels

pytestmark = pytest.mark.integration

TRAIN_METRICS = {"loss", "grad_norm", "learning_rate", "avg_p_correct", "dft_alpha", "ce_loss", "token_accuracy"}
EVAL_METRICS = {"eval_loss", "eval_ce_loss", "eval_avg_p_correct", "eval_token_accuracy", "eval_perplexity"}


def test_demo_run_learns_logs_every_metric_and_saves_a_loadable_model(tmp_path, tiny_model_dir, sample_files):
    out = tmp_path / "run"
    summary = train_dft.main([
        "--model_name_or_path", tiny_model_dir, "--data_files", *sample_files, "--output_dir", str(out),
        "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--learning_rate", "2e-3",
        "--logging_steps", "5", "--validation_split_percentage", "10", "--eval_strategy", "epoch",
        "--save_strategy", "epoch", "--save_total_limit", "1", "--report_to", "none", "--disable_tqdm", "True",
        "--max_length", "512", "--warmup_ratio", "0.05", "--lr_scheduler_type", "cosine",
    ])
    assert summary["last_loss"] < summary["first_loss"]
    assert summary["last_avg_p_correct"] > summary["first_avg_p_correct"]

    checkpoints = sorted(p for p in out.iterdir() if p.name.startswith("checkpoint-"))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    train_logs = [e for e in state["log_history"] if "loss" in e]
    eval_logs = [e for e in state["log_history"] if "eval_loss" in e]
    assert train_logs and eval_logs
    for entry in train_logs:
        assert TRAIN_METRICS <= entry.keys()
        assert entry["dft_alpha"] == 1.0
        assert 0.0 < entry["avg_p_correct"] < 1.0 and 0.0 <= entry["token_accuracy"] <= 1.0
    for entry in eval_logs:
        assert EVAL_METRICS <= entry.keys()
        assert entry["eval_perplexity"] == pytest.approx(torch.tensor(entry["eval_ce_loss"]).exp().item(), rel=1e-6)

    assert (out / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    """max |actual - expected| <= tolerance * max |expected|: relative to the tensor's scale, so entries
    that are zero up to rounding (unused embedding rows, say) do not turn rounding into failures."""
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= tolerance * scale, f"{what}: max error {error:.3e} vs scale {scale:.3e}"


def _four_sequences(tokenizer, sample_files):
    """Four conversations of different lengths, tokenised with assistant-only labels."""
    with open(sample_files[0], encoding="utf-8") as f:
        records = [json.loads(line) for line in f][:40]
    rows = [tokenize_conversation(tokenizer, r["messages"], 512) for r in records]
    rows.sort(key=lambda r: r["length"])
    picked = [rows[0], rows[12], rows[25], rows[-1]]
    assert len({r["length"] for r in picked}) == 4
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in picked]


def _reference_gradients(model, rows, alpha):
    """float64 autograd over each sequence alone (no padding, no batching): sum w*CE / total tokens."""
    model.zero_grad()
    total_tokens = sum(sum(1 for label in r["labels"][1:] if label != IGNORE_INDEX) for r in rows)
    for row in rows:
        input_ids = torch.tensor([row["input_ids"]])
        targets = shift_labels(torch.tensor([row["labels"]]))[0]
        logits = model(input_ids=input_ids).logits[0].double()  # (T, V)
        mask = targets != IGNORE_INDEX
        log_probs = torch.log_softmax(logits[mask], dim=-1)
        ce = -log_probs.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
        weight = (alpha * torch.exp(-ce) + 1 - alpha).detach()
        ((weight * ce).sum() / total_tokens).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _one_sgd_step_delta(tmp_path, model_dir, rows, tokenizer, batch_size, accumulation, alpha):
    """Runs one optimizer step of DFTTrainer with SGD(lr=1): the parameter change is minus the gradient."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = DFTTrainingArguments(
        output_dir=str(tmp_path / f"b{batch_size}ga{accumulation}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd", weight_decay=0.0,
        max_grad_norm=0.0, lr_scheduler_type="constant", report_to=[], save_strategy="no", dft_alpha=alpha,
        loss_impl="full", disable_tqdm=True, logging_steps=1,
    )
    trainer = DFTTrainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorForDFT(tokenizer.pad_token_id))
    trainer.train()
    return {name: before[name] - p.detach() for name, p in model.named_parameters()}, trainer


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_gradient_accumulation_gives_the_same_gradients_as_one_big_batch(tmp_path, tiny_model_dir, tiny_tokenizer, sample_files, alpha):
    rows = _four_sequences(tiny_tokenizer, sample_files)
    reference_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64, attn_implementation="eager")
    reference = _reference_gradients(reference_model, rows, alpha)
    for batch_size, accumulation in [(4, 1), (1, 4), (2, 2)]:
        delta, trainer = _one_sgd_step_delta(tmp_path, tiny_model_dir, rows, tiny_tokenizer, batch_size, accumulation, alpha)
        for name, expected in reference.items():
            assert_relative_close(delta[name], expected, 1e-6, f"{name} b{batch_size}xGA{accumulation}")
        logged = [e for e in trainer.state.log_history if "loss" in e][0]
        assert logged["dft_alpha"] == alpha


def test_chunked_and_full_train_identically(tmp_path, tiny_model_dir, tiny_tokenizer, sample_files):
    rows = _four_sequences(tiny_tokenizer, sample_files)
    deltas = {}
    for impl in ("full", "chunked"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64, attn_implementation="eager")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = DFTTrainingArguments(
            output_dir=str(tmp_path / impl), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
            learning_rate=1.0, optim="sgd", weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant",
            report_to=[], save_strategy="no", loss_impl=impl, loss_chunk_size=7, disable_tqdm=True, logging_steps=1,
        )
        trainer = DFTTrainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorForDFT(tiny_tokenizer.pad_token_id))
        assert trainer.loss_impl == impl
        trainer.train()
        deltas[impl] = ({n: before[n] - p.detach() for n, p in model.named_parameters()}, [e for e in trainer.state.log_history if "loss" in e][0])
    (full_delta, full_log), (chunk_delta, chunk_log) = deltas["full"], deltas["chunked"]
    for name in full_delta:
        assert_relative_close(chunk_delta[name], full_delta[name], 1e-6, name)
    for key in ("loss", "avg_p_correct", "ce_loss", "token_accuracy"):
        assert chunk_log[key] == pytest.approx(full_log[key], rel=1e-6)


def test_sft_alpha_zero_logged_loss_equals_ce_loss(tmp_path, tiny_model_dir, sample_files):
    summary = train_dft.main([
        "--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir", str(tmp_path / "sft"),
        "--max_steps", "3", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--dft_alpha", "0",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True", "--learning_rate", "0",
    ])
    assert summary["steps"] == 3
    state_logs = json.loads((tmp_path / "sft" / "run_summary.json").read_text())
    assert state_logs["first_loss"] == pytest.approx(state_logs["first_ce_loss"], rel=1e-4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dft_alpha", "1.5"], "--dft_alpha"),
        (["--attn_implementation", "flash_attention_2"], "flash-attn"),
        (["--fp16", "True"], "--fp16"),
        (["--loss_impl", "chunked", "--loss_chunk_size", "0"], "--loss_chunk_size"),
        (["--chat_template", "no-such-template"], "--chat_template no-such-template: not a file and not a built-in template"),
        (["--chat_template_kwargs", "{enable_thinking: false}"], "--chat_template_kwargs is not JSON"),
        (["--train_on_turns", "first"], "--train_on_turns must be all or last"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, tiny_model_dir, sample_files, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        train_dft.main(["--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir", str(tmp_path), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("error:")


def test_missing_model_and_missing_data_file_exit_2(tmp_path, tiny_model_dir, sample_files, capsys):
    missing_model = str(tmp_path / "no-such-model")
    with pytest.raises(SystemExit) as exit_info:
        train_dft.main(["--model_name_or_path", missing_model, "--data_files", sample_files[0], "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert missing_model in capsys.readouterr().err
    missing_data = str(tmp_path / "nothing.jsonl")
    with pytest.raises(SystemExit) as exit_info:
        train_dft.main(["--model_name_or_path", tiny_model_dir, "--data_files", missing_data, "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert missing_data in capsys.readouterr().err


def test_yaml_config_file_is_read(tmp_path, tiny_model_dir, sample_files):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndata_files: [{sample_files[0]}]\noutput_dir: {tmp_path / 'yaml-run'}\n"
        "max_steps: 2\nper_device_train_batch_size: 2\nreport_to: none\nsave_strategy: 'no'\ndft_alpha: 0.5\n"
        "logging_steps: 1\nloss_impl: chunked\n"
    )
    summary = train_dft.main([str(config)])
    assert summary["steps"] == 2
    assert os.path.isfile(tmp_path / "yaml-run" / "model.safetensors")


def test_bf16_on_cpu_falls_back_to_autocast(tmp_path, tiny_model_dir, sample_files):
    summary = train_dft.main([
        "--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir", str(tmp_path / "bf16"),
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--bf16", "True", "--report_to", "none",
        "--save_strategy", "no", "--logging_steps", "1",
    ])
    assert summary["steps"] == 2 and summary["first_loss"] > 0


def test_model_never_receives_labels_so_no_library_loss_can_replace_dft(tmp_path, tiny_model_dir, tiny_tokenizer, sample_files):
    """Liger's fused linear cross-entropy (and HF's own loss) engage only when the model gets labels."""
    rows = _four_sequences(tiny_tokenizer, sample_files)
    for impl in ("full", "chunked"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        seen: list[set] = []
        model.register_forward_pre_hook(lambda module, args, kwargs, seen=seen: seen.append(set(kwargs)), with_kwargs=True)
        args = DFTTrainingArguments(
            output_dir=str(tmp_path / impl), per_device_train_batch_size=2, max_steps=1, report_to=[],
            save_strategy="no", loss_impl=impl, disable_tqdm=True, eval_strategy="steps", eval_steps=1,
            per_device_eval_batch_size=2,
        )
        trainer = DFTTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows, data_collator=DataCollatorForDFT(tiny_tokenizer.pad_token_id))
        trainer.train()
        assert seen and all("labels" not in kwargs and "skip_logits" not in kwargs for kwargs in seen)


def test_liger_flag_keeps_only_loss_free_kernels():
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(ValueError, match="--use_liger_kernel needs the liger-kernel package"):
            DFTTrainingArguments(output_dir="unused", use_liger_kernel=True)
    else:
        args = DFTTrainingArguments(output_dir="unused", use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": True})
        assert args.liger_kernel_config["fused_linear_cross_entropy"] is False
        assert args.liger_kernel_config["cross_entropy"] is False


def test_every_flag_users_launch_with_is_accepted(tmp_path, tiny_model_dir, sample_files):
    """The flags of existing launch scripts (issue #2's list) parse, with their meaning."""
    model_args, data_args, training_args, *_ = train_dft.parse_args([
        "--model_name_or_path", tiny_model_dir, "--torch_dtype", "float32", "--attn_implementation", "sdpa",
        "--trust_remote_code", "False", "--data_files", *sample_files, "--max_length", "1024",
        "--preprocessing_num_workers", "2", "--validation_split_percentage", "5", "--enable_gradient_checkpointing", "True",
        "--dft_alpha", "0.5", "--bf16", "True", "--num_train_epochs", "2", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "3", "--learning_rate", "1e-5", "--lr_scheduler_type", "cosine",
        "--weight_decay", "0.1", "--gradient_accumulation_steps", "4", "--eval_strategy", "steps", "--eval_steps", "50",
        "--save_strategy", "steps", "--save_steps", "100", "--save_total_limit", "2", "--save_only_model", "True",
        "--report_to", "none", "--logging_steps", "5", "--warmup_ratio", "0.03", "--output_dir", str(tmp_path / "o"),
        "--logging_dir", str(tmp_path / "l"), "--remove_unused_columns", "False", "--ddp_find_unused_parameters", "False",
        "--loss_impl", "full",
    ])
    assert model_args.attn_implementation == "sdpa" and model_args.torch_dtype == "float32"
    assert data_args.data_files == sample_files and data_args.max_length == 1024 and data_args.validation_split_percentage == 5
    assert training_args.dft_alpha == 0.5 and training_args.gradient_checkpointing
    assert training_args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert training_args.warmup_steps == 0.03 and training_args.logging_dir == str(tmp_path / "l")
    assert training_args.gradient_accumulation_steps == 4 and training_args.save_total_limit == 2
    assert training_args.save_only_model and not training_args.remove_unused_columns
    assert training_args.ddp_find_unused_parameters is False and training_args.loss_impl == "full"


def test_run_summary_train_loss_is_token_weighted_over_the_run_like_the_logged_loss(tmp_path, tiny_model_dir, sample_files):
    # With the learning rate at 0 both runs see the same losses: one logging window over all 4 steps gives the
    # token-weighted loss of the run; train_loss must equal it also when the last step is after the last log.
    def run(name: str, logging_steps: str) -> dict:
        return train_dft.main([
            "--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir", str(tmp_path / name),
            "--max_steps", "4", "--per_device_train_batch_size", "3", "--logging_steps", logging_steps, "--learning_rate", "0",
            "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True",
        ])

    one_window = run("one", "4")
    assert one_window["train_loss"] == pytest.approx(one_window["last_loss"], rel=1e-6)
    assert run("split", "3")["train_loss"] == pytest.approx(one_window["last_loss"], rel=1e-6)


def test_default_logging_steps_log_a_short_run(tmp_path, tiny_model_dir, sample_files):
    """Without --logging_steps a 20-step run logs its metrics at steps 10 and 20 (TRL's default); transformers'
    500 left short runs and compare.py sweeps with empty training curves."""
    out = tmp_path / "run"
    train_dft.main([
        "--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir", str(out),
        "--max_steps", "20", "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
        "--disable_tqdm", "True",
    ])
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "avg_p_correct" in e and "loss" in e] == [10, 20]


def test_the_last_step_is_logged_whatever_logging_steps(tmp_path, tiny_model_dir, sample_files, capsys):
    """A 5-step run with the default --logging_steps 10 logged no metrics at all (no line, no final train metrics,
    empty curves); a 4-step run logging every 3 steps ended on step 3's metrics."""
    def logged_steps(name: str, steps: str, *extra: str) -> list[int]:
        out = tmp_path / name
        summary = train_dft.main([
            "--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir", str(out),
            "--max_steps", steps, "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
            "--disable_tqdm", "True", *extra,
        ])
        assert summary["final_train_metrics"]["step"] == int(steps)
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return [e["step"] for e in history if "avg_p_correct" in e and "loss" in e]

    assert logged_steps("five", "5") == [5]
    assert "dft: step 5/5: loss " in capsys.readouterr().err
    assert logged_steps("four", "4", "--logging_steps", "3") == [3, 4]
    assert logged_steps("due", "4", "--logging_steps", "2") == [2, 4]  # the last step once, when it was due anyway
