"""Fine-tune a causal LM on ChatML conversations with the DFT loss.

    python train_dft.py --model_name_or_path M --data_files a.jsonl b.json --output_dir out [HF flags]
    python train_dft.py config.yaml [flags]    # a .json/.yaml config file (or --config FILE); flags after it win

See README.md for every flag; `bash scripts/train.sh` wraps this for CPU, one GPU and many.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from transformers import HfArgumentParser, set_seed

from dftune.arguments import DataArguments, DFTTrainingArguments, ModelArguments, check_arguments_together
from dftune.config_file import expand_config_file
from dftune.data.build import build_datasets
from dftune.data.collators import DataCollatorForDFT
from dftune.data.encoding import format_supervision
from dftune.data.files import DataError
from dftune.data.packing import apply_packing, check_model_for_packing, check_packing_attention
from dftune.data.report import format_data_report, write_data_report
from dftune.data.spans import template_kwargs
from dftune.data.tokenizer import prepare_tokenizer
from dftune.errors import EXIT_BAD_INPUT, UsageError
from dftune.eval.generation import GenerationEvalArguments, GenerationEvaluator, GenerationFileError, read_generation_files
from dftune.model.loading import load_model, load_tokenizer
from dftune.model.lora import LoraArguments, LoraConfigError, apply_lora, lora_callbacks, save_generation_config, save_merged_model
from dftune.run.checkpoints import CheckpointError, add_checkpoint_callbacks, prepare_resume, save_failures_as_errors
from dftune.run.distributed import log_zero3_partition, prepare_process_group, run_as_script
from dftune.run.logs import is_main_process, library_log_level, setup_logging, use_logging_for_metrics
from dftune.run.output_dir import check_output_dirs
from dftune.run.records import RunRecorder, build_run_config, configure_progress_bars
from dftune.run.sequence_parallel import check_model_heads
from dftune.trainer import DFTTrainer


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, DFTTrainingArguments, LoraArguments, GenerationEvalArguments),
        epilog="Config file: `train_dft.py run.yaml [flags]` or `--config run.yaml [flags]` (YAML or JSON of flag: value); "
        "flags given after it override its settings.",
    )
    argv = sys.argv[1:] if argv is None else argv
    try:
        # A config file (`run.yaml --max_steps 2`, `--config run.yaml`) becomes flags before the command line's, which win.
        args = parser.parse_args_into_dataclasses(args=expand_config_file(argv, parser.dataclass_types))
        model_args, data_args, training_args, _, gen_args = args
        check_arguments_together(data_args, training_args, gen_args, model_args)  # evaluation data, tracker logins
        return args
    except ValueError as err:  # __post_init__ checks name the flags; transformers' own can run over several lines
        raise UsageError(" ".join(line.strip() for line in str(err).splitlines() if line.strip())) from None


def check_packing(model_args: ModelArguments, model=None) -> None:
    """--packing needs an attention kernel that keeps packed conversations apart (see data/packing.py)."""
    try:
        check_packing_attention(model_args.attn_implementation)
        if model is not None:
            check_model_for_packing(model)
    except ValueError as err:
        raise UsageError(str(err)) from None


def check_sequence_parallel_model(model_args: ModelArguments, training_args: DFTTrainingArguments) -> None:
    """The model's heads must split over the sequence-parallel ranks: read from its config, before any loading."""
    from transformers import AutoConfig

    size = training_args.sequence_parallel_size
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    try:
        check_model_heads(config, size)
    except ValueError as err:
        raise UsageError(str(err)) from None
    logging.getLogger("dft").info(
        "sequence parallelism: each sequence split over %d ranks (DeepSpeed Ulysses), padded to a multiple of %d tokens; "
        "data-parallel degree %d", size, size, training_args.world_size // size,
    )


