"""Paired significance of a variant against the baseline (dftune/sweep/significance.py): the difference,
the paired bootstrap interval and the exact McNemar p-value equal an independent computation from the
generation files."""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from dftune.sweep.significance import compare_runs, final_generations, mcnemar_exact_p, verdict_line

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one


def write_generations(run_dir: Path, step: int, correct: dict[str, list[bool]]) -> str:
    """generations/step-N.jsonl as the evaluator writes it: one record per (prompt, sample)."""
    path = run_dir / "generations" / f"step-{step}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for index, (location, samples) in enumerate(correct.items()):
            for sample, ok in enumerate(samples):
                f.write(json.dumps({"index": index, "sample": sample, "file": "id", "location": location, "prompt": f"q{index}",
                                    "reference": "1", "output": "1" if ok else "2", "extracted": "1" if ok else "2", "correct": ok}) + "\n")
    return str(path)


def test_mcnemar_exact_p_by_hand():
    # 1 discordant pair one way, 9 the other: 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11/1024.
    assert mcnemar_exact_p(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact_p(9, 1) == mcnemar_exact_p(1, 9)
    assert mcnemar_exact_p(5, 5) == 1.0 and mcnemar_exact_p(0, 0) == 1.0


def test_difference_interval_and_p_equal_an_independent_computation(tmp_path):
    rng = random.Random(3)
    prompts = [f"test.jsonl:{i}" for i in range(1, 41)]
    baseline, variant, truth = {}, {}, {"base": {}, "var": {}}
    for seed in (0, 1, 2):
        base = {p: [rng.random() < 0.7] for p in prompts}
        var = {p: [rng.random() < 0.45] for p in prompts}
        truth["base"][seed], truth["var"][seed] = base, var
        write_generations(tmp_path / f"sft-seed{seed}", 2, {p: [False] for p in prompts})  # an earlier evaluation
        baseline[seed] = write_generations(tmp_path / f"sft-seed{seed}", 8, base)
        variant[seed] = write_generations(tmp_path / f"dft-seed{seed}", 8, var)
    assert final_generations(str(tmp_path / "sft-seed0")) == baseline[0]

    (key, result), = compare_runs(baseline, variant).items()
    assert key == "id" and result["prompts"] == 40 and result["pairs"] == 120

    # Independent: counts and the binomial tail in exact fractions.
    pairs = [(truth["base"][s][p][0], truth["var"][s][p][0]) for s in (0, 1, 2) for p in prompts]
    b_only = sum(b and not v for b, v in pairs)
    v_only = sum(v and not b for b, v in pairs)
    n, k = b_only + v_only, min(b_only, v_only)
    exact = min(Fraction(1), 2 * sum(Fraction(_comb(n, i), 2**n) for i in range(k + 1)))
    assert (result["baseline_only"], result["variant_only"]) == (b_only, v_only)
    assert result["p_value"] == pytest.approx(float(exact), rel=1e-12)
    assert result["difference"] == pytest.approx(sum(v - b for b, v in pairs) / len(pairs))

    # Independent bootstrap: a plain loop, another generator and 4x the resamples; Monte Carlo error ~0.005.
    per_prompt = [sum(truth["var"][s][p][0] - truth["base"][s][p][0] for s in (0, 1, 2)) / 3 for p in prompts]
    other = random.Random(12345)
    means = sorted(sum(per_prompt[other.randrange(40)] for _ in range(40)) / 40 for _ in range(40_000))
    assert result["low"] == pytest.approx(means[int(0.025 * 40_000)], abs=0.012)
    assert result["high"] == pytest.approx(means[int(0.975 * 40_000)], abs=0.012)
    assert result["verdict"] == "worse" and result["high"] < 0 < 0.05 - result["p_value"]
    again = compare_runs(baseline, variant)["id"]
    assert (again["low"], again["high"]) == (result["low"], result["high"])  # a fixed resampling seed
    line = verdict_line("dft", "sft", key, result)
    assert line.startswith(f"dft vs sft on id: {result['difference']:+.3f} [") and line.endswith("worse (40 prompts x 3 pairs)")


def test_identical_runs_make_no_claim(tmp_path):
    prompts = {f"t.jsonl:{i}": [i % 2 == 0, i % 3 == 0] for i in range(1, 21)}
    base = {0: write_generations(tmp_path / "a", 4, prompts)}
    var = {0: write_generations(tmp_path / "b", 4, prompts)}
    result = compare_runs(base, var)["id"]
    assert result["difference"] == 0 and result["p_value"] == 1.0 and result["verdict"] == "no clear difference"
    assert result["pairs"] == 40 and np.isclose(result["low"], 0) and np.isclose(result["high"], 0)


def _comb(n: int, k: int) -> int:
    out = 1
    for i in range(k):
        out = out * (n - i) // (i + 1)
    return out
