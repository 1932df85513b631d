"""The output folder, checked before anything loads: writable, not on a full disk, and not holding an
earlier run unless --overwrite_output_dir or --resume_from_checkpoint says what to do with it (HF's
convention); a rerun otherwise overwrote the model and mixed in the old checkpoint-N folders."""

from __future__ import annotations

import errno
import logging
import os
import shutil

from dftune.run.checkpoints import CHECKPOINT_PATTERN, DAMAGED_PATTERN, CheckpointError, list_checkpoints
from dftune.run.logs import is_main_process

logger = logging.getLogger("dft.checkpoints")

# What a run leaves in --output_dir (besides checkpoint-N): the final model (full, or a LoRA adapter) and
# run_summary.json (RunRecorder.finish, written last).
FINAL_MODEL_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
    "adapter_model.safetensors", "adapter_model.bin",
)
RUN_SUMMARY_FILE = "run_summary.json"


PROBE_BYTES = 1 << 20  # what check_output_dirs writes to see that a directory takes data


def free_space(path: str) -> str:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        free = shutil.disk_usage(path or ".").free
    except OSError:
        return "unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
        free /= 1024
    return "unknown"


def _why_unwritable(err: OSError, path: str) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk holding it is full ({free_space(path)} free; {err.strerror})"
    if err.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a directory"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not writable ({err.strerror})"
    if err.errno == errno.ENOENT:  # e.g. under /proc, or a path the file system will not create
        return f"cannot be created ({err.strerror})"
    return err.strerror or str(err)


def check_output_dir(flag: str, path: str) -> None:
    """Creates `path` if needed and writes (and removes) a small probe file in it.

    Raises:
        CheckpointError: naming `flag` and `path`, when it is a file, cannot be created or written, or
            sits on a full disk.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{flag} {path}: is a file, not a directory; give a directory path")
    probe = os.path.join(path, f".write-probe-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        raise CheckpointError(f"{flag} {path}: {_why_unwritable(err, path)}; {'free space or ' if full else ''}choose another directory") from None
    finally:
        if os.path.exists(probe):
            os.remove(probe)


def check_output_dirs(training_args) -> None:
    """`check_output_dir` for --output_dir and --logging_dir, and `check_earlier_run` (before anything is loaded).

    Raises:
        CheckpointError: see `check_output_dir` and `check_earlier_run`.
    """
    check_output_dir("--output_dir", training_args.output_dir)
    if training_args.logging_dir:
        check_output_dir("--logging_dir", training_args.logging_dir)
    check_earlier_run(training_args)


def earlier_run_files(output_dir: str) -> list[str]:
    """The names of what a run left in `output_dir`: its final model files, run_summary.json and its
    checkpoint-N folders (oldest step first); [] for a folder no run has trained in (or one that stopped
    before its first checkpoint: nothing of it would mix with a new run)."""
    if not os.path.isdir(output_dir):
        return []
    finished = [name for name in (*FINAL_MODEL_FILES, RUN_SUMMARY_FILE) if os.path.isfile(os.path.join(output_dir, name))]
    return finished + [os.path.basename(path) for _, path in list_checkpoints(output_dir)]


def _names(names: list[str], shown: int = 4) -> str:
    return ", ".join(names) if len(names) <= shown else f"{', '.join(names[:shown - 1])}, ... {names[-1]} ({len(names)} in all)"


def check_earlier_run(training_args) -> None:
    """Refuses to train into an --output_dir that holds an earlier run, unless the flags say what to do
    (HF's convention): `--resume_from_checkpoint` continues it, `--overwrite_output_dir` starts again and
    removes, on rank 0, the earlier run's checkpoint-N (and damaged-checkpoint-N) folders and run_summary.json.

    Why remove rather than keep: kept, the old checkpoints would mix with the new run's. `latest` would
    resume from the old run's higher step, `--save_total_limit` would rotate the new checkpoints out
    first, and dft-compare would take the folder with the old run_summary.json for a finished run. The
    earlier model files are left for the new run to overwrite when it saves (the model may be read from
    this very folder: --model_name_or_path equal to --output_dir).

    Raises:
        CheckpointError: the folder holds an earlier run and neither flag is given; both are given; or
            `--resume_from_checkpoint latest` has no checkpoint-N there to continue but a finished run.
    """
    output_dir = training_args.output_dir
    found = earlier_run_files(output_dir)
    if not found:
        return
    overwrite = getattr(training_args, "overwrite_output_dir", False)  # not a TrainingArguments field in transformers 5
    resume = training_args.resume_from_checkpoint
    checkpoints = [name for name in found if CHECKPOINT_PATTERN.match(name)]
    if resume and overwrite:
        raise CheckpointError(f"--output_dir {output_dir}: --overwrite_output_dir would remove the earlier run ({_names(found)}) that "
                              "--resume_from_checkpoint continues; give one of the two")
    if resume == "latest" and not checkpoints:
        # `latest` with nothing to resume starts from step 0: it would quietly train the finished run again.
        raise CheckpointError(f"--resume_from_checkpoint latest: {output_dir} has no checkpoint-N to continue, but a finished run "
                              f"({_names(found)}); train it again from the start with --overwrite_output_dir, or choose another --output_dir")
    if resume:
        return
    if not overwrite:
        how = "continue it with --resume_from_checkpoint latest, start again with --overwrite_output_dir" if checkpoints else \
              "train again with --overwrite_output_dir"
        raise CheckpointError(f"--output_dir {output_dir}: holds an earlier run ({_names(found)}); {how}, or choose another --output_dir")
    if not is_main_process():  # one rank removes; the others only needed to know that they may go on
        return
    damaged = sorted(name for name in os.listdir(output_dir) if DAMAGED_PATTERN.match(name) and os.path.isdir(os.path.join(output_dir, name)))
    removed = checkpoints + damaged
    for name in removed:
        shutil.rmtree(os.path.join(output_dir, name))
    if RUN_SUMMARY_FILE in found:
        os.remove(os.path.join(output_dir, RUN_SUMMARY_FILE))
        removed.append(RUN_SUMMARY_FILE)
    if removed:
        logger.warning("--overwrite_output_dir: removed the earlier run's %s from %s", _names(removed), output_dir)
