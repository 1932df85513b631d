"""Overlay the training curves of one or more runs (SFT against DFT, alpha 0.5 against 1.0).

    python scripts/plot_run.py outputs/sft outputs/dft [--out comparison.png] [--title "SFT vs DFT"]

Each RUN_DIR is a training output_dir: its trainer_state.json (or the newest checkpoint-N/'s) gives the
curves, run_config.json the run name and dft_alpha for the legend. Headless (matplotlib Agg).
Exit code 2 with one line when a RUN_DIR holds no trainer_state.json.
"""

from __future__ import annotations

import argparse
import sys

from dftune.run.plots import load_run_curves, plot_runs


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training output directories")
    parser.add_argument("--out", default="comparison.png", help="PNG to write (default: comparison.png)")
    parser.add_argument("--title", default=None, help="figure title (default: the run labels)")
    parser.add_argument("--dpi", type=int, default=100, help="resolution; the figure is 15 x 8.4 inches (default: 100)")
    args = parser.parse_args(argv)
    try:
        runs = [load_run_curves(run_dir) for run_dir in args.run_dirs]
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    title = args.title or " vs ".join(run.label for run in runs)
    out = plot_runs(runs, args.out, title, dpi=args.dpi)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
