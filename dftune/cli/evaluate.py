"""Scores any model with the code training evaluates with: a base model, a checkpoint or a LoRA adapter.

    dft-eval --model_name_or_path M [--adapter DIR] --eval_generation_files q.jsonl \
        [--eval_data_files chat.jsonl] --output_dir DIR [--eval_answer_match math] [generation flags]

Generation accuracy (`eval_gen_*`, see eval/generation.py) on the prompt files and, with
--eval_data_files, the loss metrics on those conversations (eval_loss, eval_ce_loss, eval_avg_p_correct,
eval_token_accuracy, eval_entropy, eval_low_p_share, eval_perplexity), under the names training logs them.
The tokenizer and model are set up as training sets them up (data/tokenizer.py). Prints a table and writes
DIR/eval_results.json and every generation to DIR/generations/step-0.jsonl. This is how a comparison
gets its base-model row. Exit code 2 with one line on a bad flag or file.

Several processes (`torchrun --nproc_per_node N dft-eval ...`) split the prompts and the
conversations between them and gather the results: the same metrics as one process.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import transformers
from transformers import AutoModelForCausalLM, HfArgumentParser, set_seed

from dftune.arguments import DataArguments, DFTTrainingArguments, ModelArguments, resolve_torch_dtype
from dftune.data.build import build_datasets
from dftune.data.collators import DataCollatorForDFT
from dftune.data.files import DataError
from dftune.data.spans import parse_template_kwargs, template_kwargs
from dftune.data.tokenizer import TokenizerSetup, prepare_model, prepare_tokenizer
from dftune.errors import UsageError
from dftune.eval.generation import GenerationEvalArguments, GenerationEvaluator, GenerationFileError
from dftune.eval.hooks import generations_path
from dftune.model.loading import load_tokenizer
from dftune.run.distributed import run_as_script
from dftune.run.logs import is_main_process, setup_logging, use_logging_for_metrics
from dftune.run.output_dir import check_output_dir
from dftune.trainer import DFTTrainer

EXIT_BAD_INPUT = 2
RESULTS_FILE = "eval_results.json"


@dataclass
class EvaluateArguments:
    """What to score and where the results go (the model itself: --model_name_or_path and friends)."""

    output_dir: str = field(default=None, metadata={"help": "Directory for eval_results.json and generations/. Required."})
    adapter: str = field(
        default=None, metadata={"help": "A LoRA adapter directory (adapter_config.json) to apply on --model_name_or_path."}
    )
    eval_data_files: list[str] = field(
        default=None, metadata={"help": "Conversation files (as --data_files takes) for the loss metrics; optional."}
    )
    max_length: int = field(default=2048, metadata={"help": "Tokens per conversation of --eval_data_files."})
    chat_template: str = field(
        default=None,
        metadata={"help": "As for train_dft.py: a .jinja file or a built-in name (chatml) replacing the tokenizer's template; "
                          "give the run's own to score a base model as that run's step 0."},
    )
    chat_template_kwargs: str = field(
        default=None, metadata={"help": 'As for train_dft.py: JSON object of template variables (e.g. \'{"enable_thinking": false}\').'}
    )
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Conversations per loss batch."})
    dft_alpha: float = field(default=1.0, metadata={"help": "dft_alpha of the reported eval_loss (ce_loss does not depend on it)."})
    seed: int = field(default=42, metadata={"help": "Seed for sampled generation."})

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("--output_dir is required.")
        parse_template_kwargs(self.chat_template_kwargs)
        if self.adapter and not os.path.isfile(os.path.join(self.adapter, "adapter_config.json")):
            raise ValueError(f"--adapter {self.adapter}: no adapter_config.json there; give a LoRA output or checkpoint directory.")


def load_eval_tokenizer(model_args: ModelArguments, eval_args: EvaluateArguments):
    """The adapter's run directory's tokenizer when it has one (the one it trained with), else the model's,
    set up as training sets it up (template, missing control tokens, pad token): a base model is scored as
    training starts from it, and a checkpoint's saved tokenizer is left as it is."""
    source = model_args
    if eval_args.adapter and os.path.isfile(os.path.join(eval_args.adapter, "tokenizer_config.json")):
        source = ModelArguments(model_name_or_path=eval_args.adapter, trust_remote_code=model_args.trust_remote_code)
    tokenizer = load_tokenizer(source)
    return tokenizer, prepare_tokenizer(tokenizer, eval_args)  # --chat_template and its kwargs, as training reads them


