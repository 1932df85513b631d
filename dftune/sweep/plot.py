"""compare.png: generation accuracy against step per variant (mean over seeds, min-max band, the base
model as a dotted line), above the training curves of every variant averaged over its seeds, drawn by
run/plots.draw_panels (the panels of each run's training_curves.png that have data, without generation
accuracy, which the top already shows), and one legend below everything. Headless, no torch.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from dftune.run.plots import (
    PANEL_COLUMNS,
    PANEL_HEIGHT,
    PANELS,
    STATE_FILE,
    RunCurves,
    add_legend,
    draw_panels,
    legend_height,
    panel_rows,
    panels_with_data,
    read_run_config,
    style_handles,
)
from dftune.sweep.results import ACCURACY, order_accuracy_keys


def mean_log_history(histories: list[list[dict]]) -> list[dict]:
    """One log history whose entries are the seeds' means: train entries (those with `loss`) and eval
    entries are matched by step; a metric is averaged only where every seed logged it."""
    if not histories:
        return []
    grouped: dict[tuple[int, bool], list[dict]] = {}
    for history in histories:
        seen: dict[tuple[int, bool], dict] = {}
        for entry in history:
            if "step" not in entry:
                continue
            key = (int(entry["step"]), "loss" in entry)
            seen.setdefault(key, {}).update(entry)  # one merged entry per step and kind and seed
        for key, entry in seen.items():
            grouped.setdefault(key, []).append(entry)
    merged = []
    for (step, _), entries in sorted(grouped.items()):
        if len(entries) != len(histories):
            continue
        names = set.intersection(*[set(e) for e in entries])
        averaged: dict[str, Any] = {"step": step}
        for name in names:
            values = [e[name] for e in entries]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                averaged[name] = sum(values) / len(values)
        merged.append(averaged)
    return merged


def variant_curves(compare: dict[str, Any]) -> list[RunCurves]:
    """Each variant's training curves averaged over its successful seeds (read from the runs' trainer_state.json),
    its loss type from the first run's run_config.json, its colour by its place among the variants."""
    runs = []
    for index, name in enumerate(compare["variants"]):
        histories, loss_type, dft_alpha = [], None, None
        for run in compare["runs"]:
            path = os.path.join(run["output_dir"], STATE_FILE)
            # With a --grid a row is its variant at the chosen setting: the runs carry that setting's name.
            if run["variant"] == compare["variants"][name].get("variant", name) and run["status"] == "ok" and os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    histories.append(json.load(f).get("log_history", []))
                if len(histories) == 1:
                    _, loss_type, dft_alpha = read_run_config(run["output_dir"])
        if histories:
            runs.append(RunCurves(label=name, log_history=mean_log_history(histories), loss_type=loss_type,
                                  dft_alpha=dft_alpha, color=f"C{index % 10}"))
    return runs


