"""Training-curve plots from a run's log history: one run (training_curves.png) or several overlaid
(scripts/plot_run.py). Only json and matplotlib (Agg, headless), so plotting never imports torch.

A panel per metric that some run logged (none for a metric nobody logged), the loss panel named by each
run's objective, and one legend for the figure below the panels, where it covers no curve.
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
    """One run's log history, the label it gets in a plot and what its `loss` is (None: not known)."""

    label: str
    log_history: list[dict]
    loss_type: str | None = None
    dft_alpha: float | None = None
    color: str | None = None  # matplotlib colour; None: by its place among the runs drawn

    @property
    def objective(self) -> str | None:
        """The loss the run minimised, as the loss panel names it: its loss type, `sft` for dft at dft_alpha 0
        (plain cross-entropy)."""
        if self.dft_alpha == 0 and self.loss_type in (None, "dft", "sft"):
            return "sft"
        return self.loss_type


@dataclass(frozen=True)
class Panel:
    """One panel: a train metric (lines) and its eval counterpart (dashed, with markers)."""

    title: str
    train_key: str | None
    eval_key: str | None
    ylabel: str


PANELS = (
    Panel("loss", "loss", "eval_loss", "loss"),  # the title gets each run's objective (`loss_title`)
    Panel("cross-entropy", "ce_loss", "eval_ce_loss", "nats / token"),
    Panel("avg p(correct token)", "avg_p_correct", "eval_avg_p_correct", "probability"),
    Panel("token accuracy", "token_accuracy", "eval_token_accuracy", "accuracy"),
    Panel("gradient norm", "grad_norm", None, "L2 norm"),
    Panel("learning rate", "learning_rate", None, "learning rate"),
    Panel("predictive entropy (supervised tokens)", "entropy", "eval_entropy", "nats / token"),
    Panel("share of tokens with p < 0.1", "low_p_share", "eval_low_p_share", "share"),
    Panel("anchor KL to the starting model", "anchor_kl", "eval_anchor_kl", "nats / token"),
    Panel("generation accuracy (eval)", None, "eval_gen_accuracy", "accuracy"),
)
PANEL_COLUMNS = 3
PANEL_HEIGHT = 4.2  # inches a row of panels (420 px at dpi 100)
LEGEND_COLUMNS = 4


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


def panels_with_data(runs: list[RunCurves], panels: tuple[Panel, ...] = PANELS) -> list[Panel]:
    """The panels some run has a value for: a metric nobody logged (anchor_kl outside asft, generation
    accuracy without --eval_generation_files) gets no panel rather than an empty one."""
    return [
        panel for panel in panels
        if any((panel.train_key and _series(run.log_history, panel.train_key, True)[0])
               or (panel.eval_key and _series(run.log_history, panel.eval_key, False)[0]) for run in runs)
    ]


def loss_title(runs: list[RunCurves]) -> str:
    """`loss (dft objective)`, `loss (sft / dft objective)`: the loss of each run is its own objective."""
    objectives = [run.objective for run in runs]
    if None in objectives:  # e.g. a run folder without run_config.json
        return "loss (training objective)" if len(runs) == 1 else "loss (each run's own objective)"
    return f"loss ({' / '.join(dict.fromkeys(objectives))} objective)"


def run_colors(runs: list[RunCurves]) -> list[str]:
    return [run.color or f"C{index % 10}" for index, run in enumerate(runs)]


def panel_rows(count: int) -> int:
    return math.ceil(count / PANEL_COLUMNS)


def legend_height(entries: int) -> float:
    """Inches below the panels for a legend of `entries` entries, LEGEND_COLUMNS a row."""
    return 0.3 + 0.25 * math.ceil(entries / LEGEND_COLUMNS)


def style_handles() -> list:
    """Legend entries for the two line styles every panel uses."""
    from matplotlib.lines import Line2D

    return [
        Line2D([], [], color="black", linewidth=1.6, label="train"),
        Line2D([], [], color="black", linestyle="--", marker="o", markersize=5, label="eval"),
    ]


def add_legend(figure, handles: list) -> None:
    """One legend for the whole figure, below the panels: a legend inside a panel covers its curves."""
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), LEGEND_COLUMNS), fontsize=10, frameon=False)


def runs_figure(runs: list[RunCurves], title: str, dpi: int = 100):
    """Every run's curves on one figure (train: lines; eval: dashed with markers), PANEL_COLUMNS panels a row,
    the panels with data only, one legend below them. Headless."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = panels_with_data(runs)
    # One run: its name is in the title, the legend only says train / eval.
    handles = [Line2D([], [], color=color, linewidth=2.5, label=run.label) for run, color in zip(runs, run_colors(runs))] if len(runs) > 1 else []
    handles += style_handles()
    rows = max(1, panel_rows(len(panels)))
    figure = Figure(figsize=(15, PANEL_HEIGHT * rows + legend_height(len(handles))), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    draw_panels(figure, runs, panels)
    add_legend(figure, handles)
    figure.suptitle(title, fontsize=14)
    return figure


def plot_runs(runs: list[RunCurves], out_path: str, title: str, dpi: int = 100) -> str:
    """Writes `runs_figure` to out_path; returns the path."""
    figure = runs_figure(runs, title, dpi)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    figure.savefig(out_path)
    return out_path


def draw_panels(figure, runs: list[RunCurves], panels: list[Panel]) -> list:
    """The panels onto a figure (or subfigure), PANEL_COLUMNS a row; returns the axes drawn on (also the
    sweep's compare.png). No legend: the figure has one for all panels (`add_legend`)."""
    from matplotlib.ticker import MaxNLocator

    if not panels:
        return []
    grid = figure.subplots(panel_rows(len(panels)), PANEL_COLUMNS, squeeze=False)
    for ax in grid.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(grid.flat, panels):
        for run, color in zip(runs, run_colors(runs)):
            steps, values = _series(run.log_history, panel.train_key, need_train_entry=True) if panel.train_key else ([], [])
            if steps:
                ax.plot(steps, values, color=color, linewidth=1.6)
            steps, values = _series(run.log_history, panel.eval_key, need_train_entry=False) if panel.eval_key else ([], [])
            if steps:
                ax.plot(steps, values, color=color, linestyle="--", marker="o", markersize=5)
        ax.set_title(loss_title(runs) if panel.train_key == "loss" else panel.title, fontsize=12)
        ax.set_xlabel("optimizer step", fontsize=10)
        ax.set_ylabel(panel.ylabel, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if panel.train_key == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return list(grid.flat[: len(panels)])


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


def read_run_config(run_dir: str) -> tuple[str | None, str | None, Any]:
    """(run name, loss type, dft_alpha) from a run's run_config.json; Nones without one."""
    config_path = os.path.join(run_dir, RUN_CONFIG_FILE)
    if not os.path.isfile(config_path):
        return None, None, None
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    training = config.get("arguments", {}).get("training", {})
    return config.get("run_name"), training.get("loss_type"), training.get("dft_alpha")


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
    name, loss_type, dft_alpha = read_run_config(run_dir)
    name = name or os.path.basename(os.path.normpath(run_dir))
    if dft_alpha is None:
        dft_alpha = next((entry["dft_alpha"] for entry in log_history if "dft_alpha" in entry), None)
    return RunCurves(label=run_label(name, dft_alpha, loss_type), log_history=log_history, loss_type=loss_type, dft_alpha=dft_alpha)
