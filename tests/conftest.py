"""Shared fixtures: the bundled tiny model and sample data; everything offline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Tiny models gain nothing from several threads, and on a 2-core machine running 2-process tests,
# OpenMP threads of several processes oversubscribe the cores and slow everything down many times.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("SWANLAB_MODE", "offline")

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY_MODEL = ROOT / "assets" / "tiny-qwen2"
SAMPLE_FILES = [str(ROOT / "data" / "sample" / "chat_en.jsonl"), str(ROOT / "data" / "sample" / "chat_zh.json")]


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
