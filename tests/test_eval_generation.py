"""Integration tier: generation evaluation on the tiny model (batched generation, training runs,
best-model selection, generation-only evaluation, LoRA + packing, dft-eval, bad files) and
the evaluation loose ends (compute_metrics with the chunked loss, predict() metrics)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import dftune.cli.evaluate as evaluate_cli
import train_dft
from data_utils import DataCollatorForDFT, tokenize_conversation
from dft_trainer import DFTTrainer
from dftune.arguments import DFTTrainingArguments
from dftune.eval.generation import GenerationEvalArguments, GenerationEvaluator

from helpers import load_script, read_jsonl

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = str(ROOT / "data" / "sample_eval" / "questions.jsonl")
RECORD_FIELDS = {"prompt", "reference", "output", "extracted", "correct"}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> str:
    """Prompts of different lengths, as `prompt` text and as `messages` with a system turn."""
    path = tmp_path_factory.mktemp("gen") / "arith.jsonl"
    records = [
        {"prompt": "What is 3 plus 4?", "answer": 7},
        {"messages": [{"role": "system", "content": "You are a concise assistant. Answer briefly."},
                      {"role": "user", "content": "What is 12 plus 5?"}], "answer": "17"},
        {"prompt": "Count from 1 to 5.", "answer": "5"},
        {"messages": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "2 plus 2 is 4."},
                      {"role": "user", "content": "What is 9 plus 9?"}], "answer": 18},
        {"prompt": "Count from 1 to 3.", "answer": 3},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_left_padded_batched_generation_equals_one_by_one(tiny_model_dir, tiny_tokenizer, prompts_file):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    files = [prompts_file, QUESTIONS]

    def run(batch_size: int, **flags):
        flags = {"eval_generation_max_new_tokens": 20, **flags}
        args = GenerationEvalArguments(eval_generation_files=files, eval_generation_batch_size=batch_size, **flags)
        return GenerationEvaluator(args, tiny_tokenizer).evaluate(model)

    batched_metrics, batched = run(8)
    single_metrics, single = run(1)
    assert len(batched) == 5 + 19
    assert [r["output"] for r in batched] == [r["output"] for r in single]
    assert batched_metrics == single_metrics
    assert {"eval_gen_accuracy", "eval_gen_arith_accuracy", "eval_gen_questions_accuracy", "eval_gen_finished"} <= batched_metrics.keys()
    assert batched[0]["output"] and batched[0]["finished"] and batched[0]["tokens"] > 1

    # The token limit: nothing finishes, every output has exactly the limit.
    limited, records = run(8, eval_generation_max_new_tokens=2)
    assert limited["eval_gen_finished"] == 0.0 and limited["eval_gen_mean_tokens"] == 2.0
    assert all(not r["finished"] and r["tokens"] == 2 for r in records)

    # Sampling: K outputs per prompt, pass@k reported, reproducible for a seed.
    sampled, records = run(8, eval_generation_samples=3, eval_generation_temperature=1.0)
    assert len(records) == 3 * 24 and {r["sample"] for r in records} == {0, 1, 2}
    assert {"eval_gen_pass@1", "eval_gen_pass@2", "eval_gen_pass@3"} <= sampled.keys()
    assert sampled["eval_gen_pass@1"] == pytest.approx(sampled["eval_gen_accuracy"])
    assert sampled["eval_gen_pass@1"] <= sampled["eval_gen_pass@2"] <= sampled["eval_gen_pass@3"]
    assert run(8, eval_generation_samples=3, eval_generation_temperature=1.0)[0] == sampled


def test_training_logs_generation_metrics_and_keeps_the_best_checkpoint(tmp_path, tiny_model_dir, sample_files, prompts_file):
    out = tmp_path / "run"
    summary = train_dft.main([
        "--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir", str(out),
        "--validation_split_percentage", "10", "--max_steps", "30", "--per_device_train_batch_size", "8",
        "--learning_rate", "2e-3", "--logging_steps", "10", "--eval_strategy", "steps", "--eval_steps", "10",
        "--save_strategy", "steps", "--save_steps", "10", "--eval_on_start", "True", "--report_to", "none",
        "--disable_tqdm", "True", "--eval_generation_files", QUESTIONS, prompts_file, "--eval_answer_match", "contains",
        "--eval_generation_max_new_tokens", "16", "--metric_for_best_model", "eval_gen_accuracy",
        "--load_best_model_at_end", "True",
    ])
    state = json.loads((out / "checkpoint-30" / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_gen_accuracy" in e]
    assert [e["step"] for e in evals] == [0, 10, 20, 30]
    for entry in evals:
        assert {"eval_loss", "eval_ce_loss", "eval_gen_finished", "eval_gen_mean_tokens",
                "eval_gen_questions_accuracy", "eval_gen_arith_accuracy"} <= entry.keys()
        records = read_jsonl(out / "generations" / f"step-{entry['step']}.jsonl")
        assert len(records) == 24 and RECORD_FIELDS <= records[0].keys()
        assert entry["eval_gen_accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 24)
        assert entry["eval_gen_questions_accuracy"] == pytest.approx(sum(r["correct"] for r in records if r["file"] == "questions") / 19)

    # Best model: the first checkpoint with the highest accuracy (step 0 has none), and that is what was saved.
    saved = [e for e in evals if e["step"] > 0]
    best = max(saved, key=lambda e: e["eval_gen_accuracy"])
    assert state["best_metric"] == best["eval_gen_accuracy"]
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best['step']}")
    final, chosen = load_file(str(out / "model.safetensors")), load_file(str(out / f"checkpoint-{best['step']}" / "model.safetensors"))
    assert all(torch.equal(final[name], chosen[name]) for name in chosen)
    assert summary["best_eval_metrics"]["eval_gen_accuracy"]["value"] == max(e["eval_gen_accuracy"] for e in evals)
    assert "eval_gen_questions_accuracy" in summary["best_eval_metrics"]


def test_generation_only_evaluation_without_eval_data(tmp_path, tiny_model_dir, sample_files, prompts_file):
    """No --eval_data_files: --eval_strategy steps evaluates generations alone; with no strategy, once at the end."""
    common = ["--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--max_steps", "4",
              "--per_device_train_batch_size", "4", "--report_to", "none", "--disable_tqdm", "True", "--save_strategy", "no",
              "--eval_generation_files", prompts_file, "--eval_generation_max_new_tokens", "8"]
    train_dft.main([*common, "--output_dir", str(tmp_path / "steps"), "--eval_strategy", "steps", "--eval_steps", "2"])
    state = json.loads((tmp_path / "steps" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_gen_accuracy" in e] == [2, 4]
    assert not any("eval_loss" in e for e in state["log_history"])

    # With --packing (no attention_mask in training batches), the trained model is scored as saved.
    train_dft.main([*common, "--output_dir", str(tmp_path / "end"), "--packing", "True"])
    assert sorted(p.name for p in (tmp_path / "end" / "generations").iterdir()) == ["step-4.jsonl"]
    args = GenerationEvalArguments(eval_generation_files=[prompts_file], eval_generation_max_new_tokens=8)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "end")
    _, direct = GenerationEvaluator(args, AutoTokenizer.from_pretrained(tmp_path / "end")).evaluate(saved)
    assert [r["output"] for r in read_jsonl(tmp_path / "end" / "generations" / "step-4.jsonl")] == [r["output"] for r in direct]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "What is 1 plus 1?"}, ":2: field `answer` is missing or empty"),
        ({"answer": 2}, ":2: field `prompt` (text) or `messages` is required"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "2"}], "answer": 2},
         ":2: field `messages` ends with an assistant turn"),
    ],
)
def test_bad_generation_file_exits_2_naming_file_line_field(tmp_path, tiny_model_dir, sample_files, capsys, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok?", "answer": 1}) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        train_dft.main(["--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir",
                        str(tmp_path / "o"), "--eval_generation_files", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {path}{message}")
    assert not (tmp_path / "o" / "data_report.json").exists()  # stopped before any data work


def test_sampling_flags_are_checked(tmp_path, tiny_model_dir, sample_files, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_dft.main(["--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir",
                        str(tmp_path), "--eval_generation_files", QUESTIONS, "--eval_generation_samples", "4"])
    assert exit_info.value.code == 2
    assert "--eval_generation_samples > 1 needs sampling: give --eval_generation_temperature > 0" in capsys.readouterr().err


def test_lora_packing_run_and_evaluate_py_score_the_same_model(tmp_path, tiny_model_dir, sample_files, prompts_file, capsys):
    """A LoRA run with --packing is scored at its end; evaluate.py --adapter on its output gives the same outputs,
    and evaluate.py on the base model gives the base model's, with the loss metrics for --eval_data_files."""
    out = tmp_path / "lora"
    train_dft.main([
        "--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir", str(out),
        "--use_lora", "True", "--lora_r", "4", "--packing", "True", "--max_steps", "6", "--learning_rate", "5e-3",
        "--per_device_train_batch_size", "4", "--report_to", "none", "--disable_tqdm", "True", "--save_strategy", "no",
        "--eval_generation_files", prompts_file, QUESTIONS, "--eval_answer_match", "contains", "--eval_generation_max_new_tokens", "12",
    ])
    trained = read_jsonl(out / "generations" / "step-6.jsonl")
    evaluate = evaluate_cli
    flags = ["--eval_generation_files", prompts_file, QUESTIONS, "--eval_answer_match", "contains", "--eval_generation_max_new_tokens", "12"]
    adapter = evaluate.main(["--model_name_or_path", tiny_model_dir, "--adapter", str(out), "--output_dir", str(tmp_path / "ev_adapter"), *flags])
    scored = read_jsonl(tmp_path / "ev_adapter" / "generations" / "step-0.jsonl")
    assert [r["output"] for r in scored] == [r["output"] for r in trained]
    results = json.loads((tmp_path / "ev_adapter" / "eval_results.json").read_text())
    assert results["metrics"]["eval_gen_accuracy"] == adapter["metrics"]["eval_gen_accuracy"]
    assert results["metrics"]["eval_gen_accuracy"] == pytest.approx(sum(r["correct"] for r in trained) / len(trained))

    base = evaluate.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "ev_base"),
                          "--eval_data_files", sample_files[0], "--max_length", "512", *flags])
    table = capsys.readouterr().out
    assert "eval_gen_accuracy" in table and "eval_ce_loss" in table
    assert {"eval_loss", "eval_ce_loss", "eval_avg_p_correct", "eval_perplexity", "eval_gen_accuracy"} <= base["metrics"].keys()
    args = GenerationEvalArguments(eval_generation_files=[prompts_file, QUESTIONS], eval_answer_match="contains",
                                   eval_generation_max_new_tokens=12)
    direct = GenerationEvaluator(args, AutoTokenizer.from_pretrained(tiny_model_dir)).evaluate(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert [r["output"] for r in read_jsonl(tmp_path / "ev_base" / "generations" / "step-0.jsonl")] == [r["output"] for r in direct[1]]
    assert scored != read_jsonl(tmp_path / "ev_base" / "generations" / "step-0.jsonl")  # the adapter changed the model


def _small_trainer(tmp_path, tiny_model_dir, tiny_tokenizer, sample_files, **kwargs):
    from datasets import Dataset

    from data_utils import load_conversations

    conversations, _ = load_conversations([sample_files[0]])
    rows = [tokenize_conversation(tiny_tokenizer, c["messages"], 256) for c in conversations[:10]]
    dataset = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    args = DFTTrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=3, report_to="none",
                                **{k: v for k, v in kwargs.items() if k != "compute_metrics"})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return DFTTrainer(model=model, args=args, eval_dataset=dataset, data_collator=DataCollatorForDFT(tiny_tokenizer.pad_token_id),
                      compute_metrics=kwargs.get("compute_metrics")), dataset


