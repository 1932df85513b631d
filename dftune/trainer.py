"""`DFTTrainer`: a `transformers.Trainer` whose loss is DFT and whose logs carry its metrics.

Normalisation. Trainer counts N = supervised tokens of the whole optimizer step (every
gradient-accumulation micro-batch, gathered over every data-parallel rank) and hands it to
`compute_loss` as `num_items_in_batch`. Each rank returns sum_t(w_t * CE_t) / N over its own tokens.
DDP and DeepSpeed then *average* gradients over ranks, i.e. divide by world_size, so each rank's loss
is multiplied by world_size to end with exactly sum_all(w_t * dCE_t) / N, as Trainer does for its own
losses (`average_tokens_across_devices`). Under sequence parallelism a rank holds a shard of each
sequence and the divisor is DeepSpeed's (run/sequence_parallel.py). The loss is already normalised
for gradient accumulation, so Trainer must not divide it by the number of accumulation steps
(`loss_is_scaled_for_ga`).

Loss family. `args.loss_spec()` says which loss (dft, sft, asft, eaft; loss/core.py defines them); an
anchored loss (asft) also runs the reference model (loss/reference.py) on the same inputs first.

Metrics. Each micro-batch adds detached sums (tokens, loss, CE, p, correct, entropy, low-p tokens,
anchor KL) to a per-mode vector; `log()` reduces the vector over ranks once, divides once and clears
it. Never an average of averages: the logged `loss` too is token-weighted over the logging window.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import IntervalStrategy

from dftune.eval.hooks import check_compute_metrics, generation_only_init, run_generation_eval, run_generation_only_eval
from dftune.loss.chunked import dft_loss_chunked, resolve_loss_impl, unwrap
from dftune.loss.core import IGNORE_INDEX, STAT_FIELDS, LossSpec, dft_loss_from_logits, metrics_from_stats
from dftune.loss.reference import ReferenceModel
from dftune.run.sequence_parallel import gradient_divisor, sequence_parallel_size, ulysses_dataloader_adapter


def count_supervised_tokens(batches: list[dict[str, Any]]) -> torch.Tensor | None:
    """Supervised prediction targets in a list of micro-batches: labels[..., 1:] != IGNORE_INDEX, or a
    sequence-parallel shard's pre-shifted shift_labels != IGNORE_INDEX."""
    if not batches:
        return None
    if "shift_labels" in batches[0]:
        return sum((batch["shift_labels"] != IGNORE_INDEX).sum() for batch in batches)
    if "labels" not in batches[0]:
        return None
    return sum((batch["labels"][..., 1:] != IGNORE_INDEX).sum() for batch in batches)


