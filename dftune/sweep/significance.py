"""Is a variant's task accuracy really different from the baseline's? Paired tests on per-prompt correctness.

Every run of a sweep scores the same prompts (its final `generations/step-N.jsonl`), so a variant and the
baseline are compared prompt by prompt, which is far more sensitive than comparing two means over seeds:

- the accuracy difference: the mean over (prompt, seed, sample) of variant - baseline correctness;
- a paired bootstrap 95% interval: prompts resampled with replacement (a prompt keeps all its seeds and
  samples together), `BOOTSTRAP_RESAMPLES` times with a fixed seed, so the same files give the same interval;
- the exact McNemar p-value: the discordant pairs (baseline right and variant wrong, and the reverse) of
  every seed summed, two-sided binomial test at 1/2;
- a verdict: `better` / `worse` when the interval excludes 0 and p < 0.05, else `no clear difference`.

Seed s of the variant is paired with seed s of the baseline (same data order, same generation seed).
Pure functions over the generation files; no torch.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections import defaultdict

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
ALPHA = 0.05


def final_generations(run_dir: str) -> str | None:
    """The run's last generation file, generations/step-N.jsonl of the largest N (None when it has none)."""
    paths = glob.glob(os.path.join(run_dir, "generations", "step-*.jsonl"))
    steps = {int(m.group(1)): path for path in paths if (m := re.search(r"step-(\d+)\.jsonl$", path))}
    return steps[max(steps)] if steps else None


def read_correctness(path: str) -> dict[str, dict[tuple[str, int], bool]]:
    """{generation file key: {(prompt location, sample): correct}} of one generations file."""
    table: dict[str, dict[tuple[str, int], bool]] = defaultdict(dict)
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                table[record["file"]][(record["location"], int(record["sample"]))] = bool(record["correct"])
    return dict(table)


def mcnemar_exact_p(baseline_only: int, variant_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: 2 * P(X <= min) for X ~ Bin(n, 1/2), at most 1."""
    n = baseline_only + variant_only
    if n == 0:
        return 1.0
    k = min(baseline_only, variant_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def paired_bootstrap(differences: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile interval of the mean difference, prompts resampled with replacement.

    Args:
        differences: (prompts, pairs) variant - baseline correctness of each prompt's (seed, sample) pairs.
    """
    rng = np.random.default_rng(seed)
    per_prompt = differences.mean(axis=1)  # (prompts,): every prompt has the same number of pairs
    picks = rng.integers(0, len(per_prompt), size=(resamples, len(per_prompt)))  # (resamples, prompts)
    means = per_prompt[picks].mean(axis=1)
    low, high = np.percentile(means, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    return float(low), float(high)


def verdict(low: float, high: float, p: float) -> str:
    if p < ALPHA and low > 0:
        return "better"
    if p < ALPHA and high < 0:
        return "worse"
    return "no clear difference"


def compare_runs(baseline: dict[int, str], variant: dict[int, str]) -> dict[str, dict]:
    """Per generation file: the variant's seeds against the baseline's (paired by seed).

    Args:
        baseline, variant: {seed: generations file}; only seeds both have are paired.

    Returns:
        {file key: {"difference", "low", "high", "p_value", "verdict", "prompts", "pairs", "baseline_only",
        "variant_only"}}; a file is left out when the two runs do not share its prompts.
    """
    seeds = sorted(set(baseline) & set(variant))
    tables = [(read_correctness(baseline[s]), read_correctness(variant[s])) for s in seeds]
    results = {}
    files = set.intersection(*(set(b) & set(v) for b, v in tables)) if tables else set()
    for key in sorted(files):
        by_prompt: dict[str, list[float]] = defaultdict(list)
        baseline_only = variant_only = 0
        for b, v in tables:
            for (location, sample), base_correct in sorted(b[key].items()):
                var_correct = v[key].get((location, sample))
                if var_correct is None:
                    continue
                by_prompt[location].append(float(var_correct) - float(base_correct))
                baseline_only += base_correct and not var_correct
                variant_only += var_correct and not base_correct
        prompts = sorted(by_prompt)
        rows = [by_prompt[location] for location in prompts]
        if not rows or len({len(row) for row in rows}) != 1 or not rows[0]:
            continue  # prompts scored a different number of times: not a paired design
        differences = np.asarray(rows, dtype=np.float64)  # (prompts, seeds x samples)
        low, high = paired_bootstrap(differences)
        p = mcnemar_exact_p(baseline_only, variant_only)
        results[key] = {
            "difference": float(differences.mean()), "low": low, "high": high, "p_value": p, "verdict": verdict(low, high, p),
            "prompts": len(prompts), "pairs": int(differences.size), "baseline_only": baseline_only, "variant_only": variant_only,
        }
    return results


def verdict_line(variant: str, baseline: str, key: str, result: dict) -> str:
    """`dft vs sft on id: -0.111 [-0.160, -0.060], p = 0.001: worse (30 prompts x 3 pairs)`."""
    p = result["p_value"]
    shown = f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
    return (f"{variant} vs {baseline} on {key}: {result['difference']:+.3f} [{result['low']:+.3f}, {result['high']:+.3f}], "
            f"p = {shown}: {result['verdict']} ({result['prompts']} prompts x {result['pairs'] // max(result['prompts'], 1)} pairs)")
