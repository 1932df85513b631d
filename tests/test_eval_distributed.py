"""Distributed tier: generation evaluation with 2 CPU processes under DDP (torchrun) and ZeRO-3 (the
deepspeed launcher, gloo) against one process: every prompt scored once, the same outputs and accuracy.

7 prompts at 2 per generate() call: rank 0 gets 4 prompts (2 calls), rank 1 gets 3 (2 calls, the last
one short), so the gathering must drop nothing and count nothing twice; under ZeRO-3 an unequal number
of calls would hang, and every rank takes part in every forward (synced_gpus).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, SGD_ARGS, child_env, free_port, launch, write_small_data

pytestmark = pytest.mark.distributed
QUESTIONS = ROOT / "data" / "sample_eval" / "questions.jsonl"


def run_args(data_file: str, prompts: str, output_dir: Path) -> list[str]:
    return [
        "--model_name_or_path", str(ROOT / "assets" / "tiny-qwen2"), "--data_files", data_file,
        "--eval_data_files", data_file, "--output_dir", str(output_dir), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--logging_steps", "1",
        "--eval_strategy", "steps", "--eval_steps", "2", "--eval_on_start", "True", "--save_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "True", "--eval_generation_files", prompts,
        "--eval_answer_match", "contains", "--eval_generation_batch_size", "2", "--eval_generation_max_new_tokens", "12",
        *SGD_ARGS,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("eval_distributed")
    data_file = write_small_data(work, conversations=8)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(QUESTIONS.read_text(encoding="utf-8").splitlines(keepends=True)[8:15]), encoding="utf-8")
    import train_dft

    dirs = {name: work / name for name in ("one", "ddp", "zero3")}
    train_dft.main(run_args(data_file, str(prompts), dirs["one"]))
    launch("torchrun", run_args(data_file, str(prompts), dirs["ddp"]) + ["--use_cpu", "True"], work / "ddp.console")
    launch("deepspeed", run_args(data_file, str(prompts), dirs["zero3"]) + [
        "--deepspeed", str(ROOT / "ds_config" / "zero3.json"), "--use_cpu", "True"], work / "zero3.console")
    return dirs


def generations(run_dir: Path, step: int) -> list[dict]:
    lines = (run_dir / "generations" / f"step-{step}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def eval_logs(run_dir: Path) -> list[dict]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "eval_gen_accuracy" in e]


@pytest.mark.parametrize("name", ["ddp", "zero3"])
def test_two_processes_score_every_prompt_once_like_one_process(runs, name):
    for step in (0, 2):
        records = generations(runs[name], step)
        assert [r["index"] for r in records] == list(range(7)), f"{name} step {step}: prompts lost or doubled"
    # Step 0 is the same starting model everywhere: the same outputs, so the same metrics.
    assert [r["output"] for r in generations(runs[name], 0)] == [r["output"] for r in generations(runs["one"], 0)]
    one, many = eval_logs(runs["one"]), eval_logs(runs[name])
    assert [e["step"] for e in many] == [0, 2]
    for key in ("eval_gen_accuracy", "eval_gen_finished", "eval_gen_mean_tokens"):
        assert many[0][key] == one[0][key], f"{name}: {key} differs from one process"
    # After training (weights equal to rounding) the metrics still come from each run's own records.
    final = generations(runs[name], 2)
    assert many[1]["eval_gen_accuracy"] == pytest.approx(sum(r["correct"] for r in final) / 7)
    assert "eval_loss" in many[1]


def test_evaluate_py_under_torchrun_gives_one_process_metrics(tmp_path):
    """dft-eval launched on 2 processes scores every prompt and conversation once: the same
    generations and metrics as one process, results written once, both processes exiting 0."""
    data_file = write_small_data(tmp_path, conversations=8)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(QUESTIONS.read_text(encoding="utf-8").splitlines(keepends=True)[:7]), encoding="utf-8")
    flags = ["--model_name_or_path", str(ROOT / "assets" / "tiny-qwen2"), "--eval_generation_files", str(prompts),
             "--eval_data_files", data_file, "--per_device_eval_batch_size", "3", "--eval_generation_batch_size", "2",
             "--eval_generation_max_new_tokens", "12"]
    results = {}
    for procs in (1, 2):
        out = tmp_path / f"procs{procs}"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), "-m", "dftune.cli.evaluate", *flags, "--output_dir", str(out)]
        run = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        results[procs] = json.loads((out / "eval_results.json").read_text())["metrics"]
        records = generations(out, 0)
        assert [r["index"] for r in records] == list(range(7)), f"{procs} processes: prompts lost or doubled"
    one, two = results[1], results[2]
    for key in ("eval_gen_accuracy", "eval_gen_finished", "eval_gen_mean_tokens"):
        assert two[key] == one[key], key
    for key in ("eval_ce_loss", "eval_loss", "eval_avg_p_correct", "eval_token_accuracy"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    assert [r["output"] for r in generations(tmp_path / "procs2", 0)] == [r["output"] for r in generations(tmp_path / "procs1", 0)]
