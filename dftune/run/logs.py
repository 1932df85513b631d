"""Rank-aware logging: rank 0 speaks (INFO), other ranks only warn; every line says when, how bad and
which rank.

    2026-11-28 05:47:56 INFO [rank 0/2] dft: training on 16 conversations (no evaluation)

Works before torch.distributed is initialised: the rank comes from the launcher's environment
(RANK/WORLD_SIZE from torchrun, deepspeed and accelerate launch). The transformers, datasets, deepspeed
and accelerate loggers are routed through the same handlers, at WARNING unless `--log_level info` (their
INFO is model-config dumps and banners), so a line never appears once per rank. Training metrics go
through logging too (`LogMetricsCallback`), so the log file holds them with the same prefix.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time

from transformers import TrainerCallback

FORMAT = "%(asctime)s %(levelname)s [rank {rank}/{world}] %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
LIBRARY_LOGGERS = ("deepspeed", "DeepSpeed", "torch.distributed", "accelerate")
METRIC_ORDER = ("loss", "ce_loss", "avg_p_correct", "token_accuracy", "grad_norm", "learning_rate", "epoch")

logger = logging.getLogger("dft")

# DeepSpeed says at import, on every rank and in its own format, that it found no GPU ("Setting accelerator to
# CPU. If you have GPU ...", "Setting ds_accelerator to cpu (auto detect)"); a CPU run knows, and the run's
# device is in run_config.json. A filter on its logger survives DeepSpeed's set-up (which replaces the
# handlers and the level, not the filters), so it is installed here, before anything imports deepspeed.
DEEPSPEED_CPU_NOTICE = re.compile(r"Setting (ds_)?accelerator to cpu\b", re.IGNORECASE)


def _drop_deepspeed_cpu_notice(record: logging.LogRecord) -> bool:
    return not DEEPSPEED_CPU_NOTICE.match(record.getMessage())


if _drop_deepspeed_cpu_notice not in logging.getLogger("DeepSpeed").filters:
    logging.getLogger("DeepSpeed").addFilter(_drop_deepspeed_cpu_notice)


def get_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def get_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return get_rank() == 0


class PrefixEveryLineFormatter(logging.Formatter):
    """Repeats the time/level/rank prefix on every line of a multi-line message (and traceback), so
    `grep '\\[rank 1/'` or a line count never meets an unlabelled continuation line."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if "\n" not in text:
            return text
        saved = (record.msg, record.args, record.exc_info, record.exc_text, record.stack_info)
        record.msg, record.args, record.exc_info, record.exc_text, record.stack_info = "", None, None, None, None
        try:
            prefix = super().format(record)  # "time LEVEL [rank r/w] name: "
        finally:
            record.msg, record.args, record.exc_info, record.exc_text, record.stack_info = saved
        first, *rest = text.split("\n")
        return "\n".join([first] + [prefix + line for line in rest])


def _route_through_root(name: str, level: int) -> None:
    library_logger = logging.getLogger(name)
    for handler in list(library_logger.handlers):
        library_logger.removeHandler(handler)
    library_logger.setLevel(level)
    library_logger.propagate = True


def library_log_level(log_level: str = "passive", log_level_replica: str = "warning") -> int:
    """The level of the libraries' loggers (transformers, datasets, DeepSpeed) on this rank.

    HF's `--log_level` (rank 0) and `--log_level_replica` (other ranks). `passive` (the default) is WARNING,
    transformers' own default: their INFO lines are mostly model-config dumps (half of a short run's console),
    while the run's own lines (data report, metrics, summary) are the project's loggers and stay.
    `--log_level info` brings them back on rank 0. Other ranks never go below WARNING: they only warn.
    """
    rank0 = get_rank() == 0
    name = log_level if rank0 else log_level_replica
    if name == "passive":
        return logging.WARNING
    chosen = logging.getLevelName(name.upper())
    return chosen if rank0 else max(chosen, logging.WARNING)


