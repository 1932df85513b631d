"""Shared fixtures: the bundled tiny model and sample data; everything offline."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import FIXTURES, SAMPLE_FILES, TINY_MODEL, write_small_data

# Tiny models gain nothing from several threads, and on a 2-core machine running 2-process tests,
# OpenMP threads of several processes oversubscribe the cores and slow everything down many times.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("SWANLAB_MODE", "offline")
# DeepSpeed's compiled CPU ops live here across sessions (as in scripts/train.sh and .ci/run).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))



BUILD_DEEPSPEED_CPU_OP = """
from deepspeed.accelerator import get_accelerator
if get_accelerator().device_name() == "cpu":
    get_accelerator().create_op_builder("ShareMemCommBuilder").load()
"""


@pytest.fixture(scope="session", autouse=True)
def deepspeed_cpu_op(request):
    """Builds DeepSpeed's CPU communication op once, in one process, before the first test when the
    session holds distributed tests. Otherwise both ranks of the first DeepSpeed run compile it at once
    on a cold cache (2-3 CPU-minutes each) and wait on each other. A file lock keeps two test sessions
    on one machine from building it together; on a warm cache this takes a few seconds."""
    if not any(item.get_closest_marker("distributed") for item in request.session.items):
        return
    directory = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "dft-trainer-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run([sys.executable, "-c", BUILD_DEEPSPEED_CPU_OP], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=1800)
    if result.returncode != 0:  # the distributed tests then fail with the same error; the others still run
        print(f"\nbuilding DeepSpeed's CPU op failed:\n{result.stdout[-3000:]}", file=sys.stderr)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request) -> Path:
    """One folder for a module's tests, whose runs are module-scoped fixtures (the distributed tier)."""
    return tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))


@pytest.fixture(scope="module")
def data_file(workdir) -> str:
    """The first 16 sample conversations as one JSONL file in `workdir`."""
    return write_small_data(workdir)


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """The bundled tiny Qwen2 model (built by scripts/make_tiny_model.py, committed in assets/)."""
    assert (TINY_MODEL / "model.safetensors").is_file(), "run: python scripts/make_tiny_model.py assets/tiny-qwen2"
    return str(TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def sample_files() -> list[str]:
    return list(SAMPLE_FILES)


@pytest.fixture(scope="session")
def real_tokenizer_dirs(tmp_path_factory) -> dict[str, str]:
    """The real Qwen2.5 (152K) and Llama-3.2 (128K) tokenizers, decompressed from tests/fixtures/tokenizers
    (built by scripts/make_tokenizer_fixtures.py): {"qwen2.5": dir, "llama3.2": dir}."""
    import lzma
    import shutil

    dirs = {}
    for source in sorted((FIXTURES / "tokenizers").iterdir()):
        out = tmp_path_factory.mktemp(source.name)
        with lzma.open(source / "tokenizer.json.xz", "rb") as f:
            (out / "tokenizer.json").write_bytes(f.read())
        for name in ("tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(source / name, out / name)
        dirs[source.name] = str(out)
    return dirs


@pytest.fixture(scope="session")
def _real_tokenizers(real_tokenizer_dirs) -> dict:
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(path) for name, path in real_tokenizer_dirs.items()}


@pytest.fixture
def real_tokenizer(_real_tokenizers):
    """load("qwen2.5" | "llama3.2") -> a fresh copy of the real tokenizer (tests may change it)."""
    import copy

    return lambda name: copy.deepcopy(_real_tokenizers[name])


TIERS = ("unit", "integration", "distributed")


def pytest_collection_modifyitems(config, items):
    """Every test belongs to a tier (README, Tests): its file's `pytestmark`, or its own mark when heavier
    (integration, distributed). A test without one is a collection error, so `make test-unit` never
    silently gains a slow test or loses one."""
    untiered = [item.nodeid for item in items if not any(item.get_closest_marker(tier) for tier in TIERS)]
    if untiered:
        raise pytest.UsageError(f"tests without a tier marker ({', '.join(TIERS)}): {', '.join(untiered[:5])}")