def load_eval_model(model_args: ModelArguments, eval_args: EvaluateArguments, training_args, tokenizer, setup: TokenizerSetup):
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, dtype=resolve_torch_dtype(model_args, training_args),
        attn_implementation=model_args.attn_implementation, trust_remote_code=model_args.trust_remote_code,
    )
    # Rows for tokens added in training (an adapter's trainable_token_indices point past the base vocabulary).
    prepare_model(model, tokenizer, setup)
    if eval_args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, eval_args.adapter)
    return model.eval()


def format_table(metrics: dict[str, float]) -> str:
    """One metric a line; 4 significant digits, so a DFT-scale loss (0.0001) is not printed as 0.0000."""
    width = max(len(k) for k in metrics)
    return "\n".join(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}" for key, value in metrics.items())


def evaluate(model_args: ModelArguments, eval_args: EvaluateArguments, gen_args: GenerationEvalArguments) -> dict:
    check_output_dir("--output_dir", eval_args.output_dir)  # a file, unwritable or a full disk: one line now
    logger = setup_logging(os.path.join(eval_args.output_dir, "logs") if is_main_process() else None, "evaluate.log")
    if not gen_args.eval_generation_files and not eval_args.eval_data_files:
        raise GenerationFileError("nothing to evaluate: give --eval_generation_files and/or --eval_data_files")
    set_seed(eval_args.seed)
    transformers.logging.set_verbosity_warning()  # the table is the output, not the loading chatter
    training_args = DFTTrainingArguments(
        output_dir=eval_args.output_dir, per_device_eval_batch_size=eval_args.per_device_eval_batch_size, report_to="none",
        dft_alpha=eval_args.dft_alpha, seed=eval_args.seed, disable_tqdm=True,
    )
    tokenizer, setup = load_eval_tokenizer(model_args, eval_args)
    # Bad files stop the run before the model loads.
    kwargs = template_kwargs(eval_args)
    evaluator = GenerationEvaluator(gen_args, tokenizer, chat_template_kwargs=kwargs) if gen_args.eval_generation_files else None
    eval_dataset = None
    if eval_args.eval_data_files:
        data_args = DataArguments(data_files=eval_args.eval_data_files, max_length=eval_args.max_length,
                                  chat_template_kwargs=eval_args.chat_template_kwargs)
        # The files are read as training files would be; that dataset is what gets scored.
        try:
            eval_dataset, _, _ = build_datasets(data_args, tokenizer, training_args)
        except DataError as err:  # read as --data_files, given here as --eval_data_files: name the flag used
            raise DataError(str(err).replace("--data_files", "--eval_data_files")) from None
    model = load_eval_model(model_args, eval_args, training_args, tokenizer, setup)
    trainer = DFTTrainer(
        model=model, args=training_args, eval_dataset=eval_dataset, processing_class=tokenizer,
        data_collator=DataCollatorForDFT(pad_token_id=tokenizer.pad_token_id), generation_evaluator=evaluator,
    )
    use_logging_for_metrics(trainer)
    metrics = trainer.evaluate()
    results = {
        # At the top level as transformers' save_metrics writes eval_results.json (tools that read HF runs find
        # them there); under "metrics" too, where earlier versions put them (dft-compare reads that).
        **metrics,
        "model_name_or_path": model_args.model_name_or_path,
        "adapter": eval_args.adapter,
        "eval_generation_files": gen_args.eval_generation_files,
        "eval_answer_match": gen_args.eval_answer_match,
        "eval_data_files": eval_args.eval_data_files,
        "metrics": metrics,
        "generations": generations_path(eval_args.output_dir, 0) if evaluator is not None else None,
    }
    if trainer.is_world_process_zero():
        os.makedirs(eval_args.output_dir, exist_ok=True)
        with open(os.path.join(eval_args.output_dir, RESULTS_FILE), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, ensure_ascii=False)
            f.write("\n")
        label = model_args.model_name_or_path + (f" + {eval_args.adapter}" if eval_args.adapter else "")
        shown = {k: v for k, v in metrics.items() if k.startswith("eval_") and not k.endswith(("_per_second", "_runtime", "_preparation_time"))}
        print(f"\n{label}\n{format_table(shown)}\nwrote {os.path.join(eval_args.output_dir, RESULTS_FILE)}", flush=True)
        logger.info("evaluation results in %s", os.path.join(eval_args.output_dir, RESULTS_FILE))
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, EvaluateArguments, GenerationEvalArguments), description=__doc__)
    try:
        model_args, eval_args, gen_args = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
        return evaluate(model_args, eval_args, gen_args)
    except (ValueError, OSError, UsageError) as err:  # flags (__post_init__), DataError, GenerationFileError
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def cli() -> None:
    """The `dft-eval` console script (one process, or a rank under torchrun: see dftune/run/distributed.py)."""
    run_as_script(main)

if __name__ == "__main__":
    cli()
