"""Command-line arguments: one dataclass per concern, `help` on every field, cross-field checks that
name the flags. Parsed by `HfArgumentParser` in `train_dft.py`, after a config file's settings
(`train_dft.py run.yaml --max_steps 2`, `--config run.yaml`) have become flags (`expand_config_file`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import TrainingArguments

from dftune.data.spans import parse_template_kwargs
from dftune.data.templates import BUILTIN_TEMPLATES
from dftune.loss import loss_spec_for
from dftune.loss.core import LossSpec, check_dft_alpha
from dftune.loss.variants import get_variant, loss_type_help, loss_types, resolve_variant_flags, variant_flags
from dftune.run.logs import is_main_process
from dftune.run.sequence_parallel import check_sequence_parallel_flags, parallelism_config
from dftune.run.trackers import check_tracker_logins, normalize_report_to

ATTN_CHOICES = ["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"]
DTYPE_CHOICES = ["auto", "bfloat16", "float16", "float32"]
LOSS_IMPL_CHOICES = ["auto", "full", "chunked"]
LIGER_KERNELS_KEEPING_DFT = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False, "fused_linear_cross_entropy": False}


@dataclass
class ModelArguments:
    """Which model to fine-tune and how to load it."""

    model_name_or_path: str = field(
        default=None, metadata={"help": "Local model directory (or Hub id where the Hub is reachable). Required."}
    )
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype to load the weights in. auto: bfloat16/float16 under DeepSpeed with --bf16/--fp16 "
            "(DeepSpeed keeps fp32 master weights), else float32 with --bf16/--fp16 as autocast.",
            "choices": DTYPE_CHOICES,
        },
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "Attention kernel. auto: flash_attention_2 when flash-attn is importable on CUDA, else sdpa.",
            "choices": ATTN_CHOICES,
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code shipped with the checkpoint."}
    )

    def __post_init__(self):
        if not self.model_name_or_path:
            raise ValueError("--model_name_or_path is required (a local model directory).")
        flash_available = importlib.util.find_spec("flash_attn") is not None
        if self.attn_implementation == "flash_attention_2" and not flash_available:
            raise ValueError(
                "--attn_implementation flash_attention_2 needs the flash-attn package: "
                "`pip install -r requirements-gpu.txt`, or pick --attn_implementation sdpa."
            )
        if self.attn_implementation == "auto":
            self.attn_implementation = "flash_attention_2" if flash_available and torch.cuda.is_available() else "sdpa"


@dataclass
class DataArguments:
    """Where the ChatML conversations come from and how they are tokenised."""

    data_files: list[str] = field(
        default=None,
        metadata={"help": "Data: files (.jsonl, .json, .json(l).gz, .parquet), directories or globs, merged; records in "
                  "ChatML/OpenAI (tools), ShareGPT, Alpaca or TRL prompt/completion format. Required."},
    )
    eval_data_files: list[str] = field(
        default=None, metadata={"help": "Evaluation files; overrides --validation_split_percentage."}
    )
    max_length: int = field(default=2048, metadata={"help": "Tokens per conversation; longer ones keep their beginning."})
    preprocessing_num_workers: int = field(default=None, metadata={"help": "Processes for tokenisation (datasets.map)."})
    validation_split_percentage: float = field(
        default=0, metadata={"help": "Percent of the training conversations held out for evaluation (0 = none)."}
    )
    strict_data: bool = field(
        default=False, metadata={"help": "Fail on the first invalid record (file:line: reason) instead of skipping it."}
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Padding-free packing: whole conversations packed into rows of at most --max_length tokens "
            "(best-fit decreasing), position_ids restarting per conversation, attention kept inside each one "
            "(needs --attn_implementation sdpa, eager, flex_attention or flash_attention_2). Same loss and metrics."
        },
    )
    chat_template: str = field(
        default=None,
        metadata={"help": "Chat template to render with instead of the tokenizer's own: a .jinja file or a built-in name "
                  "(chatml). Control tokens it needs that the tokenizer lacks are added (embeddings resized)."},
    )
    chat_template_kwargs: str = field(
        default=None,
        metadata={"help": 'JSON object of extra template variables, e.g. \'{"enable_thinking": false}\' (part of the cache key).'},
    )
    train_on_turns: str = field(
        default="all",
        metadata={"help": "Which assistant turns are supervised: all, or only the last; a message's \"loss\": true/false overrides."},
    )
    dpo_chosen_as_sft: bool = field(
        default=False,
        metadata={"help": "Train preference (DPO) records' prompt + chosen answer as SFT instead of skipping them."},
    )
    data_cache_dir: str = field(
        default=None,
        metadata={
            "help": "Where tokenised datasets are cached, keyed by files, tokenizer, template and settings "
            "(default: HF_DATASETS_CACHE/dft_trainer; 'none' disables the cache)."
        },
    )

    def __post_init__(self):
        if not self.data_files:
            raise ValueError("--data_files is required: one or more ChatML JSON/JSONL files.")
        if self.chat_template and self.chat_template not in BUILTIN_TEMPLATES and not os.path.isfile(self.chat_template):
            raise ValueError(f"--chat_template {self.chat_template}: not a file and not a built-in template ({', '.join(BUILTIN_TEMPLATES)}).")
        if self.train_on_turns not in ("all", "last"):
            raise ValueError(f"--train_on_turns must be all or last, got {self.train_on_turns!r}.")
        parse_template_kwargs(self.chat_template_kwargs)
        if self.max_length < 2:
            raise ValueError(f"--max_length must be at least 2, got {self.max_length}.")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}.")


def with_variant_flags(cls):
    """Adds each loss variant's own flags (dftune/loss/variants.py) as fields, None unless given: the table,
    not this file, says which flags there are, their help and their choices."""
    for variant, flag in variant_flags():
        cls.__annotations__[flag.name] = Optional[flag.type]  # noqa: UP045  (a runtime type for HfArgumentParser)
        metadata = {"help": f"[--loss_type {variant.name}] {flag.help}"}
        if flag.choices is not None:
            metadata["choices"] = list(flag.choices)
        setattr(cls, flag.name, field(default=None, metadata=metadata))
    return cls


@dataclass
@with_variant_flags
class DFTTrainingArguments(TrainingArguments):
    """transformers.TrainingArguments plus the DFT loss settings.

    New fields: loss_type, dft_alpha, dft_min_weight, dft_alpha_warmup_ratio and every variant's own flags
    (anchor_kl_coef, anchor_kl_direction, eaft_top_k, eaft_power, ...: added from the table in
    dftune/loss/variants.py by `with_variant_flags`; see docs/losses.md), loss_impl,
    loss_chunk_size, enable_gradient_checkpointing, logging_dir,
    warmup_ratio (removed from transformers 5, still accepted here), group_by_length (sets
    train_sampling_strategy).
    Changed defaults: prediction_loss_only=True (evaluation never gathers vocabulary-sized logits),
    remove_unused_columns=False (the data pipeline already keeps only what the model takes),
    logging_steps=10 (TRL's; transformers' 500 logs nothing in a short run).
    """

    loss_type: str = field(
        default="dft",
        metadata={"help": loss_type_help(), "choices": list(loss_types())},
    )
    dft_alpha: float = field(
        default=None,
        metadata={
            "help": "Weight mix in [0, 1]: w = sg(alpha * g + 1 - alpha), g = p (dft, asft) or the entropy "
            "weight (eaft). 1 = the variant as published (default), 0 = plain SFT. Not with --loss_type sft."
        },
    )
    dft_min_weight: float = field(
        default=0.0,
        metadata={"help": "Floor on the token weight, in [0, 1): w = max(w, this); keeps gradients of low-p tokens alive. 0 = off."},
    )
    dft_alpha_warmup_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Share of the training steps, in [0, 1), over which dft_alpha rises linearly from 0 (SFT first, "
            "then DFT); the logged dft_alpha is the value in force. 0 = off."
        },
    )
    loss_impl: str = field(
        default="auto",
        metadata={
            "help": "full: logits for every position; chunked: LM head in chunks of tokens, never all logits "
            "(memory-efficient, same numbers); auto: chunked on GPU or with a vocabulary of 32K+, else full.",
            "choices": LOSS_IMPL_CHOICES,
        },
    )
    loss_chunk_size: int = field(
        default=512, metadata={"help": "Supervised tokens per LM-head chunk with --loss_impl chunked."}
    )
    sequence_parallel_size: int = field(
        default=1,
        metadata={"help": "Split each sequence over this many ranks (DeepSpeed Ulysses; needs --deepspeed and sdpa or "
                          "flash attention): activations per rank ~1/S for long contexts, data-parallel degree = "
                          "processes / S. Same loss and gradients as 1. See docs/sequence_parallel.md."},
    )
    enable_gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward (non-reentrant) to save memory."}
    )
    logging_dir: str = field(
        default=None, metadata={"help": "Directory for the run's log file and TensorBoard events (default: OUTPUT_DIR/logs)."}
    )
    warmup_ratio: float = field(
        default=None,
        metadata={"help": "Fraction of training steps for linear warm-up (kept from transformers 4; sets --warmup_steps)."},
    )
    prediction_loss_only: bool = field(
        default=True, metadata={"help": "Evaluation computes losses and metrics only, never gathers logits."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Drop dataset columns the model does not take (the data pipeline already does)."}
    )
    logging_steps: float = field(
        default=10,
        metadata={"help": "Log the metrics every N optimizer steps (a float < 1: that share of the run). 10 as in TRL; "
                          "transformers' 500 left short runs and sweeps with no training curve."},
    )
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={
            "help": "Trackers: swanlab, wandb, tensorboard (or any transformers integration), none or all; "
            "several as `--report_to swanlab wandb` or `swanlab,wandb`. WANDB_MODE=offline and "
            "SWANLAB_MODE=offline work without a network. See README, Experiment tracking."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an --output_dir that holds an earlier run (a model, run_summary.json or checkpoint-N "
                  "folders): its checkpoint-N folders and run_summary.json are removed first, its model is replaced when the "
                  "new run saves. Without it such a folder is refused unless --resume_from_checkpoint continues the run there."},
    )
    group_by_length: bool = field(
        default=False,
        metadata={
            "help": "Batch conversations of similar length together (less padding, without --packing): "
            "transformers' LengthGroupedSampler, i.e. --train_sampling_strategy group_by_length."
        },
    )

    def __post_init__(self):
        self._check_loss_flags()
        self._check_step_flags()
        self.report_to = normalize_report_to(self.report_to)
        if self.loss_chunk_size < 1:
            raise ValueError(f"--loss_chunk_size must be >= 1, got {self.loss_chunk_size}.")
        if self.sequence_parallel_size < 1:
            raise ValueError(f"--sequence_parallel_size must be >= 1, got {self.sequence_parallel_size}.")
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
            if self.warmup_steps:
                raise ValueError("give --warmup_ratio or --warmup_steps, not both.")
            self.warmup_steps = self.warmup_ratio  # transformers 5 reads a value below 1 as a ratio
        if self.use_liger_kernel:
            if importlib.util.find_spec("liger_kernel") is None:
                raise ValueError("--use_liger_kernel needs the liger-kernel package (pip install -r requirements-gpu.txt).")
            # Liger's fused linear cross-entropy would replace the DFT loss with plain SFT: keep only
            # its loss-free kernels. Our compute_loss never passes labels to the model either.
            self.liger_kernel_config = {
                **(self.liger_kernel_config or {}),
                **LIGER_KERNELS_KEEPING_DFT,
            }
        if self.group_by_length:
            if "train_sampling_strategy" not in TrainingArguments.__dataclass_fields__:
                raise ValueError("--group_by_length needs a transformers release with train_sampling_strategy; upgrade transformers.")
            if self.train_sampling_strategy not in ("random", "group_by_length"):
                raise ValueError(
                    f"--group_by_length conflicts with --train_sampling_strategy {self.train_sampling_strategy}; give one of them."
                )
            self.train_sampling_strategy = "group_by_length"
        if self.enable_gradient_checkpointing:
            self.gradient_checkpointing = True
            self.gradient_checkpointing_kwargs = self.gradient_checkpointing_kwargs or {"use_reentrant": False}
        if not torch.cuda.is_available() and not self.use_cpu:
            # No GPU: run on CPU without asking for --use_cpu (--bf16 then means CPU autocast in bf16).
            self.use_cpu = True
        cuda = torch.cuda.is_available() and not self.use_cpu
        if self.fp16 and not cuda:
            raise ValueError("--fp16 needs a CUDA GPU; on CPU drop it (fp32) or use --bf16.")
        if self.bf16 and cuda and not torch.cuda.is_bf16_supported():
            raise ValueError("--bf16 is not supported by this GPU; use --fp16 instead.")
        if self.logging_dir is None and self.output_dir:
            self.logging_dir = os.path.join(self.output_dir, "logs")
        if self.logging_dir:
            # transformers 5 reads the TensorBoard directory from the environment.
            os.environ.setdefault("TENSORBOARD_LOGGING_DIR", self.logging_dir)
        super().__post_init__()
        # Our loss divides by the supervised tokens of the whole step on all ranks; see dft_trainer.py.
        self.average_tokens_across_devices = True

    def _check_step_flags(self) -> None:
        """Batch sizes, epochs and best-model flags that transformers accepts and then fails on after the model has
        loaded (a sampler's traceback, a division by zero) or runs nothing with; raises ValueError naming the flag."""
        for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(self, flag)}.")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise ValueError(
                f"--num_train_epochs {self.num_train_epochs:g} trains 0 steps: give --num_train_epochs > 0 (e.g. 1) "
                "or --max_steps N."
            )
        if self.load_best_model_at_end:
            # Before TrainingArguments' own check, whose message runs over three lines and names enum members.
            eval_strategy, save_strategy = _strategy(self.eval_strategy), _strategy(self.save_strategy)
            if eval_strategy == "no":
                raise ValueError(
                    "--load_best_model_at_end needs evaluations to pick the best checkpoint: give --eval_strategy "
                    f"{save_strategy if save_strategy in ('steps', 'epoch') else 'steps'} (as --save_strategy) with evaluation data, "
                    "or drop --load_best_model_at_end."
                )
            if save_strategy != "best" and eval_strategy != save_strategy:
                raise ValueError(
                    f"--load_best_model_at_end needs a checkpoint at every evaluation: --eval_strategy {eval_strategy} and "
                    f"--save_strategy {save_strategy} differ; give both the same (e.g. --save_strategy {eval_strategy}) "
                    "or --save_strategy best."
                )

    def _check_loss_flags(self) -> None:
        """Fills the loss flags' defaults for --loss_type (dftune/loss/variants.py); raises ValueError naming a
        conflicting flag."""
        variant = get_variant(self.loss_type)
        if variant.weight_signal is None:  # plain cross-entropy: the weight flags mean nothing
            if self.dft_alpha not in (None, 0, 0.0):
                raise ValueError(f"--loss_type {variant.name} is --dft_alpha 0; drop --dft_alpha {self.dft_alpha} or use --loss_type dft.")
            for flag in ("dft_min_weight", "dft_alpha_warmup_ratio"):
                if getattr(self, flag):
                    raise ValueError(f"--{flag} has no effect with --loss_type {variant.name} (every weight is 1); drop it or use --loss_type dft.")
            self.dft_alpha = 0.0
        elif self.dft_alpha is None:
            self.dft_alpha = 1.0
        check_dft_alpha(self.dft_alpha)
        if not 0.0 <= self.dft_min_weight < 1.0:
            raise ValueError(f"--dft_min_weight must be in [0, 1), got {self.dft_min_weight}.")
        if not 0.0 <= self.dft_alpha_warmup_ratio < 1.0:
            raise ValueError(f"--dft_alpha_warmup_ratio must be in [0, 1), got {self.dft_alpha_warmup_ratio}.")
        if self.dft_alpha == 0 and variant.weight_signal is not None:
            for flag in ("dft_min_weight", "dft_alpha_warmup_ratio"):
                if getattr(self, flag):
                    raise ValueError(f"--{flag} has no effect with --dft_alpha 0 (every weight is 1); drop it or raise --dft_alpha.")
        given = {flag.name: getattr(self, flag.name) for _, flag in variant_flags()}
        for name, value in resolve_variant_flags(self.loss_type, given).items():
            setattr(self, name, value)

    def loss_spec(self, dft_alpha: float | None = None) -> LossSpec:
        """The loss these flags define; `dft_alpha`: the value in force (during --dft_alpha_warmup_ratio)."""
        return loss_spec_for(
            self.loss_type, self.dft_alpha if dft_alpha is None else dft_alpha, self.dft_min_weight,
            **{flag.name: getattr(self, flag.name) for _, flag in variant_flags()},
        )


