"""Experiment tracking: trackers offline, run_config.json, run_summary.json, progress lines.

Unit tests are pure. The integration test trains the tiny model once, one epoch, reporting to swanlab,
wandb and tensorboard at the same time (all offline), then reads back what each one wrote.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter

import pytest

import dftune.run.records as tracking
import dftune.run.trackers as tracking_backends
import train_dft
from data_utils import FileReport

from helpers import swanlab_offline_run, tensorboard_scalars, wandb_offline_run, write_small_data

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

TRAIN_METRICS = ("loss", "avg_p_correct", "dft_alpha", "ce_loss", "token_accuracy")
EVAL_METRICS = ("loss", "avg_p_correct", "ce_loss", "token_accuracy", "perplexity")
LIBRARIES = ("torch", "transformers", "datasets", "deepspeed", "accelerate")


# ---- unit --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "given, expected",
    [
        (None, ["none"]),
        ("none", ["none"]),
        ("swanlab", ["swanlab"]),
        (["swanlab", "wandb"], ["swanlab", "wandb"]),
        (["swanlab,wandb", "tensorboard"], ["swanlab", "wandb", "tensorboard"]),
    ],
)
def test_report_to_accepts_one_several_or_comma_separated(given, expected):
    assert tracking_backends.normalize_report_to(given) == expected


def test_unknown_tracker_is_a_usage_error(tiny_model_dir, sample_files, tmp_path, capsys):
    argv = ["--model_name_or_path", tiny_model_dir, "--data_files", *sample_files, "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        train_dft.main([*argv, "--report_to", "swanlab", "wandbb"])
    assert exit_info.value.code == 2
    assert "--report_to wandbb: unknown tracker" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_dft.main([*argv, "--report_to", "none", "wandb"])


def test_progress_has_percent_elapsed_eta_and_rate():
    from dist_logger import format_progress

    line = format_progress(25, 100, elapsed=50.0, steps_done=25)
    assert line == "25%, elapsed 0:00:50, ETA 0:02:30, 2.00 s/step"
    # After a resume the rate comes from this session's steps only; before any step the ETA is unknown.
    assert "ETA 0:00:05" in format_progress(90, 100, elapsed=10.0, steps_done=20)
    assert "ETA ?" in format_progress(0, 100, elapsed=0.0, steps_done=0)


def test_summary_picks_final_train_and_best_eval_metrics():
    history = [
        {"step": 1, "loss": 0.5, "ce_loss": 2.0, "avg_p_correct": 0.2, "token_accuracy": 0.3, "dft_alpha": 1.0},
        {"step": 2, "eval_loss": 0.4, "eval_avg_p_correct": 0.30, "eval_token_accuracy": 0.40, "eval_perplexity": 5.0},
        {"step": 3, "loss": 0.3, "ce_loss": 1.5, "avg_p_correct": 0.4, "token_accuracy": 0.5, "dft_alpha": 1.0},
        {"step": 4, "eval_loss": 0.45, "eval_avg_p_correct": 0.35, "eval_token_accuracy": 0.38, "eval_perplexity": 5.5},
        {"step": 4, "train_loss": 0.4, "train_runtime": 2.0},
    ]
    memory = {"device": "cpu", "peak_gib": 1.5}
    summary = tracking.summarize_run(
        history, run_name="r", output_dir="out", wall_seconds=3.0, train_seconds=2.0, global_step=4,
        steps_this_session=4, supervised_tokens=100, total_tokens=400, memory=memory, train_loss=0.4,
    )
    assert summary["final_train_metrics"] == {"step": 3, "loss": 0.3, "ce_loss": 1.5, "avg_p_correct": 0.4, "token_accuracy": 0.5, "dft_alpha": 1.0}
    assert summary["best_eval_metrics"]["eval_loss"] == {"value": 0.4, "step": 2}
    assert summary["best_eval_metrics"]["eval_avg_p_correct"] == {"value": 0.35, "step": 4}
    assert summary["best_eval_metrics"]["eval_token_accuracy"] == {"value": 0.40, "step": 2}
    assert summary["best_eval_metrics"]["eval_perplexity"] == {"value": 5.0, "step": 2}
    assert summary["tokens_per_second"] == 200.0 and summary["supervised_tokens_per_second"] == 50.0
    assert (summary["first_loss"], summary["last_loss"]) == (0.5, 0.3)
    assert summary["model_path"] == os.path.abspath("out")
    text = "\n".join(tracking.summary_lines(summary))
    assert "400 total, 100 supervised" in text and "peak memory (cpu): 1.50 GiB" in text and "eval_loss 0.4 (step 2)" in text


def test_summary_lines_keep_dft_scale_values_and_name_the_files(tmp_path):
    """DFT losses are small: `loss 0.0001 -> 0.0000` read as if training had zeroed the loss. The last lines say
    where run_summary.json and training_curves.png are."""
    history = [{"step": 1, "loss": 0.00012345, "avg_p_correct": 0.2}, {"step": 9, "loss": 0.0000213, "avg_p_correct": 0.25}]
    summary = tracking.summarize_run(
        history, run_name="r", output_dir=str(tmp_path), wall_seconds=3.0, train_seconds=2.0, global_step=9,
        steps_this_session=9, supervised_tokens=100, total_tokens=400, memory={"device": "cpu", "peak_gib": 1.5},
    )
    summary["training_curves"] = str(tmp_path / "training_curves.png")
    lines = tracking.summary_lines(summary, str(tmp_path / "run_summary.json"))
    assert "(loss 0.0001234 -> 2.13e-05, avg_p_correct 0.2 -> 0.25)" in "\n".join(lines)
    assert lines[-2:] == [f"run summary: {tmp_path / 'run_summary.json'}", f"training curves: {tmp_path / 'training_curves.png'}"]


def test_data_totals_tolerate_whatever_the_data_report_holds(tmp_path):
    assert tracking.data_totals(None) == {}
    assert tracking.data_totals({"unexpected": 1}) == {}
    report = FileReport(path="a.jsonl", read=10, kept=7, skipped=Counter({"no messages": 2, "bad role": 1}))
    totals = tracking.data_totals({"files": [report, {"read": 5, "kept": 5}], "dropped_at_tokenisation": {"too long": 2}})
    assert totals == {"files": 2, "records_read": 15, "records_kept": 12, "records_skipped": 3, "dropped_at_tokenisation": 2}
    # Totals the data pipeline computed itself win; data_report.json is the fallback.
    assert tracking.data_totals({"totals": {"records_read": 99}, "files": [report]})["records_read"] == 99
    (tmp_path / "data_report.json").write_text(json.dumps({"totals": {"conversations": 42}}))
    from_file = tracking.data_totals({}, output_dir=str(tmp_path))
    assert from_file["conversations"] == 42 and from_file["data_report"].endswith("data_report.json")


def test_data_totals_count_tokens_of_real_and_skip_streaming_datasets():
    from datasets import Dataset

    rows = {"input_ids": [[1, 2, 3], [4, 5]], "labels": [[-100, 2, 3], [-100, -100]], "attention_mask": [[1, 1, 1], [1, 1]]}
    dataset = Dataset.from_dict(rows)
    totals = tracking.data_totals({}, dataset, dataset.to_iterable_dataset())
    assert totals == {"train_conversations": 2, "train_tokens_per_epoch": 5, "train_supervised_tokens_per_epoch": 2}
    # Row selection (filter / split) goes through an indices mapping: only the selected rows count.
    assert tracking.data_totals({}, dataset.select([1]))["train_supervised_tokens_per_epoch"] == 0


def test_disable_tqdm_silences_preprocessing_and_saving_bars():
    from types import SimpleNamespace

    import datasets
    import transformers

    try:
        tracking.configure_progress_bars(SimpleNamespace(disable_tqdm=True))
        assert not datasets.is_progress_bar_enabled()
        assert not transformers.utils.logging.is_progress_bar_enabled()
    finally:
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()


def test_git_commit_outside_a_checkout_is_unknown(tmp_path):
    assert tracking.git_commit(str(tmp_path)) == "unknown"
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tracking.git_commit())


# ---- integration: one run, three trackers, offline --------------------------------------------------------
@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model_dir, sample_files):
    """One epoch of DFT on 40 conversations (36 train, 4 eval), reporting to swanlab, wandb, tensorboard."""
    root = tmp_path_factory.mktemp("tracked")
    data = write_small_data(root, 40)
    output_dir = root / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("SWANLAB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_DIR", "SWANLAB_LOG_DIR", "WANDB_PROJECT", "SWANLAB_PROJECT"):
            env.delenv(name, raising=False)
        summary = train_dft.main([
            "--model_name_or_path", tiny_model_dir, "--data_files", str(data), "--output_dir", str(output_dir),
            "--run_name", "tracked-dft", "--dft_alpha", "1.0", "--num_train_epochs", "1",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_length", "256",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--validation_split_percentage", "10",
            "--eval_strategy", "steps", "--eval_steps", "4", "--save_strategy", "no",
            "--report_to", "swanlab", "wandb", "tensorboard", "--disable_tqdm", "True", "--seed", "0",
        ])
    with open(output_dir / "trainer_state.json", encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    return {"dir": output_dir, "logs": output_dir / "logs", "summary": summary, "history": history}


def logged(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in history if key in entry]


@pytest.mark.integration
def test_tensorboard_events_hold_the_dft_metrics(tracked_run):
    scalars, texts = tensorboard_scalars(str(tracked_run["logs"]))
    for name in TRAIN_METRICS:
        assert f"train/{name}" in scalars, sorted(scalars)
    for name in EVAL_METRICS:
        assert f"eval/{name}" in scalars, sorted(scalars)
    for tag, key in (("train/avg_p_correct", "avg_p_correct"), ("eval/ce_loss", "eval_ce_loss")):
        assert [s for s, _ in scalars[tag]] == [s for s, _ in logged(tracked_run["history"], key)]
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in logged(tracked_run["history"], key)], rel=1e-6)
    assert "run_config/text_summary" in texts


@pytest.mark.integration
def test_wandb_offline_run_holds_metrics_config_and_summary(tracked_run):
    run = wandb_offline_run(str(tracked_run["logs"]))
    for name in TRAIN_METRICS:
        assert f"train/{name}" in run["history"], sorted(run["history"])
    for name in EVAL_METRICS:
        assert f"eval/{name}" in run["history"], sorted(run["history"])
    expected = [v for _, v in logged(tracked_run["history"], "avg_p_correct")]
    assert run["history"]["train/avg_p_correct"] == pytest.approx(expected)
    config = run["config"]
    assert config["dft_alpha"] == 1.0 and config["run_name"] == "tracked-dft"
    assert config["git_commit"] == tracking.git_commit()
    assert all(library in config["versions"] for library in LIBRARIES)
    assert config["data"]["train_conversations"] == 36
    assert run["summary"]["run_summary/steps"] == tracked_run["summary"]["steps"]


@pytest.mark.integration
def test_swanlab_offline_run_holds_metrics_and_config(tracked_run):
    """The transformers SwanLab callback would have raised "No active Run" here (swanlab >= 0.8)."""
    run = swanlab_offline_run(str(tracked_run["logs"] / "swanlog"))
    for name in TRAIN_METRICS:
        assert f"train/{name}" in run["scalars"], sorted(run["scalars"])
    for name in EVAL_METRICS:
        assert f"eval/{name}" in run["scalars"], sorted(run["scalars"])
    expected = logged(tracked_run["history"], "eval_avg_p_correct")
    assert [s for s, _ in run["scalars"]["eval/avg_p_correct"]] == [s for s, _ in expected]
    assert [v for _, v in run["scalars"]["eval/avg_p_correct"]] == pytest.approx([v for _, v in expected])
    assert run["finished"]
    config = run["config"]
    assert config["git_commit"] == tracking.git_commit() and config["data"]["eval_conversations"] == 4
    assert config["run_summary"]["steps"] == tracked_run["summary"]["steps"]


@pytest.mark.integration
def test_run_config_json_says_what_produced_the_run(tracked_run, tiny_model_dir):
    with open(tracked_run["dir"] / "run_config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["run_name"] == "tracked-dft"
    assert config["git_commit"] == tracking.git_commit()
    assert all(config["versions"][library] != "not installed" for library in LIBRARIES)
    assert config["hardware"]["cpu"] and config["hardware"]["cpu_count"] >= 1 and config["hardware"]["gpu_count"] == 0
    arguments = config["arguments"]
    assert arguments["model"]["model_name_or_path"] == tiny_model_dir
    assert arguments["data"]["max_length"] == 256 and arguments["data"]["validation_split_percentage"] == 10
    assert arguments["training"]["dft_alpha"] == 1.0
    assert arguments["training"]["report_to"] == ["swanlab", "wandb", "tensorboard"]
    assert arguments["training"]["learning_rate"] == 1e-3
    data = config["data"]
    assert (data["records_read"], data["records_kept"], data["train_conversations"], data["eval_conversations"]) == (40, 40, 36, 4)
    assert 0 < data["train_supervised_tokens_per_epoch"] < data["train_tokens_per_epoch"]


@pytest.mark.integration
def test_run_summary_counts_every_token_of_the_epoch(tracked_run):
    with open(tracked_run["dir"] / "run_summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    with open(tracked_run["dir"] / "run_config.json", encoding="utf-8") as f:
        data = json.load(f)["data"]
    assert summary == json.loads(json.dumps(tracked_run["summary"]))
    assert summary["steps"] == 9  # 36 conversations / batch 4
    # One full epoch: every token and every supervised token of the training set went through a step.
    assert summary["total_tokens"] == data["train_tokens_per_epoch"]
    assert summary["supervised_tokens"] == data["train_supervised_tokens_per_epoch"]
    assert summary["tokens_per_second"] == pytest.approx(summary["total_tokens"] / summary["train_seconds"], rel=0.01)
    assert summary["peak_memory"]["device"] == "cpu" and 0.05 < summary["peak_memory"]["peak_gib"] < 24
    history = tracked_run["history"]
    last_train = [entry for entry in history if "loss" in entry][-1]
    assert summary["final_train_metrics"]["avg_p_correct"] == last_train["avg_p_correct"]
    assert summary["final_train_metrics"]["step"] == 9
    assert summary["best_eval_metrics"]["eval_loss"]["value"] == min(v for _, v in logged(history, "eval_loss"))
    assert summary["train_loss"] > 0 and summary["wall_seconds"] >= summary["train_seconds"] > 0
    assert os.path.isfile(os.path.join(summary["model_path"], "model.safetensors"))


@pytest.mark.integration
def test_the_run_ends_naming_its_summary_and_curves(tracked_run):
    lines = (tracked_run["logs"] / "train.log").read_text(encoding="utf-8").splitlines()
    run_dir = os.path.abspath(tracked_run["dir"])
    # The summary's last lines (later tests of this module may log into the same file after them).
    end = next(i for i, line in enumerate(lines) if line.endswith(f"dft.tracking: model saved to {run_dir}"))
    assert lines[end + 1].endswith(f"dft.tracking: run summary: {os.path.join(run_dir, 'run_summary.json')}")
    assert lines[end + 2].endswith(f"dft.tracking: training curves: {os.path.join(run_dir, 'training_curves.png')}")
    assert os.path.isfile(os.path.join(run_dir, "run_summary.json")) and os.path.isfile(os.path.join(run_dir, "training_curves.png"))


@pytest.mark.integration
def test_progress_lines_without_tqdm(tracked_run):
    """--disable_tqdm (what train.sh passes under nohup): one line per logging step with step/total and ETA."""
    text = (tracked_run["logs"] / "train.log").read_text(encoding="utf-8")
    lines = re.findall(r"step (\d+)/9: loss ([\d.]+) \|.*\(\d+%, elapsed \d+:\d\d:\d\d, ETA [\d:?]+", text)
    assert [int(step) for step, _ in lines] == list(range(1, 10))
    assert all(math.isfinite(float(loss)) for _, loss in lines)
    eval_steps = [int(step) for step in re.findall(r"step (\d+)/9: .*eval_avg_p_correct", text)]
    assert eval_steps == [step for step, _ in logged(tracked_run["history"], "eval_avg_p_correct")]
    assert eval_steps[:2] == [4, 8]


def test_a_new_tracker_is_one_table_entry(monkeypatch):
    """TRACKERS is the one place a tracker is set up: its entry is started when --report_to names it and
    closed with the run summary's numbers (rank 0), and the others are left alone."""
    from types import SimpleNamespace

    calls = []
    entry = tracking_backends.Tracker(
        "toy", start=lambda trainer, config: calls.append(("start", config["run_name"])) or True,
        close=lambda numbers, plain: calls.append(("close", numbers["train_loss"], numbers["peak_memory_gib"])),
    )
    monkeypatch.setitem(tracking_backends.TRACKERS, "toy", entry)
    trainer = SimpleNamespace(args=SimpleNamespace(report_to=["toy"]))
    started = tracking_backends.start_trackers(trainer, {"run_name": "r1"})
    assert started == ["toy"] and calls == [("start", "r1")]
    tracking_backends.close_trackers(started, {"train_loss": 0.5, "flag": True, "peak_memory": {"peak_gib": 1.5}}, {})
    assert calls[-1] == ("close", 0.5, 1.5)
    assert tracking_backends.start_trackers(SimpleNamespace(args=SimpleNamespace(report_to=["none"])), {"run_name": "r"}) == []
