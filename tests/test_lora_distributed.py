"""LoRA under DeepSpeed ZeRO-3 with 2 CPU processes (gloo): adapters train, are saved whole from the
partitioned model, and the merged model equals base + adapter.

The test launches this file with torchrun; run as a script it is the training entry of each rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

ROOT = Path(__file__).resolve().parent.parent

# ZeRO-3 that really partitions the tiny model: with the default persistence threshold (100K elements)
# every tiny parameter would stay whole on every rank and no gather would be exercised.
ZERO3_CONFIG = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
}


def _free_port() -> int:
    with socket.socket() as sock:  # torchrun's --master_port 0 does not pick a port; ask the OS for one
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(argv: list[str]) -> None:
    import train_dft  # it opens the gloo process group DeepSpeed needs on CPU

    train_dft.main(argv)


@pytest.mark.distributed
def test_lora_zero3_two_processes(tiny_model_dir, sample_files, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config_path = tmp_path / "zero3.json"
    config_path.write_text(json.dumps(ZERO3_CONFIG))
    out = tmp_path / "out"
    argv = [
        "--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir", str(out),
        "--use_lora", "--merge_lora_on_save", "--lora_dropout", "0", "--loss_impl", "chunked",
        "--max_steps", "3", "--save_strategy", "no", "--per_device_train_batch_size", "2", "--max_length", "128",
        "--learning_rate", "1e-2", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "True",
        "--use_cpu", "True", "--deepspeed", str(config_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
               str(Path(__file__).resolve()), *argv]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 3
    log = (out / "logs" / "train.log").read_text()
    assert "trainable parameters: 16384 of 131520" in log

    # The adapter was gathered from the partitioned model: every tensor whole, every B trained.
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert len(adapter) == 28
    for name, tensor in adapter.items():
        assert tensor.numel() > 0 and torch.isfinite(tensor).all(), name
        if ".lora_B." in name:
            assert tensor.abs().max() > 0, name

    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    ids = torch.randint(3, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    merged.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-5)


if __name__ == "__main__":
    _entry(sys.argv[1:])
