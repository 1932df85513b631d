"""Process-group set-up that must happen before `TrainingArguments` exists, and a ZeRO-3 partition report.

Launchers (torchrun, `deepspeed`, `accelerate launch`) export RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT / LOCAL_RANK; the HF Trainer and accelerate read them. Two cases need help on CPU:

* DeepSpeed without a GPU: `TrainingArguments` builds the DeepSpeed config (and ZeRO-3's `zero.Init`
  reads it while the model loads) before any process group exists, so DeepSpeed sees a world of 1 and
  its `train_batch_size == micro_batch * accumulation * world_size` check fails. Opening the gloo
  process group first makes every later reader see the real world size.
* DeepSpeed in one process without a launcher: with no RANK/WORLD_SIZE in the environment DeepSpeed
  tries MPI discovery (mpi4py). A one-process rendezvous on localhost avoids that.

And one launch that cannot work is refused: `accelerate launch --cpu --num_processes 2` starts a single
process (accelerate runs CPU processes only under MPI, `--mpirun_hostfile`) and tells it neither its rank
nor the world size, so the run would quietly train alone (see `check_accelerate_launch`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from typing import NoReturn

from dftune.errors import UsageError

logger = logging.getLogger("dft.distributed")

# What tells a process its place in a multi-process run: torchrun, deepspeed and `accelerate launch
# --multi_gpu` export RANK / WORLD_SIZE; mpirun (accelerate's multi-CPU mode) exports its own.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def deepspeed_requested(argv: list[str]) -> bool:
    """True when the command line or its config file (`run.yaml [flags]`, `--config run.yaml`) names a DeepSpeed config."""
    from dftune.config_file import read_config_file, split_config_file

    if any(arg == "--deepspeed" or arg.startswith("--deepspeed=") for arg in argv):
        return True
    try:
        path, _ = split_config_file(argv)
        return bool(path and read_config_file(path).get("deepspeed"))
    except ValueError:  # a bad config file: parse_args reports it in one line
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_accelerate_launch(environ: Mapping[str, str] = os.environ) -> None:
    """Refuses a process that `accelerate launch --cpu` started alone although more were asked for.

    accelerate's simple launcher (what `--cpu` uses without MPI) starts one process whatever
    `--num_processes` says, and exports MASTER_ADDR/MASTER_PORT only when more than one process or machine
    was asked for; it never exports RANK or WORLD_SIZE. So ACCELERATE_USE_CPU with MASTER_ADDR and no rank
    variable means that of the N processes asked for only this one runs, training alone (with --num_machines,
    one such lone run per machine, all writing the same --output_dir).

    Raises:
        UsageError: naming the launch and the commands that do start N CPU processes.
    """
    if environ.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1", "yes"):
        return
    if "MASTER_ADDR" not in environ or any(name in environ for name in RANK_VARIABLES):
        return
    raise UsageError(
        "accelerate launch --cpu started 1 process, not the --num_processes asked for (accelerate runs several CPU "
        "processes only under MPI, --mpirun_hostfile); for N CPU processes run `accelerate launch --multi_gpu "
        "--num_processes N train_dft.py ... --use_cpu True` or `torchrun --nproc_per_node N train_dft.py ... --use_cpu True` "
        "(for one process leave out --num_processes, and unset MASTER_ADDR)"
    )


def prepare_process_group(argv: list[str]) -> None:
    """Opens the gloo process group for DeepSpeed on CPU (see the module docstring); no-op otherwise.

    Call before the arguments are parsed. On GPUs, under torchrun without DeepSpeed, and when a process
    group already exists, nothing is done: the Trainer and accelerate set things up themselves.

    Raises:
        UsageError: `accelerate launch --cpu --num_processes N` started one process (`check_accelerate_launch`).
    """
    import torch

    check_accelerate_launch()
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
    unlink_shared_memory_names()


def unlink_shared_memory_names() -> None:
    """Removes this rank's name of DeepSpeed's CPU allreduce buffer once every rank has mapped it.

    On CPU, DeepSpeed maps one 69 MB file per rank in /dev/shm (`deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`)
    and never unlinks it, so every run left 69 MB of RAM per process behind (the test suite left 20 GiB).
    After the barrier every rank has mapped every buffer; the mappings outlive the name. No-op without a
    process group or without the file (GPUs, another DeepSpeed).
    """
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{torch.distributed.get_rank()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join("/dev/shm", name))


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

    Ctrl-C: during training the first one stops the run with a checkpoint (GracefulStopCallback, exit 130);
    one at any other time (loading, a second Ctrl-C) ends it here with one line and status 130 instead of a
    KeyboardInterrupt traceback.
    """
    import torch

    try:
        main()
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); a rerun with --resume_from_checkpoint latest continues from the newest complete "
              "checkpoint, if any", file=sys.stderr)
        code = 128 + signal.SIGINT
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
