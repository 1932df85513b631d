"""Experiment tracking and run records: what produced an output directory, and how training went.

A run leaves in OUTPUT_DIR:
    run_config.json      every argument, git commit, library versions, hardware, data totals (written
                         before training, so a crashed run still says what it was)
    trainer_state.json   the final log history (transformers' format; `scripts/plot_run.py` reads it)
    training_curves.png  loss, ce_loss, avg_p_correct, token_accuracy, grad_norm, learning_rate, entropy,
                         low_p_share, anchor_kl (asft), eval
                         (drawn by run/plots.py, which scripts/plot_run.py also uses)
    run_summary.json     wall time, steps, tokens, tokens/s, peak memory, final/best metrics, model path

Trackers (`--report_to swanlab wandb tensorboard`) are started and closed by run/trackers.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import importlib.metadata
import json
import logging
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import time
from typing import Any

import torch
from transformers import TrainerCallback

from dftune.paths import CHECKOUT_DIR
from dftune.run.logs import format_duration
from dftune.run.plots import CURVES_FILE, RunCurves, plot_runs, run_label
from dftune.run.trackers import close_trackers, start_trackers

logger = logging.getLogger("dft.tracking")

LIBRARIES = ("torch", "transformers", "datasets", "deepspeed", "accelerate", "peft", "swanlab", "wandb", "tensorboard")
RUN_CONFIG_FILE = "run_config.json"
RUN_SUMMARY_FILE = "run_summary.json"
TRAIN_METRICS = (
    "loss", "ce_loss", "avg_p_correct", "token_accuracy", "entropy", "low_p_share", "anchor_kl", "grad_norm",
    "learning_rate", "dft_alpha",
)
# Which way is better for each eval metric (for "best eval metrics").
EVAL_GOALS = {
    "eval_loss": min,
    "eval_ce_loss": min,
    "eval_perplexity": min,
    "eval_avg_p_correct": max,
    "eval_token_accuracy": max,
    "eval_gen_accuracy": max,
    "eval_gen_finished": max,
}
EVAL_GEN_HIGHER_IS_BETTER = re.compile(r"eval_gen_(\w+_accuracy|pass@\d+)")


# ---- run configuration ---------------------------------------------------------------------------
def git_commit(path: str = CHECKOUT_DIR) -> str:
    """The project's commit, with "-dirty" when tracked files changed; "unknown" outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=path, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else (commit or "unknown")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
    return versions


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_info() -> dict[str, Any]:
    """The machine this rank runs on: GPUs when visible, the CPU always."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    if torch.cuda.is_available():
        info["gpu_count"] = torch.cuda.device_count()
        info["gpus"] = [
            {"name": torch.cuda.get_device_name(i), "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
            for i in range(torch.cuda.device_count())
        ]
    else:
        info["gpu_count"] = 0
    return info


def _get(record: Any, key: str, default: Any = None) -> Any:
    """A field of a dict or an object (FileReport dataclass), else default."""
    if isinstance(record, dict):
        return record.get(key, default)
    return getattr(record, key, default)


def dataset_token_totals(dataset) -> dict[str, int]:
    """Tokens and supervised tokens (labels != -100) in one epoch of a tokenised dataset, via Arrow."""
    import pyarrow.compute as pc

    tokens = supervised = 0
    for batch in dataset.with_format("arrow").iter(batch_size=10_000):
        tokens += pc.sum(pc.list_value_length(batch.column("input_ids"))).as_py() or 0
        labels = pc.list_flatten(batch.column("labels"))
        supervised += pc.sum(pc.not_equal(labels, -100).cast("int64")).as_py() or 0
    return {"tokens": tokens, "supervised_tokens": supervised}


def data_totals(data_summary: Any, train_dataset=None, eval_dataset=None, output_dir: str | None = None) -> dict[str, Any]:
    """Totals of the data report, tolerant of whichever keys the data pipeline provides.

    Prefers `summary["totals"]`, then OUTPUT_DIR/data_report.json's "totals", and always adds what it can
    count itself (records read/kept/skipped per the file reports, dropped conversations, dataset sizes).
    """
    totals: dict[str, Any] = {}
    summary = data_summary if isinstance(data_summary, dict) else {}
    report_path = os.path.join(output_dir, "data_report.json") if output_dir else None
    if isinstance(summary.get("totals"), dict):
        totals.update(summary["totals"])
    elif report_path and os.path.isfile(report_path):
        try:
            with open(report_path, encoding="utf-8") as f:
                report = json.load(f)
            if isinstance(report, dict) and isinstance(report.get("totals"), dict):
                totals.update(report["totals"])
        except (OSError, ValueError):
            pass
    files = summary.get("files")
    if isinstance(files, list) and files:
        totals.setdefault("files", len(files))
        totals.setdefault("records_read", sum(int(_get(r, "read", 0) or 0) for r in files))
        totals.setdefault("records_kept", sum(int(_get(r, "kept", 0) or 0) for r in files))
        if "records_skipped" not in totals:
            # A file report's `skipped` is a count, or a {reason: count} mapping in older reports.
            skipped = [_get(r, "skipped", 0) or 0 for r in files]
            totals["records_skipped"] = sum(sum(s.values()) if isinstance(s, dict) else int(s) for s in skipped)
    dropped = summary.get("dropped_at_tokenisation")
    if isinstance(dropped, dict):
        totals.setdefault("dropped_at_tokenisation", sum(dropped.values()))
    for split, dataset in (("train", train_dataset), ("eval", eval_dataset)):
        try:
            totals[f"{split}_conversations"] = len(dataset)
            counts = dataset_token_totals(dataset)
        except (TypeError, KeyError, AttributeError):  # no dataset, a streaming one, or other columns
            continue
        totals[f"{split}_tokens_per_epoch"] = counts["tokens"]
        totals[f"{split}_supervised_tokens_per_epoch"] = counts["supervised_tokens"]
    if report_path and os.path.isfile(report_path):
        totals["data_report"] = report_path
    return totals


def _plain(value: Any) -> Any:
    """JSON-safe copy: enums, paths and other objects become strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return value.value if isinstance(value, enum.Enum) else str(value)


