"""Distributed tier for the anchored loss (--loss_type asft): 2 CPU processes under torchrun (DDP,
full loss) and the deepspeed launcher (ZeRO-3, chunked loss, the frozen reference sharded too) give
the numbers of one process with the same global batch.

Every run: 16 conversations, global batch 4, 2 steps (the second with a non-zero anchor), SGD.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import ROOT, SGD_ARGS, assert_same_logs, assert_same_update, launch, train_logs, weight_delta

pytestmark = pytest.mark.distributed
STEPS = 2
KEYS = ("loss", "ce_loss", "avg_p_correct", "anchor_kl", "entropy", "low_p_share")


def asft_args(data_file: str, output_dir: Path) -> list[str]:
    return [
        "--model_name_or_path", str(ROOT / "assets" / "tiny-qwen2"), "--data_files", data_file,
        "--output_dir", str(output_dir), "--max_steps", str(STEPS), "--logging_steps", "1", "--save_steps", "2",
        "--report_to", "none", "--disable_tqdm", "True", "--loss_type", "asft", "--anchor_kl_coef", "1.0",
        *SGD_ARGS,
    ]


@pytest.fixture(scope="module")
def one_process(workdir, data_file) -> Path:
    import train_dft

    out = workdir / "one"
    train_dft.main(asft_args(data_file, out) + ["--per_device_train_batch_size", "4"])
    return out


def test_asft_ddp_matches_one_process(workdir, data_file, one_process):
    out = workdir / "ddp"
    launch("torchrun", asft_args(data_file, out) + ["--per_device_train_batch_size", "2", "--loss_impl", "full"], workdir / "ddp.console")
    expected = train_logs(one_process)
    assert expected[0]["anchor_kl"] == 0.0 and expected[1]["anchor_kl"] > 1e-4
    assert_same_logs(train_logs(out), expected, keys=KEYS, what="asft DDP 2 x batch 2 vs 1 x batch 4")
    assert_same_update(weight_delta(out / "checkpoint-2"), weight_delta(one_process / "checkpoint-2"), 1e-5, "asft DDP, 2 steps")


def test_asft_zero3_with_sharded_reference_matches_one_process(workdir, data_file, one_process):
    out = workdir / "zero3"
    console = launch("deepspeed", asft_args(data_file, out) + [
        "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2", "--loss_impl", "chunked",
        "--deepspeed", str(ROOT / "ds_config" / "zero3.json"), "--use_cpu", "True",
    ], workdir / "zero3.console")
    match = re.search(r"anchor reference: frozen copy under DeepSpeed stage 3, elements held on this rank: (\d+) of (\d+)", console)
    assert match, "no reference partition line in the ZeRO-3 run's log"
    held, full = map(int, match.groups())
    assert held < 0.6 * full  # sharded like the trained model, not a full copy per rank
    assert_same_logs(train_logs(out), train_logs(one_process), keys=KEYS, what="asft ZeRO-3 2 x batch 1 x GA 2 vs 1 x batch 4")
    assert_same_update(weight_delta(out / "checkpoint-2"), weight_delta(one_process / "checkpoint-2"), 1e-5, "asft ZeRO-3, 2 steps")
