"""Distributed tier of sequence parallelism: `--sequence_parallel_size 2` on 2 CPU processes (DeepSpeed's
Ulysses over gloo) gives the numbers of one process with the same global batch, for every loss type on both
loss paths, under ZeRO stages 0 to 3; resumes from its own checkpoint; evaluates (loss and generation) in the
same run.

Every run: 16 real conversations of uneven length (their prompts are masked, so the two shards of a
sequence hold unequal numbers of supervised tokens, as do the micro-batches), 1 sequence per micro-batch,
gradient accumulation 2, 2 SGD steps. Under S=2 the two ranks are one sequence-parallel group that works
through the step's 2 sequences one after the other; one process does the same with accumulation 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import ROOT, SGD_ARGS, assert_same_logs, assert_same_update, launch, train_logs, weight_delta

pytestmark = pytest.mark.distributed
KEYS = ("loss", "ce_loss", "avg_p_correct", "token_accuracy", "entropy", "low_p_share", "grad_norm")
# (loss type, loss path, ZeRO stage): each loss type on both paths, every stage, ZeRO-3 on most.
MATRIX = [
    ("dft", "chunked", 3), ("dft", "full", 0), ("sft", "chunked", 1), ("sft", "full", 2),
    ("asft", "chunked", 3), ("asft", "full", 3), ("eaft", "chunked", 2), ("eaft", "full", 3),
]


def run_args(data_file: str, output_dir: Path, loss_type: str, loss_impl: str) -> list[str]:
    args = [
        "--model_name_or_path", str(ROOT / "assets" / "tiny-qwen2"), "--data_files", data_file,
        "--output_dir", str(output_dir), "--max_steps", "2", "--logging_steps", "1", "--save_steps", "1",
        "--report_to", "none", "--disable_tqdm", "True", "--loss_type", loss_type, "--loss_impl", loss_impl,
        "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2", *SGD_ARGS,
    ]
    if loss_type == "asft":
        args += ["--anchor_kl_coef", "1.0"]
    return args


def zero_config(workdir: Path, stage: int) -> str:
    """ds_config/zero3.json at another stage (stage 0: DeepSpeed without ZeRO)."""
    config = json.loads((ROOT / "ds_config" / "zero3.json").read_text())
    config["zero_optimization"] = {"stage": stage} if stage < 3 else config["zero_optimization"]
    path = workdir / f"zero{stage}.json"
    path.write_text(json.dumps(config))
    return str(path)


def sequence_parallel_run(workdir: Path, args: list[str], stage: int, name: str) -> str:
    return launch("deepspeed", args + [
        "--deepspeed", zero_config(workdir, stage), "--use_cpu", "True", "--sequence_parallel_size", "2",
    ], workdir / f"{name}.console")


@pytest.mark.parametrize(("loss_type", "loss_impl", "stage"), MATRIX)
def test_two_shards_equal_one_process(workdir, data_file, loss_type, loss_impl, stage):
    import train_dft

    name = f"{loss_type}_{loss_impl}_zero{stage}"
    one = workdir / f"{name}_one"
    train_dft.main(run_args(data_file, one, loss_type, loss_impl))
    sp = workdir / f"{name}_sp2"
    console = sequence_parallel_run(workdir, run_args(data_file, sp, loss_type, loss_impl), stage, name)
    assert "sequence parallelism: each sequence split over 2 ranks (DeepSpeed Ulysses)" in console
    assert "2 sequences a step (1 per device x 2 accumulated x 2 processes / 2 sequence-parallel)" in console
    # DeepSpeed without ZeRO computes no gradient norm when clipping is off (--max_grad_norm 0).
    keys = tuple(key for key in KEYS if stage or key != "grad_norm") + (("anchor_kl",) if loss_type == "asft" else ())
    expected = train_logs(one)
    if loss_type == "asft":
        assert expected[1]["anchor_kl"] > 1e-5  # the second step's anchor is not zero: the reference was sharded right
    assert_same_logs(train_logs(sp), expected, keys=keys, rtol=2e-5, what=f"{name}: S=2 vs one process")
    for step in (1, 2):
        assert_same_update(weight_delta(sp / f"checkpoint-{step}"), weight_delta(one / f"checkpoint-{step}"), 1e-5,
                           f"{name}: weights after step {step}")
    summary, expected_summary = (json.loads((run / "run_summary.json").read_text()) for run in (sp, one))
    for key in ("supervised_tokens", "total_tokens", "train_loss"):
        assert summary[key] == pytest.approx(expected_summary[key], rel=2e-5), key


def test_resume_from_a_sequence_parallel_checkpoint_continues_exactly(workdir, data_file):
    first = workdir / "dft_chunked_zero3_sp2"  # made by the matrix above (checkpoints at steps 1 and 2)
    if not (first / "checkpoint-1").is_dir():
        sequence_parallel_run(workdir, run_args(data_file, first, "dft", "chunked"), 3, "dft_chunked_zero3")
    resumed = workdir / "resumed"
    shutil.copytree(first / "checkpoint-1", resumed / "checkpoint-1")
    args = run_args(data_file, resumed, "dft", "chunked") + ["--resume_from_checkpoint", "latest"]
    console = sequence_parallel_run(workdir, args, 3, "resumed")
    assert "checkpoint-1" in console
    assert_same_logs(train_logs(resumed)[-1:], train_logs(first)[-1:], keys=KEYS, rtol=2e-5, what="resumed step 2")
    assert_same_update(weight_delta(resumed / "checkpoint-2"), weight_delta(first / "checkpoint-2"), 1e-5, "resumed step 2")


def test_evaluation_and_generation_run_whole_sequences_in_the_same_run(workdir, data_file):
    import train_dft

    prompts = ROOT / "data" / "sample_eval" / "questions.jsonl"
    evaluation = ["--eval_data_files", data_file, "--eval_strategy", "steps", "--eval_steps", "2",
                  "--per_device_eval_batch_size", "3", "--eval_generation_files", str(prompts), "--eval_answer_match", "contains",
                  "--eval_generation_batch_size", "2", "--eval_generation_max_new_tokens", "8", "--eval_generation_max_prompts", "6"]
    one = workdir / "eval_one"
    train_dft.main(run_args(data_file, one, "dft", "chunked") + evaluation)
    sp = workdir / "eval_sp2"
    sequence_parallel_run(workdir, run_args(data_file, sp, "dft", "chunked") + evaluation, 3, "eval")
    expected, actual = (evaluations(run) for run in (one, sp))
    assert [entry["step"] for entry in actual] == [entry["step"] for entry in expected] == [2]
    for key in ("eval_loss", "eval_avg_p_correct", "eval_token_accuracy", "eval_entropy"):
        assert actual[0][key] == pytest.approx(expected[0][key], rel=2e-5), key
    generation = [key for key in expected[0] if key.startswith("eval_gen")]
    assert "eval_gen_mean_tokens" in generation, sorted(expected[0])
    for key in generation:  # the same greedy generations from the same weights
        assert actual[0][key] == pytest.approx(expected[0][key], rel=1e-6), key
    outputs = [[json.loads(line)["output"] for line in sorted((run / "generations").glob("*.jsonl"))[-1].read_text().splitlines()]
               for run in (one, sp)]
    assert len(outputs[0]) == 6 and outputs[1] == outputs[0]


def evaluations(run_dir: Path) -> list[dict]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "eval_loss" in entry]
