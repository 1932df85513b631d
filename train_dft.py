"""Fine-tune a causal LM on ChatML conversations with the DFT loss.

    python train_dft.py --model_name_or_path M --data_files a.jsonl b.json --output_dir out [HF flags]
    python train_dft.py config.yaml            # one .json/.yaml argument: a config file

See README.md for every flag; `bash scripts/train.sh` wraps this for CPU, one GPU and many.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed

from arguments import DataArguments, DFTTrainingArguments, ModelArguments, resolve_torch_dtype
from data_utils import DataCollatorForDFT, DataError, build_datasets, format_supervision
from dft_trainer import DFTTrainer
from checkpoints import EXIT_STOPPED_BY_SIGTERM, CheckpointError, add_checkpoint_callbacks, prepare_resume
from dist_logger import is_main_process, setup_logging, use_logging_for_metrics
from distributed import log_zero3_partition, prepare_process_group

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """A flag or path the user must fix; reported as one line with exit code 2."""


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, DFTTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            return parser.parse_json_file(os.path.abspath(argv[0]))
        if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            return parser.parse_yaml_file(os.path.abspath(argv[0]))
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # __post_init__ checks name the flags
        raise UsageError(str(err).splitlines()[0]) from None


def load_tokenizer(model_args: ModelArguments):
    path = model_args.model_name_or_path
    hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) is not None and not path.startswith(".")
    if not hub_id and not os.path.isdir(os.path.expanduser(path)):
        raise UsageError(f"--model_name_or_path {path}: no such model directory")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    except OSError as err:
        raise UsageError(f"--model_name_or_path {path}: cannot load a tokenizer ({str(err).splitlines()[0]})") from None


def load_model(model_args: ModelArguments, training_args: DFTTrainingArguments, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        dtype=resolve_torch_dtype(model_args, training_args),
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=model_args.trust_remote_code,
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # no KV cache in training; gradient checkpointing warns otherwise
    return model


def summarize(trainer: DFTTrainer, wall_seconds: float) -> dict:
    """First and last logged training metrics, for the console and run_summary.json."""
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry and "avg_p_correct" in entry]
    summary = {"wall_seconds": round(wall_seconds, 1), "steps": trainer.state.global_step, "output_dir": trainer.args.output_dir}
    if train_logs:
        for key in ("loss", "avg_p_correct", "ce_loss", "token_accuracy"):
            summary[f"first_{key}"] = train_logs[0][key]
            summary[f"last_{key}"] = train_logs[-1][key]
    return summary


def run(model_args: ModelArguments, data_args: DataArguments, training_args: DFTTrainingArguments) -> dict:
    logger = setup_logging(training_args.logging_dir if is_main_process() else None)
    started = time.time()
    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_args)
    train_dataset, eval_dataset, data_summary = build_datasets(data_args, tokenizer, training_args)
    logger.info("training on %d conversations (%s evaluation)", len(train_dataset), len(eval_dataset) if eval_dataset else "no")
    logger.info("first example, supervised tokens in [[ ]]:\n%s", format_supervision(tokenizer, train_dataset[0]["input_ids"], train_dataset[0]["labels"]))
    model = load_model(model_args, training_args, tokenizer)
    log_zero3_partition(model)
    trainer = DFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForDFT(pad_token_id=tokenizer.pad_token_id),
    )
    use_logging_for_metrics(trainer)
    stop = add_checkpoint_callbacks(trainer)
    logger.info("DFT loss: dft_alpha=%s, loss_impl=%s", training_args.dft_alpha, trainer.loss_impl)
    trainer.train(resume_from_checkpoint=prepare_resume(training_args))
    if stop.stopped:
        logger.warning("stopped by SIGTERM at step %d; continue with --resume_from_checkpoint latest", trainer.state.global_step)
        sys.exit(EXIT_STOPPED_BY_SIGTERM)
    trainer.save_model(training_args.output_dir)
    summary = summarize(trainer, time.time() - started)
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "run_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if "first_loss" in summary:
            logger.info(
                "done in %.0f s, %d steps: loss %.4f -> %.4f, avg_p_correct %.4f -> %.4f; model saved to %s",
                summary["wall_seconds"], summary["steps"], summary["first_loss"], summary["last_loss"],
                summary["first_avg_p_correct"], summary["last_avg_p_correct"], training_args.output_dir,
            )
    return summary


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    try:
        prepare_process_group(argv)  # DeepSpeed on CPU: before TrainingArguments (see distributed.py)
        model_args, data_args, training_args = parse_args(argv)
        return run(model_args, data_args, training_args)
    except (UsageError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
