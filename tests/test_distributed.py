"""Distributed tier: 2 CPU processes under torchrun (DDP, launched through scripts/train.sh under nohup)
and under the deepspeed launcher (ZeRO-3 on gloo), against one process with the same global batch.

Every run: 16 conversations of different lengths, global batch 4 per optimizer step, 3 steps, SGD
with momentum (see dist_helpers.SGD_ARGS), a checkpoint every step. Each launch is reused by several
tests (module-scoped fixtures), because starting processes dominates the cost.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import (
    LOG_LINE,
    ROOT,
    SGD_ARGS,
    assert_close_dicts,
    assert_same_logs,
    assert_same_update,
    child_env,
    free_port,
    launch,
    train_logs,
    weight_delta,
    weights,
)

pytestmark = pytest.mark.distributed
STEPS = 3


def common_args(data_file: str, output_dir: Path) -> list[str]:
    return [
        "--model_name_or_path", str(ROOT / "assets" / "tiny-qwen2"), "--data_files", data_file,
        "--output_dir", str(output_dir), "--max_steps", str(STEPS), "--logging_steps", "1",
        "--save_steps", "1", "--report_to", "none", "--log_level", "info", "--disable_tqdm", "True", *SGD_ARGS,
    ]


@pytest.fixture(scope="module")
def reference(workdir, data_file) -> Path:
    """One process, batch 4 x GA 1 (in this process)."""
    import train_dft

    out = workdir / "reference"
    train_dft.main(common_args(data_file, out) + ["--per_device_train_batch_size", "4"])
    return out


@pytest.fixture(scope="module")
def accumulated(workdir, data_file) -> Path:
    """One process, batch 1 x GA 4 (in this process)."""
    import train_dft

    out = workdir / "accumulated"
    train_dft.main(common_args(data_file, out) + ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4"])
    return out


@pytest.fixture(scope="module")
def ddp(workdir, data_file) -> dict:
    """2 processes x batch 2 under torchrun, started the way users start it: nohup bash scripts/train.sh."""
    out = workdir / "ddp"
    env = child_env()
    env.update(
        MODEL=str(ROOT / "assets" / "tiny-qwen2"), DATA_FILES=data_file, OUTPUT_DIR=str(out), NUM_GPUS="0",
        NUM_PROCS="2", MASTER_PORT=str(free_port()),
    )
    extra = common_args(data_file, out)[6:] + ["--per_device_train_batch_size", "2"]  # after the env-given flags
    console = workdir / "ddp.console"
    with open(console, "w") as stdout:
        result = subprocess.run(["nohup", "bash", "scripts/train.sh", *extra], cwd=ROOT, env=env, stdout=stdout,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=600)
    text = console.read_text(errors="replace")
    assert result.returncode == 0, text[-6000:]
    return {"dir": out, "console": text}


@pytest.fixture(scope="module")
def zero3(workdir, data_file) -> dict:
    """2 processes x batch 1 x GA 2 under the deepspeed launcher with ds_config/zero3.json."""
    out = workdir / "zero3"
    args = common_args(data_file, out) + [
        "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
        "--deepspeed", str(ROOT / "ds_config" / "zero3.json"), "--use_cpu", "True",
    ]
    port = free_port()
    return {"dir": out, "console": launch("deepspeed", args, workdir / "zero3.console", port=port), "port": port}


@pytest.fixture(scope="module")
def zero3_resumed(workdir, data_file, zero3) -> dict:
    """The ZeRO-3 run stopped after step 2 whose checkpoint-2 was then damaged (rank 1's optimizer shard
    cut short after its completion marker), resumed with `--resume_from_checkpoint latest` (which must
    fall back to checkpoint-1) and `--loss_impl chunked` (the LM head gathered from its shards)."""
    out = workdir / "zero3_resumed"
    out.mkdir()
    for step in (1, 2):
        shutil.copytree(zero3["dir"] / f"checkpoint-{step}", out / f"checkpoint-{step}")
    (shard,) = (out / "checkpoint-2" / "global_step2").glob("*zero_pp_rank_1_*optim_states.pt")
    shard.write_bytes(shard.read_bytes()[:1000])
    args = common_args(data_file, out) + [
        "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
        "--deepspeed", str(ROOT / "ds_config" / "zero3.json"), "--use_cpu", "True",
        "--resume_from_checkpoint", "latest", "--loss_impl", "chunked",
    ]
    return {"dir": out, "console": launch("deepspeed", args, workdir / "zero3_resumed.console"), "damaged": shard}


# ---- the same numbers everywhere ------------------------------------------------------------------
def test_gradient_accumulation_matches_batch(reference, accumulated):
    assert_same_logs(train_logs(accumulated), train_logs(reference), what="batch 1 x GA 4 vs batch 4")
    assert_same_update(weight_delta(accumulated / "checkpoint-1"), weight_delta(reference / "checkpoint-1"), 1e-5, "GA 4 step 1")


def test_ddp_matches_one_process(reference, ddp):
    logs = train_logs(ddp["dir"])
    assert len(logs) == STEPS
    assert_same_logs(logs, train_logs(reference), what="DDP 2 x batch 2 vs 1 x batch 4")
    assert_same_update(weight_delta(ddp["dir"] / "checkpoint-1"), weight_delta(reference / "checkpoint-1"), 1e-5, "DDP step 1")


def test_zero3_matches_one_process(reference, zero3):
    logs = train_logs(zero3["dir"])
    assert len(logs) == STEPS
    assert_same_logs(logs, train_logs(reference), what="ZeRO-3 2 x batch 1 x GA 2 vs 1 x batch 4")
    assert_same_update(weight_delta(zero3["dir"] / "checkpoint-1"), weight_delta(reference / "checkpoint-1"), 1e-5, "ZeRO-3 step 1")


def test_zero3_checkpoint_manifest_holds_every_rank_files(zero3):
    """Each rank hashed the shards it wrote; rank 0's marker lists them all with their sizes."""
    checkpoint = zero3["dir"] / "checkpoint-1"
    files = json.loads((checkpoint / "COMPLETE").read_text())["files"]
    written = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file() and p.name != "COMPLETE")
    assert sorted(files) == written
    assert any("zero_pp_rank_1_" in name for name in files) and "rng_state_1.pth" in files
    assert all(files[name]["size"] == (checkpoint / name).stat().st_size for name in files)