def accuracy_panels(figure, compare: dict[str, Any], runs: list[RunCurves], keys: list[str]) -> dict[str, bool]:
    """One panel per generation accuracy (overall, then per file): each variant's mean over seeds (dashed,
    as every eval curve), its min-max band, the base model dotted. Returns which of the base line and the
    band were drawn (for the legend)."""
    from matplotlib.ticker import MaxNLocator

    base = (compare.get("base") or {}).get("metrics", {})
    drawn = {"base": False, "band": False}
    grid = figure.subplots(panel_rows(len(keys)), PANEL_COLUMNS, squeeze=False)
    for ax in grid.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(grid.flat, keys):
        for run in runs:
            curve = compare["curves"].get(run.label, {}).get(key)
            if not curve or not curve["step"]:
                continue
            ax.plot(curve["step"], curve["mean"], color=run.color, linestyle="--", marker="o", markersize=4, linewidth=1.8)
            if compare["variants"][run.label]["ok"] > 1:
                ax.fill_between(curve["step"], curve["min"], curve["max"], color=run.color, alpha=0.15, linewidth=0)
                drawn["band"] = True
        if isinstance(base.get(key), (int, float)):
            ax.axhline(base[key], color="gray", linestyle=":", linewidth=1.5)
            drawn["base"] = True
        label = "all files" if key == ACCURACY else key[len("eval_gen_"):-len("_accuracy")]
        ax.set_title(f"generation accuracy: {label}", fontsize=12)
        ax.set_xlabel("optimizer step", fontsize=10)
        ax.set_ylabel("accuracy (band: min-max over seeds)", fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    return drawn


def compare_figure(compare: dict[str, Any], dpi: int = 100):
    """The figure of compare.png; None when no variant has a successful run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    runs = variant_curves(compare)
    if not runs:
        return None
    acc_keys: list[str] = []
    for curves in compare["curves"].values():
        acc_keys += [k for k in curves if k.endswith("_accuracy") and k not in acc_keys]
    acc_keys = order_accuracy_keys(acc_keys, compare.get("train_flags", []))
    # Generation accuracy is shown once: in the top panels when there are any.
    panels = [panel for panel in panels_with_data(runs, PANELS) if not (acc_keys and panel.eval_key == ACCURACY)]
    acc_rows, curve_rows = panel_rows(len(acc_keys)), panel_rows(len(panels))
    handles = [Line2D([], [], color=run.color, linewidth=2.5, label=run.label) for run in runs] + style_handles()
    extra = 2  # the base line and the band, at most
    figure = Figure(figsize=(15, PANEL_HEIGHT * max(1, acc_rows + curve_rows) + legend_height(len(handles) + extra) + 0.4),
                    dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    drawn = {"base": False, "band": False}
    if acc_rows and curve_rows:
        top, bottom = figure.subfigures(2, 1, height_ratios=[acc_rows, curve_rows])
        drawn = accuracy_panels(top, compare, runs, acc_keys)
        draw_panels(bottom, runs, panels)
    elif acc_rows:
        drawn = accuracy_panels(figure, compare, runs, acc_keys)
    else:
        draw_panels(figure, runs, panels)
    if drawn["base"]:
        handles.append(Line2D([], [], color="gray", linestyle=":", linewidth=1.5, label="base model"))
    if drawn["band"]:
        handles.append(Patch(color="gray", alpha=0.25, label="min-max over seeds"))
    add_legend(figure, handles)
    seeds = compare.get("seeds", [])
    figure.suptitle(
        f"{' vs '.join(compare['variants'])}, {len(seeds)} seed(s) each\n"
        "every curve is the mean over the seeds that finished; accuracy band: min-max over seeds", fontsize=13,
    )
    return figure


def plot_compare(compare: dict[str, Any], out_path: str, dpi: int = 100) -> str | None:
    """Writes `compare_figure` to out_path; None (nothing written) when no variant has a successful run."""
    figure = compare_figure(compare, dpi)
    if figure is None:
        return None
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    figure.savefig(out_path)
    return out_path


def plot_grid(compare: dict[str, Any], out_path: str, dpi: int = 100) -> str | None:
    """compare_grid.png: per grid flag, each variant's final accuracy (mean over seeds) against the flag's value,
    on the --select_on files (dashed: what chose the setting) and on the reported files (solid); the chosen
    setting circled. Several grid flags: one panel per flag, the other flags at the variant's chosen values.
    None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = compare.get("grid") or {}
    flags = list(next(iter(grid.values()))["grid"][0]["setting"]) if grid and next(iter(grid.values()))["grid"] else []
    if not flags:
        return None
    figure, axes = plt.subplots(1, len(flags), figsize=(5.5 * len(flags), 4.2), dpi=dpi, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, flag in zip(axes[0], flags):
        for index, (arm, entry) in enumerate(grid.items()):
            chosen = entry.get("setting") or {}
            points = [e for e in entry["grid"] if all(e["setting"][k] == chosen.get(k, e["setting"][k]) for k in flags if k != flag)]
            xs = [_number(e["setting"][flag]) for e in points]
            if any(x is None for x in xs):
                xs = list(range(len(points)))
                ax.set_xticks(xs, [e["setting"][flag] for e in points])
            color = colors[index % len(colors)]
            ax.plot(xs, [e["select_score"] if e["select_score"] is not None else math.nan for e in points], "--o", color=color,
                    label=f"{arm}: validation (--select_on)")
            reported = [sum(v for v in e["reported"].values() if v is not None) / max(1, sum(v is not None for v in e["reported"].values()))
                        if any(v is not None for v in e["reported"].values()) else math.nan for e in points]
            ax.plot(xs, reported, "-s", color=color, label=f"{arm}: reported files")
            for x, e in zip(xs, points):
                if e["variant"] == entry.get("selected"):
                    ax.plot([x], [e["select_score"]], "o", markersize=14, markerfacecolor="none", color=color)
        positive = [_number(v) for e in next(iter(grid.values()))["grid"] for k, v in e["setting"].items() if k == flag]
        if all(x is not None and x > 0 for x in positive) and max(positive) / min(positive) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(f"--{flag}")
        ax.set_ylabel("final generation accuracy (mean over seeds)")
        ax.set_title(f"accuracy vs --{flag} (circled: chosen)", fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.08 + 0.03 * math.ceil(len(labels) / 2), 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    figure.savefig(out_path)
    plt.close(figure)
    return out_path


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