def run_name(training_args) -> str:
    return training_args.run_name or os.path.basename(os.path.normpath(training_args.output_dir))


def build_run_config(
    model_args, data_args, training_args, data_summary=None, train_dataset=None, eval_dataset=None, generation_args=None
) -> dict:
    """Everything needed to know, weeks later, what produced an output directory."""
    return {
        "run_name": run_name(training_args),
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "git_commit": git_commit(),
        "versions": library_versions(),
        "hardware": hardware_info(),
        "data": data_totals(data_summary, train_dataset, eval_dataset, training_args.output_dir),
        "arguments": {
            "model": _plain(dataclasses.asdict(model_args)),
            "data": _plain(dataclasses.asdict(data_args)),
            "training": _plain(training_args.to_dict()),  # to_dict() redacts tokens
            **({"generation": _plain(dataclasses.asdict(generation_args))} if generation_args is not None else {}),
        },
    }


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")


# ---- progress --------------------------------------------------------------------------------------
def configure_progress_bars(training_args) -> None:
    """--disable_tqdm also silences the tokenisation (datasets) and model-saving (transformers) bars,
    which would otherwise fill a nohup log with carriage returns. Other ranks never show them."""
    import datasets
    import transformers

    if training_args.disable_tqdm:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


class SessionStart(TrainerCallback):
    """When this training session started: the step is only known after a checkpoint's state is loaded."""

    def __init__(self):
        self.step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step


