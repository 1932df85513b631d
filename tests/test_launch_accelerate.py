"""`accelerate launch` on CPU: `--cpu --num_processes 2` starts one process that knows nothing of the other
(accelerate runs several CPU processes only under MPI); it is refused with one line naming the commands
that do start two ranks, and the command it names trains with both."""

from __future__ import annotations

import json
import subprocess

import pytest

from dftune.errors import UsageError
from dftune.run.distributed import check_accelerate_launch

from helpers import ROOT, TINY_MODEL, child_env, free_port, write_small_data

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

# What `accelerate launch --cpu --num_processes 2` exports to the one process it starts (accelerate 1.16).
ALONE_OF_TWO = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "ACCELERATE_MIXED_PRECISION": "no"}


def test_a_lone_process_of_accelerate_cpu_launch_is_refused():
    with pytest.raises(UsageError, match=r"^accelerate launch --cpu started 1 process, not the --num_processes asked for .*"
                                         r"accelerate launch --multi_gpu --num_processes N train_dft.py \.\.\. --use_cpu True"):
        check_accelerate_launch(ALONE_OF_TWO)


@pytest.mark.parametrize("environment", [
    {},  # python train_dft.py
    {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no"},  # accelerate launch --cpu: one process asked for
    {"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},  # on GPUs, not --cpu
    {**ALONE_OF_TWO, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"},  # --multi_gpu / torchrun: a rank that knows its place
    {**ALONE_OF_TWO, "OMPI_COMM_WORLD_SIZE": "2"},  # --mpirun_hostfile: MPI tells accelerate the world size
    {**ALONE_OF_TWO, "PMI_SIZE": "2"},
])
def test_launches_that_tell_a_process_its_place_go_on(environment):
    check_accelerate_launch(environment)


def accelerate(launch_flags: list[str], out, data_file: str, *extra: str) -> tuple[subprocess.CompletedProcess, str]:
    command = ["accelerate", "launch", *launch_flags, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(ROOT / "train_dft.py"),
               "--model_name_or_path", str(TINY_MODEL), "--data_files", data_file, "--output_dir", str(out), "--max_steps", "2",
               "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True", *extra]
    result = subprocess.run(command, cwd=out.parent, env=child_env(), capture_output=True, text=True, timeout=300)
    return result, result.stdout + result.stderr


@pytest.mark.distributed
def test_accelerate_cpu_launch_of_two_processes_stops_with_one_line_and_multi_gpu_trains_two_ranks(tmp_path):
    """It used to train in one process that took itself for the whole run (world size 1), as if nothing
    were wrong. The command the refusal names runs 2 ranks on CPU."""
    data_file = write_small_data(tmp_path, 16)
    alone, output = accelerate(["--cpu", "--num_processes", "2"], tmp_path / "alone", data_file)
    assert alone.returncode != 0, output[-3000:]
    errors = [line for line in alone.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: accelerate launch --cpu started 1 process"), output[-3000:]
    assert not (tmp_path / "alone" / "model.safetensors").exists()

    two, output = accelerate(["--multi_gpu", "--num_processes", "2"], tmp_path / "two", data_file, "--use_cpu", "True")
    assert two.returncode == 0, output[-3000:]
    assert "[rank 0/2]" in output
    assert json.loads((tmp_path / "two" / "run_config.json").read_text())["hardware"]["world_size"] == 2
    # 2 steps x 2 ranks x 2 conversations: half of the 16 (one process alone would have seen a quarter).
    assert json.loads((tmp_path / "two" / "trainer_state.json").read_text())["epoch"] == 0.5
    assert (tmp_path / "two" / "model.safetensors").is_file()
