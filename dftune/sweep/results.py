"""The results of a sweep (sweep/compare.py): each run read back from its own files, the mean and sample
standard deviation over seeds per variant, and the table (console and Markdown). Pure functions of
plain values, so the tests check them against hand computations; no torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

RUN_SUMMARY_FILE = "run_summary.json"
STATE_FILE = "trainer_state.json"
RUN_STATUS_FILE = "compare_run.json"
ACCURACY = "eval_gen_accuracy"
# The table's columns after the accuracies (final values, mean ± std over seeds).
FINAL_METRICS = ("eval_ce_loss", "eval_avg_p_correct", "eval_gen_finished")


# ---- reading a run back ------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What the table needs from one run (finished or failed)."""

    variant: str
    seed: int
    output_dir: str
    status: str  # "ok" or "failed"
    reason: str = ""
    final: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[list[float]]] = field(default_factory=dict)  # metric -> [[step, value], ...]
    tokens_per_second: float | None = None
    wall_seconds: float | None = None


def accuracy_keys(entries: list[dict]) -> list[str]:
    """eval_gen_accuracy first, then the per-file ones (eval_gen_<stem>_accuracy), in order of appearance."""
    keys: list[str] = []
    for entry in entries:
        for key in entry:
            if key.startswith("eval_gen_") and key.endswith("_accuracy") and key not in keys:
                keys.append(key)
    return sorted(keys, key=lambda k: (k != ACCURACY, keys.index(k)))


def order_accuracy_keys(keys: list[str], train_flags: list[str]) -> list[str]:
    """eval_gen_accuracy, then the per-file accuracies in the order of --eval_generation_files, then the rest."""
    stems: list[str] = []
    if "--eval_generation_files" in train_flags:
        for token in train_flags[train_flags.index("--eval_generation_files") + 1:]:
            if token.startswith("--"):
                break
            # The metric name train_dft gives a file (eval_generation.metric_stem): lower-case stem, [a-z0-9_].
            stems.append(re.sub(r"[^a-z0-9_]+", "_", os.path.basename(token).split(".")[0].lower()).strip("_"))
    order = [ACCURACY] + [f"eval_gen_{stem}_accuracy" for stem in stems]
    return sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), k))


def eval_series(log_history: list[dict], key: str) -> list[list[float]]:
    """[[step, value], ...] of one eval metric, one point per step (a later entry for a step wins)."""
    points: dict[int, float] = {}
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            points[int(entry.get("step", 0))] = float(value)
    return [[step, points[step]] for step in sorted(points)]


def metrics_from_history(log_history: list[dict]) -> tuple[dict[str, float], dict[str, float], dict[str, list[list[float]]]]:
    """(final, best, curves) of the eval metrics: final = the last evaluation, best = the highest
    accuracy (the lowest for a loss) over the run's evaluations."""
    final: dict[str, float] = {}
    best: dict[str, float] = {}
    curves: dict[str, list[list[float]]] = {}
    for key in [*accuracy_keys(log_history), *FINAL_METRICS]:
        series = eval_series(log_history, key)
        if not series:
            continue
        curves[key] = series
        values = [value for _, value in series]
        final[key] = values[-1]
        best[key] = min(values) if key.endswith("loss") else max(values)
    return final, best, curves


def read_run(
    output_dir: str, variant: str, seed: int, status: str = "ok", reason: str = "", wall_seconds: float | None = None
) -> RunResult:
    """A run's metrics from its trainer_state.json and run_summary.json (what exists of them)."""
    result = RunResult(variant, seed, output_dir, status, reason, wall_seconds=wall_seconds)
    state_path = os.path.join(output_dir, STATE_FILE)
    if os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as f:
            result.final, result.best, result.curves = metrics_from_history(json.load(f).get("log_history", []))
    summary_path = os.path.join(output_dir, RUN_SUMMARY_FILE)
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        result.tokens_per_second = summary.get("tokens_per_second")
        if result.wall_seconds is None:
            result.wall_seconds = summary.get("wall_seconds")
    status_path = os.path.join(output_dir, RUN_STATUS_FILE)
    if wall_seconds is None and os.path.isfile(status_path):
        # The launch's own wall time (process start to exit: start-up, loading and evaluation included).
        with open(status_path, encoding="utf-8") as f:
            result.wall_seconds = json.load(f).get("seconds", result.wall_seconds)
    return result


# ---- aggregation ----------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1; 0 for one value) of the finite values."""
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}


def aggregate(results: list[RunResult], variants: list[str]) -> dict[str, dict[str, Any]]:
    """Per variant, over its successful seeds: mean/std of every final and best metric, tokens/s, wall time."""
    table: dict[str, dict[str, Any]] = {}
    for variant in variants:
        ok = [r for r in results if r.variant == variant and r.status == "ok"]
        runs = [r for r in results if r.variant == variant]
        keys = []
        for r in ok:
            keys += [k for k in r.final if k not in keys]
        row: dict[str, Any] = {
            "runs": len(runs),
            "ok": len(ok),
            "seeds": [r.seed for r in ok],
            "failed": {str(r.seed): r.reason for r in runs if r.status != "ok"},
            "final": {k: mean_std([r.final.get(k) for r in ok]) for k in keys},
            "best": {k: mean_std([r.best.get(k) for r in ok]) for k in keys},
            "tokens_per_second": mean_std([r.tokens_per_second for r in ok]),
            "wall_seconds": mean_std([r.wall_seconds for r in ok]),
        }
        table[variant] = row
    return table


