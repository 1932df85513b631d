"""Checkpoints: the completion marker, `--resume_from_checkpoint latest`, and runs killed mid-training
(SIGTERM: graceful save and stop; SIGKILL: a half-written checkpoint that `latest` must skip)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState

from dftune.run.checkpoints import (
    COMPLETE_MARKER,
    CheckpointError,
    CheckpointMarkerCallback,
    GracefulStopCallback,
    latest_complete_checkpoint,
    list_checkpoints,
    remove_checkpoints_after,
    resolve_resume_checkpoint,
    write_marker,
)

from helpers import ROOT, SGD_ARGS, child_env, write_small_data

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one


def make_checkpoint(output_dir: Path, step: int, complete: bool) -> Path:
    path = output_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    if complete:
        write_marker(str(path), step)
    return path


# ---- unit -------------------------------------------------------------------------------------------
def test_latest_skips_half_written_and_picks_highest_complete(tmp_path, caplog):
    make_checkpoint(tmp_path, 2, complete=True)
    make_checkpoint(tmp_path, 10, complete=True)  # numeric, not lexical: 10 > 4
    make_checkpoint(tmp_path, 4, complete=True)
    half = make_checkpoint(tmp_path, 12, complete=False)
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-14").write_text("a file, not a checkpoint")
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [2, 4, 10, 12]
    with caplog.at_level(logging.INFO, logger="dft.checkpoints"):
        chosen = resolve_resume_checkpoint("latest", str(tmp_path))
    assert chosen == str(tmp_path / "checkpoint-10")
    assert str(half) in caplog.text and "incomplete" in caplog.text
    remove_checkpoints_after(str(tmp_path), chosen)
    assert not half.exists() and (tmp_path / "checkpoint-10").exists() and (tmp_path / "checkpoint-2").exists()


def test_latest_without_complete_checkpoint_starts_fresh(tmp_path):
    assert resolve_resume_checkpoint("latest", str(tmp_path / "missing")) is None
    make_checkpoint(tmp_path, 3, complete=False)
    assert resolve_resume_checkpoint("latest", str(tmp_path)) is None
    assert resolve_resume_checkpoint(None, str(tmp_path)) is None


def test_explicit_checkpoint_path(tmp_path, caplog):
    with pytest.raises(CheckpointError, match="--resume_from_checkpoint .*no such directory"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-9"), str(tmp_path))
    (tmp_path / "not-a-checkpoint").mkdir()
    with pytest.raises(CheckpointError, match="no trainer_state.json"):
        resolve_resume_checkpoint(str(tmp_path / "not-a-checkpoint"), str(tmp_path))
    plain = make_checkpoint(tmp_path, 5, complete=False)  # e.g. written by plain transformers
    with caplog.at_level(logging.WARNING, logger="dft.checkpoints"):
        assert resolve_resume_checkpoint(str(plain), str(tmp_path)) == str(plain)
    assert "half-written" in caplog.text


def test_marker_is_atomic_and_stale_marker_removed_before_resave(tmp_path):
    path = make_checkpoint(tmp_path, 4, complete=True)
    assert json.loads((path / COMPLETE_MARKER).read_text())["step"] == 4
    assert not list(path.glob(".*tmp"))
    args = SimpleNamespace(output_dir=str(tmp_path), save_strategy="steps")
    state, control = TrainerState(global_step=4), TrainerControl(should_save=True)
    state.is_world_process_zero = True
    CheckpointMarkerCallback().on_step_end(args, state, control)
    assert not (path / COMPLETE_MARKER).exists(), "a checkpoint being rewritten must not look complete"
    CheckpointMarkerCallback().on_save(args, state, control)
    assert (path / COMPLETE_MARKER).exists()


def test_sigterm_asks_for_save_and_stop():
    stop = GracefulStopCallback()
    args = SimpleNamespace(save_strategy="steps", device="cpu")
    state, control = TrainerState(global_step=7), TrainerControl()
    previous = signal.getsignal(signal.SIGTERM)
    stop.on_train_begin(args, state, control)
    stop.on_step_end(args, state, control)
    assert not control.should_training_stop
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    stop.on_step_end(args, state, control)
    assert control.should_training_stop and control.should_save and stop.stopped
    control.should_evaluate = True  # as DefaultFlowCallback asks at the epoch end that follows
    stop.on_epoch_end(args, state, control)
    assert not control.should_save and not control.should_evaluate
    stop.on_train_end(args, state, control)
    assert signal.getsignal(signal.SIGTERM) == previous


def test_ctrl_c_stops_like_sigterm_with_status_130_and_a_second_one_quits(monkeypatch, capfd):
    from dftune.run import checkpoints

    stop = GracefulStopCallback()
    args = SimpleNamespace(save_strategy="steps", device="cpu")
    state, control = TrainerState(global_step=3), TrainerControl()
    state.is_world_process_zero = True
    previous = signal.getsignal(signal.SIGINT)
    clock = [100.0]
    monkeypatch.setattr(checkpoints.time, "monotonic", lambda: clock[0])
    stop.on_train_begin(args, state, control)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert "Ctrl-C: stopping after this optimizer step (press it again to quit at once" in capfd.readouterr().err
        os.kill(os.getpid(), signal.SIGINT)  # at once: torchrun passing the terminal's Ctrl-C on again
        time.sleep(0.05)
        stop.on_step_end(args, state, control)
        assert control.should_training_stop and control.should_save
        assert (stop.signal_name, stop.exit_code) == ("SIGINT (Ctrl-C)", 130)
        clock[0] += 2  # a second Ctrl-C of the user's: quit without waiting for the step and the save
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        stop.on_train_end(args, state, control)
    assert signal.getsignal(signal.SIGINT) == previous


def test_an_ignored_ctrl_c_stays_ignored():
    """A run started in the background by a script has SIGINT ignored (the shell's doing): a Ctrl-C meant
    for the script must not stop it."""
    stop = GracefulStopCallback()
    state = TrainerState()
    state.is_world_process_zero = True
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop.on_train_begin(SimpleNamespace(), state, TrainerControl())
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        stop.on_train_end(SimpleNamespace(), state, TrainerControl())
    finally:
        signal.signal(signal.SIGINT, previous)


# ---- integration: real runs killed mid-training ------------------------------------------------------
KILL_STEPS = 16


def run_args(data_file: str, output_dir: Path, save_steps: int) -> list[str]:
    return [
        "--model_name_or_path", str(ROOT / "assets" / "tiny-qwen2"), "--data_files", data_file,
        "--output_dir", str(output_dir), "--max_steps", str(KILL_STEPS), "--logging_steps", "1",
        "--save_steps", str(save_steps), "--save_total_limit", "2", "--per_device_train_batch_size", "2",
        "--report_to", "none", "--disable_tqdm", "True", *SGD_ARGS,
    ]


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train_dft.py", *args], cwd=ROOT, env=child_env(),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 400, interval: float = 0.002):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the kill point:\n{log.read_text()[-4000:]}")
        time.sleep(interval)
    proc.kill()
    pytest.fail("timed out waiting for the kill point")


def resume_to_the_end(args: list[str], output_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    import train_dft

    summary = train_dft.main(args + ["--resume_from_checkpoint", "latest"])
    assert summary["steps"] == KILL_STEPS
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.integration
def test_sigterm_saves_a_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = run_args(write_small_data(tmp_path, 40), out, save_steps=4)
    log = tmp_path / "sigterm.log"
    # Through train.sh under nohup, as users run it: the script passes the SIGTERM on to the trainer.
    env = child_env()
    env.update(MODEL=args[1], DATA_FILES=args[3], OUTPUT_DIR=args[5], NUM_GPUS="0")
    proc = subprocess.Popen(["nohup", "bash", "scripts/train.sh", *args[6:]], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_for(lambda: (out / "checkpoint-4" / COMPLETE_MARKER).exists(), proc, log, interval=0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-4000:]
    text = log.read_text()
    assert "train.sh: stopping (SIGTERM to process group" in text and "exit status 143" in text
    stopped_at = int(text.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 4 <= stopped_at < KILL_STEPS
    assert latest_complete_checkpoint(str(out)) == str(out / f"checkpoint-{stopped_at}")
    assert not (out / "model.safetensors").exists(), "a stopped run must not look finished"
    assert len(list_checkpoints(str(out))) <= 2  # --save_total_limit 2
    resume_to_the_end(args, out)


@pytest.mark.distributed
def test_sigterm_to_train_sh_under_torchrun_reports_the_stop_with_status_143(tmp_path):
    """torchrun answers SIGTERM with a SignalException traceback and status 1 although both ranks stopped
    as asked with a checkpoint: a scheduler or compare.py read that as a crash. train.sh now says what the
    ranks did and exits 143, as with the other launchers."""
    from helpers import free_port

    out = tmp_path / "run"
    args = run_args(write_small_data(tmp_path, 40), out, save_steps=1000)
    args[args.index("--max_steps") + 1] = "100000"  # stopped long before the end
    log = tmp_path / "torchrun.log"
    env = child_env()
    env.update(MODEL=args[1], DATA_FILES=args[3], OUTPUT_DIR=args[5], NUM_GPUS="0", NUM_PROCS="2", MASTER_PORT=str(free_port()))
    proc = subprocess.Popen(["nohup", "bash", "scripts/train.sh", *args[6:]], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_for(lambda: "dft: step 3/" in log.read_text(errors="replace"), proc, log, interval=0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-4000:]
    text = log.read_text()
    stopped_at = int(text.split("stopped by SIGTERM at step ")[1].split(";")[0])
    checkpoint = out / f"checkpoint-{stopped_at}"
    assert f"train.sh: the run stopped by SIGTERM at step {stopped_at}; {checkpoint} saved" in text
    assert text.rstrip().splitlines()[-1].startswith("exit status 143; log file: ")
    assert latest_complete_checkpoint(str(out)) == str(checkpoint)
    # One stop line of the ranks' (rank 0's), and not torchrun's 25-line SignalException traceback on the
    # console; the log file keeps everything.
    assert text.count("dft: stopped by SIGTERM at step") == 1, text[-4000:]
    assert "Traceback" not in text and "SignalException" not in text, text[-4000:]
    log_file = text.rstrip().splitlines()[-1].split("log file: ")[1]
    assert "SignalException: Process" in Path(log_file).read_text()


@pytest.mark.integration
def test_ctrl_c_saves_a_checkpoint_and_exits_130_without_a_traceback(tmp_path):
    """Ctrl-C on `python train_dft.py` printed a KeyboardInterrupt traceback and kept nothing since the last
    checkpoint; now it stops as SIGTERM does, with a checkpoint, and the status a shell gives Ctrl-C."""
    out = tmp_path / "run"
    args = run_args(write_small_data(tmp_path, 40), out, save_steps=1000)
    args[args.index("--max_steps") + 1] = "100000"
    log = tmp_path / "ctrl_c.log"
    proc = start(args, log)
    wait_for(lambda: "dft: step 2/" in log.read_text(errors="replace"), proc, log, interval=0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()[-4000:]
    text = log.read_text()
    stopped_at = int(text.split("stopped by SIGINT (Ctrl-C) at step ")[1].split(";")[0])
    assert f"{out / f'checkpoint-{stopped_at}'} saved: continue with --resume_from_checkpoint latest" in text
    assert latest_complete_checkpoint(str(out)) == str(out / f"checkpoint-{stopped_at}")
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-4000:]


@pytest.mark.integration
def test_sigterm_without_checkpoints_says_a_rerun_starts_again(tmp_path):
    """--save_strategy no: the stop used to say "continue with --resume_from_checkpoint latest", which then
    started from step 0 without a word."""
    out = tmp_path / "run"
    args = run_args(write_small_data(tmp_path, 40), out, save_steps=1000) + ["--save_strategy", "no"]
    args[args.index("--max_steps") + 1] = "100000"
    log = tmp_path / "nosave.log"
    proc = start(args, log)
    wait_for(lambda: "dft: step 2/" in log.read_text(errors="replace"), proc, log, interval=0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    text = log.read_text()
    assert "no checkpoint saved (--save_strategy no): a rerun starts again from step 0" in text
    assert "continue with --resume_from_checkpoint latest" not in text
    assert list_checkpoints(str(out)) == []


@pytest.mark.integration
def test_sigkill_mid_save_never_resumes_from_the_half_written_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = run_args(write_small_data(tmp_path, 40), out, save_steps=1)
    log = tmp_path / "sigkill.log"
    proc = start(args, log)

    def saving_after_a_complete_one():
        checkpoints = list_checkpoints(str(out))
        complete = [s for s, p in checkpoints if (Path(p) / COMPLETE_MARKER).exists()]
        writing = [p for s, p in checkpoints if complete and s > complete[-1] and not (Path(p) / COMPLETE_MARKER).exists()]
        return writing[0] if writing else None

    half_written = wait_for(saving_after_a_complete_one, proc, log)
    proc.kill()
    proc.wait(timeout=60)
    assert not (Path(half_written) / COMPLETE_MARKER).exists(), "killed too late: the save had completed"
    latest = latest_complete_checkpoint(str(out))
    assert latest is not None and latest != half_written
    resume_to_the_end(args, out)
    assert (out / f"checkpoint-{KILL_STEPS}" / COMPLETE_MARKER).exists()


def test_loading_a_tied_model_warns_only_about_keys_really_missing(tmp_path, tiny_model_dir, monkeypatch):
    """A checkpoint stores tied weights once; resuming warned "missing keys ['lm_head.weight']" for the tied copy
    (every resume of a tied model). A key that is really missing is still named."""
    import transformers.trainer
    from transformers import AutoModelForCausalLM

    from dft_trainer import DFTTrainer
    from dftune.arguments import DFTTrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = DFTTrainer(model=model, args=DFTTrainingArguments(output_dir=str(tmp_path), report_to="none"))
    warnings = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", lambda message, *a, **k: warnings.append(message))
    saved = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # as safetensors stores it
    trainer._issue_warnings_after_load(model.load_state_dict(saved, strict=False))
    assert warnings == []
    del saved["model.norm.weight"]
    trainer._issue_warnings_after_load(model.load_state_dict(saved, strict=False))
    assert warnings == ["There were missing keys in the checkpoint model loaded: ['model.norm.weight']."]
