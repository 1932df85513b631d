"""dft-compare --grid / --select_on / --baseline: every variant at every setting, each variant's setting chosen
on the validation files only, the table at the chosen settings, the whole grid in compare.json, paired
verdicts against the baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import dftune.cli.compare as compare_cli
from dftune.sweep.compare import SweepError, Variant, expand_grid
from dftune.sweep.grid import parse_grids, select

from helpers import ROOT, SAMPLE_FILES, TINY_MODEL, child_env

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one


def row(**accuracies: float) -> dict:
    return {"final": {key: {"mean": value, "std": 0.0, "n": 3} for key, value in accuracies.items()}}


def test_the_setting_is_chosen_on_the_validation_file_even_when_the_reported_file_disagrees():
    variants = expand_grid([Variant("dft", ("--loss_type", "dft"))], parse_grids(["learning_rate=1e-4,5e-4,2e-3"], SweepError))
    assert [v.name for v in variants] == ["dft@learning_rate=1e-4", "dft@learning_rate=5e-4", "dft@learning_rate=2e-3"]
    assert variants[1].flags == ("--loss_type", "dft", "--learning_rate", "5e-4") and variants[1].arm == "dft"
    val, test = "eval_gen_val_accuracy", "eval_gen_test_accuracy"
    rows = {
        "dft@learning_rate=1e-4": row(eval_gen_val_accuracy=0.40, eval_gen_test_accuracy=0.90),  # best on the reported file
        "dft@learning_rate=5e-4": row(eval_gen_val_accuracy=0.70, eval_gen_test_accuracy=0.50),  # best on validation
        "dft@learning_rate=2e-3": row(eval_gen_val_accuracy=0.70, eval_gen_test_accuracy=0.60),  # a tie: the first wins
    }
    (arm,) = select(rows, variants, [val], [test]).values()
    assert arm["selected"] == "dft@learning_rate=5e-4" and arm["setting"] == {"learning_rate": "5e-4"}
    assert [entry["select_score"] for entry in arm["grid"]] == [0.40, 0.70, 0.70]
    assert arm["grid"][0]["reported"] == {test: 0.90}


def test_grids_multiply_and_bad_grids_are_one_line(tmp_path):
    grids = parse_grids(["learning_rate=1e-4,5e-4", "dft_min_weight=0,0.1"], SweepError)
    assert len(expand_grid([Variant("sft", ("--loss_type", "sft")), Variant("dft", ())], grids)) == 8
    for bad, message in [("learning_rate", "write FLAG=V1,V2"), ("learning_rate=1e-4,,2e-3", "write FLAG=V1,V2"),
                         ("learning_rate=1e-4,1e-4", "a value is given twice")]:
        with pytest.raises(SweepError, match=message):
            parse_grids([bad], SweepError)
    test = tmp_path / "test.jsonl"
    test.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    base = ["--model_name_or_path", str(TINY_MODEL), "--output_dir", str(tmp_path / "s"), "--variants", "sft", "dft",
            "--eval_generation_files", str(test)]
    with pytest.raises(SweepError, match="--grid needs --select_on"):
        compare_cli.parse([*base, "--grid", "learning_rate=1e-4,5e-4"])
    with pytest.raises(SweepError, match="also among --eval_generation_files"):
        compare_cli.parse([*base, "--grid", "learning_rate=1e-4,5e-4", "--select_on", str(test)])
    with pytest.raises(SweepError, match="--baseline asft: not one of --variants"):
        compare_cli.parse([*base, "--baseline", "asft"])
    val = tmp_path / "val.jsonl"
    val.write_text('{"prompt": "2+2?", "answer": "4"}\n')
    with pytest.raises(SweepError, match="would share a run folder"):
        compare_cli.parse([*base, "--grid", "eval_answer_match=regex:a+b,regex:a b", "--select_on", str(val)])
    val.write_text('{"prompt": "2+2?", "answer": "4"}\n')
    config = compare_cli.parse([*base, "--grid", "learning_rate=1e-4,5e-4", "--select_on", str(val), "--max_steps", "2"])
    assert [v.name for v in config.variants] == ["sft@learning_rate=1e-4", "sft@learning_rate=5e-4", "dft@learning_rate=1e-4",
                                                 "dft@learning_rate=5e-4"]
    generation_files = config.train_flags[config.train_flags.index("--eval_generation_files") + 1:][:2]
    assert generation_files == [str(test), str(val)]  # every run also scores the validation file


@pytest.mark.integration
def test_a_grid_sweep_reports_each_variant_at_its_validation_choice_with_verdicts(tmp_path):
    questions = [json.loads(line) for line in (ROOT / "data" / "sample_eval" / "questions.jsonl").read_text().splitlines()]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions[:6]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions[6:12]))
    (tmp_path / "data.jsonl").write_text("".join(Path(SAMPLE_FILES[0]).read_text().splitlines(keepends=True)[:16]))

    def sweep(grid: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dftune.cli.compare", "--model_name_or_path", str(TINY_MODEL), "--output_dir", "sw",
             "--variants", "sft", "dft", "--seeds", "1", "--parallel", "2", "--no_base_eval", "--data_files", "data.jsonl",
             "--max_steps", "2", "--per_device_train_batch_size", "2", "--eval_generation_files", "test.jsonl",
             "--eval_answer_match", "contains", "--eval_generation_max_new_tokens", "8", "--grid", grid,
             "--select_on", "val.jsonl", "--baseline", "sft"],
            cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=600)

    first = sweep("learning_rate=1e-3,3e-2")
    assert first.returncode == 0, first.stderr[-3000:] + first.stdout[-2000:]
    compare = json.loads((tmp_path / "sw" / "compare.json").read_text())
    assert set(compare["grid_variants"]) == {f"{v}@learning_rate={lr}" for v in ("sft", "dft") for lr in ("1e-3", "3e-2")}
    for arm, entry in compare["grid"].items():
        best = max(entry["grid"], key=lambda e: e["select_score"])
        assert entry["selected"] == best["variant"] and f"{arm} (learning_rate={entry['setting']['learning_rate']})" in compare["variants"]
    assert compare["select_keys"] == ["eval_gen_val_accuracy"]
    assert "acc[val]" not in first.stdout and "acc[test]" in first.stdout  # the validation file chose, it is not reported
    (line,) = compare["significance"]["lines"]
    assert line.startswith("dft vs sft on test: ") and "p = " in line and line in first.stdout
    assert (tmp_path / "sw" / "compare_grid.png").is_file() and "dft vs sft on test" in (tmp_path / "sw" / "compare.md").read_text()

    # A changed grid value is a new run: never the old value's run reused under the new setting.
    second = sweep("learning_rate=1e-3,1e-2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("finished before, not redone") == 2  # the 1e-3 runs
    compare = json.loads((tmp_path / "sw" / "compare.json").read_text())
    assert {e["setting"]["learning_rate"] for e in compare["grid"]["dft"]["grid"]} == {"1e-3", "1e-2"}
