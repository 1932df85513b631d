"""compare.png: generation accuracy against step per variant (mean over seeds, min-max band, the base
model as a dotted line), above the training curves of every variant averaged over its seeds, drawn by
run_plots.draw_panels (the same panels as each run's training_curves.png). Headless, no torch.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from dftune.run.plots import PANEL_COLUMNS as COLUMNS
from dftune.run.plots import PANELS, STATE_FILE, RunCurves, draw_panels
from dftune.sweep.results import order_accuracy_keys


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
    """Each variant's training curves averaged over its successful seeds (read from the runs' trainer_state.json)."""
    runs = []
    for name in compare["variants"]:
        histories = []
        for run in compare["runs"]:
            path = os.path.join(run["output_dir"], STATE_FILE)
            if run["variant"] == name and run["status"] == "ok" and os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    histories.append(json.load(f).get("log_history", []))
        if histories:
            runs.append(RunCurves(label=name, log_history=mean_log_history(histories)))
    return runs


def plot_compare(compare: dict[str, Any], out_path: str, dpi: int = 100) -> str | None:
    """Writes the figure; None (nothing written) when no variant has a successful run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    runs = variant_curves(compare)
    if not runs:
        return None
    acc_keys: list[str] = []
    for curves in compare["curves"].values():
        acc_keys += [k for k in curves if k.endswith("_accuracy") and k not in acc_keys]
    acc_keys = order_accuracy_keys(acc_keys, compare.get("train_flags", []))
    acc_rows = math.ceil(len(acc_keys) / COLUMNS)
    curve_rows = math.ceil(len(PANELS) / COLUMNS)
    figure = Figure(figsize=(15, 4.2 * (acc_rows + curve_rows)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    if acc_rows:
        top, bottom = figure.subfigures(2, 1, height_ratios=[acc_rows, curve_rows])
    else:
        top, bottom = None, figure
    if top is not None:
        base = (compare.get("base") or {}).get("metrics", {})
        axes = top.subplots(acc_rows, COLUMNS, squeeze=False)
        # The same colour per variant as draw_panels gives it below (variants without a run are skipped there).
        drawn = [name for name in compare["variants"] if compare["variants"][name]["ok"]]
        for ax, key in zip(axes.flat, acc_keys):
            for index, name in enumerate(drawn):
                curve = compare["curves"].get(name, {}).get(key)
                if not curve or not curve["step"]:
                    continue
                color = f"C{index % 10}"
                n = compare["variants"][name]["ok"]
                ax.plot(curve["step"], curve["mean"], color=color, marker="o", markersize=4, linewidth=1.8, label=name)
                if n > 1:
                    ax.fill_between(curve["step"], curve["min"], curve["max"], color=color, alpha=0.15, linewidth=0)
            if isinstance(base.get(key), (int, float)):
                ax.axhline(base[key], color="gray", linestyle=":", linewidth=1.5, label="base model")
            label = "all files" if key == "eval_gen_accuracy" else key[len("eval_gen_"):-len("_accuracy")]
            ax.set_title(f"generation accuracy: {label}", fontsize=12)
            ax.set_xlabel("optimizer step", fontsize=10)
            ax.set_ylabel("accuracy (band: min-max over seeds)", fontsize=9)
            ax.set_ylim(-0.02, 1.02)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="best")
        for ax in list(axes.flat)[len(acc_keys):]:
            ax.set_visible(False)
    axes = bottom.subplots(curve_rows, COLUMNS, squeeze=False)
    draw_panels(axes, runs)
    for ax in list(axes.flat)[len(PANELS):]:
        ax.set_visible(False)
    seeds = compare.get("seeds", [])
    figure.suptitle(
        f"{' vs '.join(compare['variants'])}, {len(seeds)} seed(s) each\n"
        "every curve is the mean over the seeds that finished; accuracy band: min-max over seeds", fontsize=13,
    )
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    figure.savefig(out_path)
    return out_path
