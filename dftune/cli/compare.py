"""Compare SFT, DFT and its variants on your task: every variant x seed with the same data, budget and evaluation.

    dft-compare --model_name_or_path M --output_dir sweeps/mine \\
        --variants sft dft asft dft_alpha=0.5 --seeds 3 \\
        --data_files train.jsonl --eval_generation_files test.jsonl --eval_answer_match math \\
        --max_steps 500 --eval_strategy steps --eval_steps 100 [any other train_dft.py flag]
    dft-compare sweep.yaml           # the same from one YAML/JSON file (see README)
    dft-compare --preset small       # the shipped small experiment (scripts/experiment_small.py)

A variant is a loss type (`sft`, `dft`, `asft`, `eaft` -> `--loss_type X`), a `FLAG=VALUE`
(`dft_alpha=0.5` -> `--dft_alpha 0.5`), or parts joined by `+` (`asft+anchor_kl_coef=0.05`).
Every run is its own launch (`--launcher python`, `train.sh`, or a prefix such as
`"torchrun --nproc_per_node 2"` / `"deepspeed --num_gpus 8"`), in OUTPUT_DIR/<variant>-seed<N>/.
Running the same command again resumes: finished runs (run_summary.json present) are not redone, and
interrupted ones continue from their checkpoint, when made by the same command (model, data, flags);
with other flags or changed data it stops with one line (exit 2) unless --overwrite redoes those runs.
The base model is scored once with dft-eval (OUTPUT_DIR/base/). Writes OUTPUT_DIR/compare.json
and compare.png and prints the table. Exit code 0 when every run finished, 1 when some failed
(they are in the table with their exit reason), 2 for bad options. SIGTERM or Ctrl-C: the running runs
save a checkpoint and stop, no other starts, the table so far is written (exit 143 / 130); rerun to resume.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys

from dftune.paths import checkout_file
from dftune.sweep.compare import SweepConfig, SweepError, expand_grid, parse_variants, run_sweep
from dftune.sweep.definition import flag_values
from dftune.sweep.grid import check_files, parse_grids
from dftune.sweep.results import format_table

# train_dft.py flags that dft-eval takes too: the base model is scored with the same evaluation.
EVAL_FLAGS = (
    "--eval_generation_files", "--eval_data_files", "--eval_answer_match", "--eval_generation_max_new_tokens",
    "--eval_generation_samples", "--eval_generation_temperature", "--eval_generation_batch_size",
    "--eval_generation_max_prompts", "--max_length", "--per_device_eval_batch_size",
    "--torch_dtype", "--attn_implementation", "--trust_remote_code", "--seed",
)
OWN_KEYS = (
    "model_name_or_path", "output_dir", "variants", "seeds", "seed_list", "launcher", "parallel", "no_base_eval", "overwrite",
    "grid", "select_on", "baseline", "train_args",
)
SWITCHES = ("no_base_eval", "overwrite")  # compare options without a value (`overwrite: true` in a sweep file)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="Other flags go to every run's train_dft.py.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--seed` or `--output` are train_dft flags (or mistakes), never our options shortened
    )
    parser.add_argument("--model_name_or_path", required=True, help="the starting model of every run (and the base row)")
    parser.add_argument("--output_dir", required=True, help="the sweep's root: one sub-folder per run, compare.json, compare.png")
    parser.add_argument("--variants", nargs="+", required=True, help="e.g. sft dft asft dft_alpha=0.5 asft+anchor_kl_coef=0.05")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds: 0 .. N-1 (default 3)")
    parser.add_argument("--seed_list", type=int, nargs="+", default=None, help="explicit seeds instead of --seeds")
    parser.add_argument(
        "--launcher", default="python",
        help="python (default), train.sh (scripts/train.sh and its environment variables), or a launcher prefix "
        "such as 'torchrun --nproc_per_node 2' or 'deepspeed --num_gpus 8'",
    )
    parser.add_argument(
        "--parallel", type=int, default=1,
        help="runs at once (default 1). 2 on a 2-core CPU with OMP_NUM_THREADS=1 and a tiny model; keep 1 when each "
        "run uses every GPU. tokens/s is then per run, with the machine shared",
    )
    parser.add_argument("--no_base_eval", action="store_true", help="skip scoring the base model with dft-eval")
    parser.add_argument(
        "--grid", nargs="+", default=None, metavar="FLAG=V1,V2",
        help="run every variant at every value of a train_dft flag, e.g. learning_rate=1e-4,5e-4,2e-3 (several grids "
        "multiply); each variant's setting is chosen on --select_on, the table reports it there",
    )
    parser.add_argument(
        "--select_on", nargs="+", default=None, metavar="FILE",
        help="validation generation files (as --eval_generation_files takes) that choose each variant's grid setting; "
        "never among the reported --eval_generation_files",
    )
    parser.add_argument(
        "--baseline", default=None,
        help="a variant every other one is tested against, per reported generation file: accuracy difference, paired "
        "bootstrap 95%% interval over prompts, exact McNemar p-value and a verdict line",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="redo the runs (and the base evaluation) that an earlier dft-compare in OUTPUT_DIR made with another model, "
        "data or flags: their folders are deleted. Without it such a rerun stops before launching anything; runs made "
        "by the same command are reused either way",
    )
    return parser


def flags_from_mapping(mapping: dict) -> list[str]:
    """{"max_steps": 100, "data_files": ["a", "b"], "bf16": True} -> --max_steps 100 --data_files a b --bf16 True."""
    flags: list[str] = []
    for key, value in mapping.items():
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        flags += [f"--{key}", *[str(v) for v in values]]
    return flags


def read_config_file(path: str) -> list[str]:
    """A YAML/JSON sweep file as command-line arguments: the compare options at the top level, train_dft
    flags under `train_args` (or at the top level too)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        raise SweepError(f"{path}: cannot read the sweep file ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise SweepError(f"{path}: a sweep file is a mapping (model_name_or_path, output_dir, variants, seeds, train_args).")
    train_args = config.pop("train_args", None) or {}
    if not isinstance(train_args, dict):
        raise SweepError(f"{path}: train_args must be a mapping of train_dft.py flags to values.")
    own = {k: config.pop(k) for k in list(config) if k in OWN_KEYS}
    if isinstance(own.get("grid"), dict):  # grid: {learning_rate: [1e-4, 5e-4]} -> --grid learning_rate=1e-4,5e-4
        own["grid"] = [f"{key}={','.join(str(v) for v in (values if isinstance(values, list) else [values]))}" for key, values in own["grid"].items()]
    argv = flags_from_mapping({k: v for k, v in own.items() if k not in SWITCHES})
    argv += [f"--{k}" for k in SWITCHES if own.get(k)]
    return argv + flags_from_mapping({**config, **train_args})


def pick_flags(flags: list[str], names: tuple[str, ...]) -> list[str]:
    """The named flags with their values (everything up to the next --flag), in order."""
    picked, keep = [], False
    for token in flags:
        if token.startswith("--"):
            keep = token.split("=", 1)[0] in names
        if keep:
            picked.append(token)
    return picked


def parse(argv: list[str]) -> SweepConfig:
    """Raises SweepError on bad options; argparse exits 2 itself for a missing required one."""
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = read_config_file(argv[0])
    args, train_flags = build_parser().parse_known_args(argv)
    for flag in ("--seed", "--output_dir", "--run_name", "--model_name_or_path"):
        if flag in train_flags:
            raise SweepError(f"{flag} is set by the sweep for each run; use --seeds/--seed_list and the sweep's --output_dir.")
    seeds = args.seed_list if args.seed_list else list(range(args.seeds))
    if args.parallel < 1:
        raise SweepError(f"--parallel must be >= 1, got {args.parallel}.")
    if not seeds or len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds/--seed_list: give at least one seed, each once (got {seeds}).")
    variants = parse_variants(args.variants)
    grids = parse_grids(args.grid, SweepError)
    reported = flag_values(train_flags).get("--eval_generation_files", [])
    if grids and not args.select_on:
        raise SweepError("--grid needs --select_on VALIDATION_FILE...: the setting of each variant is chosen on prompts that are not reported.")
    if args.select_on:
        if not reported:
            raise SweepError("--select_on needs --eval_generation_files: the files the table reports.")
        check_files(args.select_on, reported, SweepError)
        train_flags = add_generation_files(train_flags, args.select_on)
    if args.baseline is not None and args.baseline not in [v.name for v in variants]:
        raise SweepError(f"--baseline {args.baseline}: not one of --variants ({', '.join(v.name for v in variants)}).")
    if args.baseline is not None and not reported:
        raise SweepError("--baseline compares generation results: give --eval_generation_files.")
    expanded = expand_grid(variants, grids)
    slugs = [v.slug for v in expanded]
    if len(set(slugs)) != len(slugs):  # two settings in one folder: one's run would be reused as the other's
        same = sorted({v.name for v in expanded if slugs.count(v.slug) > 1})
        raise SweepError(f"--grid: {' and '.join(same)} would share a run folder; write the values differently.")
    eval_flags = pick_flags(train_flags, EVAL_FLAGS)
    has_eval = any(f in eval_flags for f in ("--eval_generation_files", "--eval_data_files"))
    return SweepConfig(
        model_name_or_path=args.model_name_or_path,
        output_dir=args.output_dir,
        variants=expanded,
        seeds=seeds,
        train_flags=train_flags,
        launcher=args.launcher,
        parallel=args.parallel,
        base_eval_flags=eval_flags if has_eval and not args.no_base_eval else None,
        command_line=shlex.join([sys.argv[0], *argv]),
        overwrite=args.overwrite,
        grids=grids,
        select_on=list(args.select_on or []),
        baseline=args.baseline,
    )


def add_generation_files(train_flags: list[str], files: list[str]) -> list[str]:
    """train_flags with `files` appended to --eval_generation_files (every run also scores the validation files)."""
    flags, index = list(train_flags), train_flags.index("--eval_generation_files") + 1
    while index < len(flags) and not flags[index].startswith("--"):
        index += 1
    return flags[:index] + list(files) + flags[index:]


def run_preset_small(argv: list[str]) -> dict:
    """`--preset small`: the shipped experiment, scripts/experiment_small.py of the repository checkout."""
    import importlib.util

    script = checkout_file("scripts", "experiment_small.py")
    if script is None:
        print("error: --preset small runs scripts/experiment_small.py, which is in the repository checkout only",
              file=sys.stderr)
        sys.exit(2)
    module = None
    # It builds its base model with scripts/make_tiny_model.py, which it imports by name (as when run).
    for name in ("make_tiny_model", "experiment_small"):
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(script), f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module.main(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["--preset", "small"]:
        return run_preset_small(argv[2:])
    try:
        config = parse(argv)
        compare = run_sweep(config)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(format_table(compare))
    print(f"wrote {os.path.join(config.output_dir, 'compare.json')}" + (f" and {compare['figure']}" if compare.get("figure") else ""))
    if compare.get("stopped"):
        name = signal.Signals(compare["stopped"]).name
        print(f"compare.py: stopped by {name}, passed on to the runs in progress as SIGTERM (a run that is training saves "
              "a checkpoint first). Run the same command "
              "again to resume (finished runs are kept)", file=sys.stderr)
        sys.exit(128 + compare["stopped"])
    failed = sum(len(row["failed"]) for row in compare["variants"].values())
    if failed:
        print(f"{failed} run(s) failed; run the same command again to retry them (finished runs are kept)", file=sys.stderr)
        sys.exit(1)
    return compare


def cli() -> None:
    """The `dft-compare` console script: exit 0 when every run finished (main exits non-zero otherwise)."""
    main()

if __name__ == "__main__":
    cli()
