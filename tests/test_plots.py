"""training_curves.png (written by every run) and scripts/plot_run.py (overlays runs): real images.

Two short real runs, SFT (dft_alpha 0) and DFT (dft_alpha 1); the second keeps only a checkpoint's
trainer_state.json, as a run that is still going or crashed would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import dftune.run.plots as run_plots
import train_dft

from helpers import write_small_data

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image_stats(path) -> tuple[int, int, float, int]:
    """(width, height, share of non-white pixels, distinct colours) of a PNG."""
    from matplotlib.image import imread

    pixels = imread(str(path))[..., :3]  # (H, W, 3) floats in [0, 1]
    height, width = pixels.shape[:2]
    ink = float((pixels.min(axis=-1) < 0.9).mean())
    rgb = (pixels * 255).astype(np.uint32).reshape(-1, 3)
    colours = len(np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]))
    return width, height, ink, colours


def assert_real_plot(path) -> None:
    assert os.path.getsize(path) > 20_000, "a figure of panels with curves is tens of KB"
    width, height, ink, colours = image_stats(path)
    rows = -(-len(run_plots.PANELS) // run_plots.PANEL_COLUMNS)
    assert (width, height) == (1500, 420 * rows)
    assert 0.02 < ink < 0.6, f"{ink:.3f} of the pixels are drawn: blank or solid image"
    assert colours > 50, "text, axes and coloured curves give many distinct colours"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir, sample_files):
    root = tmp_path_factory.mktemp("plots")
    data = write_small_data(root, 60)
    runs = {}
    for name, alpha in (("sft", "0.0"), ("dft", "1.0")):
        output_dir = root / name
        train_dft.main([
            "--model_name_or_path", tiny_model_dir, "--data_files", str(data), "--output_dir", str(output_dir),
            "--run_name", name, "--dft_alpha", alpha, "--max_steps", "6", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "8", "--max_length", "256", "--learning_rate", "2e-3",
            "--logging_steps", "1", "--validation_split_percentage", "10", "--eval_strategy", "steps",
            "--eval_steps", "3", "--save_strategy", "steps", "--save_steps", "6", "--report_to", "none",
            "--disable_tqdm", "True", "--seed", "0", "--eval_generation_files",
            os.path.join(ROOT, "data", "sample_eval", "questions.jsonl"), "--eval_answer_match", "contains",
            "--eval_generation_max_new_tokens", "8",  # the generation accuracy panel
        ])
        runs[name] = output_dir
    os.remove(runs["dft"] / "trainer_state.json")  # plot_run.py must fall back to checkpoint-6/
    return runs


@pytest.mark.integration
def test_training_curves_png_is_a_real_plot(two_runs):
    for run_dir in two_runs.values():
        assert_real_plot(run_dir / "training_curves.png")


@pytest.mark.integration
def test_plot_run_overlays_runs_labelled_by_name_and_alpha(two_runs, tmp_path):
    out = tmp_path / "sft_vs_dft.png"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "plot_run.py"), str(two_runs["sft"]), str(two_runs["dft"]), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert_real_plot(out)
    labels = [run_plots.load_run_curves(str(path)).label for path in (two_runs["sft"], two_runs["dft"])]
    assert labels == ["sft (dft_alpha=0)", "dft (dft_alpha=1)"]
    # Two runs in one figure: each run's colour is on it, so more colours than one run alone.
    assert image_stats(out)[3] > image_stats(two_runs["sft"] / "training_curves.png")[3]


@pytest.mark.integration
def test_checkpoint_state_is_used_when_the_run_has_no_final_state(two_runs):
    curves = run_plots.load_run_curves(str(two_runs["dft"]))
    with open(two_runs["dft"] / "checkpoint-6" / "trainer_state.json", encoding="utf-8") as f:
        assert curves.log_history == json.load(f)["log_history"]
    assert [entry["step"] for entry in curves.log_history if "loss" in entry] == [1, 2, 3, 4, 5, 6]


def test_plot_run_names_a_directory_without_state(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "plot_run.py"), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path}: no trainer_state.json here or in a checkpoint-N/ folder; is it a training output_dir?"


def test_newest_checkpoint_wins_and_labels_fall_back_to_the_logs(tmp_path):
    for step, loss in ((5, 0.5), (10, 0.4)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        state = {"log_history": [{"step": step, "loss": loss, "dft_alpha": 0.5}]}
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(state))
    (tmp_path / "checkpoint-notes").mkdir()
    curves = run_plots.load_run_curves(str(tmp_path))
    assert curves.log_history == [{"step": 10, "loss": 0.4, "dft_alpha": 0.5}]
    assert curves.label == f"{tmp_path.name} (dft_alpha=0.5)"  # no run_config.json: folder name, alpha from the logs
    shutil.rmtree(tmp_path / "checkpoint-10")
    assert run_plots.load_run_curves(str(tmp_path)).log_history[0]["step"] == 5
