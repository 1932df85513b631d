"""Launch configuration without launching: the DeepSpeed configs, the commands scripts/train.sh builds
for CPU, one GPU, 8 GPUs and several nodes (DRY_RUN=1), and the pre-TrainingArguments set-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dftune.run.distributed import deepspeed_requested

from helpers import ROOT, TINY_MODEL, child_env, free_port

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

CONFIGS = ["zero2.json", "zero3.json", "zero3_offload.json"]


@pytest.mark.parametrize("name", CONFIGS)
def test_ds_config_leaves_the_numbers_to_the_command_line(name):
    config = json.loads((ROOT / "ds_config" / name).read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    zero = config["zero_optimization"]
    assert zero["stage"] == (2 if name == "zero2.json" else 3)
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # a consolidated final model
    assert ("offload_optimizer" in zero) == (name == "zero3_offload.json")


TRAIN_SH_VARIABLES = ("MODEL", "DATA_FILES", "OUTPUT_DIR", "LOG_DIR", "NUM_GPUS", "NUM_PROCS", "DS_CONFIG", "NNODES", "HOSTFILE", "PYTHON",
                      "MASTER_PORT", "DFT_ALPHA", "DRY_RUN", "SEQUENCE_PARALLEL_SIZE")


def dry_run(env: dict[str, str], *extra: str, cwd=ROOT) -> str:
    """The command scripts/train.sh prints with DRY_RUN=1, run from `cwd` (OUTPUT_DIR=out unless `env` says)."""
    full_env = {k: v for k, v in os.environ.items() if k not in TRAIN_SH_VARIABLES}
    full_env.update({"DRY_RUN": "1", "OUTPUT_DIR": "out", **env})
    result = subprocess.run(["bash", str(ROOT / "scripts" / "train.sh"), *extra], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_train_sh_gpu_commands():
    one = dry_run({"NUM_GPUS": "1", "MODEL": "/models/m", "MASTER_PORT": "29500"}, "--num_train_epochs", "2")
    assert one.startswith("deepspeed --num_gpus 1 --master_port 29500 train_dft.py --model_name_or_path /models/m")
    assert one.endswith("--deepspeed ds_config/zero3.json --bf16 True --num_train_epochs 2")
    eight = dry_run({"NUM_GPUS": "8", "MODEL": "/models/m", "DS_CONFIG": "ds_config/zero3_offload.json"})
    assert eight.startswith("deepspeed --num_gpus 8 ") and "--deepspeed ds_config/zero3_offload.json" in eight
    nodes = dry_run({"NUM_GPUS": "8", "NNODES": "2", "HOSTFILE": "hosts", "MASTER_ADDR": "10.0.0.1", "MODEL": "/models/m"})
    assert nodes.startswith("deepspeed --hostfile hosts --num_nodes 2 --num_gpus 8 --master_addr 10.0.0.1 --master_port 29500 train_dft.py")


def test_train_sh_passes_the_sequence_parallel_size():
    command = dry_run({"NUM_GPUS": "8", "MODEL": "/models/m", "SEQUENCE_PARALLEL_SIZE": "4"})
    assert "--sequence_parallel_size 4" in command and "--deepspeed ds_config/zero3.json" in command
    assert "--sequence_parallel_size" not in dry_run({"NUM_GPUS": "8", "MODEL": "/models/m"})


def test_train_sh_multi_node_needs_a_hostfile():
    env = {k: v for k, v in os.environ.items() if k != "HOSTFILE"}
    env.update(DRY_RUN="1", NUM_GPUS="8", NNODES="2")
    result = subprocess.run(["bash", "scripts/train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "HOSTFILE is required" in result.stderr


def test_train_sh_cpu_commands():
    assert dry_run({"NUM_GPUS": "0"}).startswith("python train_dft.py --model_name_or_path assets/tiny-qwen2")
    ddp = dry_run({"NUM_GPUS": "0", "NUM_PROCS": "2", "MASTER_PORT": "29555"})
    assert ddp.startswith("torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29555 train_dft.py")
    assert "--use_cpu True" in ddp and "--deepspeed" not in ddp
    zero3 = dry_run({"NUM_GPUS": "0", "NUM_PROCS": "2", "DS_CONFIG": "ds_config/zero3.json"})
    assert zero3.startswith("deepspeed --num_gpus 2 ") and zero3.endswith("--deepspeed ds_config/zero3.json --use_cpu True")


def test_train_sh_takes_paths_relative_to_the_callers_folder(tmp_path):
    """train.sh used to `cd` into the checkout: DATA_FILES=mydata.jsonl given in another folder was looked for
    in the checkout, and OUTPUT_DIR landed there. The bundled files are still found from anywhere."""
    command = dry_run({"NUM_GPUS": "0", "DATA_FILES": "mydata.jsonl more.json", "OUTPUT_DIR": "runs/a"}, cwd=tmp_path)
    assert command.startswith(f"python {ROOT}/train_dft.py --model_name_or_path {ROOT}/assets/tiny-qwen2 "
                              "--data_files mydata.jsonl more.json --output_dir runs/a --logging_dir runs/a/logs ")
    assert f"--eval_generation_files {ROOT}/data/sample_eval/questions.jsonl " in command  # the demo's own file
    bundled = dry_run({"NUM_GPUS": "0"}, cwd=tmp_path)
    assert f" --data_files {ROOT}/data/sample/chat_en.jsonl {ROOT}/data/sample/chat_zh.json " in bundled
    zero3 = dry_run({"NUM_GPUS": "1", "MODEL": "models/m", "MASTER_PORT": "29500"}, cwd=tmp_path)
    assert zero3.startswith(f"deepspeed --num_gpus 1 --master_port 29500 {ROOT}/train_dft.py --model_name_or_path models/m ")
    assert f"--deepspeed {ROOT}/ds_config/zero3.json " in zero3
    assert dry_run({"NUM_GPUS": "1", "MODEL": "models/m", "DS_CONFIG": "my_zero.json"}, cwd=tmp_path).endswith("--deepspeed my_zero.json --bf16 True")


@pytest.mark.parametrize(("env", "extra", "output_dir", "logging_dir"), [
    ({}, ["--output_dir", "mine"], "mine", "mine/logs"),
    ({}, ["--output_dir=mine"], "mine", "mine/logs"),
    ({"LOG_DIR": "elsewhere"}, ["--output_dir", "mine"], "mine", "elsewhere"),
    ({}, ["--output_dir", "mine", "--logging_dir", "tb"], "mine", "tb"),
    ({}, ["--logging-dir=tb"], "out", "tb"),
])
def test_train_sh_output_dir_among_the_extra_arguments_keeps_model_and_logs_together(env, extra, output_dir, logging_dir):
    """`train.sh --output_dir X` trained into X but wrote the logs to OUTPUT_DIR/logs of the environment's
    (or the timestamped default) folder: the model in one folder, its logs in another."""
    command = dry_run({"NUM_GPUS": "0", **env}, *extra)
    assert f" --output_dir {output_dir} --logging_dir {logging_dir} " in command and command.endswith(" ".join(extra))


@pytest.mark.integration
def test_train_sh_run_from_another_folder_keeps_model_and_logs_there(tmp_path):
    """A real run from a folder outside the checkout, with relative paths: the data is read there, the model
    and every log (train.log, the train-<timestamp>.log of the console) land in the --output_dir given there."""
    (tmp_path / "mydata.jsonl").write_text("\n".join((ROOT / "data" / "sample" / "chat_en.jsonl").read_text().splitlines()[:8]) + "\n")
    env = {k: v for k, v in child_env().items() if k not in TRAIN_SH_VARIABLES}
    # The model by its absolute path: not the demo's settings (3 epochs, evaluation), a one-step run.
    env.update(NUM_GPUS="0", MODEL=str(TINY_MODEL), DATA_FILES="mydata.jsonl", OUTPUT_DIR="env-out")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "train.sh"), "--output_dir", "run1", "--max_steps", "1", "--report_to", "none"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    run = tmp_path / "run1"
    assert (run / "model.safetensors").is_file() and (run / "logs" / "train.log").is_file()
    assert result.stdout.splitlines()[0].startswith(f"log file: {run / 'logs' / 'train-'}")
    assert not (tmp_path / "env-out").exists() and not (ROOT / "run1").exists()


def test_train_sh_demo_saves_checkpoints_when_asked():
    """The demo's `--save_strategy no` used to win over a user's `--save_steps 500` (transformers only
    saves every --save_steps under --save_strategy steps): an unattended demo-model run kept nothing."""
    assert "--save_strategy no" in dry_run({"NUM_GPUS": "0"})
    for asked in (["--save_steps", "50"], ["--save_steps=50"], ["--save_strategy", "epoch"]):
        command = dry_run({"NUM_GPUS": "0"}, *asked)
        assert "--save_strategy no" not in command and command.endswith(" ".join(asked))


@pytest.mark.parametrize("variable", ["OUTPUT_DIR", "LOG_DIR"])
def test_train_sh_unusable_output_dir_is_one_line_and_exit_2(tmp_path, variable):
    """A file where the folder should be: one line naming the variable, exit 2 (was two `mkdir:` lines, exit 1)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    env = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "LOG_DIR")}
    env.update({"NUM_GPUS": "0", "OUTPUT_DIR": str(tmp_path / "out"), variable: str(a_file / "sub")})
    result = subprocess.run(["bash", "scripts/train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == f"error: {variable} {a_file / 'sub'}: cannot create it (Not a directory); choose another directory"


def test_deepspeed_requested(tmp_path):
    assert deepspeed_requested(["--deepspeed", "ds_config/zero3.json"])
    assert deepspeed_requested(["--deepspeed=ds_config/zero3.json"])
    assert not deepspeed_requested(["--model_name_or_path", "m"])
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: m\ndeepspeed: ds_config/zero3.json\n")
    assert deepspeed_requested([str(config)])
    config.write_text("model_name_or_path: m\n")
    assert not deepspeed_requested([str(config)])


@pytest.mark.distributed
def test_a_launched_rank_closes_its_process_group_on_every_exit(tmp_path):
    """train_dft.py run as a script destroys the process group before the interpreter exits, also when
    it stops on bad input: a gloo group left for interpreter finalisation can abort a rank that finished
    first (SIGABRT, "terminate called without an active exception"), failing a finished run."""
    probe = (
        "import runpy, sys, torch\n"
        "sys.argv = ['train_dft.py', '--deepspeed', 'ds_config/zero3.json', '--use_cpu', 'True',\n"
        f"            '--output_dir', {str(tmp_path / 'out')!r}, '--loss_type', 'sft', '--dft_min_weight', '0.1']\n"
        "try:\n"
        "    runpy.run_path('train_dft.py', run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    print('exit', stop.code, 'group open', torch.distributed.is_initialized())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "exit 2 group open False" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.distributed
def test_ranks_of_a_launch_leave_without_interpreter_teardown_and_keep_their_exit_code(tmp_path):
    """run_as_script: each rank of a 2-process launch exits with main()'s status by os._exit, after its output is
    flushed, skipping the interpreter finalisation in which gloo's threads can abort a finished rank."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import atexit, sys\n"
        "import torch.distributed as dist\n"
        "from dftune.run.distributed import run_as_script\n"
        "def main():\n"
        "    dist.init_process_group('gloo')\n"
        "    atexit.register(print, 'finalised', flush=True)\n"
        "    print(f'rank {dist.get_rank()} done', end='')  # no newline, no flush: the exit must flush it\n"
        "    sys.exit(3)\n"
        "run_as_script(main)\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script)]
    result = subprocess.run(command, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "exitcode  : 3" in output, output[-3000:]
    assert "rank 0 done" in output and "rank 1 done" in output, output[-3000:]
    assert "finalised" not in output and "SIGABRT" not in output


def test_ctrl_c_outside_training_is_one_line_and_status_130(capsys):
    """Ctrl-C while the model or data loads (or a second one during training) printed a KeyboardInterrupt
    traceback and exit 1."""
    from dftune.run.distributed import run_as_script

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exited:
        run_as_script(interrupted)
    assert exited.value.code == 130
    assert capsys.readouterr().err.splitlines() == [
        "interrupted (Ctrl-C); a rerun with --resume_from_checkpoint latest continues from the newest complete checkpoint, if any"]


def test_exit_codes_follow_sys_exit(capsys):
    from dftune.run.distributed import _exit_code

    assert [_exit_code(None), _exit_code(0), _exit_code(2), _exit_code(143)] == [0, 0, 2, 143]
    assert _exit_code("error: bad flag") == 1 and capsys.readouterr().err == "error: bad flag\n"


def test_train_sh_picks_a_free_master_port_on_one_machine():
    """Two single-machine runs at once (compare.py --parallel 2 --launcher train.sh) both used port 29500:
    the second died with EADDRINUSE. Several nodes must agree on the port: 29500 unless set."""
    import re

    ports = [int(re.search(r"--master_port (\d+)", dry_run({"NUM_GPUS": "0", "NUM_PROCS": "2"})).group(1)) for _ in range(2)]
    assert all(port != 29500 and 1024 <= port < 65536 for port in ports)
    assert "--master_port 29511 " in dry_run({"NUM_GPUS": "0", "NUM_PROCS": "2", "MASTER_PORT": "29511"})
    nodes = dry_run({"NUM_GPUS": "8", "NNODES": "2", "HOSTFILE": "hosts", "MODEL": "/models/m"})
    assert "--master_port 29500 " in nodes