def run(
    model_args: ModelArguments, data_args: DataArguments, training_args: DFTTrainingArguments, lora_args: LoraArguments | None = None,
    gen_args: GenerationEvalArguments | None = None,
) -> dict:
    lora_args = lora_args or LoraArguments()
    gen_args = gen_args or GenerationEvalArguments()
    check_output_dirs(training_args)  # a file, unwritable or a full disk: one line now, not after loading
    logger = setup_logging(
        training_args.logging_dir if is_main_process() else None,
        library_level=library_log_level(training_args.log_level, training_args.log_level_replica),
    )
    started = time.time()
    sp_size = training_args.sequence_parallel_size
    set_seed(training_args.seed)
    configure_progress_bars(training_args)
    if data_args.packing:
        check_packing(model_args)
    # A bad generation file stops the run before any data or model work.
    prompts = read_generation_files(gen_args.eval_generation_files, gen_args.eval_generation_max_prompts) if gen_args.eval_generation_files else None
    if sp_size > 1:
        check_sequence_parallel_model(model_args, training_args)
    tokenizer = load_tokenizer(model_args)
    setup = prepare_tokenizer(tokenizer, data_args)  # template, missing control tokens, pad token
    train_dataset, eval_dataset, data_summary = build_datasets(data_args, tokenizer, training_args)
    logger.info("training on %d conversations (%s evaluation)", len(train_dataset), len(eval_dataset) if eval_dataset else "no")
    logger.info("first example, supervised tokens in [[ ]]:\n%s", format_supervision(tokenizer, train_dataset[0]["input_ids"], train_dataset[0]["labels"]))
    sp_size = training_args.sequence_parallel_size
    # Sequence parallelism shards every tensor along T in equal parts and needs each token's global position.
    data_collator = DataCollatorForDFT(
        pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=sp_size if sp_size > 1 else None, with_position_ids=sp_size > 1
    )
    generation_evaluator = GenerationEvaluator(gen_args, tokenizer, prompts, template_kwargs(data_args)) if prompts else None
    if data_args.packing:
        train_dataset, eval_dataset, data_collator, data_summary["packing"] = apply_packing(
            train_dataset, eval_dataset, data_args.max_length, model_args.attn_implementation, tokenizer.pad_token_id,
            data_args.preprocessing_num_workers, pad_to_multiple_of=sp_size if sp_size > 1 else None,
        )
    if is_main_process():
        logger.info("data report (%s):\n%s", write_data_report(data_summary, training_args.output_dir), format_data_report(data_summary))
    model = apply_lora(load_model(model_args, training_args, tokenizer, setup), lora_args, training_args, setup.new_token_ids)
    log_zero3_partition(model)
    if data_args.packing:
        # Under LoRA the forward that builds the packed mask is the base model's (peft passes position_ids on).
        check_packing(model_args, model.get_base_model() if lora_args.use_lora else model)
    trainer = DFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=data_collator,
        callbacks=lora_callbacks(lora_args),
        generation_evaluator=generation_evaluator,
    )
    use_logging_for_metrics(trainer)
    stop = add_checkpoint_callbacks(trainer)
    logger.info("loss: %s, loss_impl=%s", training_args.loss_spec(), trainer.loss_impl)
    run_config = build_run_config(model_args, data_args, training_args, data_summary, train_dataset, eval_dataset, gen_args)
    recorder = RunRecorder.start(trainer, run_config, started)
    train_output = trainer.train(resume_from_checkpoint=prepare_resume(training_args))
    if stop.stopped:  # SIGTERM or Ctrl-C: exit 143 or 130 without the final model
        step = trainer.state.global_step
        saved = os.path.join(training_args.output_dir, f"checkpoint-{step}")
        if is_main_process() and os.path.isdir(saved):  # said once: every rank stopped at this step
            logger.warning("stopped by %s at step %d; %s saved: continue with --resume_from_checkpoint latest", stop.signal_name, step, saved)
        elif is_main_process():  # --save_strategy no: `latest` would quietly start again from an older checkpoint or step 0
            logger.warning("stopped by %s at step %d; no checkpoint saved (--save_strategy no): a rerun starts again "
                           "from step 0 (or from an older checkpoint with --resume_from_checkpoint latest)", stop.signal_name, step)
        sys.exit(stop.exit_code)
    if generation_evaluator is not None and training_args.eval_strategy == "no":
        trainer.evaluate()  # no evaluation during training: score the trained model once
    with save_failures_as_errors(training_args.output_dir, training_args.output_dir):
        trainer.save_model(training_args.output_dir)
        if lora_args.use_lora and training_args.should_save:
            save_generation_config(trainer.model, training_args.output_dir)  # peft saves none with the adapter
    if lora_args.merge_lora_on_save:  # collective under ZeRO-3: every rank calls it
        save_merged_model(trainer.model, training_args.output_dir, tokenizer, on_this_rank=training_args.should_save)
    return recorder.finish(train_output)  # run_summary.json, training_curves.png, trainer_state.json


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    try:
        prepare_process_group(argv)  # DeepSpeed on CPU: before TrainingArguments (see run/distributed.py)
        model_args, data_args, training_args, lora_args, gen_args = parse_args(argv)
        return run(model_args, data_args, training_args, lora_args, gen_args)
    except (UsageError, DataError, LoraConfigError, CheckpointError, GenerationFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def cli() -> None:
    """The `dft-train` console script: `main()` with a launched rank's clean exit (see dftune/run/distributed.py)."""
    run_as_script(main)

if __name__ == "__main__":
    cli()
