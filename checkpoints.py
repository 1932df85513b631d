"""Checkpoints that are either complete or ignored, `--resume_from_checkpoint latest`, and a graceful
stop on SIGTERM.

Why a marker. The HF Trainer writes `checkpoint-N/` file by file (weights, then the optimizer - one shard
per rank under ZeRO - scheduler, RNG states, trainer_state.json) straight into its final directory. A
run killed in the middle (SIGKILL, out of memory, a node lost, or a SIGTERM followed by the launcher's
SIGKILL) leaves a directory that looks like a checkpoint but cannot be resumed from; transformers'
`get_last_checkpoint` would still pick it because it only compares step numbers. So after every rank
has finished writing, rank 0 writes `checkpoint-N/COMPLETE` (atomically: temp file + rename, after
fsync), and `latest` only considers directories that carry it.

SIGTERM. `GracefulStopCallback` turns SIGTERM into "save a checkpoint at the end of this optimizer step
and stop"; `train_dft` then exits with status 143 (128 + SIGTERM) without writing the final model.
The ranks agree on the step through one all-reduce of a flag per step, so a signal that reached one
rank only still stops them all at the same step. If the launcher kills the processes before that save
completes (torchrun and deepspeed escalate to SIGKILL after 30 s), the half-written directory has no
marker and the previous checkpoint is used.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
EXIT_STOPPED_BY_SIGTERM = 128 + signal.SIGTERM


class CheckpointError(ValueError):
    """`--resume_from_checkpoint` names something that cannot be resumed from."""


def is_complete(checkpoint_dir: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint_dir, COMPLETE_MARKER))


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
    """The complete checkpoint with the highest step in `output_dir`, or None."""
    complete = [path for _, path in list_checkpoints(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """Turns `--resume_from_checkpoint` into a directory for `Trainer.train`, or None to start fresh.

    "latest": the newest complete checkpoint in `output_dir`; none there means a fresh start (so the
    same command both starts a job and restarts it). A path: used as given (a warning if it has no
    completion marker, e.g. a checkpoint written by plain transformers).

    Raises:
        CheckpointError: the path does not exist or has no trainer_state.json.
    """
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        chosen = latest_complete_checkpoint(output_dir)
        skipped = [path for step, path in list_checkpoints(output_dir) if not is_complete(path)]
        if skipped:
            logger.warning("ignoring incomplete (half-written) checkpoints: %s", ", ".join(skipped))
        if chosen is None:
            logger.info("--resume_from_checkpoint latest: no complete checkpoint in %s, starting from scratch", output_dir)
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


def remove_incomplete_after(output_dir: str, resume_dir: str | None) -> None:
    """Deletes half-written checkpoints newer than the one resumed from (rank 0 only).

    They would be overwritten by the same steps anyway; removing them first keeps stale files (say, a
    ZeRO shard of a rank that had finished) out of the new checkpoint, and keeps save_total_limit's
    rotation from counting them.
    """
    resume_step = int(CHECKPOINT_PATTERN.match(os.path.basename(resume_dir)).group(1)) if resume_dir else -1
    for step, path in list_checkpoints(output_dir):
        if step > resume_step and not is_complete(path):
            logger.warning("removing half-written checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(directory: str) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_marker(checkpoint_dir: str, step: int) -> None:
    """Atomically writes `checkpoint_dir/COMPLETE` (temp file, fsync, rename, fsync the directory)."""
    temporary = os.path.join(checkpoint_dir, f".{COMPLETE_MARKER}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(f"step {step}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(checkpoint_dir, COMPLETE_MARKER))
    fd = os.open(checkpoint_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        if state.is_local_process_zero and os.path.isdir(checkpoint_dir):
            _fsync_tree(checkpoint_dir)  # every node flushes what it wrote before rank 0 vouches for it
        _barrier()  # ZeRO writes one optimizer shard per rank
        if state.is_world_process_zero and os.path.isdir(checkpoint_dir):
            write_marker(checkpoint_dir, state.global_step)
            logger.info("checkpoint complete: %s", checkpoint_dir)
        return control


class GracefulStopCallback(TrainerCallback):
    """SIGTERM -> save a checkpoint at the end of the current optimizer step and stop training."""

    def __init__(self):
        self.signal_received = False
        self.stopped = False
        self._previous_handler = None

    def _handle(self, signum, frame):
        self.signal_received = True  # acted on at the next step end; a handler must not do I/O

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous_handler = signal.signal(signal.SIGTERM, self._handle)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
        return control

    def _any_rank_signalled(self, args) -> bool:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.signal_received
        flag = torch.tensor([1.0 if self.signal_received else 0.0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if not self.stopped and self._any_rank_signalled(args):
            self.stopped = True
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"
            logger.warning(
                "SIGTERM received: %s and stopping at step %d",
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
    """Adds the completion marker and the SIGTERM stop to `trainer`; returns the stop callback."""
    stop = GracefulStopCallback()
    trainer.add_callback(stop)  # first: it may ask for a save that the marker callback must see
    trainer.add_callback(CheckpointMarkerCallback())
    return stop


def prepare_resume(training_args) -> str | None:
    """The checkpoint `Trainer.train` should resume from (see `resolve_resume_checkpoint`); on world
    rank 0 also clears half-written checkpoints past it (see `remove_incomplete_after`)."""
    resume_dir = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    if training_args.resume_from_checkpoint == "latest" and training_args.process_index == 0:
        remove_incomplete_after(training_args.output_dir, resume_dir)
    return resume_dir
