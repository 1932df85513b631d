"""Process-group set-up that must happen before `TrainingArguments` exists, and a ZeRO-3 partition report.

Launchers (torchrun, `deepspeed`, `accelerate launch`) export RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT / LOCAL_RANK; the HF Trainer and accelerate read them. Two cases need help on CPU:

* DeepSpeed without a GPU: `TrainingArguments` builds the DeepSpeed config (and ZeRO-3's `zero.Init`
  reads it while the model loads) before any process group exists, so DeepSpeed sees a world of 1 and
  its `train_batch_size == micro_batch * accumulation * world_size` check fails. Opening the gloo
  process group first makes every later reader see the real world size.
* DeepSpeed in one process without a launcher: with no RANK/WORLD_SIZE in the environment DeepSpeed
  tries MPI discovery (mpi4py). A one-process rendezvous on localhost avoids that.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import NoReturn

logger = logging.getLogger("dft.distributed")


def deepspeed_requested(argv: list[str]) -> bool:
    """True when the command line (or its single JSON/YAML config file) names a DeepSpeed config."""
    if any(arg == "--deepspeed" or arg.startswith("--deepspeed=") for arg in argv):
        return True
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")) and os.path.isfile(argv[0]):
        with open(argv[0], encoding="utf-8") as f:
            if argv[0].endswith(".json"):
                config = json.load(f)
            else:
                import yaml

                config = yaml.safe_load(f)
        return bool(isinstance(config, dict) and config.get("deepspeed"))
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_process_group(argv: list[str]) -> None:
    """Opens the gloo process group for DeepSpeed on CPU (see the module docstring); no-op otherwise.

    Call before the arguments are parsed. On GPUs, under torchrun without DeepSpeed, and when a process
    group already exists, nothing is done: the Trainer and accelerate set things up themselves.
    """
    import torch

    if torch.cuda.is_available() or not deepspeed_requested(argv):
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        # One process, no launcher: a rendezvous with itself instead of MPI discovery.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def close_process_group() -> None:
    """Destroys the default process group, if any (local to this rank: no collective, cannot hang)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _exit_code(code) -> int:
    """`sys.exit(code)` semantics: None is 0, an int is itself, anything else is printed and is 1."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def run_as_script(main: Callable[[], object]) -> NoReturn:
    """Runs a script's `main()` and exits with its status; a rank of a multi-process run leaves with `os._exit`.

    Why: a DDP model keeps its process group alive past `destroy_process_group` (the reducer holds it),
    and tearing gloo's threads down during interpreter finalisation can abort a rank that finished first
    (SIGABRT, "terminate called without an active exception"): the launcher then reports a finished run
    FAILED. By the time main() returns or exits, everything the run writes is closed (files, checkpoints,
    trackers in RunRecorder.finish); the log handlers and standard streams are flushed here. An unexpected
    exception keeps Python's own ending (traceback, exit 1); a single process exits normally.
    """
    import torch

    try:
        main()
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop.code)
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        close_process_group()
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def zero3_partition_sizes(model) -> tuple[int, int] | None:
    """(elements this rank stores, elements of the full model) under ZeRO-3, else None.

    ZeRO-3 replaces each parameter by an empty placeholder plus `ds_tensor`, this rank's slice;
    parameters under `stage3_param_persistence_threshold` stay whole on every rank.
    """
    params = list(model.parameters())
    if not params or not any(hasattr(p, "ds_tensor") for p in params):
        return None
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    full = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    return local, full


def log_zero3_partition(model) -> None:
    """Logs, on rank 0, how many parameter elements each rank holds (one collective on every rank)."""
    import torch
    import torch.distributed as dist

    sizes = zero3_partition_sizes(model)
    if sizes is None or not dist.is_initialized():
        return
    local = torch.tensor(sizes[0], dtype=torch.long)
    if dist.get_backend() == "nccl":
        local = local.cuda()
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    per_rank = ", ".join(f"rank {rank}: {int(n)}" for rank, n in enumerate(gathered))
    logger.info("ZeRO-3 parameter partition (elements held): %s; full model: %d", per_rank, sizes[1])