def test_compute_metrics_gets_logits_or_is_refused(tmp_path, tiny_model_dir, tiny_tokenizer, sample_files):
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {"seen": 1.0}

    with pytest.raises(ValueError, match="compute_metrics is never called with --prediction_loss_only True"):
        _small_trainer(tmp_path, tiny_model_dir, tiny_tokenizer, sample_files, compute_metrics=compute_metrics, loss_impl="full")
    with pytest.raises(ValueError, match="compute_metrics needs logits, which --loss_impl chunked never materialises"):
        _small_trainer(tmp_path, tiny_model_dir, tiny_tokenizer, sample_files, compute_metrics=compute_metrics,
                       loss_impl="chunked", prediction_loss_only=False)
    trainer, _ = _small_trainer(tmp_path, tiny_model_dir, tiny_tokenizer, sample_files, compute_metrics=compute_metrics,
                                loss_impl="full", prediction_loss_only=False)
    metrics = trainer.evaluate()
    assert metrics["eval_seen"] == 1.0 and seen["shape"][0] == 10 and seen["shape"][-1] == len(tiny_tokenizer)


def test_predict_reports_the_token_weighted_metrics_of_evaluate(tmp_path, tiny_model_dir, tiny_tokenizer, sample_files):
    trainer, dataset = _small_trainer(tmp_path, tiny_model_dir, tiny_tokenizer, sample_files, loss_impl="full")
    predicted = trainer.predict(dataset).metrics
    assert trainer._stat_sums["eval"] is None  # nothing left over for the next evaluate()
    evaluated = trainer.evaluate(dataset)
    for name in ("loss", "ce_loss", "avg_p_correct", "token_accuracy", "perplexity"):
        assert predicted[f"test_{name}"] == pytest.approx(evaluated[f"eval_{name}"], rel=1e-6)


