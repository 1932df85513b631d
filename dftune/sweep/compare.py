"""Sweeps of loss variants x seeds with the same data, budget and evaluation (dft-compare).

Each run is its own launch of `train_dft.py` (plain python, `scripts/train.sh`, torchrun or the
deepspeed launcher), so a sweep works wherever one run does, and a crash in one run cannot take the
others down. The sweep's root holds one folder per run (`<variant>-seed<N>`), `base/` (the starting
model evaluated once with dft-eval), `compare.json` and `compare.png`.

Everything the table shows is read back from the runs' own files (trainer_state.json,
run_summary.json), so re-running the command on a half-finished sweep only launches what is missing:
a run folder with run_summary.json is finished and not redone, one with a checkpoint resumes. Both only
when the run was made by the same command (model, data, flags, loss defaults: its compare_definition.json,
sweep/definition.py); otherwise the sweep stops before any launch, or with `overwrite` redoes that run.

Variants and the plan are pure functions here; the processes (process groups, stop, exit reasons) are
in sweep/launch.py, reading runs back, mean/std and the table in sweep/results.py, the
figure in sweep/plot.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dftune.paths import checkout_file, train_script
from dftune.sweep.definition import DEFINITION_FILE, changes, read_definition, run_definition, write_definition
from dftune.sweep.grid import (
    SETTING_SEPARATOR,
    accuracy_key,
    file_keys,
    grid_settings,
    select,
    setting_flags,
    setting_label,
    significance,
)
from dftune.sweep.launch import (  # noqa: F401  (Launches, exit_reason: part of this module's interface)
    LAUNCHES,
    Launches,
    exit_reason,
    free_port,
    launch,
    lock_holders,
    read_tail,
)
from dftune.sweep.results import (
    ACCURACY,
    RUN_STATUS_FILE,
    RUN_SUMMARY_FILE,
    RunResult,
    aggregate,
    markdown_table,
    mean_curve,
    order_accuracy_keys,
    read_run,
)

LAUNCH_LOG = "compare_launch.log"
BASE_DIR = "base"
BASE_RESULTS_FILE = "eval_results.json"
COMPARE_JSON = "compare.json"
COMPARE_PNG = "compare.png"
COMPARE_MD = "compare.md"
COMPARE_GRID_PNG = "compare_grid.png"
LOCK_FILE = ".compare.lock"
STOPPED = "stopped"


class SweepError(ValueError):
    """A variant, seed list or option the user must fix (one line, exit code 2)."""


# ---- variants ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One arm of the comparison: its name as given on the command line and the train_dft flags it adds."""

    name: str
    flags: tuple[str, ...]
    arm: str = ""  # the variant before a --grid expanded it (its own name when there is no grid)
    setting: tuple[tuple[str, str], ...] = ()  # the grid setting: ((flag, value), ...)

    def __post_init__(self):
        if not self.arm:
            object.__setattr__(self, "arm", self.name)

    @property
    def slug(self) -> str:
        """The name as a folder name (`dft_alpha=0.5` -> `dft_alpha_0.5`)."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name).strip("_")


def parse_variant(spec: str) -> Variant:
    """`sft`, `asft`, `dft_alpha=0.5`, `asft+anchor_kl_coef=0.05` -> train_dft flags.

    A bare word is a loss type (`--loss_type WORD`); `key=value` is `--key value`; `+` joins parts.

    Raises:
        SweepError: an empty part, a malformed FLAG=VALUE or an unknown loss type.
    """
    from dftune.loss.core import LOSS_TYPES  # the loss types train_dft.py accepts

    flags: list[str] = []
    for part in spec.split("+"):
        part = part.strip()
        if not part:
            raise SweepError(f"--variants {spec!r}: empty part; write e.g. `asft+anchor_kl_coef=0.05`.")
        if "=" in part:
            key, _, value = part.partition("=")
            key = key.strip().lstrip("-")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or value.strip() == "":
                raise SweepError(f"--variants {spec!r}: {part!r} is not FLAG=VALUE (a train_dft.py flag without the dashes).")
            flags += [f"--{key}", value.strip()]
        elif part in LOSS_TYPES:
            flags += ["--loss_type", part]
        else:
            raise SweepError(f"--variants {part!r}: unknown loss type; use one of {', '.join(LOSS_TYPES)} or FLAG=VALUE.")
    return Variant(name=spec, flags=tuple(flags))


def parse_variants(specs: list[str]) -> list[Variant]:
    """Raises SweepError on a bad spec or two variants with the same folder name."""
    if not specs:
        raise SweepError("--variants: give at least one, e.g. `--variants sft dft asft`.")
    variants = [parse_variant(spec) for spec in specs]
    slugs = [v.slug for v in variants]
    duplicates = sorted({s for s in slugs if slugs.count(s) > 1})
    if duplicates:
        raise SweepError(f"--variants: {', '.join(duplicates)} given twice (or two variants map to the same folder name).")
    return variants


# ---- the plan -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One training run of the sweep."""

    variant: Variant
    seed: int
    output_dir: str

    @property
    def name(self) -> str:
        return f"{self.variant.slug}-seed{self.seed}"


