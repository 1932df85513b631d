"""Did DFT beat SFT, fairly? The small task of experiment_small.py, with each loss at its own learning rate
and the strength of the base's prior as an axis.

    python scripts/experiment_prior.py                     # outputs/experiment_prior (about an hour on 2 cores)
    python scripts/experiment_prior.py --only_base 4800    # one base's sweep (run several at once), then
    python scripts/experiment_prior.py                     # ... again: reuses every finished run, writes the summary
    python scripts/experiment_prior.py --smoke             # the pipeline at toy sizes (the tests run it)

For every base (the same task, pre-trained from scratch for `--base_steps` steps: a weak, a medium and a
strong prior), a dft-compare sweep runs every variant at every `--grid` learning rate and seed. Each
variant's rate is chosen on a validation split of held-out problems (`val`, never reported); the table
reports the `id`, `bignum`, `3step` and `retention` splits at the chosen rates, and every variant is tested
against SFT prompt by prompt (paired bootstrap interval, exact McNemar p: dftune/sweep/significance.py).
arXiv 2510.00526 argues that probability-weighted objectives such as DFT help when the prior is strong and
hurt when it is weak: the question is whether the DFT - SFT difference changes sign along the axis.

Fine-tuning is experiment_small.py's (150 steps of batch 16, cosine, fp32) but evaluated once, at the end.
Writes OUTPUT_DIR/base<N>/ (one sweep each: compare.json, compare.md, compare_grid.png), OUTPUT_DIR/prior.json,
prior.md and prior.png (the difference to SFT with its interval, per split, against the base's steps).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import replace

import experiment_small as small

from dftune.sweep.compare import SweepConfig, SweepError, expand_grid, parse_variants, run_sweep
from dftune.sweep.grid import parse_grids
from dftune.sweep.results import format_table

DEFAULT_BASE_STEPS = (300, 1200, 4800)
DEFAULT_GRID = "learning_rate=2e-4,5e-4,1.5e-3"
SMOKE_BASE_STEPS = (5, 10)
SMOKE_GRID = "learning_rate=1e-3,3e-3"
REPORTED = ("id", "bignum", "3step", "retention")


def validation_split(splits: dict[str, list[dict]], count: int, data_seed: int) -> list[dict]:
    """Held-out two-step problems like `id` (numbers never trained on), none of them an `id` prompt: what
    chooses each variant's learning rate. Its own random stream, so the other splits stay experiment_small's."""
    rng = random.Random(data_seed + 1_000_003)
    taken = {json.dumps(record["messages"]) for record in splits["id"]}
    records = []
    while len(records) < count:
        start = rng.randint(1, 10)
        moves = small.random_moves(rng, start, 2, 1, small.TRAIN_AMOUNT)
        if not small.held_out((start, *moves)):
            continue
        question, _, final = small.word_problem(rng, start, moves)
        record = small.generation_record(question, final)
        if json.dumps(record["messages"]) not in taken:
            taken.add(json.dumps(record["messages"]))
            records.append(record)
    return records


def sweep_flags(preset: small.Preset, paths: dict[str, str]) -> list[str]:
    """experiment_small's flags, evaluated once at the end, the learning rate left to the grid."""
    flags = small.train_flags(preset, paths)
    drop = {"--learning_rate": 1, "--eval_strategy": 1, "--eval_steps": 1, "--eval_on_start": 1}
    kept, index = [], 0
    while index < len(flags):
        if flags[index] in drop:
            index += 1 + drop[flags[index]]
            continue
        kept.append(flags[index])
        index += 1
    return kept + ["--eval_strategy", "no"]


def run_base(steps: int, args, preset: small.Preset, paths: dict[str, str], splits: dict, grids) -> dict:
    """One base's sweep (its base model pre-trained first when missing)."""
    root = os.path.join(args.output_dir, f"base{steps}")
    base_model = os.path.join(root, "base_model")
    if not os.path.isfile(os.path.join(base_model, "model.safetensors")):
        seconds = small.build_base_model(replace(preset, pretrain_steps=steps), splits["pretrain"], base_model)
        with open(os.path.join(root, "pretrain_seconds.json"), "w", encoding="utf-8") as f:
            json.dump({"pretrain_steps": steps, "seconds": round(seconds, 1)}, f)
    variants = parse_variants(args.variants or ["sft", "dft"])
    config = SweepConfig(
        model_name_or_path=base_model, output_dir=root, variants=expand_grid(variants, grids),
        seeds=list(range(args.seeds if args.seeds is not None else (1 if args.smoke else 3))),
        train_flags=_with_val(sweep_flags(preset, paths), paths["val"]),
        parallel=args.parallel, base_eval_flags=small.base_eval_flags(preset, paths),
        command_line=" ".join(["python", "scripts/experiment_prior.py", *sys.argv[1:]]), overwrite=args.overwrite,
        grids=grids, select_on=[paths["val"]], baseline="sft",
    )
    compare = run_sweep(config)
    print(format_table(compare), flush=True)
    return compare


def _with_val(flags: list[str], val: str) -> list[str]:
    """flags with the validation file appended to --eval_generation_files (every run scores it too)."""
    index = flags.index("--eval_generation_files") + 1
    while index < len(flags) and not flags[index].startswith("--"):
        index += 1
    return flags[:index] + [val] + flags[index:]


