#!/usr/bin/env bash
# The small experiment (SFT vs DFT vs ASFT x 3 seeds on generated arithmetic word problems, 2-core CPU):
#   bash scripts/experiment_small.sh                 # writes outputs/experiment_small/{compare.json,compare.png}
#   bash scripts/experiment_small.sh --smoke         # the pipeline only, in well under a minute
# Arguments go to scripts/experiment_small.py (see its --help); running it again resumes the sweep.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny models: one thread per process is fastest on a small CPU
exec "${PYTHON:-python}" scripts/experiment_small.py "$@"
