"""Checkpoints that are either complete or ignored, `--resume_from_checkpoint latest`, and a graceful
stop on SIGTERM.

Why a marker. The HF Trainer writes `checkpoint-N/` file by file (weights, then the optimizer - one shard
per rank under ZeRO - scheduler, RNG states, trainer_state.json) straight into its final directory. A
run killed in the middle (SIGKILL, out of memory, a node lost, or a SIGTERM followed by the launcher's
SIGKILL) leaves a directory that looks like a checkpoint but cannot be resumed from; transformers'
`get_last_checkpoint` would still pick it because it only compares step numbers. So after every rank
has finished writing, rank 0 writes `checkpoint-N/COMPLETE` (atomically: temp file + rename, after
fsync), and `latest` only considers directories that carry it.

What the marker vouches for: see run/manifest.py (each file's size and checksum).

Save failures. A checkpoint save that fails (a full disk, a quota, an I/O error) ends the run with one
line naming the checkpoint and the free space; it never gets a marker, so every earlier checkpoint
still verifies and resumes. `check_output_dirs` refuses, before anything loads, an `--output_dir` or
`--logging_dir` that is a file, cannot be written or sits on a full disk.

SIGTERM and Ctrl-C. `GracefulStopCallback` turns SIGTERM or SIGINT into "save a checkpoint at the end of
this optimizer step and stop"; `train_dft` then exits with status 128 + the signal (143 for SIGTERM, 130
for Ctrl-C, what a shell reports for a process the signal ended) without writing the final model.
The ranks agree on the step through one all-reduce of the signal number per step, so a signal that
reached one rank only still stops them all at the same step, with the same status. If the launcher kills
the processes before that save completes (torchrun and deepspeed escalate to SIGKILL after 30 s), the
half-written directory has no marker and the previous checkpoint is used.

An earlier run. `check_output_dirs` also refuses an `--output_dir` that holds what a run leaves (the final
model, run_summary.json, checkpoint-N folders) unless `--resume_from_checkpoint` continues it or
`--overwrite_output_dir` replaces it: a new run there would overwrite the model and mix its checkpoints
with the old ones (`latest` would pick the old run's higher step).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import signal
import time
from contextlib import contextmanager

from transformers import TrainerCallback

from dftune.loss.variants import variant_flags
from dftune.run.manifest import (  # noqa: F401  (re-exported: the marker is part of this module's interface)
    COMPLETE_MARKER,
    is_complete,
    mark_complete,
    rank_and_world,
    verify_checkpoint,
    write_marker,
)

logger = logging.getLogger("dft.checkpoints")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
DAMAGED_PATTERN = re.compile(r"^damaged-checkpoint-\d+(\.\d+)?$")  # see remove_checkpoints_after
EXIT_STOPPED_BY_SIGTERM = 128 + signal.SIGTERM
# A second Ctrl-C this long after the first quits without the checkpoint. Sooner, it is the same Ctrl-C
# again: torchrun passes the terminal's SIGINT on to its workers, which got it from the terminal too.
SECOND_CTRL_C_AFTER_S = 1.0



class CheckpointError(ValueError):
    """A checkpoint or output directory the user must fix (`--resume_from_checkpoint`, `--output_dir`,
    `--logging_dir`), or a checkpoint save that failed; reported as one line, exit code 2."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint or the final model failed (full disk, quota, I/O error)."""


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every `checkpoint-N` directory in `output_dir`, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step in `output_dir`, or None (files not verified)."""
    complete = [path for _, path in list_checkpoints(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def latest_verified_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint that is complete and verifies (see `verify_checkpoint`), or None; each
    newer complete one that fails is skipped with a warning naming the damaged file."""
    for _, path in reversed(list_checkpoints(output_dir)):
        if not is_complete(path):
            continue
        problem = verify_checkpoint(path)  # collective: every rank gets the same answer
        if problem is None:
            return path
        if rank_and_world()[0] == 0:  # said once, not once per rank
            logger.warning("skipping checkpoint %s: %s", path, problem)
    return None


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """Turns `--resume_from_checkpoint` into a directory for `Trainer.train`, or None to start fresh.

    "latest": the newest complete checkpoint in `output_dir` that verifies; none there means a fresh
    start (so the same command both starts a job and restarts it). A path: used as given after
    verification (a warning if it has no completion marker, e.g. a checkpoint written by plain
    transformers). Collective under a process group (every rank verifies its own files).

    Raises:
        CheckpointError: the path does not exist, has no trainer_state.json, or fails verification.
    """
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        skipped = [path for step, path in list_checkpoints(output_dir) if not is_complete(path)]
        if skipped:
            logger.warning("ignoring incomplete (half-written) checkpoints: %s", ", ".join(skipped))
        chosen = latest_verified_checkpoint(output_dir)
        if chosen is None:
            logger.info("--resume_from_checkpoint latest: no complete, intact checkpoint in %s, starting from scratch", output_dir)
        else:
            logger.info("--resume_from_checkpoint latest: resuming from %s", chosen)
        return chosen
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume_from_checkpoint {path}: no such directory (give a checkpoint-N directory or 'latest')")
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise CheckpointError(f"--resume_from_checkpoint {path}: no trainer_state.json, not a Trainer checkpoint")
    if not is_complete(path):
        logger.warning("%s has no %s marker: it may be half-written (or was saved without this callback)", path, COMPLETE_MARKER)
        return path
    problem = verify_checkpoint(path)
    if problem:
        raise CheckpointError(f"--resume_from_checkpoint {path}: {problem}; resume from an earlier checkpoint, or give 'latest'")
    return path


