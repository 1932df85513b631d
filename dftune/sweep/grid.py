"""Per-variant hyper-parameter grids, the choice of each variant's setting on validation prompts, and the
paired verdicts against a baseline.

    dft-compare ... --variants sft dft --grid learning_rate=1e-4,5e-4,2e-3 --select_on val.jsonl \
        --eval_generation_files test.jsonl --baseline sft

Every variant runs at every grid setting (several `--grid` multiply) and seed, in its own folder
(`dft@learning_rate=5e-4-seed0` as `dft_learning_rate_5e-4-seed0`). Each variant's setting is chosen on the
`--select_on` files alone (their mean final accuracy over seeds; the first setting in grid order on a tie),
never on the reported `--eval_generation_files`: a learning rate picked on the test prompts would flatter
whichever loss it was tuned for. The table then reports every variant at its chosen setting; compare.json
keeps the whole grid. Why per variant: DFT scales each token's gradient by its probability, so the learning
rate that suits it differs from SFT's, and one shared rate decides the comparison by itself.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Any

from dftune.sweep.significance import compare_runs, final_generations, verdict_line

SETTING_SEPARATOR = "@"


def parse_grids(specs: list[str] | None, error: type[Exception]) -> list[tuple[str, list[str]]]:
    """`learning_rate=1e-4,5e-4,2e-3` -> [("learning_rate", ["1e-4", "5e-4", "2e-3"])], one per --grid.

    Raises:
        error: a spec that is not FLAG=V1,V2,..., an empty or repeated value, or a flag given twice.
    """
    grids: list[tuple[str, list[str]]] = []
    for spec in specs or []:
        key, _, values = spec.partition("=")
        key = key.strip().lstrip("-")
        items = [v.strip() for v in values.split(",")]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or not values or "" in items:
            raise error(f"--grid {spec!r}: write FLAG=V1,V2,... with a train_dft.py flag, e.g. learning_rate=1e-4,5e-4,2e-3.")
        if len(set(items)) != len(items):
            raise error(f"--grid {spec!r}: a value is given twice.")
        if key in [k for k, _ in grids]:
            raise error(f"--grid {key}: given twice; put every value in one --grid {key}=V1,V2,...")
        grids.append((key, items))
    return grids


def grid_settings(grids: list[tuple[str, list[str]]]) -> list[tuple[tuple[str, str], ...]]:
    """Every combination of the grids' values, in grid order: ((flag, value), ...) each."""
    return [tuple(zip([k for k, _ in grids], values)) for values in itertools.product(*[v for _, v in grids])]


def setting_label(setting: tuple[tuple[str, str], ...]) -> str:
    return "+".join(f"{key}={value}" for key, value in setting)


def setting_flags(setting: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    return tuple(token for key, value in setting for token in (f"--{key}", value))


def score(row: dict[str, Any], keys: list[str]) -> float | None:
    """Mean over the selection files of the mean final accuracy over seeds (None when one is missing)."""
    values = [row["final"].get(key, {}).get("mean") for key in keys]
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def select(rows: dict[str, dict[str, Any]], variants: list, select_keys: list[str], report_keys: list[str]) -> dict[str, dict[str, Any]]:
    """Per arm (a variant before the grid): every setting's selection score and reported accuracies, and the
    setting chosen. `rows`: compare.json's aggregated rows of the expanded variants."""
    arms: dict[str, dict[str, Any]] = {}
    for variant in variants:
        row = rows.get(variant.name, {"final": {}})
        arm = arms.setdefault(variant.arm, {"grid": [], "selected": None})
        arm["grid"].append({
            "variant": variant.name, "setting": dict(variant.setting), "select_score": score(row, select_keys),
            "reported": {key: row["final"].get(key, {}).get("mean") for key in report_keys},
        })
    for arm in arms.values():
        scored = [entry for entry in arm["grid"] if entry["select_score"] is not None]
        if scored:
            best = max(scored, key=lambda entry: entry["select_score"])  # max keeps the first on a tie
            arm["selected"] = best["variant"]
            arm["setting"] = best["setting"]
    return arms


def significance(compare: dict[str, Any], baseline: str, runs: list[dict[str, Any]], excluded_files: set[str]) -> dict[str, Any]:
    """Each arm (at its chosen setting, when there is a grid) against `baseline`, per reported generation file:
    difference, paired bootstrap interval, exact McNemar p, verdict (dftune/sweep/significance.py)."""
    chosen = {name: (entry.get("selected") or name) for name, entry in compare.get("grid", {}).items()} or {name: name for name in compare["variants"]}
    seeds_of = {}
    for run in runs:
        if run["status"] == "ok" and (path := final_generations(run["output_dir"])):
            seeds_of.setdefault(run["variant"], {})[run["seed"]] = path
    base_runs = seeds_of.get(chosen.get(baseline, baseline), {})
    out: dict[str, Any] = {"baseline": baseline, "comparisons": {}, "lines": []}
    for arm, variant in chosen.items():
        if arm == baseline:
            continue
        results = {key: value for key, value in compare_runs(base_runs, seeds_of.get(variant, {})).items() if key not in excluded_files}
        out["comparisons"][arm] = results
        out["lines"] += [verdict_line(arm, baseline, key, result) for key, result in results.items()]
    return out


def file_keys(paths: list[str]) -> list[str]:
    """The names generation records and metrics give these files (dftune.eval.generation.metric_stems)."""
    from dftune.eval.generation import metric_stems

    return metric_stems(paths)


def accuracy_key(stem: str) -> str:
    return f"eval_gen_{stem}_accuracy"


def check_files(select_on: list[str], reported: list[str], error: type[Exception]) -> None:
    """--select_on files must exist and never be reported files (the choice must not see the test prompts)."""
    for path in select_on:
        if not os.path.isfile(path):
            raise error(f"--select_on {path}: no such file")
    same = sorted({os.path.abspath(p) for p in select_on} & {os.path.abspath(p) for p in reported})
    if same:
        raise error(f"--select_on {same[0]}: also among --eval_generation_files; the setting must be chosen on prompts "
                    "that are not reported (a validation split)")
