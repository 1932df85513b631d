"""The glue between DFTTrainer's evaluation and generation evaluation (eval/generation.py).

Generation metrics travel with the loss metrics: DFTTrainer.evaluation_loop adds them to the
evaluation's metrics, so `log()` (console, trainer_state.json, every report_to backend), the
`on_evaluate` callbacks and `metric_for_best_model` see one dict. Without an eval dataset
(`--eval_generation_files` alone) evaluation is generation only, through the same log and callbacks.
Every rank generates its share; rank 0 writes OUTPUT_DIR/generations/step-N.jsonl.
"""

from __future__ import annotations

import contextlib
import os
import time

from transformers.trainer_utils import IntervalStrategy

from dftune.eval.generation import GENERATIONS_DIR, write_generations


@contextlib.contextmanager
def generation_only_init(args, generation_evaluator, eval_dataset):
    """Trainer.__init__ refuses an eval strategy without an eval dataset; generation needs none.

    The strategy is set aside only while Trainer checks it, and restored before training reads it.
    """
    generation_only = (
        args is not None and generation_evaluator is not None and eval_dataset is None and args.eval_strategy != IntervalStrategy.NO
    )
    if not generation_only:
        yield
        return
    strategy = args.eval_strategy
    args.eval_strategy = IntervalStrategy.NO
    try:
        yield
    finally:
        args.eval_strategy = strategy


def check_compute_metrics(compute_metrics, prediction_loss_only: bool, loss_impl: str) -> None:
    """A `compute_metrics` (Python API) needs logits that DFTTrainer would otherwise never produce.

    Raises:
        ValueError: with --prediction_loss_only True (our default: evaluation never gathers logits) it
            would silently never be called; with --loss_impl chunked no full logits exist at all.
    """
    if compute_metrics is None:
        return
    if loss_impl == "chunked":
        raise ValueError(
            "compute_metrics needs logits, which --loss_impl chunked never materialises; use --loss_impl full, "
            "or drop compute_metrics (--eval_generation_files scores generations instead)."
        )
    if prediction_loss_only:
        raise ValueError(
            "compute_metrics is never called with --prediction_loss_only True (the default here: evaluation gathers "
            "no logits); pass --prediction_loss_only False to gather them, or drop compute_metrics."
        )


def generations_path(output_dir: str, step: int, prefix: str = "eval") -> str:
    name = f"step-{step}.jsonl" if prefix == "eval" else f"step-{step}-{prefix}.jsonl"
    return os.path.join(output_dir, GENERATIONS_DIR, name)


def run_generation_eval(trainer, prefix: str = "eval") -> dict[str, float]:
    """Generates on every rank with the trainer's (unwrapped: DDP, DeepSpeed) model; returns prefixed metrics."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    metrics, records = trainer.generation_evaluator.evaluate(model, trainer.accelerator, prefix, seed=trainer.args.seed)
    if trainer.is_world_process_zero():
        write_generations(records, generations_path(trainer.args.output_dir, trainer.state.global_step, prefix))
    return metrics


def run_generation_only_eval(trainer, prefix: str = "eval") -> dict[str, float]:
    """evaluate() without an eval dataset: generation metrics, logged and passed to callbacks as Trainer does."""
    started = time.time()
    metrics = run_generation_eval(trainer, prefix)
    metrics[f"{prefix}_runtime"] = round(time.time() - started, 4)
    trainer.log(metrics)
    trainer.control = trainer.callback_handler.on_evaluate(trainer.args, trainer.state, trainer.control, metrics)
    return metrics