def mean_curve(curves: list[list[list[float]]]) -> dict[str, list[float]]:
    """Mean, std, min and max over seeds at each step that every seed evaluated at."""
    if not curves:
        return {"step": [], "mean": [], "std": [], "min": [], "max": []}
    common = sorted(set.intersection(*[{step for step, _ in c} for c in curves]))
    out: dict[str, list[float]] = {"step": common, "mean": [], "std": [], "min": [], "max": []}
    for step in common:
        values = [value for c in curves for s, value in c if s == step]
        stats = mean_std(values)
        out["mean"].append(stats["mean"])
        out["std"].append(stats["std"])
        out["min"].append(min(values))
        out["max"].append(max(values))
    return out


# ---- the table --------------------------------------------------------------------------------------------------
def _pm(stats: dict[str, Any] | None, digits: int = 3) -> str:
    if not stats or stats.get("mean") is None:
        return "-"
    if stats["n"] == 1:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _short(key: str) -> str:
    """eval_gen_shifted_accuracy -> acc[shifted]; eval_gen_accuracy -> acc."""
    if key == ACCURACY:
        return "acc"
    if key.startswith("eval_gen_") and key.endswith("_accuracy"):
        return f"acc[{key[len('eval_gen_'):-len('_accuracy')]}]"
    return key.removeprefix("eval_")


def table_rows(compare: dict[str, Any]) -> list[list[str]]:
    """The console table as rows of cells (header first): base row, then one row per variant."""
    variants = compare["variants"]
    keys: list[str] = []
    for row in variants.values():
        keys += [k for k in row["final"] if k not in keys]
    base = compare.get("base") or {}
    keys += [k for k in base.get("metrics", {}) if k.startswith("eval_gen_") and k.endswith("_accuracy") and k not in keys]
    # With --select_on the validation files chose the settings: they are not reported, nor is the overall
    # accuracy that pools them with the reported files.
    hidden = set(compare.get("select_keys", [])) | ({ACCURACY} if compare.get("select_keys") else set())
    acc_keys = order_accuracy_keys([k for k in keys if k.endswith("_accuracy") and k not in hidden], compare.get("train_flags", []))
    header = ["variant", "runs"]
    for key in acc_keys:  # best only for the overall accuracy: the per-file columns show the final value
        header += [f"final {_short(key)}", f"best {_short(key)}"] if key == ACCURACY else [_short(key)]
    header += [_short(k) for k in FINAL_METRICS] + ["tokens/s", "wall s"]
    rows = [header]
    if base:
        cells = ["base (before training)", "1" if base.get("status") == "ok" else base.get("status", "-")]
        metrics = base.get("metrics", {})
        for key in acc_keys:
            value = metrics.get(key)
            cells += [f"{value:.3f}" if isinstance(value, (int, float)) else "-"] + ([""] if key == ACCURACY else [])
        for key in FINAL_METRICS:
            value = metrics.get(key)
            cells.append(f"{value:.3f}" if isinstance(value, (int, float)) else "-")
        rows.append(cells + ["", ""])
    for name, row in variants.items():
        cells = [name, f"{row['ok']}/{row['runs']}"]
        for key in acc_keys:
            cells += [_pm(row["final"].get(key))] + ([_pm(row["best"].get(key))] if key == ACCURACY else [])
        cells += [_pm(row["final"].get(k)) for k in FINAL_METRICS]
        tps = row["tokens_per_second"]
        cells.append(f"{tps['mean']:,.0f}" if tps["mean"] is not None else "-")
        wall = row["wall_seconds"]
        cells.append(f"{wall['mean']:.0f}" if wall["mean"] is not None else "-")
        rows.append(cells)
    return rows


def format_table(compare: dict[str, Any]) -> str:
    """Aligned text table (mean ± sample std over seeds), then one line per failed run with its reason."""
    rows = table_rows(compare)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for name, row in compare["variants"].items():
        for seed, reason in row["failed"].items():
            lines.append(f"{'STOPPED' if reason.startswith('stopped by') else 'FAILED'} {name} seed {seed}: {reason}")
    base = compare.get("base") or {}
    if base and base.get("status") != "ok":
        lines.append(f"base model not evaluated: {base.get('reason', '')}")
    return "\n".join(lines + notes(compare))


def notes(compare: dict[str, Any]) -> list[str]:
    """The lines under the table: how the grid settings were chosen, and the paired verdicts."""
    lines = []
    if compare.get("grid"):
        lines.append(f"settings chosen per variant on {', '.join(compare.get('select_on', []))} (final accuracy, mean over seeds); "
                     "the whole grid is in compare.json and compare_grid.png")
    significance = compare.get("significance")
    if significance:
        lines.append(f"paired against {significance['baseline']} (difference [bootstrap 95% interval], exact McNemar p):")
        lines += [f"  {line}" for line in significance["lines"]] or ["  no paired generation files to compare"]
    return lines


def markdown_table(compare: dict[str, Any]) -> str:
    """The same table in Markdown (compare.md), failed runs listed below it."""
    rows = table_rows(compare)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(rows[0]))) + "|"]
    lines += ["| " + " | ".join(cell or " " for cell in row) + " |" for row in rows[1:]]
    for name, row in compare["variants"].items():
        lines += [f"\nFailed: {name} seed {seed}: {reason}" for seed, reason in row["failed"].items()]
    extra = notes(compare)
    if extra:
        lines += [""] + [f"- {line.strip()}" if line.startswith("  ") else line for line in extra]
    return "\n".join(lines) + "\n"
