"""scripts/bench_sp.py: one tiny length, S=1 and S=2 under the deepspeed launcher on 2 CPU processes; every rank
reports its own memory, and S=2's ranks are seen to receive half of each sequence."""

from __future__ import annotations

import pytest

from helpers import TINY_MODEL, load_script

pytestmark = pytest.mark.distributed

bench_sp = load_script("bench_sp")


def test_bench_sp_reports_both_sizes_per_rank(tmp_path):
    length = 256
    report = bench_sp.main([
        "--seq_lengths", str(length), "--steps", "1", "--model", str(TINY_MODEL), "--device", "cpu",
        "--work_dir", str(tmp_path), "--timeout", "300",
    ])
    assert report["procs"] == 2 and report["model"]["hidden_size"] == 64
    (entry,) = report["results"]
    assert entry["seq_length"] == length
    assert length - 16 <= entry["tokens"]["min"] <= entry["tokens"]["max"] <= length  # synthetic data of ~L tokens
    assert set(entry["runs"]) == {"1", "2"}
    for size, run in entry["runs"].items():
        assert run["ok"], f"S={size} failed: {run.get('error')}\n" + "\n".join(run.get("output_tail", []))
        assert [r["rank"] for r in run["per_rank"]] == [0, 1]
        for rank in run["per_rank"]:
            assert rank["peak_mib"] > 0 and rank["before_train_mib"] > 0 and rank["growth_mib"] > 0, rank
            assert rank["steps"] == 1 and rank["step_s"] > 0
        assert run["peak_mib"] == max(r["peak_mib"] for r in run["per_rank"])
    whole, split = entry["runs"]["1"], entry["runs"]["2"]
    # S=1: each rank's forward sees the whole conversation; S=2: half of it (padded to a multiple of 2).
    assert entry["tokens"]["min"] <= whole["tokens_per_forward"] <= entry["tokens"]["max"]
    assert entry["tokens"]["min"] <= 2 * split["tokens_per_forward"] <= entry["tokens"]["max"] + 1
    assert whole["sequences_per_step"] == 2 and split["sequences_per_step"] == 1
    # What autograd keeps for backward (counted tensor by tensor, no allocator noise) halves with the sequence.
    assert 0 < split["saved_activations_mib"] <= 0.6 * whole["saved_activations_mib"], (split, whole)
    assert entry["peak_ratio_s2_s1"] > 0 and entry["growth_ratio_s2_s1"] > 0