class TokenCounter:
    """Tokens of this session's optimizer steps, from the counts `DFTTrainer.get_batch_samples` keeps.

    Supervised tokens: the sum of the steps' `num_items_in_batch` (already over micro-batches and ranks).
    All tokens: this rank's count, reduced over ranks once in `totals()`.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.start = dict(trainer.tokens_trained)

    def totals(self) -> tuple[int, int]:
        """(supervised tokens, all tokens) over all ranks. Every rank must call it (one all-reduce)."""
        device = self.trainer.args.device
        counts = self.trainer.tokens_trained
        supervised = torch.as_tensor(counts["supervised"]) - torch.as_tensor(self.start["supervised"])
        local = torch.as_tensor(counts["local_total"], device=device, dtype=torch.int64).reshape(1)
        local = local - torch.as_tensor(self.start["local_total"], device=device, dtype=torch.int64)
        if self.trainer.accelerator.num_processes > 1:
            local = self.trainer.accelerator.reduce(local, reduction="sum")
        return int(supervised.item()), int(local.item())


# ---- summary ---------------------------------------------------------------------------------------
def peak_memory() -> dict[str, Any]:
    """Peak memory of this process: GPU (allocated and reserved by torch) when on GPU, and the RSS peak."""
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_gib = rss / 2**30 if sys.platform == "darwin" else rss / 2**20
    memory: dict[str, Any] = {"process_rss_peak_gib": round(rss_gib, 3)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        memory["device"] = f"cuda:{torch.cuda.current_device()}"
        memory["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        memory["gpu_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        memory["peak_gib"] = memory["gpu_peak_allocated_gib"]
    else:
        memory["device"] = "cpu"
        memory["peak_gib"] = memory["process_rss_peak_gib"]
    return memory


def train_log_entries(log_history: list[dict]) -> list[dict]:
    return [entry for entry in log_history if "loss" in entry and "step" in entry]


def best_eval_metrics(log_history: list[dict]) -> dict[str, dict[str, float]]:
    """For each eval metric, its best value over the run and the step it was reached at."""
    best: dict[str, dict[str, float]] = {}
    goals = dict(EVAL_GOALS)
    # Per-file generation accuracy and pass@k (names depend on the run): higher is better.
    for entry in log_history:
        goals.update({key: max for key in entry if EVAL_GEN_HIGHER_IS_BETTER.fullmatch(key)})
    for name, goal in goals.items():
        points = [(entry[name], entry.get("step", 0)) for entry in log_history if isinstance(entry.get(name), (int, float))]
        if points:
            value, step = goal(points, key=lambda point: point[0])
            best[name] = {"value": value, "step": step}
    return best


def summarize_run(
    log_history: list[dict],
    *,
    run_name: str,
    output_dir: str,
    wall_seconds: float,
    train_seconds: float | None,
    global_step: int,
    steps_this_session: int,
    supervised_tokens: int,
    total_tokens: int,
    memory: dict[str, Any],
    train_loss: float | None = None,
) -> dict[str, Any]:
    """The run's record for the console and run_summary.json (pure: everything comes in as arguments)."""
    train_logs = train_log_entries(log_history)
    seconds = train_seconds if train_seconds else wall_seconds
    summary: dict[str, Any] = {
        "run_name": run_name,
        "model_path": os.path.abspath(output_dir),
        "output_dir": output_dir,
        "wall_seconds": round(wall_seconds, 1),
        "train_seconds": round(seconds, 3),
        "steps": global_step,
        "steps_this_session": steps_this_session,
        "supervised_tokens": supervised_tokens,
        "total_tokens": total_tokens,
        "tokens_per_second": round(total_tokens / seconds, 1) if seconds > 0 else None,
        "supervised_tokens_per_second": round(supervised_tokens / seconds, 1) if seconds > 0 else None,
        "peak_memory": memory,
        "train_loss": train_loss,
        "final_train_metrics": {},
        "best_eval_metrics": best_eval_metrics(log_history),
    }
    if train_logs:
        last = train_logs[-1]
        summary["final_train_metrics"] = {key: last[key] for key in ("step", "epoch", *TRAIN_METRICS) if key in last}
        # Kept flat for scripts that compare the start and the end of a run.
        for key in ("loss", "avg_p_correct", "ce_loss", "token_accuracy"):
            if key in last:
                summary[f"first_{key}"] = train_logs[0][key]
                summary[f"last_{key}"] = last[key]
    return summary