def setup_logging(logging_dir: str | None = None, log_file_name: str = "train.log", library_level: int | None = None) -> logging.Logger:
    """Configures the root logger and the transformers/datasets/deepspeed loggers for this rank.

    Rank 0: INFO to stderr and, when `logging_dir` is given, appended to `logging_dir/log_file_name`.
    Other ranks: WARNING and above to stderr only. `library_level` (see `library_log_level`) sets the
    libraries' loggers apart from the project's. Returns the project logger.
    """
    rank, world = get_rank(), get_world_size()
    level = logging.INFO if rank == 0 else logging.WARNING
    library = level if library_level is None else library_level
    formatter = PrefixEveryLineFormatter(FORMAT.format(rank=rank, world=world), datefmt=DATE_FORMAT)

    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0 and logging_dir:
        os.makedirs(logging_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(logging_dir, log_file_name), encoding="utf-8"))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level)

    # Libraries keep their own handlers and levels; route them through ours at the same level.
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity(library)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    datasets.utils.logging.set_verbosity(library)
    _route_through_root("datasets", library)
    if rank != 0:  # one bar per run (rank 0's), not one per process, e.g. transformers' "Loading weights"
        datasets.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    # DeepSpeed installs its own stdout handler on the "DeepSpeed" logger when it is first imported;
    # re-route it now if it is loaded (train_dft imports it before this under --deepspeed).
    for name in LIBRARY_LOGGERS:
        _route_through_root(name, library)
    logging.captureWarnings(True)  # Python warnings (once per call site) get the same prefix
    logging.getLogger("dft").setLevel(level)
    return logging.getLogger("dft")


def format_metrics(logs: dict) -> str:
    """`loss 0.1068 | ce_loss 0.2 | ...`: known metrics first, floats to 6 significant digits."""
    keys = [k for k in METRIC_ORDER if k in logs] + sorted(k for k in logs if k not in METRIC_ORDER)
    parts = []
    for key in keys:
        value = logs[key]
        parts.append(f"{key} {value:.6g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


def format_duration(seconds: float) -> str:
    """H:MM:SS (hours unbounded)."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def format_progress(step: int, max_steps: int, elapsed: float, steps_done: int) -> str:
    """`25%, elapsed 0:00:50, ETA 0:02:30, 2.00 s/step`.

    `steps_done` counts only this session's steps (after a resume), so the rate and the ETA are real.
    """
    total = max(max_steps, 1)
    rate = steps_done / elapsed if elapsed > 0 and steps_done > 0 else 0.0
    eta = format_duration((total - step) / rate) if rate > 0 else "?"
    parts = [f"{100 * step / total:.0f}%", f"elapsed {format_duration(elapsed)}", f"ETA {eta}"]
    if rate > 0:
        parts.append(f"{rate:.2f} steps/s" if rate >= 1 else f"{1 / rate:.2f} s/step")
    return ", ".join(parts)


class LogMetricsCallback(TrainerCallback):
    """Logs each `Trainer.log` dict once (world rank 0) through logging, in place of a bare print():
    `step 10/108: loss 0.1 | ... (9%, elapsed 0:00:01, ETA 0:00:09, 9.81 steps/s)`, so a nohup log
    shows progress with the metrics even with --disable_tqdm."""

    def __init__(self):
        self.started: float | None = None
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.time()
        self.first_step = state.global_step
        if state.is_world_process_zero and state.max_steps:
            # What transformers' "***** Running training *****" block said, which its WARNING level now hides.
            # A sequence-parallel group of S ranks works on one sequence at a time: world_size / S sequences in parallel.
            sp_size = getattr(args, "sequence_parallel_size", 1)
            parallel = args.world_size // sp_size
            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * parallel
            ranks = f"{args.world_size} process{'es' if args.world_size > 1 else ''}"
            if sp_size > 1:
                ranks = f"{ranks} / {sp_size} sequence-parallel"
            logger.info(
                "training %d step%s, %d sequences a step (%d per device x %d accumulated x %s)",
                state.max_steps, "s" if state.max_steps > 1 else "", per_step, args.per_device_train_batch_size,
                args.gradient_accumulation_steps, ranks,
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            shown = {k: v for k, v in logs.items() if k != "total_flos"}
            if not state.max_steps:  # evaluation without training (dft-eval): no step, no epoch
                logger.info("metrics: %s", format_metrics({k: v for k, v in shown.items() if k != "epoch"}))
                return control
            line = f"step {state.global_step}/{state.max_steps}: {format_metrics(shown)}"
            if self.started is not None:
                elapsed = time.time() - self.started
                line += f" ({format_progress(state.global_step, state.max_steps, elapsed, state.global_step - self.first_step)})"
            logger.info(line)
        return control


def use_logging_for_metrics(trainer) -> None:
    """Replaces the Trainer's print()-based metric output by `LogMetricsCallback` (the tqdm bar stays)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    progress = trainer.pop_callback(ProgressCallback)
    if progress is not None:
        progress.on_log = lambda *args, **kwargs: None  # the bar's own copy of the metrics line
        trainer.add_callback(progress)
    trainer.add_callback(LogMetricsCallback())