def _strategy(value) -> str:
    """An --eval_strategy / --save_strategy as given: a string, or transformers' enum when set from Python."""
    return str(getattr(value, "value", value))


def check_evaluation_data(data_args: DataArguments, training_args: DFTTrainingArguments, gen_args) -> None:
    """An --eval_strategy needs something to evaluate; otherwise Trainer raises after the data and the model are
    loaded. `gen_args`: GenerationEvalArguments (prompt files alone are an evaluation: eval/hooks.py).

    Raises:
        ValueError: naming --eval_strategy and the flags that give evaluation data.
    """
    strategy = _strategy(training_args.eval_strategy)
    has_eval_data = (
        data_args.eval_data_files or data_args.validation_split_percentage > 0
        or (gen_args is not None and gen_args.eval_generation_files)
    )
    if strategy != "no" and not has_eval_data:
        raise ValueError(
            f"--eval_strategy {strategy} has nothing to evaluate: give --eval_data_files, --validation_split_percentage "
            "(e.g. 5) or --eval_generation_files, or drop --eval_strategy."
        )


def check_arguments_together(data_args: DataArguments, training_args: DFTTrainingArguments, gen_args,
                             model_args: ModelArguments | None = None) -> None:
    """The checks that need several dataclasses or the environment, before any data or model work.

    Raises:
        ValueError: an --eval_strategy without evaluation data; a --report_to tracker without a login (checked on
            rank 0, the only rank that starts tracker runs); a --sequence_parallel_size that cannot run (and
            otherwise sets transformers' parallelism_config for it).
    """
    check_evaluation_data(data_args, training_args, gen_args)
    if model_args is not None and training_args.sequence_parallel_size > 1:  # world_size sets up devices: only then
        size, attn = training_args.sequence_parallel_size, model_args.attn_implementation
        check_sequence_parallel_flags(size, attn, data_args.packing, training_args.deepspeed, training_args.world_size)
        training_args.parallelism_config = parallelism_config(size, attn)
    if is_main_process():
        check_tracker_logins(training_args.report_to)


# ---- config files ---------------------------------------------------------------------------------------
def resolve_torch_dtype(model_args: ModelArguments, training_args: DFTTrainingArguments) -> torch.dtype:
    """The dtype to load weights in (see --torch_dtype's help)."""
    if model_args.torch_dtype != "auto":
        return getattr(torch, model_args.torch_dtype)
    if training_args.deepspeed and training_args.bf16:
        return torch.bfloat16
    if training_args.deepspeed and training_args.fp16:
        return torch.float16
    return torch.float32