def summarise(compares: dict[int, dict], output_dir: str) -> dict:
    """prior.json / prior.md / prior.png: per base, the chosen rates, the reported accuracies and the verdicts."""
    summary: dict = {"bases": {}}
    lines = ["| base steps | variant (chosen rate) | " + " | ".join(f"acc[{s}]" for s in REPORTED) + " |",
             "| ---: | --- | " + " | ".join("---:" for _ in REPORTED) + " |"]
    for steps, compare in sorted(compares.items()):
        base_metrics = (compare.get("base") or {}).get("metrics", {})
        lines.append(f"| {steps} | base (before fine-tuning) | "
                     + " | ".join(_cell({"mean": base_metrics.get(f"eval_gen_{s}_accuracy"), "std": None}) for s in REPORTED) + " |")
        for label, row in compare["variants"].items():
            lines.append(f"| {steps} | {label} | " + " | ".join(_cell(row["final"].get(f"eval_gen_{s}_accuracy")) for s in REPORTED) + " |")
        significance = compare.get("significance") or {}
        summary["bases"][steps] = {
            "chosen": {arm: entry.get("setting") for arm, entry in compare.get("grid", {}).items()},
            "grid": compare.get("grid"), "variants": compare["variants"], "base": base_metrics,
            "verdicts": significance.get("comparisons", {}), "lines": significance.get("lines", []),
        }
    lines.append("")
    for steps, entry in sorted(summary["bases"].items()):
        lines += [f"- base {steps} steps: {line}" for line in entry["lines"]]
    with open(os.path.join(output_dir, "prior.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(output_dir, "prior.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    summary["figure"] = plot_prior(summary, os.path.join(output_dir, "prior.png"))
    print("\n".join(lines))
    return summary


def _cell(stats: dict | None) -> str:
    if not stats or stats.get("mean") is None:
        return "-"
    return f"{stats['mean']:.3f}" + (f" ± {stats['std']:.3f}" if stats.get("std") else "")


def plot_prior(summary: dict, path: str) -> str | None:
    """Each variant's difference to SFT with its bootstrap interval, per reported split, against base steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(summary["bases"])
    arms = sorted({arm for entry in summary["bases"].values() for arm in entry["verdicts"]})
    if not steps or not arms:
        return None
    figure, axes = plt.subplots(1, len(REPORTED), figsize=(4 * len(REPORTED), 3.6), dpi=110, squeeze=False, sharey=True)
    for ax, split in zip(axes[0], REPORTED):
        for offset, arm in enumerate(arms):
            xs, ys, lows, highs = [], [], [], []
            for n in steps:
                result = summary["bases"][n]["verdicts"].get(arm, {}).get(split)
                if result:
                    xs.append(n * (1 + 0.06 * offset))
                    ys.append(result["difference"])
                    lows.append(result["difference"] - result["low"])
                    highs.append(result["high"] - result["difference"])
            ax.errorbar(xs, ys, yerr=[lows, highs], fmt="-o", capsize=4, label=f"{arm} - sft")
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(steps, [str(n) for n in steps])
        ax.set_title(f"{split}")
        ax.set_xlabel("base pre-training steps")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy difference to SFT (95% CI)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(arms), frameon=False)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=None, help="default outputs/experiment_prior (_smoke with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks the pipeline, not the result")
    parser.add_argument("--base_steps", type=int, nargs="+", default=None, help="pre-training steps of each base (default 300 1200 4800)")
    parser.add_argument("--only_base", type=int, default=None, help="run only this base's sweep (several invocations at once)")
    parser.add_argument("--grid", default=None, help=f"as dft-compare --grid (default {DEFAULT_GRID})")
    parser.add_argument("--variants", nargs="+", default=None, help="default: sft dft")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (smoke: 1)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once within a base's sweep (default 2)")
    parser.add_argument("--data_seed", type=int, default=0, help="seed of the generated task data")
    parser.add_argument("--overwrite", action="store_true", help="as in dft-compare")
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir or ("outputs/experiment_prior_smoke" if args.smoke else "outputs/experiment_prior")
    preset = small.SMOKE if args.smoke else small.FULL
    base_steps = args.only_base and [args.only_base] or args.base_steps or list(SMOKE_BASE_STEPS if args.smoke else DEFAULT_BASE_STEPS)
    started = time.time()
    try:
        grids = parse_grids([args.grid or (SMOKE_GRID if args.smoke else DEFAULT_GRID)], SweepError)
        splits = small.build_task(preset, args.data_seed)
        splits["val"] = validation_split(splits, preset.eval_examples, args.data_seed)
        paths = small.write_task(splits, os.path.join(args.output_dir, "data"))
        compares = {steps: run_base(steps, args, preset, paths, splits, grids) for steps in base_steps}
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if args.only_base is not None:
        return {"bases": compares}
    summary = summarise(compares, args.output_dir)
    print(f"wrote {os.path.join(args.output_dir, 'prior.md')}, prior.json, prior.png in {math.ceil(time.time() - started)} s")
    return summary


if __name__ == "__main__":
    main()