def plan_runs(variants: list[Variant], seeds: list[int], root: str) -> list[RunSpec]:
    """Seed-major order (every variant at seed 0, then seed 1, ...): a sweep stopped half-way has a
    comparable set of runs."""
    return [
        RunSpec(variant, seed, os.path.join(root, f"{variant.slug}-seed{seed}")) for seed in seeds for variant in variants
    ]


def run_is_finished(output_dir: str) -> bool:
    """train_dft.py writes run_summary.json last, after the model: its presence means the run completed."""
    return os.path.isfile(os.path.join(output_dir, RUN_SUMMARY_FILE))


def has_checkpoint(output_dir: str) -> bool:
    return os.path.isdir(output_dir) and any(re.fullmatch(r"checkpoint-\d+", n) for n in os.listdir(output_dir))


def run_flags(spec: RunSpec, train_flags: list[str], model: str) -> list[str]:
    """The train_dft.py flags of one run (what defines it, and where it goes)."""
    return [
        "--model_name_or_path", model, *train_flags, *spec.variant.flags,
        "--seed", str(spec.seed), "--output_dir", spec.output_dir, "--run_name", spec.name,
    ]


def run_command(spec: RunSpec, train_flags: list[str], launcher: str, model: str) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment of one run.

    launcher: `python` (this interpreter runs train_dft.py), `train.sh` (scripts/train.sh: its GPU /
    DeepSpeed / NUM_PROCS logic; settings from the environment), or a launcher prefix such as
    `torchrun --nproc_per_node 2` or `deepspeed --num_gpus 8` put before train_dft.py.
    """
    flags = run_flags(spec, train_flags, model)
    if has_checkpoint(spec.output_dir):
        flags += ["--resume_from_checkpoint", "latest"]
    env = {}
    if launcher == "python":
        command = [sys.executable, train_script()]
    elif launcher == "train.sh":
        train_sh = checkout_file("scripts", "train.sh")
        if train_sh is None:
            raise SweepError("--launcher train.sh needs the repository checkout (scripts/train.sh); "
                             "use --launcher python or a torchrun/deepspeed prefix with an installed package")
        command = ["bash", train_sh]
        # A folder as an absolute path: train.sh adds its demo settings (learning rate, epochs, evaluation)
        # when MODEL is literally the bundled `assets/tiny-qwen2`, and a sweep's runs must be the same
        # whichever launcher starts them.
        local = os.path.abspath(model) if os.path.isdir(model) else model
        env = {"MODEL": local, "OUTPUT_DIR": spec.output_dir, "PYTHON": sys.executable}
    else:
        prefix = shlex.split(launcher)
        if os.path.basename(prefix[0]) == "deepspeed" and not any(p.startswith("--master_port") for p in prefix):
            # Its default port is 29500 for every run: two at once (--parallel) would collide (EADDRINUSE).
            # torchrun picks a free one itself on one machine, train.sh too.
            prefix += ["--master_port", str(free_port())]
        command = [*prefix, train_script()]
    return command + flags, env


# ---- the sweep's lock (the launches themselves: sweep/launch.py) ----------------------------------
def lock_sweep(output_dir: str) -> int:
    """Locks the sweep's root for this compare.py and every run it launches (they inherit the lock), so a
    second compare.py on the same root, or a rerun while a run of a killed compare.py (SIGKILL, a lost
    terminal) is still training there, stops with one line instead of two processes writing one run.
    Returns the lock's file descriptor (released when every holder has exited).

    Raises:
        SweepError: the lock is held.
    """
    path = os.path.join(output_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pids = lock_holders(path)
        held = f"held by pid {', '.join(map(str, pids))}" if pids else "held"
        stop = f"`kill {' '.join(map(str, pids))}` (a run saves a checkpoint and stops)" if pids else "stop it"
        raise SweepError(
            f"--output_dir {output_dir}: another compare.py, or a run it launched, is still running there "
            f"(the lock {path} is {held}); wait for it to finish or {stop}, then run the command again."
        ) from None
    os.set_inheritable(fd, False)  # only the launches it is given to (pass_fds) hold it
    return fd


# ---- the sweep --------------------------------------------------------------------------------------------------
@dataclass
class SweepConfig:
    """Everything a sweep needs; dft-compare builds it from the command line or a YAML file."""

    model_name_or_path: str
    output_dir: str
    variants: list[Variant]
    seeds: list[int]
    train_flags: list[str]
    launcher: str = "python"
    base_eval_flags: list[str] | None = None  # None: no base-model evaluation
    parallel: int = 1  # runs launched at once (CPU sweeps of small models; one at a time on GPUs)
    command_line: str = ""
    overwrite: bool = False  # redo the runs (and base evaluation) that an earlier command made differently
    grids: list[tuple[str, list[str]]] = field(default_factory=list)  # --grid FLAG=V1,V2: `variants` is then expanded
    select_on: list[str] = field(default_factory=list)  # validation generation files the grid setting is chosen on
    baseline: str | None = None  # --baseline: every variant's paired verdict against this one


def expand_grid(variants: list[Variant], grids: list[tuple[str, list[str]]]) -> list[Variant]:
    """Each variant at every grid setting (`dft@learning_rate=5e-4`); the variants themselves without a grid."""
    if not grids:
        return variants
    return [
        Variant(f"{v.name}{SETTING_SEPARATOR}{setting_label(setting)}", v.flags + setting_flags(setting), arm=v.name, setting=setting)
        for v in variants for setting in grid_settings(grids)
    ]


def base_flags(config: SweepConfig) -> list[str]:
    """What defines the base row: the model and the evaluation flags dft-eval gets."""
    return ["--model_name_or_path", config.model_name_or_path, *(config.base_eval_flags or [])]


def check_reuse(config: SweepConfig, plan: list[RunSpec], log: Callable[[str], None]) -> None:
    """Before any launch: every run that would be reused (finished, or resumed from its checkpoint) and the
    base evaluation must have been made by the command given now. Those that were not are removed with
    `config.overwrite` (and so made again), else nothing starts.

    Raises:
        SweepError: a reused run or the base evaluation was made differently (or has no record of how),
            naming the first difference.
    """
    reused = [(f"run {spec.name}", spec.name, spec.output_dir, run_flags(spec, config.train_flags, config.model_name_or_path))
              for spec in plan if run_is_finished(spec.output_dir) or has_checkpoint(spec.output_dir)]
    base_dir = os.path.join(config.output_dir, BASE_DIR)
    if config.base_eval_flags is not None and os.path.isfile(os.path.join(base_dir, BASE_RESULTS_FILE)):
        reused.insert(0, (f"the base model's evaluation ({BASE_DIR}/)", BASE_DIR, base_dir, base_flags(config)))
    stale = []  # (what, its name in the log, folder, why)
    for what, name, folder, flags in reused:
        recorded = read_definition(folder)
        if recorded is None:
            stale.append((what, name, folder, f"has no record of what it was made with ({DEFINITION_FILE}: an older dft-compare made it)"))
        elif differences := changes(recorded, run_definition(flags)):
            stale.append((what, name, folder, f"was made with {'; '.join(differences[:3])}"))
    if not stale:
        return
    if not config.overwrite:
        what, _, _, why = stale[0]
        more = len(stale) - 1
        others = f" ({more} more {'differs' if more == 1 else 'differ'} too)" if more else ""
        raise SweepError(f"--output_dir {config.output_dir}: {what} {why}{others}; "
                         "use a new --output_dir, or --overwrite to redo the changed runs.")
    for _, name, folder, why in stale:
        log(f"{name}: {why.removeprefix('was ')}; made again from the start (--overwrite)")
        shutil.rmtree(folder)


def evaluate_base(config: SweepConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """The starting model scored once by dft-eval (dftune/cli/evaluate.py) into OUTPUT_DIR/base/eval_results.json (reused
    when already there)."""
    base_dir = os.path.join(config.output_dir, BASE_DIR)
    results_path = os.path.join(base_dir, BASE_RESULTS_FILE)
    if not os.path.isfile(results_path):
        write_definition(base_dir, run_definition(base_flags(config)))
        command = [sys.executable, "-m", "dftune.cli.evaluate", "--model_name_or_path", config.model_name_or_path, *config.base_eval_flags, "--output_dir", base_dir]
        log(f"evaluating the base model: {shlex.join(command)}")
        code, _ = launch(command, {}, os.path.join(base_dir, LAUNCH_LOG))
        if LAUNCHES.stop_signal is not None:
            return {"status": STOPPED, "reason": stop_reason(code)}
        if code != 0 or not os.path.isfile(results_path):
            return {"status": "failed", "reason": exit_reason(code, read_tail(os.path.join(base_dir, LAUNCH_LOG)))}
    with open(results_path, encoding="utf-8") as f:
        results = json.load(f)
    metrics = results.get("metrics", results)
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"status": "ok", "output_dir": base_dir, "metrics": numbers}


def execute_run(spec: RunSpec, config: SweepConfig, prefix: str, log: Callable[[str], None]) -> RunResult:
    """One run: skipped when finished, else launched; a failure becomes a RunResult with its exit reason,
    a run the sweep's stop interrupted (or never started) one with status `stopped`."""
    if run_is_finished(spec.output_dir):
        log(f"{prefix}: finished before, not redone")
        return read_run(spec.output_dir, spec.variant.name, spec.seed)
    if LAUNCHES.stop_signal is not None:
        return RunResult(spec.variant.name, spec.seed, spec.output_dir, STOPPED, stop_reason(None))
    if os.path.isdir(spec.output_dir) and not has_checkpoint(spec.output_dir):
        # A run that died before its first checkpoint: start it again from nothing (keeping its log).
        kept_log = read_tail(os.path.join(spec.output_dir, LAUNCH_LOG))
        shutil.rmtree(spec.output_dir)
        os.makedirs(spec.output_dir)
        if kept_log:
            with open(os.path.join(spec.output_dir, LAUNCH_LOG), "w", encoding="utf-8") as f:
                f.write(kept_log)
    if not has_checkpoint(spec.output_dir):  # a fresh start; a resumed run was checked by check_reuse
        write_definition(spec.output_dir, run_definition(run_flags(spec, config.train_flags, config.model_name_or_path)))
    command, env = run_command(spec, config.train_flags, config.launcher, config.model_name_or_path)
    log(f"{prefix}: {shlex.join(command)}")
    log_path = os.path.join(spec.output_dir, LAUNCH_LOG)
    sessions = earlier_sessions(spec.output_dir)  # the launches before this resume: the run's wall time is all of them
    code, seconds = launch(command, env, log_path)
    sessions.append(round(seconds, 1))
    seconds = sum(sessions)
    if LAUNCHES.stop_signal is not None and not run_is_finished(spec.output_dir):
        reason = stop_reason(code)
        result = read_run(spec.output_dir, spec.variant.name, spec.seed, STOPPED, reason, round(seconds, 1))
        log(f"{prefix}: {reason}")
    elif code == 0 and run_is_finished(spec.output_dir):
        result = read_run(spec.output_dir, spec.variant.name, spec.seed, wall_seconds=round(seconds, 1))
        accuracy = result.final.get(ACCURACY)
        log(f"{prefix}: ok in {seconds:.0f} s" + (f", final {ACCURACY} {accuracy:.3f}" if accuracy is not None else ""))
    else:
        reason = exit_reason(code, read_tail(log_path)) if code != 0 else "exit 0 but no run_summary.json"
        result = read_run(spec.output_dir, spec.variant.name, spec.seed, "failed", reason, round(seconds, 1))
        log(f"{prefix}: FAILED ({reason}); log: {log_path}")
    with open(os.path.join(spec.output_dir, RUN_STATUS_FILE), "w", encoding="utf-8") as f:
        json.dump({"status": result.status, "reason": result.reason, "seconds": round(seconds, 1), "sessions": sessions}, f, indent=2)
    return result


