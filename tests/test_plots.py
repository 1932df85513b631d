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
    # Three rows of panels here (no anchor_kl panel outside asft) and the legend below them.
    assert width == 1500 and 3 * 420 < height < 4 * 420
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


# ---- the figure's structure: panels with data, titles, the legend's place -----------------------------------
@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib figures the code saves, still saved as usual: their axes and legends can be checked."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig

    def savefig(figure, *args, **kwargs):
        figures.append(figure)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def history(scale: float, eval_keys: tuple[str, ...] = ()) -> list[dict]:
    """A log history of the metrics every run logs (no anchor_kl: not asft), eval entries at steps 2 and 4."""
    train = [{"step": step, "loss": scale / step, "ce_loss": 2 / step, "avg_p_correct": 0.5 + step / 10, "token_accuracy": 0.4 + step / 10,
              "grad_norm": 1.0, "learning_rate": 1e-3, "entropy": 1 / step, "low_p_share": 0.1, "dft_alpha": 1.0} for step in (1, 2, 3, 4)]
    evals = [{"step": step, "eval_loss": scale / step, "eval_ce_loss": 2 / step, **{key: step / 8 for key in eval_keys}} for step in (2, 4)]
    return train + evals


def write_run(run_dir, log_history: list[dict], loss_type: str, dft_alpha: float) -> str:
    """A training output_dir as far as plotting reads it: trainer_state.json and run_config.json."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "trainer_state.json"), "w", encoding="utf-8") as f:
        json.dump({"log_history": log_history}, f)
    with open(os.path.join(run_dir, "run_config.json"), "w", encoding="utf-8") as f:
        json.dump({"run_name": os.path.basename(run_dir), "arguments": {"training": {"loss_type": loss_type, "dft_alpha": dft_alpha}}}, f)
    return str(run_dir)


def visible_axes(figure) -> list:
    return [ax for ax in figure.get_axes() if ax.get_visible()]


def assert_legend_covers_no_panel(figure) -> None:
    """One legend for the figure, outside every panel (a legend inside a panel hid curves)."""
    figure.canvas.draw()
    assert [ax.get_title() for ax in visible_axes(figure) if ax.get_legend() is not None] == []
    legends = [legend for container in [figure, *figure.subfigs] for legend in container.legends]
    assert len(legends) == 1
    box = legends[0].get_window_extent()
    for ax in visible_axes(figure):
        panel = ax.get_window_extent()
        assert box.y1 <= panel.y0 or box.y0 >= panel.y1 or box.x1 <= panel.x0 or box.x0 >= panel.x1, ax.get_title()


def test_run_figure_has_panels_with_data_only_and_names_each_objective(tmp_path, saved_figures):
    """An SFT run (dft_alpha 0) and a DFT run without anchor_kl or generation accuracy: no empty "not logged"
    panels, the loss panel named by both objectives (was "loss (DFT objective)" for the SFT run too)."""
    runs = [run_plots.load_run_curves(write_run(tmp_path / name, history(scale), "dft", alpha))
            for name, scale, alpha in (("sft", 1.0, 0.0), ("dft", 0.1, 1.0))]
    out = run_plots.plot_runs(runs, str(tmp_path / "both.png"), "sft vs dft")
    assert os.path.isfile(out)
    (figure,) = saved_figures
    assert [ax.get_title() for ax in visible_axes(figure)] == [
        "loss (sft / dft objective)", "cross-entropy", "avg p(correct token)", "token accuracy", "gradient norm",
        "learning rate", "predictive entropy (supervised tokens)", "share of tokens with p < 0.1",
    ]
    assert not [text.get_text() for ax in figure.get_axes() for text in ax.texts]  # no "not logged"
    assert_legend_covers_no_panel(figure)
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert labels == ["sft (dft_alpha=0)", "dft (dft_alpha=1)", "train", "eval"]

    run_plots.plot_runs(runs[1:], str(tmp_path / "dft.png"), "dft")  # one run: the legend says train / eval only
    assert visible_axes(saved_figures[1])[0].get_title() == "loss (dft objective)"
    assert [text.get_text() for text in saved_figures[1].legends[0].get_texts()] == ["train", "eval"]


def test_compare_figure_shows_generation_accuracy_once(tmp_path, saved_figures):
    """compare.png had the overall generation accuracy twice (top, and again among the training curves) and
    legends inside the panels."""
    from dftune.sweep.compare import SweepConfig, build_compare, parse_variants
    from dftune.sweep.plot import plot_compare
    from dftune.sweep.results import read_run

    eval_keys = ("eval_gen_accuracy", "eval_gen_id_accuracy")
    results = []
    for variant, loss_type, scale in (("sft", "sft", 1.0), ("dft", "dft", 0.1)):
        for seed in (0, 1):
            run_dir = write_run(tmp_path / f"{variant}-seed{seed}", history(scale + seed / 10, eval_keys), loss_type, 0.0 if variant == "sft" else 1.0)
            results.append(read_run(run_dir, variant, seed))
    config = SweepConfig("m", str(tmp_path), parse_variants(["sft", "dft"]), [0, 1], ["--eval_generation_files", "id.jsonl"])
    base = {"status": "ok", "metrics": {"eval_gen_accuracy": 0.2, "eval_gen_id_accuracy": 0.3}}
    assert plot_compare(build_compare(config, results, base, 1.0), str(tmp_path / "compare.png"))
    (figure,) = saved_figures
    titles = [ax.get_title() for ax in visible_axes(figure)]
    assert [title for title in titles if "generation accuracy" in title] == ["generation accuracy: all files", "generation accuracy: id"]
    assert titles[2:] == [
        "loss (sft / dft objective)", "cross-entropy", "avg p(correct token)", "token accuracy", "gradient norm",
        "learning rate", "predictive entropy (supervised tokens)", "share of tokens with p < 0.1",
    ]
    assert_legend_covers_no_panel(figure)
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert labels == ["sft", "dft", "train", "eval", "base model", "min-max over seeds"]
