"""Two CPU processes (torchrun, gloo): only rank 0 creates tracker runs and writes the run records,
and the token totals of run_summary.json are summed over both ranks."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys

import pytest

from helpers import swanlab_offline_run, tensorboard_scalars, wandb_offline_run, write_small_data

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
def test_only_rank_zero_tracks_and_tokens_add_up_over_ranks(tmp_path, tiny_model_dir, sample_files):
    data = write_small_data(tmp_path, 36)  # 32 train (4 steps of 2 x 4), 4 eval
    output_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "SWANLAB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    for name in ("WANDB_DIR", "SWANLAB_LOG_DIR", "TENSORBOARD_LOGGING_DIR"):
        env.pop(name, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        os.path.join(ROOT, "train_dft.py"), "--use_cpu", "True",
        "--model_name_or_path", tiny_model_dir, "--data_files", str(data), "--output_dir", str(output_dir),
        "--run_name", "ddp", "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--max_length", "256", "--logging_steps", "1",
        "--validation_split_percentage", "10", "--eval_strategy", "steps", "--eval_steps", "2",
        "--save_strategy", "no", "--report_to", "swanlab,wandb,tensorboard", "--disable_tqdm", "True", "--seed", "0",
    ]
    result = subprocess.run(command, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]

    logs = output_dir / "logs"
    wandb_run = wandb_offline_run(str(logs))  # asserts exactly one run
    swanlab_run = swanlab_offline_run(str(logs / "swanlog"))  # asserts exactly one run
    scalars, _ = tensorboard_scalars(str(logs))  # asserts exactly one event file
    assert not glob.glob(str(tmp_path / "wandb")) and not glob.glob(str(tmp_path / "swanlog")), "a rank tracked elsewhere"
    assert wandb_run["config"]["hardware"]["world_size"] == 2
    for series in (wandb_run["history"]["train/loss"], swanlab_run["scalars"]["train/loss"], scalars["train/loss"]):
        assert len(series) == 4, "one point per step: a second tracking rank would double them"

    with open(output_dir / "run_summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    with open(output_dir / "run_config.json", encoding="utf-8") as f:
        data_totals = json.load(f)["data"]
    assert summary["steps"] == 4
    assert data_totals["train_conversations"] == 32
    # Each rank saw half of the epoch; the totals are reduced over both.
    assert summary["supervised_tokens"] == data_totals["train_supervised_tokens_per_epoch"]
    assert summary["total_tokens"] == data_totals["train_tokens_per_epoch"]
    progress = [line for line in result.stderr.splitlines() if "dft: step 4/4: " in line and "(100%, elapsed" in line]
    assert progress and all("[rank 0/2]" in line for line in progress)