def test_bench_generation_reports_tokens_per_second(capsys):
    result = load_script("bench_generation").main(["--num_prompts", "6", "--batch_sizes", "1", "3", "--max_new_tokens", "6"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == result and result["same_outputs_for_every_batch_size"]
    assert [r["batch_size"] for r in result["runs"]] == [1, 3]
    assert all(r["prompts"] == 6 and r["generated_tokens"] > 0 and r["tokens_per_cpu_s"] > 0 for r in result["runs"])


def test_generation_prompts_render_with_the_chat_template_kwargs_of_training(tmp_path, tiny_model_dir, sample_files, prompts_file):
    """Training rendered Qwen3's template with enable_thinking false (an empty think block after the header);
    generation prompts were rendered without it, so the model was scored on prompts it was not trained on."""
    template = str(ROOT / "tests" / "fixtures" / "templates" / "qwen3.jinja")
    kwargs = '{"enable_thinking": false}'
    out = tmp_path / "qwen3"
    train_dft.main([
        "--model_name_or_path", tiny_model_dir, "--data_files", sample_files[0], "--output_dir", str(out), "--max_steps", "1",
        "--learning_rate", "0", "--report_to", "none", "--disable_tqdm", "True", "--save_strategy", "no",
        "--data_cache_dir", "none", "--chat_template", template, "--chat_template_kwargs", kwargs,
        "--eval_generation_files", prompts_file, "--eval_generation_max_new_tokens", "8",
    ])
    trained = [r["output"] for r in read_jsonl(out / "generations" / "step-1.jsonl")]
    args = GenerationEvalArguments(eval_generation_files=[prompts_file], eval_generation_max_new_tokens=8)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    evaluator = GenerationEvaluator(args, tokenizer, chat_template_kwargs={"enable_thinking": False})
    assert tokenizer.decode(evaluator.prompt_ids[0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert [r["output"] for r in evaluator.evaluate(model)[1]] == trained

    scored = evaluate_cli.main(["--model_name_or_path", str(out), "--output_dir", str(tmp_path / "ev"), "--eval_generation_files",
                                           prompts_file, "--eval_generation_max_new_tokens", "8", "--chat_template_kwargs", kwargs])
    assert [r["output"] for r in read_jsonl(Path(scored["generations"]))] == trained


def test_generation_files_are_read_like_data_files_with_real_line_numbers(tmp_path):
    """A JSON array's records are named by their line (as the data report names them), not by their index: the
    error for the 2nd record of a pretty-printed array said ':2' though it starts on line 6. Gzipped JSON lines work."""
    import gzip

    from dftune.eval.generation import GenerationFileError, read_generation_files

    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"prompt": "1+1?", "answer": 2}, {"prompt": "2+2?"}], indent=2))
    with pytest.raises(GenerationFileError, match=rf"^{array}:6: field `answer` is missing or empty"):
        read_generation_files([str(array)])
    zipped = tmp_path / "q.jsonl.gz"
    with gzip.open(zipped, "wt") as f:
        f.write(json.dumps({"prompt": "1+1?", "answer": 2}) + "\n\n" + json.dumps({"prompt": "2+2?", "answer": 4}) + "\n")
    assert [p.location for p in read_generation_files([str(zipped)])] == [f"{zipped}:1", f"{zipped}:3"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "1+1?", "answer": 2}) + "\n{oops\n")
    with pytest.raises(GenerationFileError, match=rf"^{broken}:2: not valid JSON"):
        read_generation_files([str(broken)])