def earlier_sessions(output_dir: str) -> list[float]:
    """The seconds of each earlier launch of a run that resumes from its checkpoint ([] for a fresh start)."""
    path = os.path.join(output_dir, RUN_STATUS_FILE)
    if not has_checkpoint(output_dir) or not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            status = json.load(f)
        return [float(s) for s in status.get("sessions", [status["seconds"]])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def stop_reason(code: int | None) -> str:
    name = signal.Signals(LAUNCHES.stop_signal).name
    how = "not started" if code is None else f"passed on as SIGTERM, {exit_reason(code, '').split(':')[0]}"
    return f"stopped by {name} to compare.py ({how}); run the same command again to resume"


def run_sweep(config: SweepConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Launches every run that is not finished (`config.parallel` at a time), then writes compare.json and
    compare.png and returns the compare record. A failed run is recorded with its exit reason and the
    sweep goes on. A SIGTERM or SIGINT stops the sweep: the running runs get SIGTERM (they save a
    checkpoint and exit), no other starts, and the record has `stopped` set to the signal's number.

    Raises:
        SweepError: another compare.py, or a run launched by one, is still running in the sweep's root; a
            finished or interrupted run (or the base evaluation) was made by another command (`check_reuse`).
    """
    from concurrent.futures import ThreadPoolExecutor

    os.makedirs(config.output_dir, exist_ok=True)
    lock_fd = lock_sweep(config.output_dir)
    LAUNCHES.stop_signal, LAUNCHES.inherited_fds = None, (lock_fd,)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, lambda signum, _: LAUNCHES.stop(signum)) for s in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    try:
        started = time.time()
        plan = plan_runs(config.variants, config.seeds, config.output_dir)
        check_reuse(config, plan, log)
        base = evaluate_base(config, log) if config.base_eval_flags is not None else None
        prefixes = [f"[{index}/{len(plan)}] {spec.name}" for index, spec in enumerate(plan, 1)]
        # Threads only wait on subprocesses; results keep the plan's order.
        with ThreadPoolExecutor(max_workers=max(1, config.parallel)) as pool:
            results = list(pool.map(lambda item: execute_run(item[0], config, item[1], log), zip(plan, prefixes)))
        compare = build_compare(config, results, base, time.time() - started)
        compare["stopped"] = LAUNCHES.stop_signal
        write_compare(compare, config.output_dir)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        LAUNCHES.inherited_fds = ()
        os.close(lock_fd)
    return compare


def build_compare(config: SweepConfig, results: list[RunResult], base: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
    compare = _compare_record(config, results, base, seconds)
    select_stems = file_keys(config.select_on) if config.select_on else []
    if config.grids:
        reported = [k for k in order_accuracy_keys(_accuracy_keys(compare), config.train_flags)
                    if k != ACCURACY and k not in {accuracy_key(stem) for stem in select_stems}]
        compare["grid"] = select(compare["variants"], config.variants, [accuracy_key(stem) for stem in select_stems], reported)
        compare["select_on"] = list(config.select_on)
        compare["select_keys"] = [accuracy_key(stem) for stem in select_stems]
        compare["grid_variants"], compare["grid_curves"] = compare["variants"], compare["curves"]
        compare["variants"], compare["curves"] = {}, {}
        for arm, entry in compare["grid"].items():
            if entry["selected"] is not None:
                label = f"{arm} ({setting_label(tuple(entry['setting'].items()))})"
                compare["variants"][label] = {**compare["grid_variants"][entry["selected"]], "variant": entry["selected"], "arm": arm,
                                              "setting": entry["setting"]}
                compare["curves"][label] = compare["grid_curves"][entry["selected"]]
    if config.baseline:
        compare["significance"] = significance(compare, config.baseline, compare["runs"], set(select_stems))
    return compare


def _accuracy_keys(compare: dict[str, Any]) -> list[str]:
    keys: list[str] = []
    for row in compare["variants"].values():
        keys += [k for k in row["final"] if k.endswith("_accuracy") and k not in keys]
    return keys


def _compare_record(config: SweepConfig, results: list[RunResult], base: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
    names = [v.name for v in config.variants]
    curves: dict[str, dict[str, Any]] = {}
    for name in names:
        ok = [r for r in results if r.variant == name and r.status == "ok"]
        keys = []
        for r in ok:
            keys += [k for k in r.curves if k not in keys]
        curves[name] = {k: mean_curve([r.curves[k] for r in ok if k in r.curves]) for k in keys}
    return {
        "model_name_or_path": config.model_name_or_path,
        "output_dir": os.path.abspath(config.output_dir),
        "command": config.command_line,
        "launcher": config.launcher,
        "parallel": config.parallel,
        "seeds": config.seeds,
        "train_flags": config.train_flags,
        "variant_flags": {v.name: list(v.flags) for v in config.variants},
        "std": "sample standard deviation over seeds (n - 1)",
        "sweep_seconds_this_session": round(seconds, 1),
        "base": base,
        "variants": aggregate(results, names),
        "curves": curves,
        "runs": [r.__dict__ for r in results],
    }


def write_compare(compare: dict[str, Any], output_dir: str) -> None:
    """compare.json and compare.png (the figure is skipped, with a note, when no run has curves)."""
    from dftune.sweep.plot import plot_compare, plot_grid

    png = os.path.join(output_dir, COMPARE_PNG)
    compare["figure"] = plot_compare(compare, png)
    if compare.get("grid"):
        compare["grid_figure"] = plot_grid(compare, os.path.join(output_dir, COMPARE_GRID_PNG))
    with open(os.path.join(output_dir, COMPARE_MD), "w", encoding="utf-8") as f:
        f.write(markdown_table(compare))
    with open(os.path.join(output_dir, COMPARE_JSON), "w", encoding="utf-8") as f:
        json.dump(compare, f, indent=2)
