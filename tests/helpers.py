"""Helpers shared by the tests (tests import this module, never conftest):

- paths of the bundled material (ROOT, TINY_MODEL, SAMPLE_FILES, FIXTURES, TEMPLATES);
- launching train_dft.py in real processes (python, torchrun, deepspeed; all on CPU) and reading what the
  runs left behind (logs, weights);
- small builders (tiny models for a real tokenizer, data files) and readers (supervised spans, JSONL);
- readers for what the trackers wrote offline (no tracker server involved): wandb (`run-*.wandb`) and swanlab (`run-*.swanlab`) both store a run as a LevelDB log: a 7-byte file
  header, then 32 KiB blocks of records framed as (crc32 u32, length u16, type u8) + payload, a payload
  being one protobuf `Record` of the library's own schema.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "assets" / "tiny-qwen2"
SAMPLE_FILES = [str(ROOT / "data" / "sample" / "chat_en.jsonl"), str(ROOT / "data" / "sample" / "chat_zh.json")]
FIXTURES = ROOT / "tests" / "fixtures"
TEMPLATES = FIXTURES / "templates"
IGNORE_INDEX = -100

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


def launch(launcher: str, args: list[str], log_path: Path, timeout: int = 600, procs: int = 2, port: int | None = None) -> str:
    """Runs train_dft.py under `launcher` (python | torchrun | deepspeed) on `port` (a free one by default),
    returns its console output.

    Raises AssertionError with the output's tail when the run fails.
    """
    if launcher == "python":
        command = [sys.executable, "train_dft.py"]
    elif launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                   "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()), "train_dft.py"]
    elif launcher == "deepspeed":
        command = ["deepspeed", "--num_gpus", str(procs), "--master_port", str(port or free_port()), "train_dft.py"]
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
    if "lm_head.weight" in end.keys() - start.keys():
        # DeepSpeed below ZeRO-3 saves a tied LM head beside the embedding it equals; the model has it once.
        assert torch.equal(end.pop("lm_head.weight"), end["model.embed_tokens.weight"]), "an untied lm_head appeared"
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


# ---- small builders and readers -------------------------------------------------------------------------
def tiny_model_for(tokenizer_dir: str, out_dir: str, tie: bool) -> str:
    """A random-init 2-layer Llama of the tokenizer's vocabulary next to a copy of the tokenizer (for train_dft)."""
    import shutil

    import transformers

    shutil.copytree(tokenizer_dir, out_dir, dirs_exist_ok=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie,
                                      eos_token_id=tokenizer.eos_token_id)
    transformers.LlamaForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def supervised_spans(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    """Decoded text of each run of consecutive supervised tokens."""
    spans, run = [], []
    for token_id, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == token_id
            run.append(token_id)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def load_script(name: str):
    """scripts/NAME.py as a module (the scripts are not part of the package). Scripts import their
    siblings by name (experiment_small uses make_tiny_model), as when run, so scripts/ goes on the path."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.append(str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ---- tracker files ----------------------------------------------------------------------------------------
BLOCK = 32768
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def leveldb_records(path: str, file_header: bytes) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(file_header), f"{path}: not a {file_header!r} log"
    records, pending, pos = [], b"", 7
    while pos + RECORD_HEADER <= len(data):
        if BLOCK - pos % BLOCK < RECORD_HEADER:  # the tail of a block is zero padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + RECORD_HEADER])
        pos += RECORD_HEADER
        if kind == 0 and length == 0:
            break
        chunk = data[pos : pos + length]
        pos += length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    return records


def only(pattern: str) -> str:
    matches = glob.glob(pattern)
    assert len(matches) == 1, f"expected exactly one {pattern}, found {matches}"
    return matches[0]


def wandb_offline_run(wandb_parent: str) -> dict:
    """History keys, config keys and the final summary of the one offline run under WANDB_PARENT/wandb/."""
    import json

    from wandb.proto import wandb_internal_pb2

    run_dir = only(os.path.join(wandb_parent, "wandb", "offline-run-*"))
    history: dict[str, list] = {}
    config: dict[str, object] = {}
    summary: dict[str, object] = {}
    for raw in leveldb_records(only(os.path.join(run_dir, "run-*.wandb")), b":W&B"):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                key = "/".join(item.nested_key) or item.key
                history.setdefault(key, []).append(json.loads(item.value_json))
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            for update in updates:
                config["/".join(update.nested_key) or update.key] = json.loads(update.value_json)
        elif kind == "summary":
            for update in record.summary.update:
                summary["/".join(update.nested_key) or update.key] = json.loads(update.value_json)
    return {"dir": run_dir, "history": history, "config": config, "summary": summary}


def swanlab_offline_run(log_dir: str) -> dict:
    """Scalar series and config of the one swanlab run under LOG_DIR."""
    import yaml
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record

    run_dir = only(os.path.join(log_dir, "run-*"))
    scalars: dict[str, list] = {}
    finished = False
    for raw in leveldb_records(only(os.path.join(run_dir, "run-*.swanlab")), b":SWL"):
        record = Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "scalar":
            scalars.setdefault(record.scalar.key, []).append((record.scalar.step, record.scalar.value.number))
        finished = finished or kind == "finish"
    with open(os.path.join(run_dir, "files", "config.yaml"), encoding="utf-8") as f:
        config = {key: entry["value"] for key, entry in yaml.safe_load(f).items()}
    return {"dir": run_dir, "scalars": scalars, "config": config, "finished": finished}


def tensorboard_scalars(logging_dir: str) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """(tag -> [(step, value)], text tags) from the event files in LOGGING_DIR (not its subfolders)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    only(os.path.join(logging_dir, "events.out.tfevents.*"))
    accumulator = EventAccumulator(logging_dir)
    accumulator.Reload()
    tags = accumulator.Tags()
    scalars = {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in tags["scalars"]}
    return scalars, list(tags.get("tensors", []))