def test_generation_prompts_with_a_system_turn_render_as_training_does_under_mistral(tmp_path, real_tokenizer):
    """Mistral v0.1's template raises on a system role: training folds the system prompt into the first user turn,
    generation evaluation died with a jinja traceback at start-up. Now the prompt is folded the same way, and a
    prompt the template still cannot render is one error naming file:line."""
    from dftune.eval.generation import GenerationEvalArguments, GenerationEvaluator, GenerationFileError

    from helpers import TEMPLATES

    tokenizer = real_tokenizer("llama3.2")
    tokenizer.chat_template = (TEMPLATES / "mistral_7b_instruct_v0_1.jinja").read_text()
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "answer": 4}) + "\n")
    evaluator = GenerationEvaluator(GenerationEvalArguments(eval_generation_files=[str(path)]), tokenizer)
    assert tokenizer.decode(evaluator.prompt_ids[0]) == "<|begin_of_text|>[INST] Be brief.\n\n2+2? [/INST]"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "answer": 4}) + "\n")
    with pytest.raises(GenerationFileError, match=rf"^{path}:1: the chat template cannot render this prompt \(Conversation roles must alternate"):
        GenerationEvaluator(GenerationEvalArguments(eval_generation_files=[str(path)]), tokenizer)


@pytest.mark.parametrize("case", ["output_dir_is_a_file", "model_dir_without_a_model", "eval_data_file_missing"])
def test_evaluate_py_bad_paths_are_one_line_naming_the_flag(tmp_path, tiny_model_dir, capsys, case):
    """Were `[Errno 20] Not a directory: '.../logs'` (no flag named) and transformers' "Couldn't instantiate
    the backend tokenizer" (a run's folder given before it finished, or a sweep's base/ folder)."""
    evaluate = evaluate_cli
    a_file, not_a_model = tmp_path / "a_file", tmp_path / "run"
    a_file.write_text("x")
    not_a_model.mkdir()
    (not_a_model / "eval_results.json").write_text("{}")
    model, output_dir, expected = {
        "output_dir_is_a_file": (tiny_model_dir, a_file, f"error: --output_dir {a_file}: is a file, not a directory"),
        "model_dir_without_a_model": (not_a_model, tmp_path / "ev", f"error: --model_name_or_path {not_a_model}: not a model directory"),
        "eval_data_file_missing": (tiny_model_dir, tmp_path / "ev", f"error: {tmp_path / 'nope.jsonl'}: data file not found; check --eval_data_files"),
    }[case]
    extra = ["--eval_data_files", str(tmp_path / "nope.jsonl")] if case == "eval_data_file_missing" else []
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model_name_or_path", str(model), "--eval_generation_files", QUESTIONS, "--output_dir", str(output_dir), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err


