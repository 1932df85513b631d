"""dft-compare and sweep/compare.py: variants -> flags, the table's mean/std against a hand
computation, a real sweep on the tiny model where one variant fails and the other still runs, and a
second invocation that resumes (the finished run is not redone)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

import dftune.cli.compare as compare_cli
import dftune.sweep.compare as eval_compare
import dftune.sweep.results as eval_compare_results
from dftune.sweep.compare import SweepError, Variant, exit_reason, parse_variant
from dftune.sweep.results import RunResult, aggregate, mean_std, metrics_from_history

from helpers import child_env, write_small_data

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- unit --------------------------------------------------------------------------------------------------
def test_variant_names_map_to_train_flags():
    assert parse_variant("sft").flags == ("--loss_type", "sft")
    assert parse_variant("asft").flags == ("--loss_type", "asft")
    assert parse_variant("dft_alpha=0.5").flags == ("--dft_alpha", "0.5")
    assert parse_variant("asft+anchor_kl_coef=0.05").flags == ("--loss_type", "asft", "--anchor_kl_coef", "0.05")
    assert parse_variant("dft_alpha=0.5").slug == "dft_alpha_0.5"
    for bad in ("sgd", "dft+", "alpha=", "=3"):
        with pytest.raises(SweepError, match="--variants"):
            parse_variant(bad)
    with pytest.raises(SweepError, match="given twice"):
        eval_compare.parse_variants(["sft", "sft"])


def test_mean_and_sample_std_against_hand_computation():
    stats = mean_std([0.5, 0.7, 0.6])
    assert stats["n"] == 3
    assert stats["mean"] == pytest.approx(0.6)
    assert stats["std"] == pytest.approx(0.1)  # sqrt((0.01 + 0.01 + 0) / 2)
    assert mean_std([0.25]) == {"mean": 0.25, "std": 0.0, "n": 1}
    assert mean_std([None, float("nan")])["mean"] is None


def test_final_and_best_from_a_log_history():
    history = [
        {"loss": 1.0, "step": 5},
        {"eval_gen_accuracy": 0.2, "eval_gen_id_accuracy": 0.3, "eval_ce_loss": 2.0, "step": 0},
        {"eval_gen_accuracy": 0.6, "eval_gen_id_accuracy": 0.7, "eval_ce_loss": 1.5, "step": 10},
        {"eval_gen_accuracy": 0.4, "eval_gen_id_accuracy": 0.5, "eval_ce_loss": 1.7, "step": 20},
    ]
    final, best, curves = metrics_from_history(history)
    assert final == {"eval_gen_accuracy": 0.4, "eval_gen_id_accuracy": 0.5, "eval_ce_loss": 1.7}
    assert best == {"eval_gen_accuracy": 0.6, "eval_gen_id_accuracy": 0.7, "eval_ce_loss": 1.5}  # loss: lowest
    assert curves["eval_gen_accuracy"] == [[0, 0.2], [10, 0.6], [20, 0.4]]


def _result(variant, seed, final_acc, best_acc, ce, tps, wall, status="ok", reason=""):
    return RunResult(
        variant, seed, f"/runs/{variant}-{seed}", status, reason,
        final={"eval_gen_accuracy": final_acc, "eval_ce_loss": ce}, best={"eval_gen_accuracy": best_acc, "eval_ce_loss": ce},
        tokens_per_second=tps, wall_seconds=wall,
    )


def test_table_means_and_stds_against_hand_computation():
    results = [
        _result("sft", 0, 0.50, 0.55, 1.0, 1000, 60),
        _result("sft", 1, 0.70, 0.75, 1.2, 1100, 62),
        _result("sft", 2, 0.60, 0.80, 1.1, 1200, 64),
        _result("dft", 0, 0.40, 0.40, 1.4, 900, 70),
        _result("dft", 1, 0.0, 0.0, 0.0, None, 3, status="failed", reason="exit 2: error: --foo"),
    ]
    table = aggregate(results, ["sft", "dft"])
    sft = table["sft"]
    assert (sft["runs"], sft["ok"]) == (3, 3)
    assert sft["final"]["eval_gen_accuracy"]["mean"] == pytest.approx(0.6)
    assert sft["final"]["eval_gen_accuracy"]["std"] == pytest.approx(0.1)
    assert sft["best"]["eval_gen_accuracy"]["mean"] == pytest.approx(0.7)
    # best: 0.55, 0.75, 0.80 -> mean 0.7, deviations -0.15, 0.05, 0.10 -> sqrt(0.035 / 2)
    assert sft["best"]["eval_gen_accuracy"]["std"] == pytest.approx(math.sqrt(0.035 / 2))
    assert sft["final"]["eval_ce_loss"]["mean"] == pytest.approx(1.1)
    assert sft["tokens_per_second"]["mean"] == pytest.approx(1100)
    assert sft["wall_seconds"]["std"] == pytest.approx(2.0)
    dft = table["dft"]  # the failed seed counts as a run but not in the statistics
    assert (dft["runs"], dft["ok"], dft["failed"]) == (2, 1, {"1": "exit 2: error: --foo"})
    assert dft["final"]["eval_gen_accuracy"] == {"mean": 0.4, "std": 0.0, "n": 1}
    text = eval_compare_results.format_table({"variants": table, "base": {"status": "ok", "metrics": {"eval_gen_accuracy": 0.1}}})
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["variant", "runs", "final", "acc"]
    assert "base (before training)" in lines[2] and "0.100" in lines[2]
    assert "0.600 ± 0.100" in lines[3] and "0.700 ± 0.132" in lines[3]
    assert lines[-1] == "FAILED dft seed 1: exit 2: error: --foo"


def test_exit_reason_names_the_error_line():
    assert exit_reason(2, "loading\nerror: --dft_alpha must be in [0, 1]\n") == "exit 2: error: --dft_alpha must be in [0, 1]"
    log = "Traceback (most recent call last):\n  File x\ntorch.OutOfMemoryError: CUDA out of memory\nsome cleanup line\n"
    assert exit_reason(1, log) == "exit 1: torch.OutOfMemoryError: CUDA out of memory"
    assert exit_reason(-9, "") == "killed by signal 9: no output"


def test_cli_options_and_yaml_file(tmp_path):
    config = compare_cli.parse([
        "--model_name_or_path", "m", "--output_dir", str(tmp_path), "--variants", "sft", "dft_alpha=0.5", "--seeds", "2",
        "--data_files", "a.jsonl", "b.jsonl", "--eval_generation_files", "g.jsonl", "--max_steps", "10",
    ])
    assert config.seeds == [0, 1]
    assert [v.name for v in config.variants] == ["sft", "dft_alpha=0.5"]
    assert config.train_flags == ["--data_files", "a.jsonl", "b.jsonl", "--eval_generation_files", "g.jsonl", "--max_steps", "10"]
    assert config.base_eval_flags == ["--eval_generation_files", "g.jsonl"]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "model_name_or_path: m\noutput_dir: out\nvariants: [sft, dft]\nseed_list: [3, 5]\nlauncher: train.sh\n"
        "train_args:\n  data_files: [a.jsonl]\n  max_steps: 10\n  bf16: true\n"
    )
    config = compare_cli.parse([str(sweep)])
    assert (config.seeds, config.launcher, config.output_dir) == ([3, 5], "train.sh", "out")
    assert config.train_flags == ["--data_files", "a.jsonl", "--max_steps", "10", "--bf16", "True"]
    assert config.base_eval_flags is None  # nothing to evaluate the base model on
    with pytest.raises(SweepError, match="--seed is set by the sweep"):
        compare_cli.parse(["--model_name_or_path", "m", "--output_dir", "o", "--variants", "sft", "--seed", "1"])


def test_run_commands_for_each_launcher(tmp_path):
    spec = eval_compare.RunSpec(Variant("dft_alpha=0.5", ("--dft_alpha", "0.5")), 1, str(tmp_path / "run"))
    command, env = eval_compare.run_command(spec, ["--max_steps", "5"], "python", "m")
    assert command[1].endswith("train_dft.py") and env == {}
    assert command[2:] == ["--model_name_or_path", "m", "--max_steps", "5", "--dft_alpha", "0.5", "--seed", "1",
                           "--output_dir", spec.output_dir, "--run_name", "dft_alpha_0.5-seed1"]
    command, env = eval_compare.run_command(spec, [], "train.sh", "m")
    assert command[:2] == ["bash", os.path.join(ROOT, "scripts", "train.sh")] and env["OUTPUT_DIR"] == spec.output_dir
    (tmp_path / "run" / "checkpoint-4").mkdir(parents=True)  # a run stopped after a checkpoint continues from it
    command, _ = eval_compare.run_command(spec, [], "torchrun --nproc_per_node 2", "m")
    assert command[:3] == ["torchrun", "--nproc_per_node", "2"] and command[-2:] == ["--resume_from_checkpoint", "latest"]
    # The deepspeed runner's port is always 29500 unless given: runs at once (--parallel) would collide.
    command, _ = eval_compare.run_command(spec, [], "deepspeed --num_gpus 2", "m")
    assert command[:4] == ["deepspeed", "--num_gpus", "2", "--master_port"] and int(command[4]) != 29500
    command, _ = eval_compare.run_command(spec, [], "deepspeed --num_gpus 2 --master_port 29600", "m")
    assert command.count("--master_port") == 1 and command[4] == "29600"


# ---- integration: real runs ---------------------------------------------------------------------------------
@pytest.mark.integration
def test_sweep_failed_variant_reported_others_finish_and_resume_skips_finished(tmp_path, tiny_model_dir):
    data = write_small_data(tmp_path, 24)
    out = tmp_path / "sweep"
    argv = [
        "--model_name_or_path", tiny_model_dir, "--output_dir", str(out),
        # The bad variant comes first: the good one must still run after it.
        "--variants", "dft_alpha=7", "dft_alpha=0", "--seeds", "1",
        "--data_files", data, "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "128",
        "--logging_steps", "1", "--validation_split_percentage", "20", "--eval_strategy", "steps", "--eval_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True", "--data_cache_dir", "none",
        "--no_base_eval", "--parallel", "2",
    ]
    first = subprocess.run([sys.executable, "-m", "dftune.cli.compare", *argv], cwd=ROOT,
                           env=child_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "FAILED dft_alpha=7 seed 0: exit 2: error: --dft_alpha must be in [0, 1]" in first.stdout
    summary = out / "dft_alpha_0-seed0" / "run_summary.json"
    assert summary.is_file()
    record = json.loads((out / "compare.json").read_text())
    assert record["variants"]["dft_alpha=0"]["ok"] == 1
    assert record["variants"]["dft_alpha=7"]["failed"]["0"].startswith("exit 2: error: --dft_alpha")
    assert record["variants"]["dft_alpha=0"]["final"]["eval_ce_loss"]["n"] == 1
    assert os.path.getsize(out / "compare.png") > 20_000
    finished_at = summary.stat().st_mtime_ns

    lines: list[str] = []
    config = compare_cli.parse(argv)
    again = eval_compare.run_sweep(config, log=lines.append)
    assert "[2/2] dft_alpha_0-seed0: finished before, not redone" in lines
    assert any(line.startswith("[1/2] dft_alpha_7-seed0: FAILED") for line in lines)  # failed runs are retried
    assert summary.stat().st_mtime_ns == finished_at
    assert again["variants"]["dft_alpha=0"]["final"] == record["variants"]["dft_alpha=0"]["final"]


def test_train_sh_launch_of_an_sft_variant_parses(tmp_path):
    """train.sh used to add --dft_alpha 1.0 to every run, which --loss_type sft refuses (exit 2)."""
    import shlex

    import train_dft

    spec = eval_compare.RunSpec(parse_variant("sft"), 0, str(tmp_path / "sft-seed0"))
    command, env = eval_compare.run_command(spec, ["--data_files", "a.jsonl"], "train.sh", "assets/tiny-qwen2")
    printed = subprocess.run(command, cwd=ROOT, env={**child_env(), **env, "DRY_RUN": "1", "NUM_GPUS": "0"},
                             capture_output=True, text=True, check=True).stdout
    argv = shlex.split(printed)[2:]  # after `python train_dft.py`
    assert "--dft_alpha" not in argv
    # Not train.sh's demo settings for the bundled model: the same run as with --launcher python.
    assert argv == ["--model_name_or_path", os.path.join(ROOT, "assets", "tiny-qwen2"), "--data_files", "data/sample/chat_en.jsonl",
                    "data/sample/chat_zh.json", "--output_dir", spec.output_dir, "--logging_dir", os.path.join(spec.output_dir, "logs"),
                    "--disable_tqdm", "True", *command[2:]]  # (no terminal)
    training_args = train_dft.parse_args(argv)[2]
    assert (training_args.loss_type, training_args.dft_alpha) == ("sft", 0.0)
    printed = subprocess.run(command, cwd=ROOT, env={**child_env(), **env, "DRY_RUN": "1", "NUM_GPUS": "0", "DFT_ALPHA": "0.5"},
                             capture_output=True, text=True, check=True).stdout
    assert "--dft_alpha 0.5" in printed


def test_launches_hold_the_sweep_lock_and_get_the_stop(tmp_path):
    """A launch holds the sweep's lock as long as it lives (a rerun after compare.py was SIGKILLed must not
    start a second process on the same run), and a stop reaches its whole process group."""
    import signal
    import threading

    fd = eval_compare.lock_sweep(str(tmp_path))
    with pytest.raises(SweepError, match="still running there"):
        eval_compare.lock_sweep(str(tmp_path))  # a second compare.py on the same root
    launches = eval_compare.Launches()
    launches.inherited_fds = (fd,)
    # The launcher starts a worker of its own and dies on SIGTERM at once, as the deepspeed runner does; its
    # worker gets the stop too, and saves (here: writes a file after a while) before it exits.
    saved, ready = tmp_path / "saved", tmp_path / "ready"
    worker = (f"import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1), open({str(saved)!r}, 'w').close(), "
              f"sys.exit(143))); open({str(ready)!r}, 'w').close(); time.sleep(60)")
    script = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(60)"
    codes = []
    with open(tmp_path / "log", "w") as log:
        thread = threading.Thread(target=lambda: codes.append(launches.run([sys.executable, "-c", script], {}, log, str(tmp_path))))
        thread.start()
        while not ready.is_file():
            threading.Event().wait(0.05)
        os.close(fd)  # compare.py gone (SIGKILL): the launch still holds the lock
        group = next(iter(launches._running))
        with pytest.raises(SweepError, match=f"still running there .*held by pid {group}\\b.*`kill {group}`"):
            eval_compare.lock_sweep(str(tmp_path))
        launches.stop(signal.SIGTERM)
        thread.join(30)
    assert codes == [-signal.SIGTERM]
    assert saved.is_file()  # run() returned only once the worker had finished its save
    for _ in range(100):  # the worker too (same process group)
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            break
        threading.Event().wait(0.05)
    else:
        pytest.fail("a process of the stopped launch is still running")
    os.close(eval_compare.lock_sweep(str(tmp_path)))  # free again
    assert launches.run([sys.executable, "-c", "pass"], {}, None, str(tmp_path)) is None  # nothing starts after a stop


@pytest.mark.integration
def test_sigterm_to_compare_stops_the_run_with_a_checkpoint_and_a_rerun_resumes_it(tmp_path, tiny_model_dir):
    """`kill <pid of compare.py>` used to leave the training run going on its own (an orphan still writing
    the run's folder) and no table; now the run saves a checkpoint and stops, and the same command resumes it."""
    import re
    import signal
    import time

    data = write_small_data(tmp_path, 16)
    out = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "dftune.cli.compare", "--model_name_or_path", tiny_model_dir,
        "--output_dir", str(out), "--variants", "sft", "--seeds", "1", "--no_base_eval",
        "--data_files", data, "--max_steps", "400", "--per_device_train_batch_size", "2", "--max_length", "64",
        "--logging_steps", "1", "--save_steps", "10000", "--report_to", "none", "--disable_tqdm", "True",
        "--data_cache_dir", "none",
    ]
    sweep = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    train_log = out / "sft-seed0" / "logs" / "train.log"
    deadline = time.time() + 300
    while not (train_log.is_file() and re.search(r"step [2-9]\d*/400", train_log.read_text())):
        assert sweep.poll() is None and time.time() < deadline, sweep.communicate()
        time.sleep(0.1)
    sweep.send_signal(signal.SIGTERM)
    stdout, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert "stopped by SIGTERM" in stderr and "STOPPED sft seed 0: stopped by SIGTERM" in stdout
    checkpoints = [p for p in (out / "sft-seed0").iterdir() if p.name.startswith("checkpoint-")]
    assert len(checkpoints) == 1 and (checkpoints[0] / "COMPLETE").is_file()  # saved by the stop
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 2 <= stopped_at < 400
    os.close(eval_compare.lock_sweep(str(out)))  # no process of the run is left holding the sweep
    first_session = json.loads((out / "sft-seed0" / "compare_run.json").read_text())["seconds"]

    again = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "--resume_from_checkpoint latest" in again.stdout
    state = json.loads((out / "sft-seed0" / "trainer_state.json").read_text())
    assert state["global_step"] == 400
    assert [h["step"] for h in state["log_history"] if "loss" in h][0] == 1  # the resumed history kept the steps before the stop
    # The run's wall time is both sessions (was the resumed session's alone).
    sessions = json.loads((out / "sft-seed0" / "compare_run.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[0] == first_session
    assert json.loads((out / "compare.json").read_text())["runs"][0]["wall_seconds"] == pytest.approx(sum(sessions), abs=0.11)
