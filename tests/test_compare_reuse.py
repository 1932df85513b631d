"""dft-compare reuses a finished or interrupted run only when the command would make the same run: the
same model, data, training flags and loss defaults. A rerun with other flags or changed data used to print
"finished before, not redone" and the old table (or resume the old run); now it stops with one line naming
what changed, and --overwrite redoes the changed runs."""

from __future__ import annotations

import json
import os

import pytest

import dftune.cli.compare as compare_cli
import dftune.sweep.compare as sweep_compare
from dftune.sweep.compare import SweepError
from dftune.sweep.definition import DEFINITION_FILE, changes, run_definition, write_definition

from helpers import write_small_data

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one


# ---- unit: what counts as a change ---------------------------------------------------------------------------
def test_changes_name_each_flag_file_and_loss_default_that_differs(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": []}\n')
    before = run_definition(["--model_name_or_path", "m", "--data_files", str(data), "--max_steps", "2", "--bf16", "True",
                             "--loss_type", "asft", "--seed", "0", "--output_dir", "a", "--run_name", "x"])
    write_definition(str(tmp_path / "run"), before)
    recorded = json.loads((tmp_path / "run" / DEFINITION_FILE).read_text())
    assert "--output_dir" not in recorded["flags"] and "--run_name" not in recorded["flags"]  # where it is, not what it is
    assert recorded["loss_defaults"]["anchor_kl_coef"] == 0.1  # asft's default, relied on by this run
    same = run_definition(["--model_name_or_path", "m", "--data_files", str(data), "--max_steps=2", "--bf16", "True",
                           "--loss_type", "asft", "--seed", "0", "--output_dir", "b", "--resume_from_checkpoint", "latest"])
    assert changes(recorded, same) == []
    os.utime(data, ns=(1, 1))  # rewritten with the same content (experiment_small.py writes its data every time)
    assert changes(recorded, run_definition(["--model_name_or_path", "m", "--data_files", str(data), "--max_steps", "2",
                                             "--bf16", "True", "--loss_type", "asft", "--seed", "0"])) == []
    data.write_text('{"messages": [1]}\n')
    now = run_definition(["--model_name_or_path", "m", "--data_files", str(data), "--max_steps", "4", "--learning_rate", "1e-4",
                          "--loss_type", "asft", "--seed", "0"])
    assert changes(recorded, now) == [
        "--max_steps 2, now 4", "--bf16 True, now without it", "no --learning_rate, now --learning_rate 1e-4",
        f"{data} as it was then (changed since)",
    ]
    recorded["loss_defaults"]["anchor_kl_coef"] = 0.05  # as if the code's default had been another one then
    assert changes(recorded, now)[-1] == "the code's default --anchor_kl_coef 0.05, now 0.1"


def test_a_changed_base_evaluation_is_refused_and_overwrite_removes_it(tmp_path):
    """The base row (OUTPUT_DIR/base/, dft-eval) is reused on the same terms as a run."""
    config = compare_cli.parse(["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--variants", "sft",
                                "--eval_data_files", "dev.jsonl", "--max_length", "128"])
    base = tmp_path / "base"
    write_definition(str(base), run_definition(sweep_compare.base_flags(config)))
    (base / "eval_results.json").write_text('{"metrics": {"eval_ce_loss": 1.0}}')
    sweep_compare.check_reuse(config, [], print)  # the same evaluation: kept
    config = compare_cli.parse(["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--variants", "sft",
                                "--eval_data_files", "dev.jsonl", "--max_length", "256"])
    with pytest.raises(SweepError) as refused:
        sweep_compare.check_reuse(config, [], print)
    assert str(refused.value) == (f"--output_dir {tmp_path}: the base model's evaluation (base/) was made with --max_length 128, "
                                  "now 256; use a new --output_dir, or --overwrite to redo the changed runs.")
    config.overwrite = True
    sweep_compare.check_reuse(config, [], print)
    assert not base.exists()  # evaluated again by the sweep


def test_overwrite_from_the_command_line_and_the_sweep_file(tmp_path):
    argv = ["--model_name_or_path", "m", "--output_dir", "o", "--variants", "sft"]
    assert compare_cli.parse(argv).overwrite is False
    assert compare_cli.parse([*argv, "--overwrite"]).overwrite is True
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("model_name_or_path: m\noutput_dir: o\nvariants: [sft]\noverwrite: true\ntrain_args:\n  max_steps: 3\n")
    config = compare_cli.parse([str(sweep)])
    assert config.overwrite is True and config.train_flags == ["--max_steps", "3"]


# ---- integration: real runs ------------------------------------------------------------------------------------
@pytest.mark.integration
def test_rerun_with_other_flags_or_data_is_refused_and_overwrite_redoes_the_run(tmp_path, tiny_model_dir, capsys):
    data = write_small_data(tmp_path, 16)
    out = tmp_path / "sweep"
    run = out / "sft-seed0"

    def argv(max_steps: int, *extra: str) -> list[str]:
        return [
            "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), "--variants", "sft", "--seeds", "1",
            "--no_base_eval", "--data_files", data, "--max_steps", str(max_steps), "--per_device_train_batch_size", "4",
            "--max_length", "64", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
            "--report_to", "none", "--disable_tqdm", "True", "--data_cache_dir", "none", *extra,
        ]

    def refused(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as exit_info:
            compare_cli.main(argv)
        assert exit_info.value.code == 2
        captured = capsys.readouterr()
        assert "sft-seed0: " not in captured.out  # refused before any launch
        return captured.err.strip()

    compare_cli.main(argv(2))
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 2
    finished_at = (run / "run_summary.json").stat().st_mtime_ns
    capsys.readouterr()

    compare_cli.main(argv(2))  # the same command: the finished run is reused
    assert "[1/1] sft-seed0: finished before, not redone" in capsys.readouterr().out

    remedy = "use a new --output_dir, or --overwrite to redo the changed runs."
    assert refused(argv(3)) == f"error: --output_dir {out}: run sft-seed0 was made with --max_steps 2, now 3; {remedy}"
    assert refused(argv(2, "--learning_rate", "1e-3")) == (
        f"error: --output_dir {out}: run sft-seed0 was made with no --learning_rate, now --learning_rate 1e-3; {remedy}"
    )
    with open(data, "a", encoding="utf-8") as f:  # the data edited in place
        f.write(open(data, encoding="utf-8").readline())
    assert refused(argv(2)) == f"error: --output_dir {out}: run sft-seed0 was made with {data} as it was then (changed since); {remedy}"
    assert (run / "run_summary.json").stat().st_mtime_ns == finished_at

    # An interrupted run (checkpoints, no run_summary.json) of other flags is not resumed either.
    (run / "run_summary.json").unlink()
    assert refused(argv(3)).startswith(f"error: --output_dir {out}: run sft-seed0 was made with --max_steps 2, now 3; ")

    compare_cli.main(argv(3, "--overwrite"))
    output = capsys.readouterr().out
    assert "sft-seed0: made with --max_steps 2, now 3" in output and "--resume_from_checkpoint" not in output
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3]  # a new run, not a resumed one
    assert json.loads((run / DEFINITION_FILE).read_text())["flags"]["--max_steps"] == ["3"]
    compare_cli.main(argv(3))  # and it is reused by the same command
    assert "[1/1] sft-seed0: finished before, not redone" in capsys.readouterr().out