def test_evaluate_py_takes_the_runs_chat_template(tmp_path, tiny_model_dir, prompts_file, capsys):
    """A run trained with --chat_template F: its base model is scored as the run's step 0 only with the same
    template (evaluate.py had no such flag and scored the tokenizer's own template)."""
    from helpers import TEMPLATES

    evaluate = evaluate_cli
    template = TEMPLATES / "llama3_2_instruct.jinja"
    results = evaluate.main(["--model_name_or_path", tiny_model_dir, "--eval_generation_files", prompts_file,
                             "--eval_generation_max_new_tokens", "4", "--output_dir", str(tmp_path / "ev"),
                             "--chat_template", str(template)])
    err = capsys.readouterr().err
    assert f"chat template: {template} (--chat_template)" in err
    # The Llama-3 template's control tokens, missing from the tiny Qwen tokenizer, are added as in training.
    assert f"the --chat_template {template} template writes" in err and "<|eot_id|>" in err
    assert results["metrics"]["eval_gen_mean_tokens"] > 0
    # No training: the metrics line has no "step 0/0: epoch 0".
    assert "dft: metrics: eval_gen_accuracy" in err and "step 0/0" not in err


def test_eval_results_json_has_the_metrics_at_the_top_level_as_save_metrics_writes(tmp_path, tiny_model_dir, sample_files):
    """dft-eval's eval_results.json held its metrics only under "metrics"; transformers' save_metrics (and what reads
    HF runs) puts them at the top level. Both now; the table keeps DFT-scale values (4 significant digits)."""
    out = tmp_path / "ev"
    returned = evaluate_cli.main(["--model_name_or_path", tiny_model_dir, "--eval_data_files", sample_files[0],
                                  "--max_length", "256", "--output_dir", str(out)])
    saved = json.loads((out / "eval_results.json").read_text())
    assert {"eval_loss", "eval_ce_loss", "eval_avg_p_correct", "eval_perplexity"} <= saved["metrics"].keys()
    assert {key: saved[key] for key in saved["metrics"]} == saved["metrics"] == returned["metrics"]
    assert saved["model_name_or_path"] == tiny_model_dir
    assert evaluate_cli.format_table({"eval_loss": 0.0000213}) == "eval_loss  2.13e-05"