def summary_lines(summary: dict[str, Any], summary_path: str | None = None) -> list[str]:
    """Human-readable summary for the console / train.log; numbers to 4 significant digits (DFT losses are
    small: 0.0001 is not 0.0000). Ends with where the model, `summary_path` (run_summary.json) and the
    summary's "training_curves" are."""
    memory = summary["peak_memory"]
    lines = [
        f"run {summary['run_name']}: {summary['steps']} steps in {format_duration(summary['wall_seconds'])} "
        f"(training {summary['train_seconds']:.1f} s)",
        f"tokens: {summary['total_tokens']:,} total, {summary['supervised_tokens']:,} supervised; "
        f"{summary['tokens_per_second'] or 0:,.0f} tokens/s, {summary['supervised_tokens_per_second'] or 0:,.0f} supervised tokens/s",
        f"peak memory ({memory['device']}): {memory['peak_gib']:.2f} GiB",
    ]
    final = summary["final_train_metrics"]
    if final:
        shown = ", ".join(f"{k} {final[k]:.4g}" for k in ("loss", "ce_loss", "avg_p_correct", "token_accuracy") if k in final)
        first = ", ".join(f"{k} {summary['first_' + k]:.4g} -> {summary['last_' + k]:.4g}" for k in ("loss", "avg_p_correct") if "first_" + k in summary)
        lines.append(f"final train metrics: {shown}" + (f" ({first})" if first else ""))
    if summary["best_eval_metrics"]:
        lines.append(
            "best eval metrics: "
            + ", ".join(f"{k} {v['value']:.4g} (step {v['step']})" for k, v in summary["best_eval_metrics"].items())
        )
    lines.append(f"model saved to {summary['model_path']}")
    if summary_path:
        lines.append(f"run summary: {os.path.abspath(summary_path)}")
    if summary.get("training_curves"):
        lines.append(f"training curves: {os.path.abspath(summary['training_curves'])}")
    return lines


# ---- the recorder train_dft.run uses -------------------------------------------------------------
class RunRecorder:
    """Ties the pieces to one trainer: `start()` before train(), `finish()` after save_model()."""

    def __init__(self, trainer, run_config: dict, started: float | None = None):
        self.trainer = trainer
        self.run_config = run_config
        self.started = started or time.time()
        self.session = SessionStart()
        self.trackers: list[str] = []
        self.tokens = TokenCounter(trainer)

    @classmethod
    def start(cls, trainer, run_config: dict, started: float | None = None) -> RunRecorder:
        """Writes run_config.json (rank 0), starts the selected trackers, installs the progress lines.

        `started`: when the run began (time.time()), so the wall time includes data and model loading."""
        recorder = cls(trainer, run_config, started)
        args = trainer.args
        if trainer.is_world_process_zero():
            path = os.path.join(args.output_dir, RUN_CONFIG_FILE)
            write_json(path, run_config)
            logger.info("run configuration in %s (git %s)", path, run_config["git_commit"])
        recorder.trackers = start_trackers(trainer, run_config)  # dftune/run/trackers.py's table
        trainer.add_callback(recorder.session)
        return recorder

    def finish(self, train_output=None) -> dict:
        """Saves trainer_state.json, writes the summary and the curves (rank 0), closes the trackers.

        Every rank must call it (the token totals are reduced over ranks)."""
        trainer = self.trainer
        supervised_tokens, total_tokens = self.tokens.totals()
        trainer.save_state()  # OUTPUT_DIR/trainer_state.json: the final log history, for plot_run.py
        metrics = getattr(train_output, "metrics", None) or {}
        summary = summarize_run(
            trainer.state.log_history,
            run_name=self.run_config["run_name"],
            output_dir=trainer.args.output_dir,
            wall_seconds=time.time() - self.started,
            train_seconds=metrics.get("train_runtime"),
            global_step=trainer.state.global_step,
            steps_this_session=trainer.state.global_step - self.session.step,
            supervised_tokens=supervised_tokens,
            total_tokens=total_tokens,
            memory=peak_memory(),
            train_loss=metrics.get("train_loss"),
        )
        if trainer.is_world_process_zero():
            output_dir = trainer.args.output_dir
            dft_alpha = trainer.args.dft_alpha
            curves = RunCurves(run_label(self.run_config["run_name"], dft_alpha, trainer.args.loss_type), trainer.state.log_history,
                               loss_type=trainer.args.loss_type, dft_alpha=dft_alpha)
            summary["training_curves"] = plot_runs([curves], os.path.join(output_dir, CURVES_FILE), f"{curves.label}: training curves")
            summary_path = os.path.join(output_dir, RUN_SUMMARY_FILE)
            write_json(summary_path, summary)
            for line in summary_lines(summary, summary_path):
                logger.info(line)
            close_trackers(self.trackers, summary, _plain(summary))
        return summary
