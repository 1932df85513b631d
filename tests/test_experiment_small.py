"""scripts/experiment_small.py: the task data keeps its held-out split honest, and the --smoke pipeline
(pre-train a base, evaluate it, fine-tune sft and dft, compare) runs end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from helpers import child_env, load_script

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
experiment_small = load_script("experiment_small")


def numbers_of(worked_answer: str) -> tuple[int, ...]:
    """'9 + 4 = 13. 13 - 5 = 8. The answer is 8.' -> (9, 4, -5)."""
    steps = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", worked_answer)
    return (int(steps[0][0]), *[int(b) if op == "+" else -int(b) for _, op, b, _ in steps])


def test_task_is_deterministic_and_id_problems_are_held_out():
    preset = experiment_small.FULL
    splits = experiment_small.build_task(preset, data_seed=0)
    assert splits == experiment_small.build_task(preset, data_seed=0)
    assert {name: len(records) for name, records in splits.items()} == {
        "pretrain": preset.pretrain_examples, "train": preset.train_examples, "eval_conversations": preset.eval_examples,
        "id": preset.eval_examples, "bignum": preset.eval_examples, "3step": preset.eval_examples, "retention": preset.eval_examples,
    }
    trained = {numbers_of(r["messages"][-1]["content"]) for r in splits["train"] + splits["pretrain"]}
    held = [numbers_of(r["messages"][-1]["content"]) for r in splits["eval_conversations"]]
    assert all(len(n) == 3 for n in held) and not trained & set(held)
    for conversation, record in zip(splits["eval_conversations"], splits["id"]):
        assert conversation["messages"][:1] == record["messages"]
        assert conversation["messages"][1]["content"].endswith(f"The answer is {record['answer']}.")
    for record in splits["train"] + splits["pretrain"]:
        numbers = numbers_of(record["messages"][-1]["content"])
        running = [sum(numbers[: i + 1]) for i in range(len(numbers))]
        assert all(0 <= value <= experiment_small.FACT_LIMIT for value in running)
    assert all(max(abs(m) for m in numbers_of(r["messages"][1]["content"])[1:]) <= experiment_small.TRAIN_AMOUNT for r in splits["train"])


@pytest.mark.integration
def test_smoke_experiment_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "smoke"
    completed = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "experiment_small.sh"), "--smoke", "--output_dir", str(out)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    compare = json.loads((out / "compare.json").read_text())
    assert compare["base"]["status"] == "ok", compare["base"]
    assert set(compare["base"]["metrics"]) >= {"eval_gen_accuracy", "eval_gen_retention_accuracy"}
    for variant in ("sft", "dft"):
        row = compare["variants"][variant]
        assert (row["runs"], row["ok"]) == (1, 1)
        assert {"eval_gen_accuracy", "eval_gen_id_accuracy", "eval_gen_bignum_accuracy", "eval_gen_3step_accuracy",
                "eval_gen_retention_accuracy", "eval_ce_loss", "eval_gen_finished"} <= set(row["final"])
        # Evaluated at step 0 (--eval_on_start) and at the end.
        assert compare["curves"][variant]["eval_gen_accuracy"]["step"] == [0, experiment_small.SMOKE.max_steps]
        assert (out / f"{variant}-seed0" / "generations").is_dir()
    # The base row (dft-eval) and step 0 of a run (--eval_on_start) score the same model the same way.
    step0 = json.loads((out / "sft-seed0" / "trainer_state.json").read_text())["log_history"]
    step0 = next(entry for entry in step0 if entry.get("step") == 0 and "eval_ce_loss" in entry)
    for key in ("eval_ce_loss", "eval_gen_accuracy", "eval_gen_finished"):
        assert compare["base"]["metrics"][key] == pytest.approx(step0[key], rel=1e-5)
    assert os.path.getsize(out / "compare.png") > 20_000
    assert "base (before training)" in completed.stdout and "final acc" in completed.stdout

    # Run again, the task data is written again (same content): the runs are reused. With another budget
    # they are not: the old table used to come back as the new one.
    command = ["bash", os.path.join(ROOT, "scripts", "experiment_small.sh"), "--smoke", "--output_dir", str(out)]
    again = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "sft-seed0: finished before, not redone" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
    changed = subprocess.run([*command, "--max_steps", "4"], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
    assert changed.returncode == 2, changed.stdout[-3000:] + changed.stderr[-3000:]
    assert changed.stderr.strip().splitlines()[-1] == (
        f"error: --output_dir {out}: run sft-seed0 was made with --max_steps 3, now 4 (1 more differs too); "
        "use a new --output_dir, or --overwrite to redo the changed runs."
    )


def test_validation_split_is_held_out_and_never_an_id_prompt():
    prior = load_script("experiment_prior")
    splits = experiment_small.build_task(experiment_small.FULL, data_seed=0)
    val = prior.validation_split(splits, 48, data_seed=0)
    assert len(val) == 48 and val == prior.validation_split(splits, 48, data_seed=0)
    id_prompts = {json.dumps(r["messages"]) for r in splits["id"]}
    trained = {r["messages"][0]["content"] for r in splits["train"]}
    for record in val:
        assert json.dumps(record["messages"]) not in id_prompts and record["messages"][0]["content"] not in trained
        assert experiment_small.held_out(question_numbers(record["messages"][0]["content"]))


def question_numbers(question: str) -> tuple[int, ...]:
    """'Hugo has 9 books. Hugo buys 2 more. Then Hugo sells 3. ...' -> (9, 2, -3)."""
    start = int(re.search(r"has (\d+)", question).group(1))
    moves = [int(n) if verb in ("buys", "finds", "gets") else -int(n)
             for verb, n in re.findall(r"(buys|finds|gets|gives|loses|sells) (\d+)", question)]
    return (start, *moves)


@pytest.mark.integration
def test_smoke_prior_experiment_chooses_rates_on_validation_and_compares_to_sft(tmp_path):
    """scripts/experiment_prior.py --smoke: two bases, a 2-rate grid, the choice on `val`, verdicts against SFT."""
    out = tmp_path / "prior"
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "experiment_prior.py"), "--smoke", "--output_dir", str(out)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads((out / "prior.json").read_text())
    assert sorted(summary["bases"], key=int) == ["5", "10"]
    for entry in summary["bases"].values():
        assert set(entry["chosen"]) == {"sft", "dft"} and set(entry["verdicts"]["dft"]) == {"id", "bignum", "3step", "retention"}
        assert "val" not in entry["verdicts"]["dft"]  # the validation split chose the rates: it is not reported
    assert (out / "prior.png").is_file() and (out / "base5" / "compare_grid.png").is_file()
    assert "dft vs sft on id:" in (out / "prior.md").read_text()
