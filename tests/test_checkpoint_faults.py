"""Faults a long run meets around its checkpoints and outputs: files damaged after the completion marker,
a save that fails on a full disk, an --output_dir / --logging_dir that is a file, read-only or full.

Every fault ends either in a run that carries on with a warning, or in one line with exit code 2."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dftune.run.checkpoints import CheckpointError, latest_complete_checkpoint, list_checkpoints, prepare_resume, resolve_resume_checkpoint
from dftune.run.manifest import COMPLETE_MARKER, file_owner, mark_complete, read_manifest, verify_checkpoint
from dftune.run.output_dir import check_output_dir, check_output_dirs

from helpers import ROOT, SGD_ARGS, child_env, write_small_data

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

STEPS = 3


# ---- unit: the manifest and verification ---------------------------------------------------------------
def fake_checkpoint(output_dir: Path, step: int) -> Path:
    """A checkpoint directory with a few files of known content, marked complete the way on_save does."""
    path = output_dir / f"checkpoint-{step}"
    (path / f"global_step{step}").mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "model.safetensors").write_bytes(bytes(range(256)) * 40 + bytes([step]))
    (path / f"global_step{step}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"shard" * 100)
    mark_complete(str(path), step)
    return path


def flip_a_byte(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_marker_records_every_file_with_size_and_checksum(tmp_path):
    path = fake_checkpoint(tmp_path, 2)
    files = read_manifest(str(path))["files"]
    assert sorted(files) == ["global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt", "model.safetensors", "trainer_state.json"]
    assert files["model.safetensors"]["size"] == 256 * 40 + 1
    assert verify_checkpoint(str(path)) is None


def test_file_owner_is_the_rank_that_wrote_it():
    assert file_owner("global_step4/zero_pp_rank_3_mp_rank_00_optim_states.pt", 4) == 3
    assert file_owner("global_step4/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", 4) == 1
    assert file_owner("rng_state_2.pth", 4) == 2
    assert file_owner("rng_state_5.pth", 4) == 0  # saved by a larger world: rank 0 checks it
    assert file_owner("model.safetensors", 4) == file_owner("rng_state.pth", 4) == 0


@pytest.mark.parametrize("damage", ["same size", "truncated", "missing"])
def test_latest_skips_a_damaged_checkpoint_naming_the_file(tmp_path, caplog, damage):
    fake_checkpoint(tmp_path, 2)
    newest = fake_checkpoint(tmp_path, 4)
    shard = newest / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "same size":
        flip_a_byte(shard, 100)
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:50])
    else:
        shard.unlink()
    with caplog.at_level(logging.WARNING, logger="dft.checkpoints"):
        chosen = resolve_resume_checkpoint("latest", str(tmp_path))
    assert chosen == str(tmp_path / "checkpoint-2")
    expected = {"same size": "checksum differs", "truncated": "50 bytes, 500 when saved", "missing": "is missing"}[damage]
    assert f"{shard}" in caplog.text and expected in caplog.text


def test_latest_moves_the_damaged_checkpoints_it_skipped_aside(tmp_path):
    fake_checkpoint(tmp_path, 2)
    flip_a_byte(fake_checkpoint(tmp_path, 4) / "model.safetensors")
    args = type("Args", (), {"resume_from_checkpoint": "latest", "output_dir": str(tmp_path), "process_index": 0})()
    assert prepare_resume(args) == str(tmp_path / "checkpoint-2")
    assert not (tmp_path / "checkpoint-4").exists(), "the resumed run writes step 4 again: no stale files"
    assert (tmp_path / "damaged-checkpoint-4" / "model.safetensors").is_file(), "kept for a look, out of the rotation"
    flip_a_byte(fake_checkpoint(tmp_path, 4) / "model.safetensors")  # damaged again after the resumed run
    assert prepare_resume(args) == str(tmp_path / "checkpoint-2")
    assert (tmp_path / "damaged-checkpoint-4.1").is_dir()


def test_explicit_damaged_checkpoint_is_one_line(tmp_path):
    path = fake_checkpoint(tmp_path, 4)
    flip_a_byte(path / "model.safetensors")
    with pytest.raises(CheckpointError) as raised:
        resolve_resume_checkpoint(str(path), str(tmp_path))
    message = str(raised.value)
    assert "\n" not in message and f"{path}/model.safetensors is damaged" in message and "'latest'" in message


def test_a_marker_without_manifest_still_counts_as_complete(tmp_path):
    path = tmp_path / "checkpoint-3"  # written by an earlier version: "step 3"
    path.mkdir()
    (path / "trainer_state.json").write_text("{}")
    (path / COMPLETE_MARKER).write_text("step 3\n")
    assert resolve_resume_checkpoint("latest", str(tmp_path)) == str(path)


def test_checking_checkpoints_by_hand(tmp_path, capsys):
    import dftune.run.manifest as checkpoint_manifest

    fake_checkpoint(tmp_path, 2)
    flip_a_byte(fake_checkpoint(tmp_path, 10) / "trainer_state.json")
    (tmp_path / "checkpoint-12").mkdir()
    assert checkpoint_manifest.main([str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{tmp_path / 'checkpoint-2'}: intact (3 files, 0.0 MiB verified)"
    assert lines[1].startswith(f"{tmp_path / 'checkpoint-10'}: DAMAGED, {tmp_path / 'checkpoint-10' / 'trainer_state.json'} is damaged")
    assert lines[2].startswith(f"{tmp_path / 'checkpoint-12'}: incomplete")
    assert checkpoint_manifest.main([str(tmp_path / "checkpoint-2")]) == 0
    capsys.readouterr()
    # A path that is not there was a FileNotFoundError traceback; a folder without checkpoints printed nothing.
    (tmp_path / "empty").mkdir()
    assert checkpoint_manifest.main([str(tmp_path / "nope"), str(tmp_path / "empty")]) == 2
    out, err = capsys.readouterr()
    assert err == f"error: {tmp_path / 'nope'}: no such directory; give a run's --output_dir or one of its checkpoint-N directories\n"
    assert out == f"{tmp_path / 'empty'}: no checkpoint-N directories\n"


# ---- unit: output directories ---------------------------------------------------------------------------
def test_output_dir_that_is_a_file(tmp_path):
    a_file = tmp_path / "out"
    a_file.write_text("not a directory")
    with pytest.raises(CheckpointError, match=f"^--output_dir {a_file}: is a file, not a directory"):
        check_output_dir("--output_dir", str(a_file))
    with pytest.raises(CheckpointError, match="^--logging_dir .*: a part of the path is a file"):
        check_output_dir("--logging_dir", str(a_file / "logs"))
    check_output_dir("--output_dir", str(tmp_path / "new" / "dir"))
    assert (tmp_path / "new" / "dir").is_dir() and not list((tmp_path / "new" / "dir").iterdir())


def test_resume_settings_compare_loss_and_number_of_processes(tmp_path):
    """A checkpoint of 2 processes resumed by 1 (the data order and effective batch change) is named too."""
    import torch

    from dftune.arguments import DFTTrainingArguments
    from dftune.run.checkpoints import changed_resume_settings

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    saved = DFTTrainingArguments(output_dir=str(tmp_path), loss_type="dft", report_to="none")
    torch.save(saved, checkpoint / "training_args.bin")
    for rank in (0, 1):
        (checkpoint / f"rng_state_{rank}.pth").write_bytes(b"")
    now = DFTTrainingArguments(output_dir=str(tmp_path), loss_type="dft", report_to="none")
    assert changed_resume_settings(str(checkpoint), now) == ["processes: now 1, checkpoint 2"]
    now = DFTTrainingArguments(output_dir=str(tmp_path), loss_type="asft", anchor_kl_coef=0.1, report_to="none")
    assert changed_resume_settings(str(checkpoint), now)[:2] == ["--loss_type: now asft, checkpoint dft", "--anchor_kl_coef: now 0.1, checkpoint None"]
    (checkpoint / "training_args.bin").write_bytes(b"not a pickle")  # unreadable: nothing to compare but the ranks
    assert changed_resume_settings(str(checkpoint), now) == ["processes: now 1, checkpoint 2"]


def test_output_dir_that_cannot_be_created_does_not_advise_freeing_space():
    """Was `--output_dir /proc/x: No such file or directory; free space or choose another directory`."""
    with pytest.raises(CheckpointError) as raised:
        check_output_dir("--output_dir", "/proc/dft-trainer-test/run")
    assert str(raised.value) == "--output_dir /proc/dft-trainer-test/run: cannot be created (No such file or directory); choose another directory"


# ---- integration: real runs -----------------------------------------------------------------------------
def run_args(data_file: str, output_dir: Path) -> list[str]:
    return [
        "--model_name_or_path", str(ROOT / "assets" / "tiny-qwen2"), "--data_files", data_file,
        "--output_dir", str(output_dir), "--max_steps", str(STEPS), "--logging_steps", "1", "--save_steps", "1",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--disable_tqdm", "True", *SGD_ARGS,
    ]


def step_losses(checkpoint: Path) -> dict[int, float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def one_error_line(capsys) -> str:
    """The single `error:` line the run printed (SystemExit(2) already shows no exception escaped)."""
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[str, Path]:
    """A 3-step run with a checkpoint at every step."""
    import train_dft

    workdir = tmp_path_factory.mktemp("faults")
    data_file = write_small_data(workdir, 12)
    out = workdir / "uninterrupted"
    train_dft.main(run_args(data_file, out))
    return data_file, out


@pytest.mark.integration
def test_latest_resumes_from_the_newest_intact_checkpoint_from_a_real_run(uninterrupted, tmp_path, capsys):
    import train_dft

    data_file, source = uninterrupted
    out = tmp_path / "run"
    for step in (1, 2, 3):
        shutil.copytree(source / f"checkpoint-{step}", out / f"checkpoint-{step}")
    damaged = out / "checkpoint-3" / "model.safetensors"
    flip_a_byte(damaged, 3)  # the header length: safetensors itself would fail "deserializing header"
    summary = train_dft.main(run_args(data_file, out) + ["--resume_from_checkpoint", "latest"])
    assert summary["steps"] == STEPS
    log = capsys.readouterr().err  # train_dft's own log handlers replace caplog's
    assert f"WARNING [rank 0/1] dft.checkpoints: skipping checkpoint {out / 'checkpoint-3'}: {damaged} is damaged" in log
    assert f"resuming from {out / 'checkpoint-2'}" in log
    assert "differ from the run that wrote it" not in log  # the same flags: no warning
    assert step_losses(out / "checkpoint-3") == pytest.approx(step_losses(source / "checkpoint-3"), rel=1e-6)
    assert verify_checkpoint(str(out / "checkpoint-3")) is None  # written again, intact


@pytest.mark.integration
def test_resuming_with_another_loss_names_the_changed_flags(uninterrupted, tmp_path, capsys):
    """A resume with --loss_type sft of a DFT run's checkpoint went on without a word: one run, two losses."""
    import train_dft

    data_file, source = uninterrupted
    out = tmp_path / "run"
    shutil.copytree(source / "checkpoint-2", out / "checkpoint-2")
    train_dft.main(run_args(data_file, out) + ["--resume_from_checkpoint", "latest", "--loss_type", "sft", "--seed", "8"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "differ from the run that wrote it" in line]
    assert len(warnings) == 1
    assert (f"WARNING [rank 0/1] dft.checkpoints: resuming {out / 'checkpoint-2'} with settings that differ from the run that "
            "wrote it (--loss_type: now sft, checkpoint dft; --dft_alpha: now 0.0, checkpoint 1.0; --seed: now 8, checkpoint 7)") in warnings[0]


@pytest.mark.integration
def test_explicit_damaged_checkpoint_stops_with_one_line(uninterrupted, tmp_path, capsys):
    import train_dft

    data_file, source = uninterrupted
    checkpoint = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(source / "checkpoint-2", checkpoint)
    (checkpoint / "optimizer.pt").write_bytes((checkpoint / "optimizer.pt").read_bytes()[:100])  # a copy stopped half-way
    with pytest.raises(SystemExit) as exited:
        train_dft.main(run_args(data_file, tmp_path / "run") + ["--resume_from_checkpoint", str(checkpoint)])
    assert exited.value.code == 2
    line = one_error_line(capsys)
    assert f"{checkpoint}/optimizer.pt is damaged: 100 bytes" in line


@pytest.mark.integration
def test_checkpoint_save_on_a_full_disk_ends_with_one_line_and_earlier_checkpoints_resume(uninterrupted, tmp_path, capsys, monkeypatch):
    import train_dft

    data_file, source = uninterrupted
    out = tmp_path / "run"
    real_save = torch.save

    def disk_fills_at_checkpoint_2(obj, f, *args, **kwargs):
        """The real writer, except that checkpoint-2's optimizer state meets a full disk half-way."""
        if isinstance(f, (str, os.PathLike)) and str(f).endswith("checkpoint-2/optimizer.pt"):
            Path(f).write_bytes(b"\0" * 64)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_at_checkpoint_2)
    with pytest.raises(SystemExit) as exited:
        train_dft.main(run_args(data_file, out))
    assert exited.value.code == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: saving {out / 'checkpoint-2'} failed: No space left on device (")
    assert "earlier checkpoints are intact (checkpoint-1 the newest)" in line and "--resume_from_checkpoint latest" in line
    assert not (out / "checkpoint-2" / COMPLETE_MARKER).exists()
    assert verify_checkpoint(str(out / "checkpoint-1")) is None

    monkeypatch.setattr(torch, "save", real_save)  # space freed: resume
    summary = train_dft.main(run_args(data_file, out) + ["--resume_from_checkpoint", "latest"])
    assert summary["steps"] == STEPS
    assert step_losses(out / "checkpoint-3") == pytest.approx(step_losses(source / "checkpoint-3"), rel=1e-6)


@pytest.mark.integration
def test_output_dir_or_logging_dir_that_is_a_file_stops_before_loading(tmp_path, capsys, monkeypatch):
    import train_dft

    a_file = tmp_path / "out"
    a_file.write_text("not a directory")
    monkeypatch.setattr(train_dft, "load_tokenizer", lambda *a: pytest.fail("loaded the model before checking the output"))
    for flags, named in (
        (["--output_dir", str(a_file)], f"--output_dir {a_file}: is a file"),
        (["--output_dir", str(tmp_path / "ok"), "--logging_dir", str(a_file / "logs")], f"--logging_dir {a_file / 'logs'}: a part"),
    ):
        with pytest.raises(SystemExit) as exited:
            train_dft.main(["--model_name_or_path", str(ROOT / "assets" / "tiny-qwen2"), "--data_files", "x.jsonl", *flags])
        assert exited.value.code == 2
        assert one_error_line(capsys).startswith(f"error: {named}")


def user_namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


MOUNT_AND_RUN = """
set -e
mount -t tmpfs -o size=256k tmpfs "$1"
head -c 1M /dev/zero > "$1/fill" 2>/dev/null || true    # the disk is now full
mount -t tmpfs -o ro,size=64k tmpfs "$2"                # a read-only file system
shift 2
exec "$@"
"""


@pytest.mark.integration
@pytest.mark.parametrize("flag,where,expected", [
    ("--output_dir", "full", "the disk holding it is full (0 bytes free; No space left on device)"),
    ("--logging_dir", "full", "the disk holding it is full"),
    ("--output_dir", "readonly", "not writable (Read-only file system)"),
])
def test_output_on_a_full_disk_or_read_only_file_system_is_one_line(tmp_path, flag, where, expected):
    """A real full tmpfs and a real read-only one, mounted in a private user and mount namespace."""
    if not user_namespaces_work():
        pytest.skip("needs `unshare --user --mount` (unprivileged user namespaces) to mount a small tmpfs")
    full, readonly = tmp_path / "full", tmp_path / "readonly"
    full.mkdir()
    readonly.mkdir()
    target = str((full if where == "full" else readonly) / "run")
    paths = {"--output_dir": str(tmp_path / "out"), "--logging_dir": str(tmp_path / "out" / "logs"), flag: target}
    command = [
        "unshare", "--user", "--map-root-user", "--mount", "bash", "-c", MOUNT_AND_RUN, "_", str(full), str(readonly),
        sys.executable, "train_dft.py", "--model_name_or_path", str(ROOT / "assets" / "tiny-qwen2"),
        "--data_files", str(ROOT / "data" / "sample" / "chat_en.jsonl"), "--report_to", "none",
        "--output_dir", paths["--output_dir"], "--logging_dir", paths["--logging_dir"],
    ]
    result = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: {flag} {target}: {expected}") and lines[-1].endswith("choose another directory"), lines
    assert "Traceback" not in result.stderr and "training on" not in result.stdout + result.stderr


# ---- an earlier run in --output_dir ---------------------------------------------------------------------
def earlier_run(output_dir: Path, checkpoints=(2, 4), finished=True) -> Path:
    """What a run leaves: checkpoint-N folders, and when it finished the model and run_summary.json."""
    for step in checkpoints:
        fake_checkpoint(output_dir, step)
    output_dir.mkdir(parents=True, exist_ok=True)
    if finished:
        (output_dir / "model.safetensors").write_bytes(b"weights")
        (output_dir / "run_summary.json").write_text("{}")
    (output_dir / "logs").mkdir()
    return output_dir


class Loaded(Exception):
    """Raised in place of loading the tokenizer: the checks before loading let the run go on."""


def test_rerun_into_a_used_output_dir_stops_before_loading(tmp_path, capsys, monkeypatch):
    """A second run into a finished run's folder overwrote its model without a word and mixed its
    checkpoint-N folders with the old ones (`latest` then resumed the old run's higher step)."""
    import train_dft

    def loading(*args):
        raise Loaded

    monkeypatch.setattr(train_dft, "load_tokenizer", loading)
    out = earlier_run(tmp_path / "out")
    with pytest.raises(SystemExit) as exited:
        train_dft.main(run_args("x.jsonl", out))
    assert exited.value.code == 2
    assert one_error_line(capsys) == (
        f"error: --output_dir {out}: holds an earlier run (model.safetensors, run_summary.json, checkpoint-2, checkpoint-4); "
        "continue it with --resume_from_checkpoint latest, start again with --overwrite_output_dir, or choose another --output_dir")
    assert (out / "checkpoint-4").is_dir() and (out / "model.safetensors").read_bytes() == b"weights"

    saved_without_checkpoints = earlier_run(tmp_path / "no_checkpoints", checkpoints=())
    with pytest.raises(SystemExit):
        train_dft.main(run_args("x.jsonl", saved_without_checkpoints))
    assert one_error_line(capsys).endswith("holds an earlier run (model.safetensors, run_summary.json); "
                                           "train again with --overwrite_output_dir, or choose another --output_dir")

    # Continuing the run is what --resume_from_checkpoint is for; a run that died before its first
    # checkpoint left nothing that would mix (its logs, data report and run config are written again).
    for folder, flags in ((out, ["--resume_from_checkpoint", "latest"]), (earlier_run(tmp_path / "died", checkpoints=(), finished=False), [])):
        (folder / "data_report.json").write_text("{}")
        with pytest.raises(Loaded):
            train_dft.main(run_args("x.jsonl", folder) + flags)


def test_resume_latest_into_a_finished_run_without_checkpoints_is_refused(tmp_path):
    """`latest` with no checkpoint-N starts from step 0: it would train the finished run again over its model."""
    out = earlier_run(tmp_path / "out", checkpoints=())
    args = SimpleNamespace(output_dir=str(out), logging_dir=None, resume_from_checkpoint="latest")
    with pytest.raises(CheckpointError, match=r"^--resume_from_checkpoint latest: .* has no checkpoint-N to continue, but a finished run "
                                              r"\(model.safetensors, run_summary.json\); train it again from the start with --overwrite_output_dir"):
        check_output_dirs(args)
    args.overwrite_output_dir = True
    with pytest.raises(CheckpointError, match="--overwrite_output_dir would remove the earlier run .* give one of the two"):
        check_output_dirs(args)


def test_overwrite_output_dir_removes_the_earlier_checkpoints_and_summary(tmp_path):
    """--overwrite_output_dir (the check reads it with getattr: transformers 5 dropped the field) starts again
    without the old checkpoints: kept, `latest` and --save_total_limit would mix them with the new run's."""
    out = earlier_run(tmp_path / "out", checkpoints=(2, 10))
    (out / "damaged-checkpoint-12").mkdir()
    (out / "checkpoint-14").write_text("a file of the user's, not a checkpoint")
    check_output_dirs(SimpleNamespace(output_dir=str(out), logging_dir=None, resume_from_checkpoint=None, overwrite_output_dir=True))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-14", "logs", "model.safetensors"]  # the model: replaced when the run saves


@pytest.mark.integration
def test_overwrite_of_a_real_run_keeps_only_the_new_checkpoints(uninterrupted, tmp_path):
    """A 2-step run over the 3-step run's folder: without --overwrite_output_dir it stops; with it,
    `latest` afterwards is the new run's checkpoint-2, not the old checkpoint-3."""
    import train_dft

    data_file, source = uninterrupted
    out = tmp_path / "run"
    shutil.copytree(source, out)
    args = run_args(data_file, out)
    args[args.index("--max_steps") + 1] = "2"
    with pytest.raises(SystemExit) as exited:
        train_dft.main(args)
    assert exited.value.code == 2
    summary = train_dft.main([*args, "--overwrite_output_dir", "True"])
    assert summary["steps"] == 2
    assert [step for step, _ in list_checkpoints(str(out))] == [1, 2]
    assert latest_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
