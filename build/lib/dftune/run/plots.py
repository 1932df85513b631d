"""Training-curve plots from a run's log history: one run (training_curves.png) or several overlaid
(scripts/plot_run.py). Only json and matplotlib (Agg, headless), so plotting never imports torch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

CURVES_FILE = "training_curves.png"
STATE_FILE = "trainer_state.json"
RUN_CONFIG_FILE = "run_config.json"


@dataclass
class RunCurves:
    """One run's log history and the label it gets in a plot."""

    label: str
    log_history: list[dict]


# (panel title, train key, eval key, y-axis label)
PANELS = (
    ("loss (DFT objective)", "loss", "eval_loss", "loss"),
    ("cross-entropy", "ce_loss", "eval_ce_loss", "nats / token"),
    ("avg p(correct token)", "avg_p_correct", "eval_avg_p_correct", "probability"),
    ("token accuracy", "token_accuracy", "eval_token_accuracy", "accuracy"),
    ("gradient norm", "grad_norm", None, "L2 norm"),
    ("learning rate", "learning_rate", None, "learning rate"),
    ("predictive entropy (supervised tokens)", "entropy", "eval_entropy", "nats / token"),
    ("share of tokens with p < 0.1", "low_p_share", "eval_low_p_share", "share"),
    ("anchor KL to the starting model (asft)", "anchor_kl", "eval_anchor_kl", "nats / token"),
    ("generation accuracy (eval)", None, "eval_gen_accuracy", "accuracy"),
)
PANEL_COLUMNS = 3


def _series(log_history: list[dict], key: str, need_train_entry: bool) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and "step" in entry:
            if need_train_entry and "loss" not in entry:
                continue
            steps.append(entry["step"])
            values.append(value)
    return steps, values


def plot_runs(runs: list[RunCurves], out_path: str, title: str, dpi: int = 100) -> str:
    """Draws every run's curves on one figure, PANEL_COLUMNS panels a row (train: lines; eval: dashed with markers). Headless."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = math.ceil(len(PANELS) / PANEL_COLUMNS)
    figure = Figure(figsize=(15, 4.2 * rows), dpi=dpi, layout="constrained")  # 1500 x 420 px a row at dpi 100
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, PANEL_COLUMNS, squeeze=False)
    for ax in axes.flat[len(PANELS):]:
        ax.set_visible(False)
    draw_panels(axes, runs)
    figure.suptitle(title, fontsize=14)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    figure.savefig(out_path)
    return out_path


def draw_panels(axes, runs: list[RunCurves]) -> None:
    """The PANELS onto a grid of matplotlib axes, PANEL_COLUMNS a row (also the sweep's compare.png)."""
    from matplotlib.ticker import MaxNLocator

    colors = [f"C{i}" for i in range(10)]
    for ax, (panel_title, train_key, eval_key, ylabel) in zip(axes.flat, PANELS):
        drawn = False
        for index, run in enumerate(runs):
            color = colors[index % len(colors)]
            # One run: its name is in the title, the legend only says train / eval.
            prefix = f"{run.label} " if len(runs) > 1 else ""
            steps, values = _series(run.log_history, train_key, need_train_entry=True) if train_key else ([], [])
            if steps:
                ax.plot(steps, values, color=color, linewidth=1.6, label=f"{prefix}train")
                drawn = True
            if eval_key:
                steps, values = _series(run.log_history, eval_key, need_train_entry=False)
                if steps:
                    ax.plot(steps, values, color=color, linestyle="--", marker="o", markersize=5, label=f"{prefix}eval")
                    drawn = True
        ax.set_title(panel_title, fontsize=12)
        ax.set_xlabel("optimizer step", fontsize=10)
        ax.set_ylabel(ylabel, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if train_key == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if drawn:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def run_label(name: str, dft_alpha: Any, loss_type: str | None = None) -> str:
    """`name (dft_alpha=1)`, with the loss type first when it is not plain dft: `name (asft, dft_alpha=1)`."""
    parts = [loss_type] if loss_type and loss_type != "dft" else []
    if isinstance(dft_alpha, (int, float)):
        parts.append(f"dft_alpha={dft_alpha:g}")
    return f"{name} ({', '.join(parts)})" if parts else name


def find_trainer_state(run_dir: str) -> str | None:
    """RUN_DIR/trainer_state.json, else the one of the newest checkpoint-N/."""
    direct = os.path.join(run_dir, STATE_FILE)
    if os.path.isfile(direct):
        return direct
    checkpoints = []
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        prefix, _, step = name.partition("-")
        if prefix == "checkpoint" and step.isdigit() and os.path.isfile(os.path.join(run_dir, name, STATE_FILE)):
            checkpoints.append((int(step), os.path.join(run_dir, name, STATE_FILE)))
    return max(checkpoints)[1] if checkpoints else None


def load_run_curves(run_dir: str) -> RunCurves:
    """A run directory's log history and label (run name from run_config.json, dft_alpha from it or the logs).

    Raises:
        FileNotFoundError: no trainer_state.json in RUN_DIR or its checkpoint-N/ folders.
    """
    state_path = find_trainer_state(run_dir)
    if state_path is None:
        raise FileNotFoundError(f"{run_dir}: no {STATE_FILE} here or in a checkpoint-N/ folder; is it a training output_dir?")
    with open(state_path, encoding="utf-8") as f:
        log_history = json.load(f).get("log_history", [])
    name, dft_alpha, loss_type = os.path.basename(os.path.normpath(run_dir)), None, None
    config_path = os.path.join(run_dir, RUN_CONFIG_FILE)
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        name = config.get("run_name") or name
        dft_alpha = config.get("arguments", {}).get("training", {}).get("dft_alpha")
        loss_type = config.get("arguments", {}).get("training", {}).get("loss_type")
    if dft_alpha is None:
        dft_alpha = next((entry["dft_alpha"] for entry in log_history if "dft_alpha" in entry), None)
    return RunCurves(label=run_label(name, dft_alpha, loss_type), log_history=log_history)
