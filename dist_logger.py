"""Rank-aware logging: rank 0 speaks (INFO), other ranks only warn; every line says which rank it is.

Works before torch.distributed is initialised: the rank comes from the launcher's environment
(RANK/WORLD_SIZE from torchrun, deepspeed and accelerate launch).
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s [rank {rank}/{world}] %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def get_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def get_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return get_rank() == 0


def setup_logging(logging_dir: str | None = None, log_file_name: str = "train.log") -> logging.Logger:
    """Configures the root logger and the transformers/datasets/deepspeed loggers for this rank.

    Rank 0: INFO to stderr and, when `logging_dir` is given, to `logging_dir/log_file_name`.
    Other ranks: WARNING and above to stderr only. Returns the project logger.
    """
    rank, world = get_rank(), get_world_size()
    level = logging.INFO if rank == 0 else logging.WARNING
    formatter = logging.Formatter(FORMAT.format(rank=rank, world=world), datefmt=DATE_FORMAT)

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

    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    datasets.utils.logging.set_verbosity(level)
    datasets.utils.logging.disable_propagation()
    datasets_logger = logging.getLogger("datasets")
    for handler in list(datasets_logger.handlers):
        datasets_logger.removeHandler(handler)
    datasets_logger.propagate = True
    if rank != 0:
        datasets.utils.logging.disable_progress_bar()
    for name in ("deepspeed", "DeepSpeed", "torch.distributed", "accelerate"):
        library_logger = logging.getLogger(name)
        for handler in list(library_logger.handlers):
            library_logger.removeHandler(handler)
        library_logger.setLevel(level)
        library_logger.propagate = True
    return logging.getLogger("dft")
