#!/usr/bin/env bash
# Makes a Python environment ready for the project (what `make` runs before every target):
#   1. with a VENV_DIR argument and no environment there yet, creates it (python -m venv);
#   2. unless torch is already importable: installs torch==TORCH_VERSION for this machine, the CUDA build
#      from PyPI when an NVIDIA GPU is visible (nvidia-smi), else the CPU build (TORCH_CPU_INDEX);
#   3. installs requirements.txt, then the project itself editable (pip install -e .: the dftune package and
#      the console scripts dft-train, dft-eval, dft-compare, dft-inspect; no script needs sys.path tricks).
# Steps 2-3 are skipped when the environment's stamp (sys.prefix/.dft-trainer-requirements) holds the
# sha256 of requirements.txt, pyproject.toml and this script: a second call installs nothing, a changed
# requirements.txt reinstalls. The stamp lives in the environment, so a recreated one installs again.
#
#   bash scripts/setup_env.sh .venv/bin/python .venv     # make's default: the project-local .venv
#   bash scripts/setup_env.sh /opt/conda/bin/python      # an existing environment (PYTHON=... make ...)
#
# Variables: TORCH_VERSION [2.13.0]  TORCH_CPU_INDEX [https://download.pytorch.org/whl/cpu]
#            BASE_PYTHON [python3; creates the venv]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${1:?usage: setup_env.sh PYTHON [VENV_DIR]}"
VENV_DIR="${2:-}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
BASE_PYTHON="${BASE_PYTHON:-python3}"
PIP=(-m pip install --quiet --progress-bar off)

if [ -n "$VENV_DIR" ] && [ ! -x "$VENV_DIR/bin/python" ]; then
  echo "setup: creating $VENV_DIR ($("$BASE_PYTHON" --version 2>&1))"
  "$BASE_PYTHON" -m venv "$VENV_DIR"
fi
if ! "$PY" -c 'import sys' 2>/dev/null; then
  echo "setup: $PY is not a working Python (set PYTHON=/path/to/python, or remove it to use .venv)" >&2
  exit 2
fi

WANT="$(cat requirements.txt pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)"
STAMP="$("$PY" -c 'import os, sys; print(os.path.join(sys.prefix, ".dft-trainer-requirements"))')"
if [ "$(cat "$STAMP" 2>/dev/null || true)" = "$WANT" ]; then
  exit 0  # installed by an earlier call, requirements.txt unchanged
fi

started=$SECONDS
if "$PY" -c 'import torch' 2>/dev/null; then
  echo "setup: torch $("$PY" -c 'import torch; print(torch.__version__)') is already installed in $("$PY" -c 'import sys; print(sys.prefix)')"
elif nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  echo "setup: installing torch==$TORCH_VERSION (CUDA build: an NVIDIA GPU is visible)"
  "$PY" "${PIP[@]}" "torch==$TORCH_VERSION"
else
  echo "setup: installing torch==$TORCH_VERSION (CPU build: no NVIDIA GPU visible)"
  # torch alone from the CPU index, then its dependencies from the usual index (the CPU index is
  # asked about one package only: where it cannot be reached, that costs seconds, not minutes).
  if ! "$PY" "${PIP[@]}" --no-deps "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"; then
    echo "setup: $TORCH_CPU_INDEX did not answer; installing the default torch build instead"
  fi
  "$PY" "${PIP[@]}" "torch==$TORCH_VERSION"
fi
echo "setup: installing requirements.txt"
"$PY" "${PIP[@]}" -r requirements.txt
echo "setup: installing the project (editable: dftune and its console scripts)"
# --no-deps: requirements.txt above brought them (pyproject.toml names the same lower bounds);
# --no-build-isolation: setuptools of the environment, no download of a build environment.
"$PY" "${PIP[@]}" --no-deps --no-build-isolation -e .
if ! echo "$WANT" > "$STAMP" 2>/dev/null; then
  echo "setup: cannot write $STAMP; the next call checks the requirements again"
fi
echo "setup: environment ready in $((SECONDS - started)) s"