def remove_checkpoints_after(output_dir: str, resume_dir: str | None) -> None:
    """Clears the checkpoints newer than the one `latest` resumed from (rank 0 only), since the resumed
    run writes those steps again: half-written ones are deleted; damaged ones (complete, but failing
    verification) are moved aside to `damaged-checkpoint-N`, never deleted, in case the difference was
    a hand edit.

    Clearing them first keeps stale files (say, a ZeRO shard of a rank that had finished) out of the
    new checkpoint, and keeps save_total_limit's rotation from counting them.
    """
    resume_step = int(CHECKPOINT_PATTERN.match(os.path.basename(resume_dir)).group(1)) if resume_dir else -1
    for step, path in list_checkpoints(output_dir):
        if step <= resume_step:
            continue
        if not is_complete(path):
            logger.warning("removing half-written checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)
            continue
        aside = os.path.join(output_dir, f"damaged-checkpoint-{step}")
        suffix = 1
        while os.path.exists(aside):
            aside, suffix = os.path.join(output_dir, f"damaged-checkpoint-{step}.{suffix}"), suffix + 1
        os.rename(path, aside)
        logger.warning("moved damaged checkpoint %s aside to %s (delete it when you have looked)", path, aside)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointMarkerCallback(TrainerCallback):
    """Marks `checkpoint-N` complete once every rank has written its part of it."""

    def on_step_end(self, args, state, control, **kwargs):
        # A checkpoint about to be (re)written in a directory that carries an old marker (a resumed run
        # repeating a step, a save at epoch end after one at the same step) must not look complete
        # while it is being overwritten.
        if control.should_save and state.is_world_process_zero:
            stale = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", COMPLETE_MARKER)
            if os.path.exists(stale):
                os.remove(stale)
        return control

    on_epoch_end = on_step_end  # the Trainer saves after either

    def on_save(self, args, state, control, **kwargs):
        checkpoint_dir = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        _barrier()  # ZeRO writes one optimizer shard per rank: all are written before any is hashed
        with save_failures_as_errors(checkpoint_dir, args.output_dir):
            mark_complete(checkpoint_dir, state.global_step)
        return control


class GracefulStopCallback(TrainerCallback):
    """SIGTERM or Ctrl-C (SIGINT) -> save a checkpoint at the end of the current optimizer step and stop
    training; a second Ctrl-C (SECOND_CTRL_C_AFTER_S after the first) quits at once, without it.

    After training, `stopped` says whether it stopped, `signal_name` why and `exit_code` (128 + the signal)
    how the process should end. SIGINT stays ignored where it was (a job started in the background by a
    script: the shell ignores Ctrl-C for it).
    """

    def __init__(self):
        self.signal_received = 0  # the signal number (the larger one if both came); 0: none yet
        self.stopped_by = 0  # the signal the ranks agreed on when they stopped
        self.stopped = False
        self._first_ctrl_c_at: float | None = None
        self._is_main = True
        self._previous_handlers: dict[int, object] = {}

    @property
    def signal_name(self) -> str:
        name = signal.Signals(self.stopped_by).name if self.stopped_by else "signal"
        return f"{name} (Ctrl-C)" if self.stopped_by == signal.SIGINT else name

    @property
    def exit_code(self) -> int:
        return 128 + self.stopped_by

    def _handle(self, signum, frame):
        # Acted on at the next step end: a handler must not do I/O that may be under way (logging), only
        # a raw write to stderr.
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_ctrl_c_at is not None and now - self._first_ctrl_c_at > SECOND_CTRL_C_AFTER_S:
                raise KeyboardInterrupt  # the user will not wait for the step and the save
            if self._first_ctrl_c_at is None:
                self._first_ctrl_c_at = now
                if self._is_main:
                    os.write(2, b"\nCtrl-C: stopping after this optimizer step (press it again to quit at once, without a checkpoint)\n")
        self.signal_received = max(self.signal_received, signum)

    def on_train_begin(self, args, state, control, **kwargs):
        self._is_main = state.is_world_process_zero
        for signum in (signal.SIGTERM, signal.SIGINT):
            if signum == signal.SIGINT and signal.getsignal(signum) is signal.SIG_IGN:
                continue
            self._previous_handlers[signum] = signal.signal(signum, self._handle)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for signum, previous in self._previous_handlers.items():
            signal.signal(signum, previous)
        self._previous_handlers.clear()
        return control

    def _agreed_signal(self, args) -> int:
        """The largest signal number any rank received (0: none), on every rank."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.signal_received
        flag = torch.tensor([float(self.signal_received)], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped:
            return control
        self.stopped_by = self._agreed_signal(args)
        if self.stopped_by:
            self.stopped = True
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"
            logger.warning(
                "%s received: %s and stopping at step %d",
                self.signal_name,
                "saving a checkpoint" if control.should_save else "no checkpoint (--save_strategy no)",
                state.global_step,
            )
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped:  # already saved at this step; no end-of-epoch evaluation or second save
            control.should_save = False
            control.should_evaluate = False
        return control


def add_checkpoint_callbacks(trainer) -> GracefulStopCallback:
    """Adds the completion marker and the SIGTERM stop to `trainer`, and turns a failed checkpoint save
    into a `CheckpointSaveError`; returns the stop callback."""
    stop = GracefulStopCallback()
    trainer.add_callback(stop)  # first: it may ask for a save that the marker callback must see
    trainer.add_callback(CheckpointMarkerCallback())
    save_checkpoint = trainer._save_checkpoint

    @functools.wraps(save_checkpoint)
    def guarded_save_checkpoint(*args, **kwargs):
        checkpoint_dir = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
        with save_failures_as_errors(checkpoint_dir, trainer.args.output_dir):
            return save_checkpoint(*args, **kwargs)

    trainer._save_checkpoint = guarded_save_checkpoint
    return stop


# What a resumed run must share with the run that wrote the checkpoint to be the same run: the loss, the
# optimisation and the data order. transformers itself warns only about batch size and step intervals.
RESUME_SETTINGS = (
    "loss_type", "dft_alpha", "dft_min_weight", "dft_alpha_warmup_ratio",
    *(flag.name for _, flag in variant_flags()),  # every loss variant's own flags (dftune/loss/variants.py)
    "learning_rate", "lr_scheduler_type", "weight_decay", "gradient_accumulation_steps",
    "seed", "data_seed",
)


def changed_resume_settings(checkpoint_dir: str, training_args) -> list[str]:
    """`--flag: now X, checkpoint Y` for each of RESUME_SETTINGS, and the number of processes, that differs
    from the run that wrote `checkpoint_dir` (its training_args.bin and rng_state files); [] when that
    cannot be read (a checkpoint of plain transformers or of an older version)."""
    import torch

    changed = []
    try:
        saved = torch.load(os.path.join(checkpoint_dir, "training_args.bin"), weights_only=False)
    except Exception:  # absent or unreadable (another version's class): nothing to compare
        saved = None
    for name in RESUME_SETTINGS:
        if saved is not None and hasattr(saved, name) and getattr(saved, name) != getattr(training_args, name, None):
            changed.append(f"--{name}: now {getattr(training_args, name, None)}, checkpoint {getattr(saved, name)}")
    ranks = [n for n in os.listdir(checkpoint_dir) if re.fullmatch(r"rng_state(_\d+)?\.pth", n)]
    if ranks and len(ranks) != training_args.world_size:
        changed.append(f"processes: now {training_args.world_size}, checkpoint {len(ranks)}")
    return changed


def prepare_resume(training_args) -> str | None:
    """The checkpoint `Trainer.train` should resume from (see `resolve_resume_checkpoint`); with `latest`,
    world rank 0 also clears the half-written or damaged checkpoints past it (see `remove_checkpoints_after`).
    Settings that differ from the run that wrote it are named in one warning (a changed --loss_type used
    to go on silently, mixing two losses in one run)."""
    resume_dir = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    if training_args.resume_from_checkpoint == "latest" and training_args.process_index == 0:
        remove_checkpoints_after(training_args.output_dir, resume_dir)
    if resume_dir and training_args.process_index == 0:
        changed = changed_resume_settings(resume_dir, training_args)
        if changed:
            logger.warning("resuming %s with settings that differ from the run that wrote it (%s): from here on "
                           "this is a different run; resume with the original flags to continue that one",
                           resume_dir, "; ".join(changed))
    return resume_dir


# ---- output directories and failed saves -------------------------------------------------------------
def _error_reason(err: BaseException) -> str:
    """The errno text of the first OSError in the exception chain, else the error's first line."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


@contextmanager
def save_failures_as_errors(target: str, output_dir: str):
    """Turns an exception raised while writing `target` into a one-line `CheckpointSaveError`.

    Raises:
        CheckpointSaveError: what failed, why, the free space on --output_dir's disk and how to go on.
    """
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:
        earlier = [path for _, path in list_checkpoints(output_dir) if is_complete(path) and path != target]
        resume = f"earlier checkpoints are intact ({os.path.basename(earlier[-1])} the newest); free space, then rerun with --resume_from_checkpoint latest" if earlier else "no earlier checkpoint; free space and start again"
        raise CheckpointSaveError(
            f"saving {target} failed: {_error_reason(err)} ({_free_space(output_dir)} free on the disk holding --output_dir); {resume}"
        ) from err


def _free_space(path: str) -> str:
    from dftune.run.output_dir import free_space  # output_dir.py builds on this module

    return free_space(path)