class LogFinalStep(TrainerCallback):
    """Logs the last step's metrics whatever --logging_steps: a 5-step run with the default 10 would otherwise log
    none (no metrics line, no final train metrics in run_summary.json, empty curves), and a longer run would end
    on metrics up to logging_steps - 1 steps old. --logging_strategy no still logs nothing."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and args.logging_strategy != IntervalStrategy.NO:
            control.should_log = True  # Trainer logs once per step: no second line when the step was due anyway
        return control


class DFTTrainer(Trainer):
    """Trainer with the DFT loss family. Reads the loss flags (`args.loss_spec()`), `loss_impl` and
    `loss_chunk_size` from its args.

    `generation_evaluator` (eval_generation.GenerationEvaluator): scored generation at every evaluation,
    its metrics joining the evaluation's (see eval/hooks.py); without an eval dataset, evaluation is
    generation only.
    """

    def __init__(self, *args, generation_evaluator=None, **kwargs):
        self.generation_evaluator = generation_evaluator
        with generation_only_init(kwargs.get("args"), generation_evaluator, kwargs.get("eval_dataset")):
            super().__init__(*args, **kwargs)
        self.add_callback(LogFinalStep())
        # compute_loss below returns a loss normalised by the step's token count.
        self.loss_is_scaled_for_ga = True
        self.model_accepts_loss_kwargs = True
        self._stat_sums: dict[str, torch.Tensor | None] = {"train": None, "eval": None}
        # Train stats of this train() call, reduced over ranks: run_summary's token-weighted train_loss.
        self._session_train_stats: list[float] | None = None
        self._eval_prefix = "eval"
        # Supervised tokens of all ranks, and this rank's tokens, over every optimizer step so far.
        self.tokens_trained: dict[str, torch.Tensor | int] = {"supervised": 0, "local_total": 0}
        self.loss_impl = resolve_loss_impl(
            self.args.loss_impl, self.accelerator.unwrap_model(self.model), n_gpu=self.args.n_gpu, fp16=self.args.fp16
        )
        check_compute_metrics(self.compute_metrics, self.args.prediction_loss_only, self.loss_impl)
        # Autocast wraps only the model's forward; the chunked LM head runs in the same 16-bit dtype.
        self._head_dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        self.reference: ReferenceModel | None = None
        sp_size = sequence_parallel_size(self.accelerator)
        # What DDP / DeepSpeed divide the ranks' summed gradients by (fixed for the run; see the module docstring).
        self._gradient_divisor = gradient_divisor(self.accelerator)
        if self.args.loss_spec().anchored:  # the starting weights, before any step or resumed checkpoint
            from transformers.integrations.deepspeed import deepspeed_config

            self.reference = ReferenceModel.for_model(self.model, deepspeed_config(), autocast=self.accelerator.autocast)
            # Under sequence parallelism the reference's attention runs sharded like the policy's.
            self.reference.sequence_parallel = sp_size > 1
        if sp_size > 1:
            self.accelerator.deepspeed_ulysses_dl_adapter = ulysses_dataloader_adapter(
                self.accelerator, self.args.per_device_train_batch_size
            )
        self.dft_alpha_in_force = float(self.args.dft_alpha)

    def current_loss_spec(self) -> LossSpec:
        """The loss of the step about to run: dft_alpha rises linearly from 0 over the first
        --dft_alpha_warmup_ratio of the steps (global_step counts the steps already taken)."""
        alpha = float(self.args.dft_alpha)
        ratio = self.args.dft_alpha_warmup_ratio
        if ratio > 0 and self.state.max_steps > 0:
            alpha *= min(1.0, self.state.global_step / (ratio * self.state.max_steps))
        return self.args.loss_spec(dft_alpha=alpha)

    def train(self, *args, **kwargs):
        self._session_train_stats = None
        return super().train(*args, **kwargs)

    # ---- loss -----------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Takes the step's micro-batches and counts N over all of them and all ranks."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        supervised = count_supervised_tokens(batch_samples)
        if supervised is not None:
            supervised = supervised.to(device)
            if self.accelerator.num_processes > 1:
                # Every rank must join this collective, including one with an empty step.
                supervised = self.accelerator.gather(supervised.reshape(1)).sum()
            # Running totals for the run summary; tensors, so no device sync per step.
            self.tokens_trained["supervised"] = self.tokens_trained["supervised"] + supervised
        for batch in batch_samples:
            mask = batch.get("attention_mask")
            self.tokens_trained["local_total"] = self.tokens_trained["local_total"] + (
                mask.sum() if mask is not None else batch["input_ids"].numel()
            )
        return batch_samples, supervised

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        if hasattr(dataloader, "skipped"):  # sequence parallelism's loader (run/sequence_parallel.py)
            return dataloader.skipped(num_batches)
        return super().get_resumed_dataloader(dataloader, num_batches)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        # (B, T), unshifted; under sequence parallelism (B, T/S) already shifted, so a shard's last position has
        # the next shard's first token as its target.
        labels_are_shifted = "shift_labels" in inputs
        labels = inputs.pop("shift_labels") if labels_are_shifted else inputs.pop("labels")
        # Trainer asks Liger-patched models to skip logits in evaluation and compute their own loss
        # from labels; the model never gets labels here (it must not compute a loss of its own).
        inputs.pop("skip_logits", None)
        training = model.training
        # Evaluation normalises per batch; its logged loss is rebuilt from token sums in log().
        step_tokens = num_items_in_batch if training else None
        if not training:
            labels = self._mask_eval_padding_duplicates(labels)
        # Evaluation scores the target objective (the full --dft_alpha), so eval_loss of evaluations during and
        # after the alpha warm-up compare (metric_for_best_model); training uses the value in force.
        spec = self.current_loss_spec() if training else self.args.loss_spec()
        if training:
            self.dft_alpha_in_force = spec.dft_alpha
        if self.reference is not None:
            self.reference.prepare(self.accelerator)  # once; needs the trainer's finished DeepSpeed config
        if self.loss_impl == "chunked":
            result, outputs = dft_loss_chunked(
                model, inputs, labels, spec, step_tokens, chunk_size=self.args.loss_chunk_size,
                matmul_dtype=self._head_dtype, reference=self.reference, labels_are_shifted=labels_are_shifted,
            )
        else:
            ref_logits = self.reference.logits(unwrap(model), inputs) if spec.anchored else None  # (B, T, V)
            outputs = model(**inputs, use_cache=False)
            result = dft_loss_from_logits(
                outputs.logits, labels, spec, step_tokens, labels_are_shifted=labels_are_shifted, ref_logits=ref_logits
            )
        loss = result.loss
        if training and num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # DDP / ZeRO average gradients over ranks; undo that average (see module docstring).
            loss = loss * self._gradient_divisor
        self._add_stats("train" if training else "eval", result.stats)
        return (loss, outputs) if return_outputs else loss

    def _mask_eval_padding_duplicates(self, labels: torch.Tensor) -> torch.Tensor:
        """accelerate pads the last evaluation batch of some ranks with repeated samples (even_batches)
        and `gather_for_metrics` drops them from Trainer's own results; drop them from our sums too.

        The gathered last batch is rank 0's rows, then rank 1's, ...; global rows >= `remainder` repeat.
        labels: (B, T) -> (B, T) with IGNORE_INDEX on the repeated rows.
        """
        state = self.accelerator.gradient_state
        if self.accelerator.num_processes == 1 or not state.end_of_dataloader or state.remainder <= 0:
            return labels
        rows = labels.shape[0]
        global_rows = torch.arange(rows, device=labels.device) + self.accelerator.process_index * rows
        repeated = global_rows >= state.remainder  # (B,)
        if not repeated.any():
            return labels
        labels = labels.clone()
        labels[repeated] = IGNORE_INDEX
        return labels

    # ---- metrics --------------------------------------------------------------------------------
    def _add_stats(self, mode: str, stats: torch.Tensor) -> None:
        current = self._stat_sums[mode]
        self._stat_sums[mode] = stats if current is None else current + stats

    def _add_session_stats(self, stats: list[float]) -> None:
        session = self._session_train_stats
        self._session_train_stats = stats if session is None else [a + b for a, b in zip(session, stats)]

    def _reduce_stats(self, mode: str) -> list[float]:
        """Sums the mode's stats over ranks (every rank calls log(), so this collective is matched)."""
        stats = self._stat_sums[mode]
        if stats is None:
            stats = torch.zeros(len(STAT_FIELDS), dtype=torch.float64)
        stats = stats.to(self.args.device)
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats, reduction="sum")
        self._stat_sums[mode] = None
        return stats.tolist()

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._eval_prefix = metric_key_prefix
        self._stat_sums["eval"] = None
        if self.generation_evaluator is not None and eval_dataset is None and self.eval_dataset is None:
            return run_generation_only_eval(self, metric_key_prefix)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.generation_evaluator is not None and description == "Evaluation":
            # Here, not in evaluate(): the model is prepared (DeepSpeed inference engine) and the metrics
            # still reach log(), the callbacks and metric_for_best_model with the loss metrics.
            output.metrics.update(run_generation_eval(self, metric_key_prefix))
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        prefix = self._eval_prefix
        anchored = self.reference is not None
        if "loss" in logs:  # a training logging step
            stats = self._reduce_stats("train")
            self._add_session_stats(stats)
            metrics = metrics_from_stats(stats, anchored=anchored)
            if metrics:
                # Token-weighted over the window (Trainer's is a mean of per-step losses).
                logs["loss"] = metrics.pop("dft_loss")
            logs.update(metrics)
            logs["dft_alpha"] = float(self.dft_alpha_in_force)
        elif "train_loss" in logs:  # the end of train(): every rank logs it, so the reduce is matched
            self._add_session_stats(self._reduce_stats("train"))  # the steps after the last logging step
            metrics = metrics_from_stats(self._session_train_stats or [0.0] * len(STAT_FIELDS), anchored=anchored)
            if metrics:
                # Token-weighted over this train() call, like the logged `loss` (Trainer's: a mean of step losses).
                logs["train_loss"] = metrics["dft_loss"]
        elif f"{prefix}_loss" in logs:  # the end of an evaluation
            self._add_eval_metrics(logs, prefix)
        super().log(logs, start_time)

    def _add_eval_metrics(self, logs: dict[str, float], prefix: str) -> None:
        """Replaces Trainer's per-batch-mean loss with the token-weighted DFT metrics of the eval sums."""
        metrics = metrics_from_stats(self._reduce_stats("eval"), prefix=f"{prefix}_", anchored=self.reference is not None)
        if metrics:
            # Token-weighted over the whole eval set, not a mean of per-batch means.
            logs[f"{prefix}_loss"] = metrics.pop(f"{prefix}_dft_loss")
            logs.update(metrics)
            logs[f"{prefix}_perplexity"] = math.exp(min(metrics[f"{prefix}_ce_loss"], 700.0))

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """Trainer.predict never calls log(): flush the eval sums into its metrics here, as evaluate() does."""
        self._stat_sums["eval"] = None
        output = super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if f"{metric_key_prefix}_loss" in output.metrics:
            self._add_eval_metrics(output.metrics, metric_key_prefix)
        else:
            self._stat_sums["eval"] = None  # no labels: nothing to report, nothing left for the next evaluate()
        return output

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """Resuming a model with tied embeddings warned "missing keys ['lm_head.weight']": the checkpoint stores a
        tied weight once, and transformers lists the other name as missing although it is the same tensor.
        Only tied copies are dropped from the list; a key that is really missing is still warned about."""
        copies = tied_copies(self.model)
        missing = [key for key in load_result.missing_keys if key not in copies]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))


def tied_copies(model: torch.nn.Module) -> set[str]:
    """Names under which a parameter already seen under another name appears again (tied weights)."""
    seen: set[int] = set()
    copies = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            copies.add(name)
        seen.add(id(param))
    return copies
