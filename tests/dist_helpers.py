"""Helpers for the distributed, checkpoint and logging tests: launching train_dft.py in real processes
(python, torchrun, deepspeed; all on CPU) and reading what the runs left behind."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "assets" / "tiny-qwen2"

# One step of SGD (momentum: its buffer makes resume depend on the optimizer state) without weight
# decay or clipping: the first step's weight change is -lr * gradient, so runs compare gradients.
SGD_ARGS = [
    "--optim", "sgd", "--optim_args", "momentum=0.9", "--learning_rate", "0.1", "--weight_decay", "0",
    "--max_grad_norm", "0", "--lr_scheduler_type", "constant", "--seed", "7",
]
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) \[rank (\d+)/(\d+)\] ")


def write_small_data(directory: Path, conversations: int = 16) -> str:
    """The first `conversations` English sample conversations (lengths differ) as one JSONL file."""
    source = ROOT / "data" / "sample" / "chat_en.jsonl"
    lines = source.read_text(encoding="utf-8").splitlines()[:conversations]
    path = directory / "small.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    # The launchers (deepspeed, train.sh's python and torchrun) of the environment running the tests,
    # also when it is not activated (`.venv/bin/python -m pytest`).
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


def launch(launcher: str, args: list[str], log_path: Path, timeout: int = 600, procs: int = 2) -> str:
    """Runs train_dft.py under `launcher` (python | torchrun | deepspeed), returns its console output.

    Raises AssertionError with the output's tail when the run fails.
    """
    if launcher == "python":
        command = [sys.executable, "train_dft.py"]
    elif launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "train_dft.py"]
    elif launcher == "deepspeed":
        command = ["deepspeed", "--num_gpus", str(procs), "--master_port", str(free_port()), "train_dft.py"]
    else:
        raise ValueError(launcher)
    with open(log_path, "w", encoding="utf-8") as out:
        result = subprocess.run(command + args, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    output = log_path.read_text(encoding="utf-8", errors="replace")
    assert result.returncode == 0, f"{launcher} run failed ({result.returncode}):\n{output[-6000:]}"
    return output


def train_logs(run_dir: str | Path) -> list[dict]:
    """Per-step training log entries (loss, avg_p_correct, ...) from the run's trainer_state.json."""
    state_files = sorted(Path(run_dir).glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    state = json.loads(state_files[-1].read_text())
    return [entry for entry in state["log_history"] if "loss" in entry and "avg_p_correct" in entry]


def weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint or model directory's model.safetensors, in float64."""
    return {name: t.double() for name, t in load_file(str(Path(path) / "model.safetensors")).items()}


def weight_delta(after: str | Path, before: str | Path = TINY_MODEL) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (after - before, after): the first step's update and the weights it produced."""
    start, end = weights(before), weights(after)
    return {name: (end[name] - start[name], end[name]) for name in end}


def assert_same_update(actual: dict, expected: dict, rtol: float, what: str) -> None:
    """Updates (from `weight_delta`) equal within rtol of the tensor's largest update, plus the float32
    resolution of the weights they were read from (a weight near 1 is only known to ~1e-7)."""
    assert actual.keys() == expected.keys(), f"{what}: different tensors {sorted(actual.keys() ^ expected.keys())}"
    for name, (delta, weight) in expected.items():
        allowed = rtol * delta.abs().max() + 4 * torch.finfo(torch.float32).eps * weight.abs().max()
        error = (actual[name][0] - delta).abs().max()
        assert error <= allowed, f"{what}: {name} update differs by {float(error):.3g} (allowed {float(allowed):.3g})"


def assert_close_dicts(actual: dict, expected: dict, rtol: float, what: str) -> None:
    """Every tensor within rtol of the other, measured against the largest entry of the tensor."""
    assert actual.keys() == expected.keys(), f"{what}: different tensors {sorted(actual.keys() ^ expected.keys())}"
    for name in expected:
        scale = expected[name].abs().max().clamp(min=1e-12)
        error = (actual[name] - expected[name]).abs().max() / scale
        assert error <= rtol, f"{what}: {name} differs by {float(error):.3g} (relative to max {float(scale):.3g})"


def assert_same_logs(actual: list[dict], expected: list[dict], keys=("loss", "avg_p_correct"), rtol=1e-5, what="") -> None:
    assert [e["step"] for e in actual] == [e["step"] for e in expected], f"{what}: logged steps differ"
    for got, want in zip(actual, expected):
        for key in keys:
            assert abs(got[key] - want[key]) <= rtol * abs(want[key]), (
                f"{what}: step {want['step']} {key} {got[key]!r} != {want[key]!r}"
            )