def test_deepspeed_on_cpu_leaves_no_shared_memory_behind(zero3):
    """DeepSpeed's CPU allreduce maps a 69 MB /dev/shm file per rank and never removes it; the run unlinks
    each name once every rank has mapped it (run/distributed.py), so nothing stays in RAM after the run."""
    assert Path("/dev/shm").is_dir()
    assert sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{zero3['port']}_*")) == []


def test_zero3_shards_parameters(zero3):
    """Each rank stores half of the parameters, both while training and in its optimizer shard."""
    match = re.search(r"ZeRO-3 parameter partition \(elements held\): rank 0: (\d+), rank 1: (\d+); full model: (\d+)", zero3["console"])
    assert match, "no partition line in the ZeRO-3 run's log"
    rank0, rank1, full = map(int, match.groups())
    assert 0 < rank0 < full and 0 < rank1 < full and rank0 + rank1 >= full
    shard_dir = zero3["dir"] / "checkpoint-1" / "global_step1"
    held = []
    for rank in (0, 1):
        shard = torch.load(shard_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu", weights_only=False)
        assert shard["optimizer_state_dict"]["partition_count"] == 2
        held.append(sum(t.numel() for t in shard["optimizer_state_dict"]["fp32_flat_groups"]))
    assert held == [rank0, rank1]


def test_zero3_final_model_is_consolidated_and_loads(reference, zero3):
    """The 16-bit gathered save: one model.safetensors that AutoModelForCausalLM loads, ties kept."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(zero3["dir"])
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not list(zero3["dir"].glob("global_step*")), "the final model must not be a ZeRO checkpoint"
    assert_close_dicts(weights(zero3["dir"]), weights(reference), 1e-5, "ZeRO-3 final model vs reference")


def test_ddp_final_model_loads(reference, ddp):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ddp["dir"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert_close_dicts(weights(ddp["dir"]), weights(reference), 1e-5, "DDP final model vs reference")


def test_zero3_resume_latest_with_chunked_loss_continues_exactly(zero3, zero3_resumed):
    """Steps 2..3 after resuming from step 1 equal the uninterrupted run: same data order, same
    optimizer (momentum) state; and the chunked loss, whose LM head is gathered under ZeRO-3, gives
    the full loss's numbers and gradients (the tied embedding is both the LM head and the input)."""
    console = zero3_resumed["console"]
    assert f"skipping checkpoint {zero3_resumed['dir'] / 'checkpoint-2'}: {zero3_resumed['damaged']} is damaged: 1000 bytes" in console
    assert f"resuming from {zero3_resumed['dir'] / 'checkpoint-1'}" in console
    assert "loss_impl=chunked" in zero3_resumed["console"]
    resumed = [entry for entry in train_logs(zero3_resumed["dir"]) if entry["step"] > 1]
    uninterrupted = [entry for entry in train_logs(zero3["dir"]) if entry["step"] > 1]
    assert [entry["step"] for entry in resumed] == [2, 3]
    assert_same_logs(resumed, uninterrupted, keys=("loss", "avg_p_correct", "ce_loss"), what="ZeRO-3 resumed")
    # Steps 2-3 moved every weight (the tied embedding / LM head included) as in the uninterrupted run.
    step1 = zero3["dir"] / "checkpoint-1"
    assert_same_update(weight_delta(zero3_resumed["dir"], before=step1), weight_delta(zero3["dir"], before=step1), 1e-5, "steps 2-3")


# ---- logging ----------------------------------------------------------------------------------------
def _our_lines(console: str) -> list[re.Match]:
    return [m for m in (LOG_LINE.match(line) for line in console.splitlines()) if m]


@pytest.mark.parametrize("run", ["ddp", "zero3"])
def test_two_process_logging_speaks_once(run, request):
    result = request.getfixturevalue(run)
    lines = _our_lines(result["console"])
    assert lines, "no formatted log lines"
    assert {m.group(3) for m in lines} == {"2"}
    info = [m.string for m in lines if m.group(1) == "INFO"]
    assert info and all("[rank 0/2]" in line for line in info), "a rank other than 0 logged INFO"
    assert all(m.group(1) in ("WARNING", "ERROR", "CRITICAL") for m in lines if m.group(2) != "0")
    assert sum("dft: training on 16 conversations" in line for line in info) == 1
    for step in range(1, STEPS + 1):
        assert sum(f"dft: step {step}/{STEPS}: loss " in line for line in info) == 1
    # The library loggers follow: transformers' and DeepSpeed's INFO lines come once, from rank 0.
    assert sum("transformers.trainer: ***** Running training *****" in line for line in info) == 1
    if run == "zero3":
        assert any(" DeepSpeed: " in line for line in info)
    # The rank-0 log file under logging_dir holds the same INFO lines, each once.
    file_lines = (result["dir"] / "logs" / "train.log").read_text().splitlines()
    assert all(LOG_LINE.match(line) and "[rank 0/2]" in line for line in file_lines)
    file_info = [line for line in file_lines if LOG_LINE.match(line).group(1) == "INFO"]
    assert sorted(file_info) == sorted(info)


def test_train_sh_prints_and_writes_timestamped_log(ddp):
    first = ddp["console"].splitlines()[0]
    match = re.fullmatch(r"log file: (.*/logs/train-\d{8}-\d{6}\.log)", first)
    assert match, first
    log_text = Path(match.group(1)).read_text()
    assert "torchrun --nproc_per_node 2" in log_text and "--use_cpu True" in log_text
    assert "dft: step 3/3: loss" in log_text
    assert log_text.rstrip().endswith(f"exit status 0; log file: {match.group(1)}")


def test_ddp_evaluation_ignores_the_samples_accelerate_repeats(workdir):
    """5 eval conversations over 2 ranks x batch 2: accelerate repeats samples to even the last batch;
    the eval metrics must equal one process's over the 5 real conversations."""
    import json as json_module

    import train_dft

    lines = (ROOT / "data" / "sample" / "chat_en.jsonl").read_text(encoding="utf-8").splitlines()
    train_file, eval_file = workdir / "eval_train.jsonl", workdir / "eval_5.jsonl"
    train_file.write_text("\n".join(lines[:8]) + "\n", encoding="utf-8")
    eval_file.write_text("\n".join(lines[100:105]) + "\n", encoding="utf-8")
    args = [
        "--model_name_or_path", str(ROOT / "assets" / "tiny-qwen2"), "--data_files", str(train_file),
        "--eval_data_files", str(eval_file), "--max_steps", "1", "--learning_rate", "0", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "2", "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "True", "--logging_steps", "1",
    ]
    train_dft.main(args + ["--output_dir", str(workdir / "eval_one")])
    launch("torchrun", args + ["--output_dir", str(workdir / "eval_two")], workdir / "eval_two.console")

    def eval_metrics(run: str) -> dict:
        history = json_module.loads((workdir / run / "trainer_state.json").read_text())["log_history"]
        entry = next(e for e in history if "eval_loss" in e)
        return {k: v for k, v in entry.items() if k in ("eval_loss", "eval_ce_loss", "eval_avg_p_correct", "eval_token_accuracy")}

    one, two = eval_metrics("eval_one"), eval_metrics("eval_two")
    assert len(one) == 4
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=1e-5), key
